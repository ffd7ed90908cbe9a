"""Checkpoints: megatron-core ``dist_checkpointing`` plus the state needed to resume exactly.

Layout of ``<save>/iter_0000020/``:
  - the sharded model and optimizer state (reshardable to another TP/PP/EP on load);
  - ``config.yaml``: the resolved config of the run;
  - ``train_state.pt``: iteration, consumed samples, skipped steps;
  - ``rng/rank_<rank>.pt``: every rank's RNG states (restored only under the same layout);
  - ``complete``: written last, atomically. A directory without it is an interrupted save
    and is never loaded.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from megavlm.config.loader import dump_yaml
from megavlm.config.schema import Config

COMPLETE_MARKER = "complete"
# Optimizer state in the layout-independent form, so a checkpoint loads into other layouts.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0  # the data loader's position: the next global sample index
    skipped_steps: int = 0
    # multimodal data: samples seen, then skipped per reason (data.vlm_dataset.BAD_REASONS)
    data_counts: list[float] = field(default_factory=list)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_complete(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that has its completion marker, or ``root``
    itself if it is one."""
    root = Path(root)
    if (root / COMPLETE_MARKER).is_file():
        return root
    if not root.is_dir():
        return None
    complete = [d for d in root.glob("iter_*") if (d / COMPLETE_MARKER).is_file()]
    return max(complete, key=lambda d: int(d.name.split("_")[1]), default=None)


def _sharded_state_dict(model, optimizer, *, is_loading: bool) -> dict:
    model_sd = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(unwrap_model(model))}
    merged = {k: v for sd in model_sd.values() for k, v in sd.items()}
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            merged, is_loading=is_loading, metadata=_OPTIMIZER_METADATA
        )
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer the state tensors that loading fills in place.

    With torch's Adam (no TE/apex), megatron's DistributedOptimizer.state_dict() requires
    each parameter's ``step`` to exist, which happens only after a first step.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer) -> None:
    """megatron's DistributedOptimizer.load_state_dict gives every parameter of torch's Adam
    the *same* ``step`` tensor, which Adam then increments once per parameter per step,
    corrupting bias correction after a resume. Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout(cfg: Config) -> dict:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "cp": p.cp, "ep": p.ep, "etp": p.etp,
            "world_size": dist.get_world_size()}


def save_checkpoint(root: str | Path, cfg: Config, state: TrainState, model, optimizer) -> Path:
    """Save collectively; returns the checkpoint directory. Every rank must call it."""
    path = checkpoint_dir(root, state.iteration)
    rank = dist.get_rank()
    if rank == 0:
        if path.exists():  # an interrupted save of the same iteration
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(model, optimizer, is_loading=False), str(path))
    (path / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), path / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (path / "config.yaml").write_text(dump_yaml(cfg))
        torch.save({**asdict(state), "layout": _layout(cfg)}, path / "train_state.pt")
        _atomic_write_bytes(path / COMPLETE_MARKER, f"{state.iteration}\n".encode())
    dist.barrier()
    return path


def load_checkpoint(path: str | Path, cfg: Config, model, optimizer) -> TrainState:
    """Load into the current layout (which may differ from the saved one).

    RNG states are restored only when the layout is unchanged, since they are per rank.
    """
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete megavlm checkpoint (no '{COMPLETE_MARKER}' marker)")
    meta = torch.load(path / "train_state.pt", weights_only=False)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    loaded = _load_into(path, model, optimizer)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if meta["layout"] == _layout(cfg) and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(
        iteration=meta["iteration"],
        consumed_samples=meta["consumed_samples"],
        skipped_steps=meta["skipped_steps"],
        data_counts=meta.get("data_counts", []),
    )


def _load_into(path: Path, model, optimizer) -> dict:
    loaded = dist_checkpointing.load(_sharded_state_dict(model, optimizer, is_loading=True), str(path))
    for i, chunk in enumerate(unwrap_model(model)):
        chunk.load_state_dict(loaded[f"model{i}"])
    return loaded


def load_model_weights(path: str | Path, model) -> None:
    """Only the model weights of a complete checkpoint, into any layout (inference, RL init)."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete megavlm checkpoint (no '{COMPLETE_MARKER}' marker)")
    _load_into(path, model, None)
