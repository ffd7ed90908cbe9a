#!/bin/bash
# One per node in LAUNCH_MODE=torchrun (see launch.sh), inside the container:
#   bash slurm/torchrun_node.sh torchrun --nnodes=... tools/pretrain_vlm.py ...
# Runs the given torchrun command so that slurm's SIGUSR1 (time-limit warning) reaches the
# training workers, which checkpoint and exit 0, and not torchrun itself: torch < 2.9's
# torchrun does not handle SIGUSR1 and would die of it, orphaning the workers mid-save.
#   - torchrun starts with SIGUSR1 ignored. That is inherited by the workers, whose trainer
#     installs its own handler (megavlm.training.loop), so they still react to it.
#   - this shell relays SIGUSR1 to torchrun's children, in case slurm signals only the task
#     itself rather than every process of the step.
set -u
(( $# )) || { echo "usage: $0 torchrun [args...]" >&2; exit 2; }

( trap '' USR1; exec "$@" ) &
agent=$!
trap 'pkill -USR1 -P "$agent" || true' USR1
while :; do
    rc=0
    wait "$agent" || rc=$?
    kill -0 "$agent" 2>/dev/null || break
done
exit "$rc"
