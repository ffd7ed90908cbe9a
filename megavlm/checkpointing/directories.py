"""Checkpoint directory layout and the completion marker.

``<root>/iter_0000020/`` holds the sharded state (megatron-core ``dist_checkpointing``),
``config.yaml`` (the resolved config of the run) and, written last and atomically, the
``complete`` marker: a directory without it is an interrupted save and is never loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from megavlm.config.loader import dump_yaml, load_config
from megavlm.config.schema import Config

COMPLETE_MARKER = "complete"
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


def latest_complete(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that has its completion marker, or ``root``
    itself if it is one."""
    root = Path(root)
    if is_complete(root):
        return root
    if not root.is_dir():
        return None
    complete = [d for d in root.glob("iter_*") if is_complete(d)]
    return max(complete, key=lambda d: int(d.name.split("_")[1]), default=None)


def require_complete(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint, else FileNotFoundError naming it."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete megavlm checkpoint (no '{COMPLETE_MARKER}' marker)")
    return path


def mark_complete(path: str | Path, iteration: int) -> None:
    """The last write of a save: from now on the directory is loadable."""
    atomic_write_bytes(Path(path) / COMPLETE_MARKER, f"{iteration}\n".encode())


def write_config(path: str | Path, cfg: Config) -> None:
    atomic_write_bytes(Path(path) / CONFIG_FILE, dump_yaml(cfg).encode())


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a checkpoint was saved with, plus dotted overrides (not validated)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a megavlm checkpoint directory)")
    return load_config(file, list(overrides))
