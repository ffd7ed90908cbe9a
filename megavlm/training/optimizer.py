"""AdamW through megatron-core (distributed optimizer when configured) and the LR schedule."""

from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer

from megavlm.config.schema import Config
from megavlm.platform import device
from megavlm.training.lr_schedule import LRPhase, LRSchedule


def build_optimizer(cfg: Config, model_chunks: list[torch.nn.Module]) -> MegatronOptimizer:
    t = cfg.train
    dtype = device.default_dtype(t.precision)
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        model_chunks,
    )


def build_lr_schedule(cfg: Config) -> LRSchedule:
    """Explicit phases if given, else one decay from train.lr to train.min_lr after warmup."""
    t = cfg.train
    phases = t.lr_phases or [
        LRPhase(iters=max(t.iters - t.warmup_iters, 0), end_lr=t.min_lr, decay=t.lr_decay)
    ]
    return LRSchedule(lr=t.lr, warmup_iters=t.warmup_iters, phases=phases)
