"""``parallel.vision_cp_split``: the vision encoder's media spread over the CP ranks.

Without it every rank of a CP group encodes all images and frames of the micro-batch (they
share the batch), which repeats the ViT work ``cp`` times: at 256K tokens of video that
is most of the step. With it, rank ``r`` encodes a contiguous share of the media blocks
(balanced by patch count), and the features are all-gathered so every rank can scatter the
full set into the whole sequence before splitting it (``megavlm.parallel.context``).

The gradient rule is the point of this module. Every rank's loss depends on *all* gathered
features (through its own share of the sequence), so the gradient of a rank's own features
is the **sum over the CP group** of the gradients of that slice: the gather's backward is an
all-reduce (sum) followed by taking the local slice, i.e. a reduce-scatter. Taking only the
local gradient slice (as a plain ``all_gather`` backward would, or a copy that treats the
gathered tensor as constant) silently drops the other ranks' contributions; Megatron-Bridge
shipped that bug once. DDP then sums the ViT's parameter gradients over DP x CP, which with
megatron's per-token loss gives exactly the single-rank gradient (tested at CP = 2).

Why not ``torch.distributed.nn.all_gather``: gloo needs equal sizes, and the shares differ.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["media_shares", "encode_split_over_cp"]


def media_shares(grid_thw: Tensor, cp_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` block range of each CP rank: contiguous, balanced by patches.

    Block ``i`` goes to the rank whose patch interval ``[r * P / cp, (r + 1) * P / cp)``
    contains the block's first patch (the same on every rank: no communication).
    """
    patches = grid_thw.long().prod(dim=-1).tolist()
    total = sum(patches)
    owner, start = [], 0
    for n in patches:
        owner.append(min(start * cp_size // max(total, 1), cp_size - 1))
        start += n
    shares = []
    for r in range(cp_size):
        mine = [i for i, o in enumerate(owner) if o == r]
        shares.append((mine[0], mine[-1] + 1) if mine else (0, 0))
    return shares


class _GatherFeatures(torch.autograd.Function):
    """Concatenate every rank's ``[n_r, h]`` rows in rank order; backward = reduce-scatter."""

    @staticmethod
    def forward(ctx, local: Tensor, counts: list[int], rank: int, group) -> Tensor:
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        longest = max(counts)
        padded = local.new_zeros(longest, local.shape[1])
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss used every feature
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None, None


def encode_split_over_cp(
    vision: torch.nn.Module, pixels: Tensor, grid_thw: Tensor, group, *, width: int, levels: int
) -> tuple[Tensor, list[Tensor]]:
    """``vision(pixels, grid_thw)`` computed a share per CP rank and gathered (see module doc).

    ``width``: the feature size (the decoder's hidden size); ``levels``: DeepStack levels.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    shares = media_shares(grid_thw.cpu(), cp)
    rows = torch.cat([grid_thw.new_zeros(1), grid_thw.long().prod(dim=-1).cumsum(0)]).tolist()
    first, last = shares[rank]
    if last > first:
        features, deepstack = vision(pixels[rows[first] : rows[last]], grid_thw[first:last])
    else:  # no media for this rank: take part in the gathers (and their backward) with zero rows
        params = list(vision.parameters())
        trainable = any(p.requires_grad for p in params)
        features = torch.zeros(0, width, dtype=params[0].dtype, device=pixels.device, requires_grad=trainable)
        deepstack = [features] * levels
    stacked = torch.cat([features, *deepstack], dim=-1)  # one collective for all levels
    counts = torch.tensor([stacked.shape[0]], device=stacked.device)
    all_counts = [torch.zeros_like(counts) for _ in range(cp)]
    dist.all_gather(all_counts, counts, group=group)
    gathered = _GatherFeatures.apply(stacked, [int(c) for c in all_counts], rank, group)
    pieces = gathered.split(features.shape[-1], dim=-1)
    return pieces[0], list(pieces[1:])
