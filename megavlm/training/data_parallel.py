"""Wrap model chunks for data parallelism (megatron's DDP, optionally the distributed optimizer).

The model itself knows nothing of the layout (``megavlm.models.build``): megatron-core's
layers shard themselves from the TransformerConfig, and DDP is applied from here.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.schema import ParallelConfig
from megavlm.platform import device


def overlap_settings(parallel: ParallelConfig) -> tuple[bool, bool]:
    """(overlap_grad_reduce, overlap_param_gather) with ``None`` resolved: on with CUDA, the
    parameter all-gather only with the distributed optimizer (the only one that gathers)."""
    cuda = device.has_cuda()
    grad = cuda if parallel.overlap_grad_reduce is None else parallel.overlap_grad_reduce
    param = parallel.overlap_param_gather
    if param is None:
        param = cuda and parallel.distributed_optimizer
    return grad, param


def ddp_config(parallel: ParallelConfig) -> DistributedDataParallelConfig:
    """The DistributedDataParallelConfig megatron-core receives."""
    overlap_grad_reduce, overlap_param_gather = overlap_settings(parallel)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )


def wrap_data_parallel(
    chunks: list[torch.nn.Module], tconfig: TransformerConfig, parallel: ParallelConfig
) -> list[DistributedDataParallel]:
    config = ddp_config(parallel)
    return [
        # Only the first chunk gets buckets: megatron-LM's rule for interleaved PP.
        DistributedDataParallel(
            config=tconfig, ddp_config=config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]


@contextlib.contextmanager
def parameters_in_sync(model: list[DistributedDataParallel]):
    """Parameters all-gathered for the duration (checkpoint save, export).

    With ``overlap_param_gather`` the distributed optimizer's all-gather of the updated
    parameters is only started by the next ``zero_grad`` and finished in the next
    forward's pre-hooks; as in Megatron-LM's save path, the hooks are disabled (which
    gathers synchronously) and enabled again afterwards."""
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
