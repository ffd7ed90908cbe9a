"""Stop signals (SIGTERM, SIGUSR1) for a training job and for the processes it starts.

Slurm delivers its time-limit warning (``--signal=USR1@300``, forwarded by ``srun``) and its
SIGTERM to *every* process of a job step, not only to the training processes. The trainer
turns either signal into "finish the step, checkpoint, exit 0" (``StopRequest``); any helper
process that has no handler dies of it instead (both signals terminate by default). The one
that matters is the writer-results ``multiprocessing`` Manager that megatron-core's
``filesystem_async`` spawns at a process's first ``dist_checkpointing.save`` and keeps for the
process's life: once it is dead, the stop save fails with ``BrokenPipeError``.

So every child a training process starts must not act on these signals:

- ``children_shielded()``: start children (checkpoint writers, the Manager) with the stop
  signals *blocked* in the calling thread. The signal mask survives ``fork`` and ``exec``
  (``spawn`` children too), so the children never receive them; the parent's own signals
  stay pending and are delivered when the block ends, or are taken by another thread and
  handled in the main thread as usual (Python runs handlers there), so none is lost.
- ``loader_worker_init``: torch DataLoader workers install a C SIGTERM handler that dies on
  any SIGTERM not sent by their parent, and they must still exit on the parent's
  ``terminate()`` at shutdown; this initializer keeps exactly that (see its docstring).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker

import torch
import torch.distributed as dist

from megavlm.platform import device

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1})


class StopRequest:
    """Remembers SIGTERM / SIGUSR1 (slurm preemption) until the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank if any rank got a signal (they must stop together)."""
        flag = torch.tensor([float(self.requested)], device=device.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextmanager
def children_shielded() -> Iterator[None]:
    """Block the stop signals in this thread while the body starts child processes, which
    inherit the block (see the module docstring). Nests; restores the previous mask."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # multiprocessing's resource tracker, started with the first spawn-context child
        # (e.g. the Manager), blocks and then *unblocks* SIGTERM around its own start, which
        # undoes ours: start it now (it inherits the block too), then block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of megavlm's DataLoaders: a worker ignores the stop signals that
    slurm sends to the whole step, but still exits on its parent's SIGTERM.

    torch's worker handler (``_set_worker_signal_handlers``) exits quietly on the parent's
    SIGTERM (how ``terminate()`` at interpreter exit stops daemonic workers) and dies of
    anyone else's, which kills the job through the parent's SIGCHLD check while it saves.
    A Python handler cannot see the sender, so the signals are blocked in this thread
    (threads started later inherit that) and one thread takes them with ``sigwaitinfo``,
    whose ``si_pid`` names the sender.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_worker_signal_loop, args=(os.getppid(),), daemon=True,
                     name="megavlm-worker-signals").start()


def _worker_signal_loop(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # what torch's own handler does for its parent's terminate()
