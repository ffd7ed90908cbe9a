"""Wrap model chunks for data parallelism (megatron's DDP, optionally the distributed optimizer).

The model itself knows nothing of the layout (``megavlm.models.build``): megatron-core's
layers shard themselves from the TransformerConfig, and DDP is applied from here.
"""

from __future__ import annotations

import contextlib
import functools

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
    model = [
        # Only the first chunk gets buckets: megatron-LM's rule for interleaved PP.
        DistributedDataParallel(
            config=tconfig, ddp_config=config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]
    if not tconfig.fp8_param:  # fp8 parameters are re-quantized through the all-gather
        for chunk in model:
            skip_single_rank_collectives(chunk)
    return model


class _Done:
    """The handle of a collective over one rank: nothing to wait for."""

    def wait(self) -> None:
        pass


def _local_grad_sync(group, force_all_reduce: bool = False) -> None:
    """megatron's ``_ParamAndGradBucketGroup.start_grad_sync`` for a group of one rank: the
    same gradient checks and scaling, without the reduce-scatter / all-reduce, which over
    one rank would copy every gradient onto itself."""
    if group.is_first_batch and group.grad_reduce_handle is not None:
        return
    ddp = group.ddp_config
    if ddp.check_for_nan_in_grad or ddp.check_for_large_grads:
        group.check_grads(check_for_nan_or_inf=ddp.check_for_nan_in_grad, check_for_large=ddp.check_for_large_grads)
    for bucket in group.buckets:
        if bucket.gradient_scaling_factor != 1.0:
            bucket.grad_data *= bucket.gradient_scaling_factor
    # finish_grad_sync waits on the handle of an overlapped reduction
    group.grad_reduce_handle = _Done() if ddp.overlap_grad_reduce else None


def _local_param_sync(group, force_sync: bool = False) -> None:
    """``start_param_sync`` for a group of one rank: the rank's shard is the whole bucket,
    so the all-gather has nothing to bring."""
    group.param_gather_handle = None
    group.param_gather_dispatched = True


def skip_single_rank_collectives(chunk: DistributedDataParallel) -> int:
    """Replace the gradient reduction and parameter all-gather of every bucket group whose
    collective group has one rank (DP x CP = 1: nothing to shard or average) by their local
    part; returns the number of groups changed.

    Why: megatron-core issues them whatever the group size, and gloo (and NCCL) then copy
    the whole gradient and parameter buffers in place every step, which was the largest
    fixed cost of a 1-rank train step besides the kernels (bench/vlm_throughput.py).
    Parameters, gradients and checkpoints are unchanged: over one rank both collectives
    are the identity."""
    ddp = chunk.ddp_config
    if ddp.num_distributed_optimizer_instances != 1:
        return 0
    changed = 0
    for group in [*chunk.bucket_groups, *chunk.expert_parallel_bucket_groups]:
        comm = (group.intra_distributed_optimizer_instance_group if ddp.use_distributed_optimizer
                else group.data_parallel_group)
        if comm.size() != 1:
            continue
        group.start_grad_sync = functools.partial(_local_grad_sync, group)
        if ddp.use_distributed_optimizer:
            group.start_param_sync = functools.partial(_local_param_sync, group)
        changed += 1
    return changed


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
