"""Find this process's place in a distributed job and start the process group.

The same training script must run under ``torchrun`` and directly under slurm ``srun``
with one task per GPU, so the launcher is detected from the environment instead of being
configured by hand. A process with neither is a single-process run.

``RANK`` alone does not identify torchrun: enroot's ``50-slurm-pytorch`` hook (NGC images
under pyxis) exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in every srun task, and a login shell may carry stale ones into a job. So
torchrun is recognized by variables only its agent sets (``TORCHELASTIC_RUN_ID``,
``LOCAL_WORLD_SIZE``), then slurm by ``SLURM_PROCID``; generic variables that are present
too must agree with slurm's, and the error names the pair that does not.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

# Set by torchrun's agent and not by the pyxis hook: these mean "torchrun started us".
_TORCHRUN_OWN = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")
# generic variable -> the slurm variable it must equal when both are set (srun mode)
_GENERIC_TO_SLURM = (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"), ("LOCAL_RANK", "SLURM_LOCALID"))
# A single process binds any free port: two single-process tools on one machine (two
# tools/generate.py, a test running two at once) must not clash on a fixed default.
_SINGLE_PROCESS_PORT = 0
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 10000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; ``launcher`` is "torchrun", "slurm" or "single"."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand slurm hostlist syntax, e.g. ``node[01-03,07]`` -> node01, node02, node03, node07.

    Several bracket groups in one name expand to their cartesian product, leftmost
    group varying slowest, as slurm does. Zero padding of a range start is kept.
    """
    # Parsed by hand because `scontrol show hostnames` is not available inside every container.
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist):
        if not pattern:
            raise ValueError(f"malformed slurm nodelist {nodelist!r}: empty host name")
        pieces = re.split(r"(\[[^\]]*\])", pattern)
        choices = [[p] if i % 2 == 0 else _expand_brackets(p[1:-1], nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas outside brackets; commas inside brackets separate ranges."""
    patterns, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"malformed slurm nodelist {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            patterns.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"malformed slurm nodelist {nodelist!r}: unbalanced brackets")
    patterns.append(nodelist[start:])
    return patterns


def _expand_brackets(ranges: str, nodelist: str) -> list[str]:
    values: list[str] = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None:
            raise ValueError(f"malformed slurm nodelist {nodelist!r}: bad range {item!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"malformed slurm nodelist {nodelist!r}: reversed range {item!r}")
        values.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return values


def detect_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables: torchrun first, then slurm, else a single process.

    Under slurm the rendezvous port is derived from ``SLURM_JOB_ID`` so that every task
    of one job picks the same port without talking to each other.
    """
    env = os.environ if environ is None else environ
    # LOCAL_WORLD_SIZE alone counts outside slurm (launchers that mimic torchrun); inside
    # an srun task it may be stale, and is then checked against slurm's instead.
    if "TORCHELASTIC_RUN_ID" in env or ("LOCAL_WORLD_SIZE" in env and "SLURM_PROCID" not in env):
        dist_env = DistEnv(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE"),
            master_addr=_str(env, "MASTER_ADDR"),
            # torchrun --master_port=0 picks a free port and hands workers its own store
            master_port=_port(env, "MASTER_PORT", allow_zero=True),
            launcher="torchrun",
        )
    elif "SLURM_PROCID" in env:
        _check_generic_agrees_with_slurm(env)
        job_id = _int(env, "SLURM_JOB_ID", default=0)
        dist_env = DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_world_size=_slurm_local_world_size(env),
            master_addr=env.get("MASTER_ADDR") or _slurm_first_host(env),
            master_port=_port(env, "MASTER_PORT", default=_SLURM_PORT_BASE + job_id % _SLURM_PORT_SPAN),
            launcher="slurm",
        )
    else:
        stale = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name in env]
        if stale:
            raise ValueError(
                f"{', '.join(f'{n}={env[n]}' for n in stale)} set, but no launcher: neither torchrun "
                f"({' nor '.join(_TORCHRUN_OWN)}) nor srun (SLURM_PROCID). Start with torchrun or srun, "
                f"or unset {' '.join(stale)} (left over in this shell?) for a single-process run"
            )
        dist_env = DistEnv(
            rank=0,
            local_rank=0,
            world_size=1,
            local_world_size=1,
            master_addr="127.0.0.1",
            master_port=_port(env, "MASTER_PORT", default=_SINGLE_PROCESS_PORT, allow_zero=True),
            launcher="single",
        )
    _check_consistent(dist_env)
    return dist_env


