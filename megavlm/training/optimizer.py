"""AdamW through megatron-core (distributed optimizer when configured) and the LR schedule."""

from __future__ import annotations

import functools

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megavlm.config.schema import Config
from megavlm.platform import device
from megavlm.training.lr_schedule import LRPhase, LRSchedule


def build_optimizer(cfg: Config, model_chunks: list[torch.nn.Module]) -> MegatronOptimizer:
    optimizer = get_megatron_optimizer(optimizer_config(cfg), model_chunks)
    use_fused_torch_adam(optimizer)
    skip_aliased_param_copies(optimizer)
    return optimizer


def _aliases_its_buffer_slot(opt: DistributedOptimizer, main: torch.Tensor, model_param: torch.Tensor) -> bool:
    """Whether ``main`` is the very memory megatron's ``_copy_main_params_to_model_params``
    would copy it to (the parameter's range of its bucket's param buffer)."""
    world_range = opt._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
    gbuf_index, _, bucket_id = opt.model_param_gbuf_map[model_param]
    target = opt.buffers[gbuf_index].buckets[bucket_id].param_data.view(-1)[world_range.start:world_range.end]
    return target.data_ptr() == main.data_ptr() and target.numel() == main.numel() and target.dtype == main.dtype


def skip_aliased_param_copies(optimizer: MegatronOptimizer) -> list[DistributedOptimizer]:
    """Drop the distributed optimizer's copy of fp32 main parameters into the param buffer
    where every one of them is a view of that same buffer (fp32 parameters: megatron's
    main shard of an fp32 parameter is the parameter's own slice), so the copy writes each
    byte onto itself every step. The copies from fp32 main parameters of bf16/fp16
    parameters are kept. Returns the optimizers changed."""
    changed = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue
        pairs = [(main, model) for mains, models in zip(opt.shard_fp32_groups, opt.model_fp32_groups)
                 for main, model in zip(mains, models)]
        if not pairs or not all(_aliases_its_buffer_slot(opt, main, model) for main, model in pairs):
            continue
        opt._copy_main_params_to_model_params = functools.partial(_copy_without_fp32_groups, opt,
                                                                  opt._copy_main_params_to_model_params)
        changed.append(opt)
    return changed


def _copy_without_fp32_groups(opt: DistributedOptimizer, copy) -> None:
    saved = opt.shard_fp32_groups
    opt.shard_fp32_groups = [[] for _ in saved]  # megatron zips these with the model groups
    try:
        copy()
    finally:
        opt.shard_fp32_groups = saved


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
