"""Layout-free views of a sharded model: global keys, global shapes, global offsets.

megatron-core's ``sharded_state_dict()`` already describes where every local tensor sits
in the full (unsharded) model, for any TP/PP/VPP/EP layout. We use that one description
for two jobs: initializing weights so that every layout gets the same full model for a
seed, and gathering full parameters or gradients to compare layouts (tests, conversion).
"""

from __future__ import annotations

import hashlib
import itertools
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


# Side of one random draw (rows x columns of a layer's matrix; further axes are drawn whole).
# TP slices are usually multiples of 256 (head_dim 128 x an even number of heads, ffn/tp),
# so a rank rarely draws tile parts it does not keep. Changing it changes every model.
INIT_TILE = 256


def _tile_seed(seed: int, key: str, index: tuple[int, ...], tile: tuple[int, ...]) -> int:
    text = f"{seed}:{key}:{','.join(map(str, index))}:{','.join(map(str, tile))}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _draw(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One tile of N(0, 1) in fp32 on the generator's device (tests record the sizes here)."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


@torch.no_grad()
def initialize_shard(
    shard: Shard, *, seed: int, std: float, num_layers: int, vocab_size: int,
    generators: dict[torch.device, torch.Generator] | None = None,
) -> None:
    """Fill one shard with its part of the layout-free model (see ``initialize_layout_invariant``).

    ``generators`` (one per device, re-seeded for every tile) may be shared between calls.
    """
    p = shard.prepend_axis_num
    layer_shape = shard.global_shape[p:]  # one layer's (one expert's) full tensor
    if len(layer_shape) < 2:
        if shard.key.endswith("bias"):
            shard.data.zero_()
        return  # norm weights, layer scales: as built
    drawn = list(layer_shape)  # the part that gets random values; the rest is zero
    if shard.key.endswith(_VOCAB_KEYS):
        drawn[0] = min(vocab_size, drawn[0])  # padding rows (their count depends on TP)
    scale = std / math.sqrt(2.0 * num_layers) if shard.key.endswith(_SCALED_INIT_KEYS) else std
    index = shard.global_offset[:p]  # layer (and expert) of this shard
    lo = shard.global_offset[p:]
    if len(lo) != shard.data.dim():
        raise ValueError(f"{shard.key}: local shape {tuple(shard.data.shape)} vs global {shard.global_shape}")
    hi = tuple(o + n for o, n in zip(lo, shard.data.shape))
    # Tiles depend only on the layout-free ``drawn`` shape; dims past the second are whole.
    tile = tuple(min(INIT_TILE, n) for n in drawn[:2]) + tuple(drawn[2:])
    if any(h > n for h, n in zip(hi, drawn)):
        shard.data.zero_()
    if any(a >= n for a, n in zip(lo, drawn)):
        return  # only padding rows here
    ranges = [range(a // t, -(-min(b, n) // t)) for a, b, n, t in zip(lo, hi, drawn, tile)]
    if generators is None:
        generators = {}
    device = shard.data.device
    gen = generators.get(device)
    if gen is None:
        gen = generators[device] = torch.Generator(device=device)
    for tile_index in itertools.product(*ranges):
        gen.manual_seed(_tile_seed(seed, shard.key, index, tile_index))
        values = _draw(tile, gen)
        starts = [i * t for i, t in zip(tile_index, tile)]
        ends = [min(s + t, b, n) for s, t, b, n in zip(starts, tile, hi, drawn)]
        begins = [max(s, a) for s, a in zip(starts, lo)]
        src = tuple(slice(b - s, e - s) for b, e, s in zip(begins, ends, starts))
        dst = tuple(slice(b - a, e - a) for b, e, a in zip(begins, ends, lo))
        shard.data[dst].copy_(values[src].mul_(scale))


@torch.no_grad()
def initialize_layout_invariant(
    model_chunks: Iterable[torch.nn.Module], *, seed: int, std: float, num_layers: int, vocab_size: int
) -> None:
    """Re-draw every matrix so that a seed gives one full model under any layout.

    The values of a weight are a function of (seed, global key, layer/expert index, position
    in that layer's tensor) only, never of TP/PP/VPP/EP or of the vocabulary padding (rows
    past ``vocab_size`` are zero). Each rank computes just the slices it holds.

    Why tiles: megatron's sharded keys stack layers (``decoder.layers.mlp.linear_fc1.weight``
    is ``[num_layers, ...]``, experts add a second prepended axis), so drawing the full
    global tensor and slicing it costs every rank O(num_layers) per layer, O(L^2) in all,
    and transient memory of a whole stacked tensor (about 29 GB for qwen3-8b's fc1 in fp32).
    Instead each layer's (expert's) matrix is cut into fixed ``INIT_TILE`` x ``INIT_TILE``
    tiles (leading two dims; further dims whole), every tile drawn from its own generator
    seeded by (seed, key, layer/expert index, tile index). A rank draws only the tiles that
    overlap its slice, on the parameter's device: work is its share of the model plus
    partial tiles at slice edges, and transient memory one tile. Tiles never depend on the
    padded vocabulary (they tile ``vocab_size`` rows), so padding cannot shift real rows.
    The values do depend on the device type (CPU and CUDA generators differ).

    Output projections get megatron's scaled init, std / sqrt(2 * num_layers); biases are
    zero; other vectors (norm weights, layer scales) stay as built.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for shard in iter_shards(model_chunks):
        initialize_shard(
            shard, seed=seed, std=std, num_layers=num_layers, vocab_size=vocab_size, generators=generators
        )


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
