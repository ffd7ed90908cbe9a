"""One context-parallel (CP) rank's share of a micro-batch.

Every rank of a CP group reads the *same* micro-batch (CP ranks share a data-parallel
rank). Each then keeps ``1 / cp`` of its tokens, chosen by the one partition rule of
:mod:`megavlm.parallel.partition` (Transformer Engine's, zigzag), for everything that is
per token: labels, loss mask, loss weights and position ids. Token *ids* stay whole: the
first pipeline stage embeds the full sequence, scatters the visual features at their
placeholders (which may sit in any rank's share), and only then splits the embeddings and
DeepStack addends with the same partition (``VLMModel``).

Packed rows (``cu_seqlens``) are moved to the padded layout first: each sample is padded
to a multiple of ``2 * cp`` (TE's THD rule) and the row's trailing padding absorbs the
growth, so the row keeps ``data.seq_length`` tokens (pipeline stages exchange fixed-shape
tensors). A row whose samples no longer fit after padding is an error naming the sizes;
the packer reserves that room (``data.packing``'s ``multiple``).

Position ids: MRoPE ids are computed per sample on the full sequence by the data path
(``megavlm.positions``) and split here like the tokens, so rotary frequencies are applied
token by token (no CP slicing in the rotary module). One exception: with Transformer
Engine and packed (THD) input, megatron-core's ``apply_rotary_pos_emb`` slices the
frequencies per sample and CP rank itself (its "exact mapping" branch, the same zigzag rule),
so it receives the ids of the whole padded row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megavlm.parallel.partition import CPPartition, cp_partition, pad_cu_seqlens

__all__ = ["CPShard", "gather_from_cp", "shard_for_cp"]


@dataclass
class CPShard:
    """What one CP rank feeds its model chunk for one micro-batch."""

    tokens: Tensor  # [b, S] ids of the whole (padded-layout) row: the first stage embeds them all
    labels: Tensor  # [b, S / cp]
    loss_mask: Tensor  # [b, S / cp]
    loss_weights: Tensor | None  # [b, S / cp]
    position_ids: Tensor  # [3, b, S / cp] or [b, S / cp] (whole row for TE + packed)
    partition: CPPartition
    packed_seq_params: PackedSeqParams | None


def _move(x: Tensor, src: list[tuple[int, int]], dst_starts: list[int], total: int, dim: int, fill) -> Tensor:
    """Tokens of ``x`` at ``src`` ranges moved to start at ``dst_starts`` along ``dim`` of a
    new tensor of ``total`` tokens filled with ``fill``."""
    shape = list(x.shape)
    shape[dim] = total
    out = x.new_full(shape, fill)
    idx_src = torch.cat([torch.arange(a, e) for a, e in src]) if src else torch.zeros(0, dtype=torch.long)
    idx_dst = torch.cat([torch.arange(d, d + e - a) for (a, e), d in zip(src, dst_starts)]) if src else idx_src
    return out.index_copy(dim, idx_dst.to(x.device), x.index_select(dim, idx_src.to(x.device)))


def _padded_packing(cu_seqlens: Tensor, sample_ids: Tensor | None, total: int, cp: int):
    """(source ranges, padded starts, real cu, padded cu) of a packed row of ``total`` tokens.

    The row's trailing padding segment (tokens with sample id -1) is dropped and rebuilt
    at the end so that the row keeps ``total`` tokens.
    """
    cu = [int(c) for c in cu_seqlens.tolist()]
    segments = list(zip(cu[:-1], cu[1:]))
    if sample_ids is not None and segments:
        last_start = segments[-1][0]
        if int(sample_ids.reshape(-1)[last_start]) < 0:
            segments = segments[:-1]
    real = torch.tensor([0] + [e - a for a, e in segments], dtype=torch.long).cumsum(0)
    padded = pad_cu_seqlens(real, 2 * cp)
    used = int(padded[-1])
    if used > total:
        raise ValueError(
            f"a packed row of {total} tokens holds samples of lengths {[e - a for a, e in segments]}, "
            f"which need {used} tokens once each is padded to a multiple of 2 x parallel.cp = {2 * cp} "
            "(Transformer Engine's THD rule); the packer must reserve that room (data.pack with cp > 1)"
        )
    starts = padded[:-1].tolist()
    if used < total:  # the rebuilt trailing padding: one more segment, all of it "real" to attention
        real = torch.cat([real, real[-1:] + (total - used)])
        padded = torch.cat([padded, padded.new_tensor([total])])
    return segments, starts, real, padded


def shard_for_cp(
    *,
    tokens: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    loss_weights: Tensor | None,
    position_ids: Tensor,
    cu_seqlens: Tensor | None,
    sample_ids: Tensor | None,
    cp_size: int,
    cp_rank: int,
    pad_token_id: int,
    packed_format: str = "sbhd",
) -> CPShard:
    """This rank's share of one micro-batch (see the module docstring).

    ``packed_format``: ``"sbhd"`` for megavlm's ring attention (rotary frequencies applied
    token by token, tensors keep their batch dim), ``"thd"`` for Transformer Engine.
    """
    if packed_format not in ("sbhd", "thd"):
        raise ValueError(f"packed_format must be 'sbhd' or 'thd', got {packed_format!r}")
    total = tokens.shape[1]
    mrope = position_ids.dim() == 3
    pos_dim = 2 if mrope else 1
    params = None
    full_positions = False
    if cu_seqlens is None:
        partition = cp_partition(cp_size, cp_rank, seq_len=total)
    else:
        if tokens.shape[0] != 1:
            raise ValueError(f"packed micro-batches have one row, got {tokens.shape[0]}")
        src, starts, real, padded = _padded_packing(cu_seqlens.cpu(), sample_ids, total, cp_size)

        def move(x: Tensor | None, dim: int, fill) -> Tensor | None:
            return None if x is None else _move(x, src, starts, total, dim, fill)

        tokens = move(tokens, 1, pad_token_id)
        labels = move(labels, 1, 0)
        loss_mask = move(loss_mask, 1, 0)
        loss_weights = move(loss_weights, 1, 0)
        position_ids = move(position_ids, pos_dim, 0)
        partition = cp_partition(cp_size, cp_rank, cu_seqlens_padded=padded)
        dev = tokens.device
        lengths = padded[1:] - padded[:-1]
        params = PackedSeqParams(
            qkv_format=packed_format,
            cu_seqlens_q=real.to(dev, torch.int32), cu_seqlens_kv=real.to(dev, torch.int32),
            cu_seqlens_q_padded=padded.to(dev, torch.int32), cu_seqlens_kv_padded=padded.to(dev, torch.int32),
            max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()),
        )
        full_positions = packed_format == "thd"

    def split(x: Tensor | None, dim: int = 1) -> Tensor | None:
        return None if x is None else x.index_select(dim, partition.indices.to(x.device))

    return CPShard(
        tokens=tokens,
        labels=split(labels),
        loss_mask=split(loss_mask),
        loss_weights=split(loss_weights),
        position_ids=position_ids if full_positions else split(position_ids, pos_dim),
        partition=partition,
        packed_seq_params=params,
    )


def gather_from_cp(local: Tensor, partition: CPPartition, group, dim: int = 1) -> Tensor:
    """The whole sequence of per-token values (``local``: this rank's share, ``partition``'s
    tokens along ``dim``): an all-gather over the CP ``group``, every share put back at its
    rank's positions. The inverse of the split; RL needs whole rows of log-probs and values
    (GAE runs backwards over each response)."""
    shares = [torch.empty_like(local) for _ in range(partition.cp_size)]
    dist.all_gather(shares, local.contiguous(), group=group)
    shape = list(local.shape)
    shape[dim] = int(partition.cu_seqlens_padded[-1])
    whole = local.new_zeros(shape)
    for rank, share in enumerate(shares):
        indices = cp_partition(partition.cp_size, rank, cu_seqlens_padded=partition.cu_seqlens_padded).indices
        whole.index_copy_(dim, indices.to(local.device), share)
    return whole
