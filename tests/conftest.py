"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch


# `make test` runs the suite on 2 pytest-xdist workers (`-n 2 --dist loadfile`): one process
# runs a whole file (its module fixtures are built once, its tests keep their order), and a
# 2-core machine stays busy while the other worker waits on a subprocess or runs one thread.
# Files that share a session fixture must share a worker: the multi-rank launches of
# tests/parallel serve test_layouts.py and test_planner_memory.py. (xdist's own `xdist_group`
# marks do nothing under pytest 9.2, whose node ids no longer come from `item._nodeid`.)
_SAME_WORKER_AS = {"tests/parallel/test_planner_memory.py": "tests/parallel/test_layouts.py"}


if importlib.util.find_spec("xdist"):  # a hook pytest rejects when xdist is not installed

    def pytest_xdist_make_scheduler(config, log):
        from xdist.scheduler import LoadFileScheduling

        class FileScheduling(LoadFileScheduling):
            def _split_scope(self, nodeid: str) -> str:
                path = super()._split_scope(nodeid)
                return _SAME_WORKER_AS.get(path, path)

        return FileScheduling(config, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_rank_megatron():
    """A 1-rank gloo group with megatron's parallel state, for in-process model tests."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megavlm.platform import cpu_adapter

    own_pg = not torch.distributed.is_initialized()
    if own_pg:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    cpu_adapter.install()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    yield
    parallel_state.destroy_model_parallel()
    if own_pg:
        torch.distributed.destroy_process_group()


# MEGAVLM_TEST_CPU_LOG=FILE: one line per test phase with wall seconds and the CPU seconds of
# this process and of the subprocesses it waited for (torchrun launches, tools), to tell a test
# that burns CPU from one that waits (and so could overlap with another).
if os.environ.get("MEGAVLM_TEST_CPU_LOG"):
    import json
    import resource
    import time

    def _usage() -> tuple[float, float, float]:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter(), own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        start = _usage()
        yield
        end = _usage()
        with open(os.environ["MEGAVLM_TEST_CPU_LOG"], "a") as log:
            log.write(json.dumps({"test": item.nodeid, "wall": end[0] - start[0], "cpu_self": end[1] - start[1],
                                  "cpu_children": end[2] - start[2]}) + "\n")
