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
    return seeded_first_fit_decreasing([], dict(enumerate(lengths)), capacity)


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


def seeded_first_fit_decreasing(seed: Sequence[int], lengths: dict[int, int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing of ``lengths``' keys not in ``seed``, with bin 0 pre-filled by ``seed``."""
    bins, room = [], []
    if seed:
        bins.append(list(seed))
        room.append(capacity - sum(lengths[i] for i in seed))
    seeded = set(seed)
    new = [i for i in lengths if i not in seeded]
    for i in new:
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than data.seq_length={capacity}")
    for i in sorted(new, key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


class PackedDataset:
    """Index ``k`` -> the k-th packed row of ``source`` (a sequence of single-row samples).

    Source samples are read in order in windows of at least ``window_rows`` rows' worth of
    tokens (at most ``max_window`` samples) and binned first-fit-decreasing. The emptiest bin
    of a window is not emitted: its samples seed bin 0 of the next window, where the new
    samples fill it (a seeded bin is never carried again, so a sample waits at most two
    windows). Without the carry, every window ended with a part-filled row: 81% real tokens
    in 1024-token rows of the synthetic mix with 64-sample windows; with it, over 97% in
    1024- and 8192-token rows (``bench/data_throughput.py --packing``). Row ``k`` is a pure
    function of the source, so the data position stays one integer.

    Every reader (each DP rank, each loader worker) plans every row, and serves only its
    own. When the source gives lengths without decoding (``length(i)``: ``EncodedDataset``
    from image headers and video containers), planning reads headers only and a reader
    decodes only the samples of the rows it serves; otherwise samples are read (decoded) to
    learn their lengths, and kept until their row is served. Reading every sample fully for
    planning made each DP rank and worker decode the whole global batch.
    """

    def __init__(self, source: Sequence[Batch], *, seq_length: int, window_rows: int = 4, max_window: int = 8192,
                 align: int = 1):
        self.source = source
        self.seq_length = seq_length
        # Each sample counted as its length rounded up to ``align`` (2 x CP under context
        # parallelism, where every sample is padded to that multiple: megavlm.parallel.context).
        self.align = align
        self.window_rows, self.max_window = window_rows, max_window
        self._by_length = hasattr(source, "length")  # plan from lengths alone
        self._chunk = 16  # samples read (and their images decoded) together, without ``length``
        self._reset()

    def _reset(self) -> None:
        """The plan before row 0."""
        # Packed rows found and not yet passed, as source indices, by row number. Rows this
        # reader has passed are dropped: a run reads billions of samples, and a plan of every
        # row kept in memory grew without bound (about 2 lists per training step).
        self._bins: dict[int, list[int]] = {}
        self._found = 0  # rows planned so far
        self._next = 0  # the first source index not read yet
        self._carry: list[int] = []  # the samples of the last window's held-back bin
        self._rows: dict[int, Batch] = {}  # samples read for their length, kept until their row is served
        self._lengths: dict[int, int] = {}  # planned lengths of the samples of rows not yet served
        self._served = 0  # rows below this have been served (or skipped by this worker)
        self.padding_tokens = 0

    def _length(self, i: int) -> int:
        """Sample ``i``'s length: from the source's ``length``, else from the sample itself,
        read (a chunk at a time, one batched decode) and kept until its row is served."""
        if self._by_length:
            return self._lengths.setdefault(i, self.source.length(i))
        if i not in self._rows:
            chunk = [j for j in range(i, i + self._chunk) if j not in self._rows]
            if hasattr(self.source, "__getitems__"):  # one batched decode per chunk (DALI)
                self._rows.update(zip(chunk, self.source.__getitems__(chunk)))
            else:
                self._rows[i] = self.source[i]
        return self._rows[i].tokens.shape[-1]

    def _extend(self) -> None:
        lengths = {i: self._length(i) for i in self._carry}
        tokens, target = sum(lengths.values()), self.window_rows * self.seq_length
        while tokens < target and len(lengths) < self.max_window:
            lengths[self._next] = n = self._length(self._next)
            tokens += n
            self._next += 1
        lengths = {i: -(-n // self.align) * self.align for i, n in lengths.items()}
        bins = seeded_first_fit_decreasing(self._carry, lengths, self.seq_length)
        free = [self.seq_length - sum(lengths[i] for i in b) for b in bins]
        held = None
        if len(bins) > 1:  # hold back the emptiest unseeded bin (the last on ties)
            first = 1 if self._carry else 0
            held = max(range(first, len(bins)), key=lambda b: (free[b], b))
        self._carry = bins[held] if held is not None else []
        for b, members in enumerate(bins):
            if b != held:
                self._bins[self._found] = members
                self._found += 1
                self.padding_tokens += free[b]

    def padding_fraction(self) -> float:
        return self.padding_tokens / max(self._found * self.seq_length, 1)

    def __getitem__(self, k: int) -> Batch:
        if k < self._served:  # rows are read in increasing order; a reader that goes back re-plans
            self._reset()
        while k >= self._found:
            self._extend()
        members = self._bins[k]
        if self._by_length:
            rows = self.source.__getitems__(members) if hasattr(self.source, "__getitems__") else \
                [self.source[i] for i in members]
            for i, row in zip(members, rows):
                if row.tokens.shape[-1] > self._lengths[i]:
                    raise ValueError(f"sample {i} of row {k}: {row.tokens.shape[-1]} tokens encoded, "
                                     f"{self._lengths[i]} planned from its headers (SampleEncoder.layouts)")
        else:
            rows = [self._rows.pop(i) if i in self._rows else self.source[i] for i in members]
        # Rows are read in increasing order (each loader worker reads every n-th): rows this
        # reader has passed, and their samples, will not be asked for again; drop them.
        for j in range(self._served, k + 1):
            for i in self._bins.pop(j, ()):
                self._rows.pop(i, None)
                self._lengths.pop(i, None)
        self._served = k + 1
        return pack(rows, self.seq_length)
