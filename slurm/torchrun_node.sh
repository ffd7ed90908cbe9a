#!/bin/bash
# One per node in LAUNCH_MODE=torchrun (see launch.sh), inside the container:
#   bash slurm/torchrun_node.sh torchrun --nnodes=... tools/pretrain_vlm.py ...
# Runs the given torchrun command so that slurm's stop signals (SIGUSR1 time-limit warning,
# SIGTERM) reach the training workers, which checkpoint and exit 0, and not torchrun itself:
# torch < 2.9's torchrun dies of SIGUSR1, orphaning the workers mid-save, and any torchrun
# turns SIGTERM into "kill the workers after 30 s" and a failed exit.
#   - torchrun starts with both signals ignored and is told not to handle SIGTERM
#     (TORCHELASTIC_SIGNALS_TO_HANDLE, default "SIGTERM,SIGINT,SIGHUP,SIGQUIT"). The ignore is
#     inherited by the workers, whose trainer installs its own handlers
#     (megavlm.platform.signals), so they still react.
#   - this shell relays both signals to torchrun's children, in case slurm signals only the
#     task itself rather than every process of the step.
set -u
(( $# )) || { echo "usage: $0 torchrun [args...]" >&2; exit 2; }

export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
( trap '' USR1 TERM; exec "$@" ) &
agent=$!
trap 'pkill -USR1 -P "$agent" || true' USR1
trap 'pkill -TERM -P "$agent" || true' TERM
while :; do
    rc=0
    wait "$agent" || rc=$?
    kill -0 "$agent" 2>/dev/null || break
done
exit "$rc"
