"""Which samples each data-parallel rank reads, as a pure function of consumed samples.

Global batch ``k`` holds samples ``[k * G, (k + 1) * G)``. It is cut into micro-batch
groups of ``micro_batch_size * dp``, and DP rank ``r`` takes the ``r``-th micro-batch of
each group (Megatron-LM's order). Since the position is one integer, resuming is exact.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from megavlm.data.batch import Batch


def micro_batches(
    dataset: Sequence[Batch], *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[Batch]:
    """Endless micro-batches for one DP rank, starting after ``consumed_samples``."""
    group = micro_batch_size * dp_size
    if consumed_samples % group:
        raise ValueError(
            f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size x DP = {group}"
        )
    start = consumed_samples
    while True:
        first = start + dp_rank * micro_batch_size
        yield Batch.collate([dataset[i] for i in range(first, first + micro_batch_size)])
        start += group
