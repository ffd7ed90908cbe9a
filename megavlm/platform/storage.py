"""Is a directory the same on every rank? Checked once at start for ``checkpoint.save``.

In a container job a path that is not bind-mounted from shared storage exists separately
in each node's throwaway container filesystem: a multi-node save then fails on the nodes
that lack rank 0's directory, and a requeued job finds no checkpoint and starts over. A
probe file written by rank 0 and looked for by every rank finds this in a second instead.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import torch.distributed as dist


class StorageNotSharedError(RuntimeError):
    pass


def check_shared_directory(path: str | Path, key: str, *, wait_s: float = 10.0) -> None:
    """Collective: rank 0 creates ``path`` and a probe file in it; every rank must see the
    file within ``wait_s`` (for network filesystems' attribute caches). Raises on every rank,
    naming the ranks, hosts, ``key`` and the mount each rank found the path on."""
    path = Path(path)
    rank = dist.get_rank()
    name = [f".megavlm-probe-{uuid.uuid4().hex}" if rank == 0 else None]
    error = [None]
    if rank == 0:
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / name[0]).write_text(name[0])
        except OSError as e:
            error[0] = f"{key}={path}: rank 0 on {socket.gethostname()} cannot write there: {e}"
    payload = [name[0], error[0]]
    dist.broadcast_object_list(payload, src=0)
    name, error = payload
    if error is not None:
        raise StorageNotSharedError(error)

    probe = path / name
    deadline = time.monotonic() + wait_s
    while not _sees(probe, name) and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = _sees(probe, name)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname(), _mount_of(path)))
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [(r, host, mount) for r, (ok, host, mount) in enumerate(views) if not ok]
    if blind:
        ranks = ", ".join(f"rank {r} on {host} (path on mount {mount})" for r, host, mount in blind[:8])
        more = f" and {len(blind) - 8} more" if len(blind) > 8 else ""
        raise StorageNotSharedError(
            f"{key}={path} is not shared: {ranks}{more} do not see the probe file rank 0 wrote there "
            f"(rank 0 on {views[0][1]}, path on mount {views[0][2]}). Checkpoints must be on storage every "
            "node sees: under pyxis, bind-mount a shared directory at this path (slurm/launch.sh: "
            f"MOUNTS=/lustre/...:{path}), or use a path under one that is mounted."
        )


def _sees(probe: Path, token: str) -> bool:
    try:
        return probe.read_text() == token
    except OSError:
        return False


def _mount_of(path: Path) -> str:
    """'<mount point> (<fs type>)' holding ``path``, from /proc/self/mounts ('?' elsewhere)."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    target = os.path.realpath(existing)
    point, fstype = "?", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and (point == "?" or len(mount) >= len(point)):
                    point, fstype = mount, fields[2]
    except OSError:
        pass
    return f"{point} ({fstype})"
