"""When a run stops on its own, and what a hung collective says.

``train.exit_interval`` (stop after every N-th iteration, e.g. to hand a slurm allocation
back at a known point) and ``train.exit_duration_mins`` (stop once the run has trained
that long, e.g. inside a fixed-length allocation) both save a checkpoint and exit
cleanly, like a SIGTERM. The duration counts from the Trainer's start on every rank, and
one rank past it stops them all: ranks must stop at the same iteration.

``parallel.timeout_minutes`` is the process group's collective timeout. NCCL's watchdog
already names the rank and the operation (``WorkNCCL(OpType=ALLREDUCE, ...)``); gloo's
error is a bare socket timeout, so ``collective_phase`` re-raises it naming the rank and
the training phase it hung in.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from megavlm.platform import device


class ExitRule:
    """``train.exit_interval`` / ``train.exit_duration_mins``: ``reason(iteration)`` is the
    same on every rank (collective only when a duration is set)."""

    def __init__(self, exit_interval: int, exit_duration_mins: float, clock=time.monotonic):
        self.interval, self.minutes, self._clock = exit_interval, exit_duration_mins, clock
        self._start = clock()

    def reason(self, iteration: int) -> str | None:
        if self.interval and iteration % self.interval == 0:
            return f"train.exit_interval={self.interval} reached at iteration {iteration}"
        if self.minutes:
            elapsed = (self._clock() - self._start) / 60
            flag = torch.tensor([float(elapsed >= self.minutes)], device=device.device())
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                return f"train.exit_duration_mins={self.minutes} reached at iteration {iteration}"
        return None


class CollectiveTimeoutError(RuntimeError):
    pass


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


@contextlib.contextmanager
def collective_phase(name: str, timeout_minutes: float):
    """Re-raise a collective timeout inside ``name`` naming this rank and the phase."""
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        if not _is_timeout(err) or isinstance(err, CollectiveTimeoutError):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        raise CollectiveTimeoutError(
            f"rank {rank} of {world}: a collective in {name} did not complete within "
            f"parallel.timeout_minutes={timeout_minutes} (another rank is hung, dead or much slower); "
            f"backend error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from err
