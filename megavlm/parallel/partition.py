"""Which tokens a context-parallel (CP) rank holds: the zigzag split, regular and packed.

One rule for both layouts, Transformer Engine's (REFERENCE 10):

* **regular** (``[b, s]`` batches, every row one sequence): the sequence is viewed as
  ``2 * cp`` equal chunks and rank ``r`` keeps chunks ``r`` and ``2 * cp - 1 - r``, in that
  order. This is ``megatron.core.utils.get_batch_on_this_cp_rank`` (tested to be equal).
  Why two chunks: under a causal mask late tokens attend to more keys than early ones, so
  giving every rank one early and one late chunk balances the attention work.
* **packed / THD** (several samples concatenated, boundaries in ``cu_seqlens``): each
  sample is first padded to a multiple of ``2 * cp`` (``cu_seqlens_padded``), then split
  *per sample* into ``2 * cp`` chunks, zigzag per sample: rank ``r`` holds, for every sample
  in order, that sample's chunk ``r`` followed by its chunk ``2 * cp - 1 - r``. This is
  TE's ``thd_get_partitioned_indices`` (what megatron's ``get_thd_batch_on_this_cp_rank``
  calls, CUDA only). Splitting per sample balances every sample's causal work, and every
  rank holds a piece of every sample, so the ring attention's masks stay per sample.

The regular layout is the packed one with a single sample whose length is already a
multiple of ``2 * cp``; both go through :func:`cp_partition`.

Indices refer to the *padded* packed sequence (length ``cu_seqlens_padded[-1]``); use
:func:`pad_packed` to move real tokens there. Pure torch, no process group needed: any rank
can compute any rank's indices, which the ring attention uses to build its block masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["CPPartition", "cp_partition", "pad_cu_seqlens", "pad_packed", "split_for_cp"]


@dataclass(frozen=True)
class CPPartition:
    """This rank's share of a (possibly packed) sequence.

    Attributes:
        indices: ``[n_local]`` int64 positions, in the padded packed sequence, of the tokens
            this rank holds, in local order (``x_local = x_padded.index_select(dim, indices)``).
        cu_seqlens_padded: ``[n + 1]`` int64 global cumulative padded lengths (every sample a
            multiple of ``2 * cp``); for the regular layout ``[0, s]``.
        cp_size, cp_rank: the split this describes.
    """

    indices: Tensor
    cu_seqlens_padded: Tensor
    cp_size: int
    cp_rank: int

    @property
    def local_cu_seqlens_padded(self) -> Tensor:
        """``[n + 1]`` cumulative per-sample lengths of the local tokens (padded / cp)."""
        return torch.div(self.cu_seqlens_padded, self.cp_size, rounding_mode="floor")


def pad_cu_seqlens(cu_seqlens: Tensor, multiple: int) -> Tensor:
    """Cumulative lengths with every sample rounded up to a multiple of ``multiple``."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long).cpu()
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be [0, ...] non-decreasing, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    padded = (lengths + multiple - 1) // multiple * multiple
    return torch.cat([cu.new_zeros(1), torch.cumsum(padded, 0)])


def cp_partition(
    cp_size: int,
    cp_rank: int,
    *,
    seq_len: Optional[int] = None,
    cu_seqlens: Optional[Tensor] = None,
    cu_seqlens_padded: Optional[Tensor] = None,
) -> CPPartition:
    """The tokens CP rank ``cp_rank`` of ``cp_size`` holds (see the module docstring).

    Give exactly one of:
        seq_len: regular layout; must be a multiple of ``2 * cp_size`` (as megatron requires).
        cu_seqlens: packed layout, ``[n + 1]`` real cumulative lengths; each sample is padded
            to a multiple of ``2 * cp_size``.
        cu_seqlens_padded: packed layout, already padded (each sample a multiple of
            ``2 * cp_size``).
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"bad cp rank {cp_rank} of {cp_size}")
    given = [x is not None for x in (seq_len, cu_seqlens, cu_seqlens_padded)]
    if sum(given) != 1:
        raise ValueError("give exactly one of seq_len, cu_seqlens, cu_seqlens_padded")
    n_chunks = 2 * cp_size
    if seq_len is not None:
        if seq_len % n_chunks:
            raise ValueError(f"sequence length {seq_len} is not a multiple of 2 * cp = {n_chunks}")
        padded = torch.tensor([0, seq_len], dtype=torch.long)
    elif cu_seqlens is not None:
        padded = pad_cu_seqlens(cu_seqlens, n_chunks)
    else:
        padded = torch.as_tensor(cu_seqlens_padded, dtype=torch.long).cpu()
        if bool(((padded[1:] - padded[:-1]) % n_chunks != 0).any()):
            raise ValueError(f"cu_seqlens_padded {padded.tolist()} has a sample not a multiple of {n_chunks}")
    starts = padded[:-1]
    chunk = (padded[1:] - padded[:-1]) // n_chunks  # [n] chunk length of each sample
    # per sample: [start + r*c, start + (r+1)*c) then [start + (2cp-1-r)*c, start + (2cp-r)*c)
    pieces = []
    for s0, c in zip(starts.tolist(), chunk.tolist()):
        if c == 0:
            continue
        first = s0 + cp_rank * c
        second = s0 + (n_chunks - 1 - cp_rank) * c
        pieces += [torch.arange(first, first + c), torch.arange(second, second + c)]
    indices = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return CPPartition(indices=indices, cu_seqlens_padded=padded, cp_size=cp_size, cp_rank=cp_rank)


def split_for_cp(x: Tensor, partition: CPPartition, dim: int = 1) -> Tensor:
    """This rank's tokens of ``x`` (padded layout) along ``dim`` (megatron's batches: dim 1)."""
    if x.shape[dim] != int(partition.cu_seqlens_padded[-1]):
        raise ValueError(
            f"dim {dim} has {x.shape[dim]} tokens, the partition expects {int(partition.cu_seqlens_padded[-1])}"
        )
    return x.index_select(dim, partition.indices.to(x.device))


def pad_packed(
    x: Tensor, cu_seqlens: Tensor, cu_seqlens_padded: Tensor, dim: int = 0, value: float = 0
) -> Tensor:
    """Move packed real tokens (``cu_seqlens``) to the padded layout (``cu_seqlens_padded``),
    filling each sample's tail with ``value``."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long).cpu()
    pad = torch.as_tensor(cu_seqlens_padded, dtype=torch.long).cpu()
    if x.shape[dim] != int(cu[-1]):
        raise ValueError(f"dim {dim} has {x.shape[dim]} tokens, cu_seqlens describe {int(cu[-1])}")
    shape = list(x.shape)
    shape[dim] = int(pad[-1])
    out = x.new_full(shape, value)
    lengths = cu[1:] - cu[:-1]
    dest = torch.cat([torch.arange(p, p + n) for p, n in zip(pad[:-1].tolist(), lengths.tolist())] or
                     [torch.zeros(0, dtype=torch.long)])
    return out.index_copy(dim, dest.to(x.device), x)