def _check_generic_agrees_with_slurm(env: Mapping[str, str]) -> None:
    """Generic rank variables next to slurm's come from the pyxis hook (then they agree) or
    are stale (e.g. exported in the submitting shell); name any pair that disagrees."""
    conflicts = [
        f"{generic}={env[generic]} but {slurm}={env.get(slurm)}"
        for generic, slurm in _GENERIC_TO_SLURM
        if generic in env and slurm in env and env[generic].strip() != env[slurm].strip()
    ]
    if "LOCAL_WORLD_SIZE" in env and env["LOCAL_WORLD_SIZE"].strip() != str(_slurm_local_world_size(env)):
        conflicts.append(f"LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']} but slurm runs "
                         f"{_slurm_local_world_size(env)} task(s) on this node")
    addr = env.get("MASTER_ADDR", "")
    if _is_loopback(addr) and _int(env, "SLURM_JOB_NUM_NODES", default=1) > 1:
        conflicts.append(f"MASTER_ADDR={addr} but the job has SLURM_JOB_NUM_NODES={env['SLURM_JOB_NUM_NODES']} nodes")
    if conflicts:
        raise ValueError(
            f"launcher variables disagree under srun: {'; '.join(conflicts)}. The generic ones are stale "
            "(exported before sbatch/srun?): unset them, or start with torchrun"
        )


def _is_loopback(addr: str) -> bool:
    return addr == "localhost" or addr.startswith("127.") or addr == "::1"


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"{name} is not set; the launcher must export it")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must not be negative")
    return value


def _str(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ValueError(f"{name} is not set; the launcher must export it")
    return value


def _port(env: Mapping[str, str], name: str, default: int | None = None, allow_zero: bool = False) -> int:
    port = _int(env, name, default)
    if not (0 if allow_zero else 1) <= port < 65536:
        raise ValueError(f"{name}={env.get(name)!r} is not a TCP port (1-65535)")
    return port


def _slurm_local_world_size(env: Mapping[str, str]) -> int:
    """Tasks on this node: ``SLURM_NTASKS_PER_NODE`` if plain, else this node's ``SLURM_TASKS_PER_NODE`` entry."""
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    raw = env.get("SLURM_TASKS_PER_NODE")
    if raw is None:
        raise ValueError("neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set; run under srun")
    per_node: list[int] = []
    for entry in raw.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", entry)
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={raw!r} is not of the form '8(x2)' or '4,4'")
        per_node.extend([int(match.group(1))] * int(match.group(2) or 1))
    node_id = _int(env, "SLURM_NODEID", default=0)
    if node_id >= len(per_node):
        raise ValueError(f"SLURM_NODEID={node_id} has no entry in SLURM_TASKS_PER_NODE={raw!r}")
    return per_node[node_id]


def _slurm_first_host(env: Mapping[str, str]) -> str:
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            return expand_slurm_nodelist(env[name])[0]
    raise ValueError("none of MASTER_ADDR, SLURM_JOB_NODELIST, SLURM_NODELIST is set; export MASTER_ADDR")


def _check_consistent(env: DistEnv) -> None:
    if env.rank >= env.world_size:
        raise ValueError(f"rank {env.rank} is not below world size {env.world_size} ({env.launcher} variables)")
    if env.local_rank >= env.local_world_size:
        raise ValueError(
            f"local rank {env.local_rank} is not below local world size {env.local_world_size} "
            f"({env.launcher} variables)"
        )


def init_process_group(env: DistEnv, backend: str, timeout_minutes: float = 30) -> None:
    """Start torch.distributed for ``env``; does nothing if a process group already exists.

    The rendezvous variables are exported too because megatron-core and
    dist_checkpointing read them from ``os.environ`` rather than from the process group.
    """
    import torch  # here, so that the rest of this module loads without torch (slurm helpers)
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=backend,
        # Under torchrun, env:// reuses the agent's rendezvous store (works with port 0).
        init_method="env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
