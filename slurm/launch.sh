#!/bin/bash
# Shared body of slurm/{pretrain,sft,ppo}.sbatch: start one megavlm training step on every
# node of the allocation inside the pyxis/enroot container, turn slurm's time-limit warning
# (SIGUSR1, see `#SBATCH --signal`) into "checkpoint, exit, requeue", and print what it did.
#
# The sbatch files set TOOL (and a default CONFIG) and source this file. Everything below
# is an environment variable with a default; see slurm/README.md. Extra arguments of the
# sbatch script are dotted config overrides, e.g. `sbatch slurm/pretrain.sbatch train.iters=10`.
#
#   NODES          nodes to use (default: all of the allocation, SLURM_JOB_NUM_NODES)
#   GPUS_PER_NODE  GPUs (= training processes) per node (default SLURM_GPUS_ON_NODE, else 8)
#   IMAGE          container: squashfs made by `enroot import` (see docker/README.md)
#   CODE_DIR       host checkout mounted over the image's copy at WORKDIR, so edits need no
#                  rebuild (default: the submit directory; CODE_DIR=none runs the image's code)
#   WORKDIR        repository root inside the container (default /opt/megavlm)
#   MOUNTS         extra pyxis mounts, comma-separated SRC:DST[:ro], e.g. data and checkpoints
#   CONFIG         recipe, relative to the repository root (or an absolute container path)
#   OVERRIDES      dotted overrides, space-separated (appended before the script's arguments)
#   LAUNCH_MODE    srun: one task per GPU runs python, ranks come from SLURM_* (default)
#                  torchrun: one task per node runs torchrun with a c10d rendezvous on the head node
#   RDZV_PORT      torchrun rendezvous port on the head node (default 29500)
#   SITE_ENV       file sourced first for the cluster's NCCL/IB settings (default
#                  slurm/site.env in the submit directory, if present; see site.env.example)
#   CONTAINER_ENV  extra variable names whose host values must win over the image's ENV
#                  (pyxis --container-env); NCCL_*, UCX_*, NVTE_*, TORCH_NCCL_* and
#                  CUDA_DEVICE_MAX_CONNECTIONS that are set are always passed this way
#   MAX_RESTARTS   requeue at most this many times (SLURM_RESTART_COUNT; default 100)
#   HOST_PYTHON    python3 with PyYAML on the batch node, to check the recipe's paths
#                  against the mounts (default python3; skipped with a note if it cannot)
#   DRY_RUN=1      print the srun command line instead of running it
set -euo pipefail

die() { echo "megavlm launch: error: $*" >&2; exit 1; }
# Print a command so that it can be pasted into a shell; plain words stay unquoted.
quote() {
    local w q out=()
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$w"); else printf -v q '%q' "$w"; out+=("$q"); fi
    done
    echo "${out[*]}"
}

: "${TOOL:?TOOL is not set; submit one of slurm/*.sbatch instead of launch.sh}"
# The site's network settings first, so that anything below (and the user's own exports,
# which the file should not override: use ${VAR:-default} there) can rely on them.
SITE_ENV=${SITE_ENV:-${SLURM_SUBMIT_DIR:-$PWD}/slurm/site.env}
if [[ -f "$SITE_ENV" ]]; then
    echo "megavlm launch: sourcing site settings $SITE_ENV"
    set -a
    # shellcheck source=/dev/null
    source "$SITE_ENV"
    set +a
