"""Start a megavlm job: process group, CPU adapter, megatron parallel state, RNG seeds."""

from __future__ import annotations

import os
import random
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megavlm.platform import cpu_adapter, device
from megavlm.platform.launch import DistEnv, detect_dist_env, init_process_group


class ParallelDegrees(Protocol):
    """What ``initialize`` reads of ``config.ParallelConfig`` (platform sits below config)."""

    tp: int
    pp: int
    vpp: int | None
    cp: int
    ep: int
    etp: int | None
    timeout_minutes: float


def megatron_parallel_sizes(parallel: ParallelDegrees) -> dict:
    """The degrees under megatron-core's names, shared by ``initialize_model_parallel`` and
    ``TransformerConfig`` so the groups and the layers can never disagree."""
    return dict(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp and parallel.vpp > 1 else None,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )


def initialize(parallel: ParallelDegrees, seed: int, env: DistEnv | None = None) -> DistEnv:
    """Bring up the process group and megatron's TP/PP/CP/EP/DP groups from ``parallel``.

    The config must already be validated against ``env.world_size``.
    """
    env = env or detect_dist_env()
    if device.has_cuda():
        # megatron's TP/SP communication overlap assumes kernels are issued in order
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    init_process_group(env, device.distributed_backend(), timeout_minutes=parallel.timeout_minutes)
    if not device.has_cuda():
        cpu_adapter.install()
    parallel_state.initialize_model_parallel(**megatron_parallel_sizes(parallel))
    seed_everything(seed)
    return env


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron's TP/EP RNG trackers.

    Pipeline stages get different seeds (as in Megatron-LM) so dropout masks differ per stage.
    """
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_SINGLE_RANK_GROUP = None


def without_context_parallel() -> ProcessGroupCollection:
    """megatron's process groups with a one-rank CP group, for modules that are not context
    parallel under a CP run: the vision encoder works on whole images, but megatron's
    attention reads ``pg_collection.cp`` (rotary slicing of packed input, TE's CP path)."""
    global _SINGLE_RANK_GROUP
    groups = ProcessGroupCollection.use_mpu_process_groups()
    if groups.cp.size() > 1:
        if _SINGLE_RANK_GROUP is None:
            # only this rank takes part in creating its own group
            _SINGLE_RANK_GROUP = dist.new_group([dist.get_rank()], use_local_synchronization=True)
        groups.cp = _SINGLE_RANK_GROUP
    return groups
