"""AdamW through megatron-core (distributed optimizer when configured) and the LR schedule."""

from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer

from megavlm.config.schema import Config
from megavlm.platform import device
from megavlm.training.lr_schedule import LRPhase, LRSchedule


def build_optimizer(cfg: Config, model_chunks: list[torch.nn.Module]) -> MegatronOptimizer:
    optimizer = get_megatron_optimizer(optimizer_config(cfg), model_chunks)
    use_fused_torch_adam(optimizer)
    return optimizer


def optimizer_config(cfg: Config) -> OptimizerConfig:
    """The OptimizerConfig megatron-core receives."""
    t = cfg.train
    dtype = device.default_dtype(t.precision)
    return OptimizerConfig(
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
    )


def _fuse(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    optimizer.defaults["fused"], optimizer.defaults["foreach"] = True, False
    # torch keeps a fused optimizer's step counts as fp32 on the parameter's device (its
    # load_state_dict does so only when the saved groups were fused already)
    for param, state in optimizer.state.items():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def use_fused_torch_adam(optimizer: MegatronOptimizer) -> list[torch.optim.Optimizer]:
    """Switch megatron's inner optimizer to torch's fused AdamW kernel where it is torch's AdamW.

    Without Transformer Engine or apex, megatron-core builds ``torch.optim.AdamW`` with
    torch's default implementation, which on CPU is a Python loop of about ten kernels per
    parameter; the fused kernel (CPU and CUDA) does the same update per element in one pass
    over all parameters. TE's and apex's FusedAdam are fused already and left alone.
    The flag lives in the param groups, which a checkpoint load replaces with the saved
    ones, so a load hook sets it again. Returns the optimizers switched.
    """
    switched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) is not torch.optim.AdamW or not _fused_supported(inner):
            continue
        _fuse(inner)
        inner.register_load_state_dict_post_hook(_fuse)
        switched.append(inner)
    return switched


def _fused_supported(optimizer: torch.optim.Optimizer) -> bool:
    """torch's own check (device and dtype of every parameter), run on a throwaway instance
    over one empty stand-in per (device, dtype): megatron's main parameters may be views."""
    kinds = {(p.device, p.dtype) for group in optimizer.param_groups for p in group["params"]}
    stand_ins = [torch.empty(0, device=d, dtype=t, requires_grad=True) for d, t in kinds]
    try:
        torch.optim.AdamW(stand_ins, fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_lr_schedule(cfg: Config) -> LRSchedule:
    """Explicit phases if given, else one decay from train.lr to train.min_lr after warmup."""
    t = cfg.train
    phases = t.lr_phases or [
        LRPhase(iters=max(t.iters - t.warmup_iters, 0), end_lr=t.min_lr, decay=t.lr_decay)
    ]
    return LRSchedule(lr=t.lr, warmup_iters=t.warmup_iters, phases=phases)
