"""Which samples each data-parallel rank reads, as a pure function of consumed samples.

Global batch ``k`` holds samples ``[k * G, (k + 1) * G)``. It is cut into micro-batch
groups of ``micro_batch_size * dp``, and DP rank ``r`` takes the ``r``-th micro-batch of
each group (Megatron-LM's order). Since the position is one integer, resuming is exact,
into any DP size, and loader workers (``data.num_workers``) cannot change the order: a
``torch.utils.data.DataLoader`` returns the batches of its batch sampler in order.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from megavlm.data.batch import Batch
from megavlm.platform.signals import loader_worker_init


class MicroBatchIndices:
    """Endless lists of sample indices, one list per micro-batch of one DP rank."""

    def __init__(self, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        group = micro_batch_size * dp_size
        if consumed_samples % group:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size x DP = {group}"
            )
        self.start, self.group = consumed_samples, group
        self.first = dp_rank * micro_batch_size
        self.size = micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.start
        while True:
            yield list(range(start + self.first, start + self.first + self.size))
            start += self.group


def micro_batches(
    dataset: Sequence[Batch], *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Endless micro-batches for one DP rank, starting after ``consumed_samples``."""
    indices = MicroBatchIndices(consumed_samples=consumed_samples, micro_batch_size=micro_batch_size,
                                dp_rank=dp_rank, dp_size=dp_size)
    if num_workers == 0:
        return (Batch.collate([dataset[i] for i in batch]) for batch in indices)
    # Spawned, not forked: a forked worker inherits the parent's CUDA state (it fails on first
    # CUDA use) and DALI's threads' locks (forked workers hung with a DALI pipeline in the
    # parent); spawned ones start clean (their image decoders run on the CPU, see data.encode).
    context = "spawn"
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=indices, num_workers=num_workers, collate_fn=Batch.collate, persistent_workers=True,
        worker_init_fn=loader_worker_init,  # slurm signals every process of the step
        multiprocessing_context=context,
    )
    return iter(loader)
