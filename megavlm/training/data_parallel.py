"""Wrap model chunks for data parallelism (megatron's DDP, optionally the distributed optimizer).

The model itself knows nothing of the layout (``megavlm.models.build``): megatron-core's
layers shard themselves from the TransformerConfig, and DDP is applied from here.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig


def wrap_data_parallel(
    chunks: list[torch.nn.Module], tconfig: TransformerConfig, *, distributed_optimizer: bool
) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    return [
        # Only the first chunk gets buckets: megatron-LM's rule for interleaved PP.
        DistributedDataParallel(
            config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]