fi
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
IMAGE=${IMAGE:-/shared/containers/megavlm.sqsh}
CODE_DIR=${CODE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
WORKDIR=${WORKDIR:-/opt/megavlm}
MOUNTS=${MOUNTS:-}
CONFIG=${CONFIG:?CONFIG is not set}
OVERRIDES=${OVERRIDES:-}
LAUNCH_MODE=${LAUNCH_MODE:-srun}
RDZV_PORT=${RDZV_PORT:-29500}
PYTHON=${PYTHON:-python}
HOST_PYTHON=${HOST_PYTHON:-python3}
MAX_RESTARTS=${MAX_RESTARTS:-100}
RESTARTS=${SLURM_RESTART_COUNT:-0}
CONTAINER_ENV=${CONTAINER_ENV:-}
DRY_RUN=${DRY_RUN:-0}

[[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set: submit with sbatch (or run inside salloc)"
[[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set: submit with sbatch (or run inside salloc)"
[[ -n "$NODES" ]] || die "NODES is not set and SLURM_JOB_NUM_NODES is empty"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "NODES=$NODES is not a positive integer"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE is not a positive integer"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS is not a non-negative integer"
# A squashfs path must be readable here (every node reads the same shared file); anything
# else (e.g. nvcr.io#nvidia/pytorch:25.09-py3) is a registry image that each node pulls.
if [[ "$IMAGE" == /* || "$IMAGE" == ./* || "$IMAGE" == *.sqsh ]]; then
    [[ -f "$IMAGE" && -r "$IMAGE" ]] ||
        die "IMAGE=$IMAGE is not a readable file (make it with enroot import, docker/README.md; chmod a+r for others)"
else
    echo "megavlm launch: note: IMAGE=$IMAGE is not a file: every node will pull it from the registry"
fi

# Check the tool and recipe on the host when the checkout is mounted: a typo should fail
# here, in one line, not as NODES x GPUS_PER_NODE Python tracebacks after the container starts.
if [[ "$CODE_DIR" != none ]]; then
    [[ -d "$CODE_DIR" ]] ||
        die "CODE_DIR=$CODE_DIR is not a directory (set CODE_DIR=none to run the code in the image)"
    [[ -f "$CODE_DIR/$TOOL" ]] ||
        die "$TOOL does not exist in CODE_DIR=$CODE_DIR${TOOL_MISSING_HINT:+: $TOOL_MISSING_HINT}"
    if [[ "$CONFIG" != /* && ! -f "$CODE_DIR/$CONFIG" ]]; then
        die "CONFIG=$CONFIG does not exist in CODE_DIR=$CODE_DIR; pass CONFIG=path/to/recipe.yaml"
    fi
fi

# The head node hosts the rendezvous (torchrun) or the TCP store (srun: megavlm.platform
# reads MASTER_ADDR, else the first host of SLURM_JOB_NODELIST; the port comes from the job id).
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
HEAD=$(head -n1 <<<"$hosts")
[[ -n "$HEAD" ]] || die "no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
num_hosts=$(wc -l <<<"$hosts")
(( NODES <= num_hosts )) || die "NODES=$NODES but the allocation has $num_hosts node(s): $SLURM_JOB_NODELIST"
export MASTER_ADDR=${MASTER_ADDR:-$HEAD}
# megatron-core's TP/SP communication overlap assumes one CUDA work queue (Megatron-LM sets this too).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# NCCL collectives on side streams free their buffers by stream order instead of
# recordStream, which otherwise holds memory until a later sync (Megatron-LM sets this too).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}

mounts=()
[[ "$CODE_DIR" != none ]] && mounts+=("$CODE_DIR:$WORKDIR")
[[ -n "$MOUNTS" ]] && mounts+=("$MOUNTS")
container=(--container-image="$IMAGE" --container-workdir="$WORKDIR" --no-container-mount-home)
if (( ${#mounts[@]} )); then
    container+=(--container-mounts="$(IFS=,; echo "${mounts[*]}")")
fi
# Under pyxis a variable the image sets with ENV keeps the image's value unless it is
# named in --container-env; name every setting meant to reach the training processes.
env_names=$(compgen -e | grep -E '^(NCCL_|UCX_|NVTE_|TORCH_NCCL_|CUDA_DEVICE_MAX_CONNECTIONS$)' || true)
env_names=$(printf '%s\n' $env_names ${CONTAINER_ENV//,/ } | sort -u | paste -sd, -)
[[ -n "$env_names" ]] && container+=(--container-env="$env_names")

# Where the recipe's paths are: inside the container, a path not under a mount is in that
# node's own container filesystem, gone after the job (and not the same on other nodes).
# Host-side mapping of checkpoint.save, for the requeue rule below.
ckpt_host=
map_to_host() {  # container path -> host path through the longest matching mount, or fail
    local path=$1 m src dst best_src= best_dst=
    for m in "${mounts[@]}"; do
        local IFS=,
        for m in $m; do
            src=${m%%:*}; dst=${m#*:}; dst=${dst%%:*}
            if [[ "$path" == "$dst" || "$path" == "${dst%/}/"* ]] && (( ${#dst} > ${#best_dst} )); then
                best_src=$src; best_dst=$dst
            fi
        done
    done
    [[ -n "$best_dst" ]] || return 1
    echo "$best_src${path#"$best_dst"}"
}
check_recipe_paths() {
    local listing key value path host recipe=$CODE_DIR/$CONFIG
    [[ "$CONFIG" != /* ]] || recipe=$(map_to_host "$CONFIG") || {
        echo "megavlm launch: note: CONFIG=$CONFIG is in the image; its paths are not checked against MOUNTS"
        return 0
    }
    listing=$(PYTHONPATH="$CODE_DIR" "$HOST_PYTHON" "$CODE_DIR/slurm/recipe_paths.py" "$recipe" \
              ${overrides[@]+"${overrides[@]}"} "$@" 2>&1) || {
        echo "megavlm launch: note: recipe paths not checked against MOUNTS ($HOST_PYTHON: ${listing##*$'\n'});" \
             "the trainer checks checkpoint.save at start"
        return 0
    }
    while IFS=$'\t' read -r key value; do
        [[ -n "$key" ]] || continue
        path=$value
        [[ "$path" == /* ]] || path="$WORKDIR/$path"
        if host=$(map_to_host "$path"); then
            if [[ "$key" == checkpoint.save ]]; then ckpt_host=$host; fi
        else
            echo "megavlm launch: warning: $key=$value is not under any container mount" \
                 "(${mounts[*]:-none}): it would live in each node's container and be lost; add it to MOUNTS"
        fi
    done <<<"$listing"
    return 0
}

read -r -a overrides <<<"$OVERRIDES"
# (the ${a[@]+...} form keeps bash < 4.4 from calling an empty array unbound under set -u)
train_args=("$TOOL" --config "$CONFIG" ${overrides[@]+"${overrides[@]}"} "$@")
if [[ "$CODE_DIR" != none ]]; then
    check_recipe_paths "$@"
fi

case "$LAUNCH_MODE" in
    srun)
        tasks_per_node=$GPUS_PER_NODE
        worker=("$PYTHON" "${train_args[@]}")
        ;;
    torchrun)
        tasks_per_node=1
        # torchrun_node.sh keeps torchrun alive through SIGUSR1 and hands it to the workers.
        worker=(bash slurm/torchrun_node.sh torchrun
                --nnodes="$NODES" --nproc_per_node="$GPUS_PER_NODE"
                --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"
                "${train_args[@]}")
        ;;
    *) die "LAUNCH_MODE=$LAUNCH_MODE: use srun or torchrun" ;;
esac

# --gpu-bind=none: every task sees all of its node's GPUs and picks its own (local rank);
# --distribution=block:block: consecutive ranks share a node (TP groups stay on NVLink);
# --label: each output line starts with its task number.
step=(srun --nodes="$NODES" --ntasks-per-node="$tasks_per_node" --kill-on-bad-exit=1
      --gpu-bind=none --distribution=block:block --label)
# Without an explicit count every task of the step gets one CPU, which starves data loading.
if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]]; then
    step+=(--cpus-per-task=$(( SLURM_CPUS_ON_NODE / tasks_per_node > 0 ? SLURM_CPUS_ON_NODE / tasks_per_node : 1 )))
fi
step+=("${container[@]}" "${worker[@]}")

echo "megavlm launch: job $SLURM_JOB_ID (restart $RESTARTS of at most $MAX_RESTARTS):" \
     "$NODES node(s) x $GPUS_PER_NODE GPU(s), mode $LAUNCH_MODE, head $HEAD, image $IMAGE"
if [[ "$DRY_RUN" == 1 ]]; then
    quote "${step[@]}"
    exit 0
fi
echo "megavlm launch: $(quote "${step[@]}")"

# Preemption: `#SBATCH --signal=B:USR1@300` sends SIGUSR1 to this batch shell 300 s before the
# time limit. Pass it on to the step (srun forwards it to every task); the trainer finishes
# its step, saves a checkpoint and exits 0; then put the job back in the queue. The requeued
# job resumes because the recipe's checkpoint.load points at its checkpoint.save.
newest_complete() {  # newest iteration with a complete checkpoint under $1 (-1: none, or unknown)
    local marker n best=-1
    [[ -n "$1" ]] || { echo -1; return; }
    for marker in "$1"/iter_*/complete; do
        [[ -f "$marker" ]] || continue
        n=${marker%/complete}; n=$((10#${n##*/iter_}))
        (( n > best )) && best=$n
    done
    echo "$best"
}
start_iter=$(newest_complete "$ckpt_host")

preempted=0
srun_pid=
on_usr1() {
    preempted=1
    echo "megavlm launch: SIGUSR1 at $(date '+%F %T'): asking the training step to checkpoint and stop"
    if [[ -n "$srun_pid" ]]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi
}
trap on_usr1 USR1

"${step[@]}" &
srun_pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting until srun itself exits.
while :; do
    rc=0
    wait "$srun_pid" || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
trap '' USR1  # a late warning must not kill this shell before it reports

# Requeue only what can continue: a clean stop (exit 0 after the signal), or a failed one
# that still left a newer complete checkpoint than the job started from. Anything else
# (a crash while saving, an unwritable checkpoint directory) ends the job as failed instead
# of requeueing it forever; so does reaching MAX_RESTARTS.
if (( ! preempted )); then
    echo "megavlm launch: training step exited with $rc"
    exit "$rc"
fi
end_iter=$(newest_complete "$ckpt_host")
if (( rc == 0 )); then
    why="it stopped cleanly"
elif (( end_iter > start_iter )); then
    why="it failed (exit $rc) but left a newer complete checkpoint (iteration $end_iter, started from $start_iter)"
else
    echo "megavlm launch: training step failed with exit $rc after SIGUSR1 and saved no newer complete" \
         "checkpoint${ckpt_host:+ in $ckpt_host}; not requeueing job $SLURM_JOB_ID"
    exit "$rc"
fi
if (( RESTARTS >= MAX_RESTARTS )); then
    echo "megavlm launch: $why, but job $SLURM_JOB_ID was already requeued $RESTARTS times" \
         "(MAX_RESTARTS=$MAX_RESTARTS); not requeueing: resubmit to continue from the last checkpoint"
    exit 1
fi
echo "megavlm launch: $why after SIGUSR1; requeueing job $SLURM_JOB_ID"
scontrol requeue "$SLURM_JOB_ID"
exit 0
