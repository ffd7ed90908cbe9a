"""Normalization modules for megatron-core layer specs on the CPU (local) path.

Why these exist: megatron-core's local spec (``get_gpt_layer_local_spec``) builds its norms
with ``megatron.core.transformer.torch_norm.WrappedTorchNorm``, which asserts
``not config.sequence_parallel``. The reason is not numerical: a plain ``torch.nn`` norm
simply does not carry the ``sequence_parallel`` attribute on its parameters, and megatron's
``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``) only all-reduces
the grads of parameters marked that way. Under sequence parallelism each TP rank normalizes a
different slice of the sequence, so each rank holds a *partial* weight/bias grad that must be
summed over the TP group; without the mark the replicas silently drift apart.

The modules below are drop-ins for a ``ModuleSpec`` ``module`` slot (same constructor as
``WrappedTorchNorm`` / ``FusedLayerNorm`` / ``TENorm``: ``config, hidden_size, eps, ...``),
subclass the ``torch.nn`` norms (so numerics and state-dict keys equal those of the local spec
— checkpoints are interchangeable) and mark every parameter with
``sequence_parallel = config.sequence_parallel``, exactly like megatron's ``FusedLayerNorm``
(``fusions/fused_layer_norm.py``) and Transformer Engine's norms (``TENorm`` passes
``sequence_parallel=config.sequence_parallel`` to TE, which sets the same attribute).

QK-norm (``q_layernorm`` / ``k_layernorm``, built by ``SelfAttention`` with
``hidden_size=kv_channels`` through the same class): those norms act on the TP-local *heads*
of the full (already all-gathered) sequence, so each TP rank's grad is a partial sum over a
different subset of heads and must be summed across TP *whether or not* sequence parallelism
is on. megatron-core 0.16.1 handles this by parameter *name*: ``finalize_model_grads`` sums a
param's grad over TP if ``(config.sequence_parallel and param.sequence_parallel) or
(config.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name))`` — a single
``elif`` branch, so a QK-norm param that is also marked is reduced exactly once. FusedLayerNorm
and TENorm therefore mark QK-norm params with ``config.sequence_parallel`` like any other norm
(they cannot tell what they normalize), and we do the same: the mark is redundant but harmless
for QK-norm, and the name-based rule is what makes it correct without SP.

Only ``zero_centered_gamma=False`` is supported (``torch.nn`` norms have no such mode): a
``ValueError`` is raised otherwise, rather than silently training a differently parametrized
model. ``persist_layer_norm`` / ``memory_efficient_layer_norm`` are CUDA-kernel choices; like
``FusedLayerNorm`` (which falls back to its non-persistent kernel) they are accepted and
ignored.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["RMSNorm", "LayerNorm", "Norm"]


def _reject_zero_centered_gamma(config: TransformerConfig, zero_centered_gamma: bool) -> None:
    if zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False):
        raise ValueError(
            "megavlm.models.norms supports only zero_centered_gamma=False "
            "(config.layernorm_zero_centered_gamma must be False): torch.nn norms have no "
            "zero-centered weight parametrization. Use the Transformer Engine spec (TENorm) "
            "for zero-centered gamma."
        )


def _mark_sequence_parallel(module: torch.nn.Module, sequence_parallel: bool) -> None:
    """Tag each parameter the way FusedLayerNorm/TENorm do, for finalize_model_grads."""
    module.sequence_parallel = sequence_parallel
    for param in module.parameters():
        setattr(param, "sequence_parallel", sequence_parallel)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's norm constructor and sequence-parallel marking.

    Args:
        config: the transformer config; ``config.sequence_parallel`` is copied onto the params.
        hidden_size: size of the normalized (last) dimension; ``kv_channels`` for QK-norm.
        eps: epsilon added to the mean square.
        persist_layer_norm, normalization: accepted for interface parity, unused.
        zero_centered_gamma: must be False.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        _reject_zero_centered_gamma(config, zero_centered_gamma)
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.config = config
        _mark_sequence_parallel(self, config.sequence_parallel)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` (with bias) with megatron's norm constructor and SP marking.

    Args: as for :class:`RMSNorm`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        _reject_zero_centered_gamma(config, zero_centered_gamma)
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.config = config
        _mark_sequence_parallel(self, config.sequence_parallel)


class Norm:
    """Dispatcher in the style of ``WrappedTorchNorm`` / ``TENorm``.

    ``Norm(config, hidden_size, ...)`` returns an :class:`RMSNorm` or :class:`LayerNorm`
    instance chosen by ``config.normalization`` (not by the ``normalization`` argument, which
    megatron passes inconsistently; WrappedTorchNorm and TENorm also read the config). Use it
    as the ``module`` of a ModuleSpec wherever megatron's spec has ``WrappedTorchNorm``/``TENorm``.
    """

    _CLASSES = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        norm_cls = cls._CLASSES.get(config.normalization)
        if norm_cls is None:
            raise ValueError(
                f"megavlm.models.norms.Norm supports config.normalization in "
                f"{sorted(cls._CLASSES)}, got {config.normalization!r}"
            )
        return norm_cls(
            config,
            hidden_size,
            eps=eps,
            persist_layer_norm=persist_layer_norm,
            zero_centered_gamma=zero_centered_gamma,
            normalization=config.normalization,
        )
