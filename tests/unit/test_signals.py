"""Processes a training run starts do not die of the stop signals slurm sends to the whole
job step (megavlm.platform.signals); the trainer itself still gets them."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import threading
import time

import torch

from megavlm.platform.signals import children_shielded, loader_worker_init


def test_children_started_shielded_survive_stop_signals_and_the_parent_keeps_its_own():
    """megatron-core's writer-results Manager (a spawned process) started inside the shield
    keeps serving after SIGUSR1 and SIGTERM; a signal to the parent during the shield is
    held and handled when it ends."""
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    manager = None
    try:
        with children_shielded():
            manager = multiprocessing.get_context("spawn").Manager()
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            assert signal.SIGUSR1 in signal.sigpending() and got == []
        time.sleep(0.01)
        assert got == [1]
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(manager._process.pid, sig)
        queue = manager.Queue()  # a round trip: the server is still alive
        queue.put("ok")
        assert queue.get() == "ok"
    finally:
        signal.signal(signal.SIGUSR1, previous)
        if manager is not None:
            manager.shutdown()


def test_loader_worker_ignores_others_stop_signals_and_exits_on_its_parents_terminate():
    """torch's own worker handler dies of any SIGTERM not from its parent (killing the job
    through the parent's SIGCHLD check); with loader_worker_init only the parent's counts."""
    loader = torch.utils.data.DataLoader(range(1000), batch_size=1, num_workers=1, persistent_workers=True,
                                         worker_init_fn=loader_worker_init)
    batches = iter(loader)
    assert next(batches).tolist() == [0]
    (worker,) = batches._workers
    for sig in ("TERM", "USR1"):  # sent by another process, as slurm's are
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    assert [next(batches).item() for _ in range(3)] == [1, 2, 3]  # the worker is still serving
    assert worker.is_alive()
    worker.terminate()  # what multiprocessing does to daemonic children at exit
    worker.join(timeout=30)
    assert worker.exitcode == 0
    batches._shutdown_workers()
