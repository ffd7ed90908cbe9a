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


TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")


@functools.cache
def transformer_engine_import_error() -> str | None:
    """Why ``transformer_engine.pytorch`` does not import here (None: it does)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed (pip install 'megavlm[gpu]' or use the NGC container)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        return f"import transformer_engine.pytorch failed: {type(e).__name__}: {e}"
    return None


def has_transformer_engine() -> bool:
    """TE imports (it needs CUDA: never true on a CPU machine)."""
    return has_cuda() and transformer_engine_import_error() is None


def use_transformer_engine(impl: str) -> bool:
    """Whether to build Transformer Engine layers for ``model.transformer_impl``.

    ``auto``: TE on a CUDA machine, megatron's local layers without CUDA. A CUDA machine whose
    TE does not import is an error that shows the import error, never a silent fallback to
    local layers (slower, no FP8); running local layers on a GPU is the explicit ``local``.
    """
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl: {impl!r} is not one of {', '.join(TRANSFORMER_IMPLS)}")
    if impl == "local" or (impl == "auto" and not has_cuda()):
        return False
    if not has_cuda():
        raise RuntimeError("model.transformer_impl=transformer_engine needs a CUDA GPU (this machine has none)")
    error = transformer_engine_import_error()
    if error is not None:
        raise RuntimeError(
            f"Transformer Engine is required on this CUDA machine (model.transformer_impl={impl}) but {error}. "
            "Fix the install, or set model.transformer_impl=local to run megatron's local layers on the GPU."
        )
    return True


def has_wgrad_accumulation_fusion(*, use_te: bool) -> bool:
    """Whether ``gradient_accumulation_fusion`` has its kernel: TE's linear layers bring their
    own; megatron's local ones call apex's ``fused_weight_gradient_mlp_cuda`` and raise without it."""
    if not has_cuda():
        return False
    return use_te or importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


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
