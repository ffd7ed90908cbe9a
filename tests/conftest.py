"""Shared fixtures."""

from __future__ import annotations

import os
import socket

import pytest
import torch


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
