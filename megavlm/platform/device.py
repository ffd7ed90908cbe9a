"""Capability detection: the one place that asks what hardware and libraries are present.

Everything device-dependent in megavlm branches on these functions (and on layer-spec
selection), never on ad-hoc ``torch.cuda.is_available()`` calls spread through the code.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def distributed_backend() -> str:
    """NCCL on GPUs; gloo on CPU (the only backend with CPU collectives)."""
    return "nccl" if has_cuda() else "gloo"


@functools.cache
def has_transformer_engine() -> bool:
    """TE imports only with CUDA present; without it we use megatron-core's local specs."""
    if not has_cuda() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def fp8_support(recipe: str) -> tuple[bool, str]:
    """Whether this machine can train with the given FP8 recipe, and if not, why."""
    if not has_cuda():
        return False, "FP8 needs a CUDA GPU (this machine has none)"
    if not has_transformer_engine():
        return False, "FP8 needs Transformer Engine (pip install 'megavlm[gpu]' or the NGC container)"
    import transformer_engine
    from packaging.version import Version
    from transformer_engine.pytorch import fp8 as te_fp8

    needed = _TE_VERSION_FOR_RECIPE.get(recipe)
    have = Version(transformer_engine.__version__.split("+")[0])
    if needed is not None and have < Version(needed):
        return False, f"FP8 recipe {recipe!r} needs Transformer Engine >= {needed}, found {have}"
    if recipe == "mxfp8":
        ok, reason = te_fp8.check_mxfp8_support()
    else:
        ok, reason = te_fp8.check_fp8_support()
    return bool(ok), reason or ""


# Oldest Transformer Engine that megatron-core 0.16.1 drives each FP8 recipe with.
_TE_VERSION_FOR_RECIPE = {"tensorwise": "2.2", "mxfp8": "2.1"}


def default_dtype(precision: str) -> torch.dtype:
    """``auto`` means bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    if precision == "auto":
        return torch.bfloat16 if has_cuda() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
