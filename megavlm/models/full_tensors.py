"""Layout-free views of a sharded model: global keys, global shapes, global offsets.

megatron-core's ``sharded_state_dict()`` already describes where every local tensor sits
in the full (unsharded) model, for any TP/PP/VPP/EP layout. We use that one description
for two jobs: initializing weights so that every layout gets the same full model for a
seed, and gathering full parameters or gradients to compare layouts (tests, conversion).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.utils import unwrap_model

_VOCAB_KEYS = ("word_embeddings.weight", "output_layer.weight")
_SCALED_INIT_KEYS = ("linear_proj.weight", "linear_fc2.weight")


@dataclass(frozen=True)
class Shard:
    key: str
    data: torch.Tensor  # view into the local parameter
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    prepend_axis_num: int

    def slices(self) -> tuple[slice, ...]:
        """Index of this shard in the full tensor (prepended axes hold one entry locally)."""
        local_shape = (1,) * self.prepend_axis_num + tuple(self.data.shape)
        return tuple(slice(o, o + n) for o, n in zip(self.global_offset, local_shape))


def iter_shards(model_chunks: Iterable[torch.nn.Module]) -> Iterator[Shard]:
    """Every ShardedTensor of the model chunks (factories expanded), as ``Shard``."""
    for chunk in unwrap_model(list(model_chunks)):
        for item in nested_values(chunk.sharded_state_dict()):
            built = item.build() if isinstance(item, ShardedTensorFactory) else [item]
            for sh in built:
                if isinstance(sh, ShardedTensor) and sh.flattened_range is None:
                    yield Shard(
                        key=sh.key,
                        data=sh.data,
                        global_shape=tuple(sh.global_shape),
                        global_offset=tuple(sh.global_offset),
                        prepend_axis_num=sh.prepend_axis_num,
                    )


def _key_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def initialize_layout_invariant(
    model_chunks: Iterable[torch.nn.Module], *, seed: int, std: float, num_layers: int, vocab_size: int
) -> None:
    """Re-draw every matrix from a generator seeded by (seed, global key).

    Each rank draws the full tensor and keeps its slice, so TP/PP/VPP/EP layouts and the
    vocabulary padding (which depends on TP) never change the model. Output projections get
    megatron's scaled init, std / sqrt(2 * num_layers); biases are zero; other vectors
    (norm weights) stay as built.
    """
    for shard in iter_shards(model_chunks):
        if len(shard.global_shape) - shard.prepend_axis_num < 2:
            if shard.key.endswith("bias"):
                shard.data.zero_()
            continue
        shape = list(shard.global_shape)
        if shard.key.endswith(_VOCAB_KEYS):
            shape[shard.prepend_axis_num] = vocab_size  # padding rows stay zero
        scale = std / math.sqrt(2.0 * num_layers) if shard.key.endswith(_SCALED_INIT_KEYS) else std
        full = torch.zeros(shard.global_shape, dtype=torch.float32)
        full[tuple(slice(0, n) for n in shape)] = (
            torch.randn(shape, generator=_key_generator(seed, shard.key)) * scale
        )
        shard.data.copy_(full[shard.slices()].reshape(shard.data.shape))


def _grad_view(shard: Shard, params: list[torch.nn.Parameter]) -> torch.Tensor | None:
    """The slice of ``param.main_grad`` (DDP) or ``param.grad`` matching ``shard.data``."""
    ptr = shard.data.untyped_storage().data_ptr()
    offset = shard.data.storage_offset()
    for p in params:
        if p.untyped_storage().data_ptr() == ptr and p.storage_offset() <= offset < p.storage_offset() + p.numel():
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            if grad is None:
                return None
            return grad.as_strided(shard.data.shape, shard.data.stride(), grad.storage_offset() + offset - p.storage_offset())
    raise KeyError(f"no parameter owns sharded tensor {shard.key}")


def gather_full_tensors(
    model_chunks: list[torch.nn.Module], *, grads: bool = False, group=None
) -> dict[str, torch.Tensor]:
    """Assemble full tensors (parameters, or their gradients) from all ranks, on every rank.

    Meant for tests and conversion of small models: everything travels as Python objects.
    """
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    local = []
    for shard in iter_shards(model_chunks):
        tensor = _grad_view(shard, params) if grads else shard.data
        if tensor is not None:
            local.append((shard.key, shard.global_shape, shard.slices(), tensor.detach().float().cpu().clone()))
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    full: dict[str, torch.Tensor] = {}
    for rank_items in gathered:
        for key, shape, slices, tensor in rank_items:
            target = full.setdefault(key, torch.zeros(shape))
            target[slices] = tensor.reshape(target[slices].shape)
    return full


@torch.no_grad()
def load_full_tensors(model_chunks: list[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slices of full tensors (sharded key space) into the model.

    A full tensor smaller than the global shape (the vocabulary before megatron pads it for
    TP) fills the leading part; the padding stays zero. Every shard must be covered.
    """
    for shard in iter_shards(model_chunks):
        if shard.key not in full:
            raise KeyError(f"no weights for {shard.key!r} (shape {shard.global_shape})")
        source = full[shard.key].to(shard.data.dtype)
        if tuple(source.shape) != shard.global_shape:
            padded = torch.zeros(shard.global_shape, dtype=source.dtype)
            padded[tuple(slice(0, n) for n in source.shape)] = source
            source = padded
        shard.data.copy_(source[shard.slices()].reshape(shard.data.shape))
