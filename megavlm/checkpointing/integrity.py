"""Checksums of a checkpoint's files, kept in its completion marker and verified on load.

The marker (``complete``) is JSON: ``{"iteration": N, "files": {"relative/path": [size,
"sha256"]}}``. It is written last, so it can list every other file of the directory. A
file whose size or digest differs from the marker is damaged (bit rot, a truncated copy, a
half-synced object store); loading it would either fail deep inside torch with an opaque
unpickling error or, worse, load silently wrong weights. An older marker holding only the
iteration (``"20\\n"``) has no checksums and is loaded unverified.

Hashing is split over the ranks of a job (``part``): each reads ``1/world`` of the files,
so a save or a load of a multi-terabyte checkpoint costs every rank about the same.
hashlib has no directory-manifest helper, hence this module.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

COMPLETE_MARKER = "complete"
_CHUNK = 8 << 20  # hashlib releases the GIL on large updates: bigger chunks, fewer calls


class CheckpointCorruptError(RuntimeError):
    """A file of a complete checkpoint differs from the checksum in its marker."""

    def __init__(self, path: Path, damaged: dict[str, str]):
        self.path, self.damaged = Path(path), damaged
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(damaged.items()))
        super().__init__(
            f"checkpoint {path} is damaged: {listed}. Restore the file, or set checkpoint.fallback=true "
            "to resume from the previous complete checkpoint"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(path: Path) -> list[str]:
    """Every file under ``path`` except the marker and temporary files, sorted, relative."""
    path = Path(path)
    return sorted(
        str(p.relative_to(path)) for p in path.rglob("*")
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.endswith(".tmp")
    )


def part(names: list[str], rank: int, world: int) -> list[str]:
    """This rank's share of the files (round robin over the sorted list)."""
    return names[rank::world]


def checksums(path: Path, names: list[str]) -> dict[str, list]:
    """``{name: [size, sha256]}`` for ``names`` under ``path``."""
    path = Path(path)
    return {n: [(path / n).stat().st_size, sha256_file(path / n)] for n in names}


def marker_record(path: Path) -> dict:
    """The marker's content: ``{"iteration": N, "files": {...} or None}`` (None: an old marker)."""
    text = (Path(path) / COMPLETE_MARKER).read_text()
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, int):  # an old marker: just the iteration
        return {"iteration": record, "files": None}
    if not isinstance(record, dict) or "files" not in record:
        raise CheckpointCorruptError(path, {COMPLETE_MARKER: "the marker is not readable"})
    return record


def find_damage(path: Path, names: list[str], listed: dict[str, list]) -> dict[str, str]:
    """``{name: reason}`` for the files among ``names`` that differ from ``listed``."""
    path = Path(path)
    damaged = {}
    for name in names:
        size, digest = listed[name]
        file = path / name
        if not file.is_file():
            damaged[name] = "missing"
        elif file.stat().st_size != size:
            damaged[name] = f"size {file.stat().st_size} bytes, expected {size}"
        elif sha256_file(file) != digest:
            damaged[name] = "sha256 differs from the marker"
    return damaged


def verify(path: Path, rank: int = 0, world: int = 1) -> dict[str, str]:
    """This rank's share of the damage of a complete checkpoint ({} if intact or unverifiable)."""
    listed = marker_record(path)["files"]
    if listed is None:
        return {}
    return find_damage(path, part(sorted(listed), rank, world), listed)


def encode_marker(iteration: int, files: dict[str, list]) -> bytes:
    return (json.dumps({"iteration": iteration, "files": files}, sort_keys=True, indent=0) + "\n").encode()


_verified: set[tuple] = set()  # stat signatures of directories verified in this process


def _signature(path: Path) -> tuple:
    """Cheap identity of a directory's files (names, sizes, mtimes): a rewrite changes it."""
    return (str(path.resolve()),) + tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()
    )


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointCorruptError naming every damaged file of ``path``.

    Collective when torch.distributed is initialized (every rank of the job must call it):
    each rank hashes its share, then all ranks learn the union. A directory whose files
    are unchanged since they were verified in this process is not hashed again (a fallback
    search and the load that follows read the files once).
    """
    import torch.distributed as dist

    path = Path(path)
    key = _signature(path)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        cached: list = [None] * world
        dist.all_gather_object(cached, key in _verified)  # skip only if every rank may (no hang)
        if all(cached):
            return
        shares: list = [None] * world
        dist.all_gather_object(shares, verify(path, dist.get_rank(), world))
        damaged = {k: v for share in shares for k, v in share.items()}
    else:
        if key in _verified:
            return
        damaged = verify(path)
    if damaged:
        raise CheckpointCorruptError(path, damaged)
    _verified.add(key)
