"""Sequence packing: several samples per row of ``data.seq_length`` tokens.

Samples are binned by first-fit-decreasing within consecutive windows of ``buffer_size``
source samples, so packed row ``k`` depends only on the source dataset (resume stays a
single integer), and a window's samples never wait long for a bin. Each packed row keeps
per-sample position ids and ``cu_seqlens``; padding is its own segment with no loss.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from megavlm.data.batch import Batch, concat_media, merge_accounting


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into ``lengths`` whose sums fit ``capacity``, in a stable order."""
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than data.seq_length={capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def pack(samples: Sequence[Batch], seq_length: int) -> Batch:
    """One packed row [1, seq_length] from single-row samples (their media concatenated)."""
    names = ("tokens", "labels", "loss_mask", "position_ids")
    parts = {name: torch.cat([getattr(s, name) for s in samples], dim=-1) for name in names}
    lengths = [s.tokens.shape[-1] for s in samples]
    pad = seq_length - sum(lengths)
    if pad < 0:
        raise ValueError(f"{sum(lengths)} tokens do not fit data.seq_length={seq_length}")
    boundaries = [0, *torch.tensor(lengths).cumsum(0).tolist()] + ([seq_length] if pad else [])
    sample_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=-1)
    return Batch(
        **{name: F.pad(t, (0, pad)) for name, t in parts.items()},
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32),
        sample_ids=F.pad(sample_ids, (0, pad), value=-1),
        **concat_media(samples),
        **merge_accounting(samples),
    )


class PackedDataset:
    """Index ``k`` -> the k-th packed row of ``source`` (a sequence of single-row samples)."""

    def __init__(self, source: Sequence[Batch], *, seq_length: int, buffer_size: int = 64, align: int = 1):
        self.source = source
        self.seq_length = seq_length
        # Each sample counted as its length rounded up to ``align`` (2 x CP under context
        # parallelism, where every sample is padded to that multiple: megavlm.parallel.context).
        self.align = align
        self.buffer_size = buffer_size
        self._bins: list[list[int]] = []  # packed rows found so far, as source indices
        self._windows_done = 0
        self.padding_tokens = 0

    def _extend(self) -> None:
        start = self._windows_done * self.buffer_size
        indices = range(start, start + self.buffer_size)
        lengths = [self.source[i].tokens.shape[-1] for i in indices]
        aligned = [-(-n // self.align) * self.align for n in lengths]
        for b in first_fit_decreasing(aligned, self.seq_length):
            self._bins.append([start + i for i in b])
            self.padding_tokens += self.seq_length - sum(lengths[i] for i in b)
        self._windows_done += 1

    def padding_fraction(self) -> float:
        return self.padding_tokens / max(len(self._bins) * self.seq_length, 1)

    def __getitem__(self, k: int) -> Batch:
        while k >= len(self._bins):
            self._extend()
        return pack([self.source[i] for i in self._bins[k]], self.seq_length)
