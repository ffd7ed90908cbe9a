"""Training checkpoints: the model (``megavlm.checkpointing``) plus what resuming exactly needs.

Directories, the marker, ``config.yaml`` and the model weights belong to
``megavlm.checkpointing`` (shared with inference, conversion and RL); this module adds the
optimizer, the train state and the RNG states. Layout of ``<save>/iter_0000020/``:
  - the sharded model and optimizer state (reshardable to another TP/PP/EP on load);
  - ``config.yaml``: the resolved config of the run;
  - ``train_state.pt``: iteration, consumed samples, skipped steps;
  - ``rng/rank_<rank>.pt``: every rank's RNG states (restored only under the same layout);
  - ``complete``: written last, atomically, with the size and sha256 of every other file
    (hashed by all ranks, each its share). A directory without it is an interrupted save
    and is never loaded; a file that differs from it stops the load with its name
    (``checkpoint.fallback`` resumes from the previous complete checkpoint instead).
    ``checkpoint.keep_last`` deletes older checkpoints once a new one is complete. With ``checkpoint.async_save`` the sharded state is written in the
    background (``save_checkpoint_async``) and the marker only once every rank has finished.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megavlm.checkpointing import (
    ASSETS_DIR,
    CheckpointCorruptError,
    checkpoint_dir,
    complete_checkpoints,
    copy_assets,
    mark_complete,
    model_sharded_state_dict,
    require_complete,
    rotate,
    verify_checkpoint,
    write_config,
)
from megavlm.checkpointing.integrity import checkpoint_files, checksums, part
from megavlm.checkpointing.weights import load_model_state
from megavlm.config.schema import Config
from megavlm.platform import device
from megavlm.platform.host_memory import release_freed_memory

# Optimizer state in the layout-independent form, so a checkpoint loads into other layouts.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0  # the data loader's position: the next global sample index
    skipped_steps: int = 0
    # multimodal data: samples seen, then skipped per reason (data.vlm_dataset.BAD_REASONS)
    data_counts: list[float] = field(default_factory=list)
    # what was wrong with the first skipped samples (rank 0's), so a resumed run still names them
    bad_examples: list[str] = field(default_factory=list)


def _optimizer_sharded_state_dict(model, optimizer, *, is_loading: bool) -> dict:
    merged = {k: v for sd in model_sharded_state_dict(model).values() for k, v in sd.items()}
    return {"optimizer": optimizer.sharded_state_dict(merged, is_loading=is_loading, metadata=_OPTIMIZER_METADATA)}


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
        "cuda": torch.cuda.get_rng_state() if device.has_cuda() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.has_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout(cfg: Config) -> dict:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "cp": p.cp, "ep": p.ep, "etp": p.etp,
            "world_size": dist.get_world_size()}


def _prepare_dir(path: Path, rank: int) -> None:
    if rank == 0:
        if path.exists():  # an interrupted save of the same iteration
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()


def _sharded_state_dict(model, optimizer) -> dict:
    state_dict = model_sharded_state_dict(model)
    if optimizer is not None:
        state_dict.update(_optimizer_sharded_state_dict(model, optimizer, is_loading=False))
    return state_dict


def _write_small_files(path: Path, cfg: Config, state: TrainState, rank: int, assets: Path | None) -> None:
    """Every rank's RNG states, then (rank 0) config.yaml, the model's tokenizer/processor
    files (``checkpointing.assets``) and train_state.pt; not the marker."""
    (path / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), path / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        write_config(path, cfg)
        copy_assets(assets, path / ASSETS_DIR)
        torch.save({**asdict(state), "layout": _layout(cfg)}, path / "train_state.pt")


def save_checkpoint(root: str | Path, cfg: Config, state: TrainState, model, optimizer, *,
                    assets: Path | None = None) -> Path:
    """Save collectively; returns the checkpoint directory. Every rank must call it."""
    path = checkpoint_dir(root, state.iteration)
    rank = dist.get_rank()
    _prepare_dir(path, rank)
    dist_checkpointing.save(_sharded_state_dict(model, optimizer), str(path))
    _write_small_files(path, cfg, state, rank, assets)
    _complete(path, state.iteration, cfg.checkpoint.keep_last)
    release_freed_memory()
    return path


def _complete(path: Path, iteration: int, keep_last: int) -> None:
    """Collective last step of a save: every rank hashes its share of the files, rank 0
    writes the marker with all checksums, then applies ``checkpoint.keep_last``."""
    dist.barrier()  # every file written (rank 0's small files included)
    rank, world = dist.get_rank(), dist.get_world_size()
    shares: list = [None] * world
    dist.all_gather_object(shares, checksums(path, part(checkpoint_files(path), rank, world)))
    if rank == 0:
        mark_complete(path, iteration, {k: v for share in shares for k, v in share.items()})
        if keep_last:
            rotate(path.parent, keep_last)
    dist.barrier()


def resume_checkpoint(root: str | Path, *, fallback: bool) -> Path | None:
    """The checkpoint to resume from under ``root`` (collective): the newest complete one
    whose files match their checksums. A damaged one raises CheckpointCorruptError naming
    its files, or, with ``fallback``, is reported and skipped for the one before it."""
    for path in complete_checkpoints(root):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointCorruptError as err:
            if not fallback:
                raise
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"megavlm: {err.path} is damaged ({', '.join(sorted(err.damaged))}); "
                      "checkpoint.fallback=true: trying the previous complete checkpoint", flush=True)
    return None


def save_checkpoint_async(
    root: str | Path, cfg: Config, state: TrainState, model, optimizer, *, assets: Path | None = None
) -> tuple[Path, AsyncRequest]:
    """Start a save whose sharded tensors are written in the background. Every rank must call it.

    What is written before returning: ``common.pt``, the RNG states, ``config.yaml`` and
    ``train_state.pt`` (all small). The returned request writes the sharded model and
    optimizer state when scheduled on an ``AsyncCallsQueue``; its finalize functions, which
    megatron runs on every rank only after all ranks' writes have finished, write the
    tensor metadata and then, last, the ``complete`` marker. A crash before that leaves a
    directory that is never loaded.

    The tensors are captured when the request is scheduled (copied off the GPU, or, on CPU,
    in the forked writer's copy-on-write snapshot), so training may go on right after.
    """
    path = checkpoint_dir(root, state.iteration)
    rank = dist.get_rank()
    _prepare_dir(path, rank)
    request = dist_checkpointing.save(_sharded_state_dict(model, optimizer), str(path), async_sharded_save=True)
    _write_small_files(path, cfg, state, rank, assets)
    iteration, keep_last = state.iteration, cfg.checkpoint.keep_last

    def mark_complete_after_all_ranks():
        _complete(path, iteration, keep_last)
        release_freed_memory()

    request.add_finalize_fn(mark_complete_after_all_ranks)
    return path, request


def load_checkpoint(path: str | Path, cfg: Config, model, optimizer) -> TrainState:
    """Load into the current layout (which may differ from the saved one).

    RNG states are restored only when the layout is unchanged, since they are per rank.
    """
    path = require_complete(path)
    if not (path / "train_state.pt").is_file():
        raise FileNotFoundError(
            f"{path} holds weights only (an imported checkpoint): start from it with checkpoint.pretrained={path}, "
            "not checkpoint.load"
        )
    meta = torch.load(path / "train_state.pt", weights_only=False)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    extra = _optimizer_sharded_state_dict(model, optimizer, is_loading=True) if optimizer is not None else None
    loaded = load_model_state(path, model, extra)
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
        bad_examples=meta.get("bad_examples", []),
    )
