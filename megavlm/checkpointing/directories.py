"""Checkpoint directory layout and the completion marker.

``<root>/iter_0000020/`` holds the sharded state (megatron-core ``dist_checkpointing``),
``config.yaml`` (the resolved config of the run) and, written last and atomically, the
``complete`` marker: a directory without it is an interrupted save and is never loaded.
The marker lists every other file with its size and sha256 (``integrity``), checked on load.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from megavlm.config.loader import dump_yaml, load_config
from megavlm.config.schema import Config
from megavlm.checkpointing.integrity import COMPLETE_MARKER, checkpoint_files, checksums, encode_marker
CONFIG_FILE = "config.yaml"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def require_new_dir(path: str | Path) -> Path:
    """``path`` if writing a new model there loses nothing (absent, or an empty folder)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    return path


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def _iteration_of(d: Path) -> int:
    return int(d.name.split("_")[1])


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, newest first (``[root]`` if it is one)."""
    root = Path(root)
    if is_complete(root):
        return [root]
    if not root.is_dir():
        return []
    complete = [d for d in root.glob("iter_*") if d.name[5:].isdigit() and is_complete(d)]
    return sorted(complete, key=_iteration_of, reverse=True)


def latest_complete(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that has its completion marker, or ``root``
    itself if it is one."""
    found = complete_checkpoints(root)
    return found[0] if found else None


def rotate(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints under ``root``, and the
    interrupted saves older than the oldest kept one; returns what was deleted.

    The marker goes first, so a deletion cut short leaves an incomplete directory (never
    loaded, removed by the next rotation), not a complete-looking one with missing files.
    """
    keep = complete_checkpoints(root)[:keep_last]
    if len(keep) < keep_last or not keep:
        return []
    oldest_kept = _iteration_of(keep[-1])
    deleted = []
    for d in Path(root).glob("iter_*"):
        if d.name[5:].isdigit() and _iteration_of(d) < oldest_kept:
            (d / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(d)
            deleted.append(d)
    return sorted(deleted)


def require_complete(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint, else FileNotFoundError naming it."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete megavlm checkpoint (no '{COMPLETE_MARKER}' marker)")
    return path


def mark_complete(path: str | Path, iteration: int, files: dict[str, list] | None = None) -> None:
    """The last write of a save: from now on the directory is loadable.

    ``files`` are the checksums of every other file (``integrity.checksums``), computed
    here when not given; a multi-rank save passes the union of each rank's share."""
    path = Path(path)
    if files is None:
        files = checksums(path, checkpoint_files(path))
    atomic_write_bytes(path / COMPLETE_MARKER, encode_marker(iteration, files))


def write_config(path: str | Path, cfg: Config) -> None:
    atomic_write_bytes(Path(path) / CONFIG_FILE, dump_yaml(cfg).encode())


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a checkpoint was saved with, plus dotted overrides (not validated)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a megavlm checkpoint directory)")
    return load_config(file, list(overrides))
