"""Build this rank's model chunks, initialize them, and wrap them for data parallelism.

The model itself knows nothing of the layout: megatron-core's layers shard themselves
from the TransformerConfig, and DDP / the distributed optimizer are applied from here.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.schema import Config
from megavlm.models.full_tensors import initialize_layout_invariant
from megavlm.models.language.model import transformer_config
from megavlm.models.vlm import VLMModel
from megavlm.platform import device


def num_model_chunks(cfg: Config) -> int:
    return cfg.parallel.vpp if cfg.parallel.vpp and cfg.parallel.vpp > 1 else 1


def build_model_chunks(cfg: Config) -> tuple[list[torch.nn.Module], TransformerConfig]:
    """Unwrapped model chunks (one per virtual pipeline stage) on this rank's device."""
    use_te = device.has_transformer_engine()
    tconfig = transformer_config(
        cfg.model, cfg.parallel, dtype=device.default_dtype(cfg.train.precision), use_te=use_te
    )
    vpp = num_model_chunks(cfg)
    chunks = [
        VLMModel(cfg.model, cfg.parallel, tconfig, use_te=use_te, vp_stage=i if vpp > 1 else None)
        for i in range(vpp)
    ]
    if cfg.model.init == "layout_invariant":
        lm = cfg.model.language
        initialize_layout_invariant(
            chunks, seed=cfg.train.seed, std=cfg.model.init_std, num_layers=lm.num_layers,
            vocab_size=lm.vocab_size,
        )
    return [chunk.to(device.device()) for chunk in chunks], tconfig


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
