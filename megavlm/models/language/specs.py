"""Qwen3 decoder layer specs on megatron-core, for the local (CPU) and TE (GPU) backends.

Backend choice sits behind megatron's ``BackendSpecProvider``: Transformer Engine's on GPU
(fused norm+linear, FP8, TE attention), ``LocalBackend`` elsewhere (megatron's local
layers, plus our sequence-parallel-aware norms and an SDPA core attention). Specs are
built explicitly per layer, so a MoE frequency pattern is honoured layer by layer.
"""

from __future__ import annotations

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megavlm.config import schema
from megavlm.models.language.core_attention import SDPAAttention
from megavlm.models.linear import RowParallelLinear
from megavlm.models.norms import Norm


class LocalBackend(LocalSpecProvider):
    """megatron-core's local layers with SP-capable norms and SDPA attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return Norm

    def core_attention(self) -> type:
        return SDPAAttention

    def row_parallel_linear(self) -> type:
        return RowParallelLinear


def backend_provider(*, use_te: bool) -> BackendSpecProvider:
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalBackend()


def _mlp_spec(backend: BackendSpecProvider, *, num_experts: int | None, grouped_gemm: bool) -> ModuleSpec:
    if num_experts:
        return get_moe_module_spec_for_backend(
            backend=backend, num_experts=num_experts, moe_grouped_gemm=grouped_gemm
        )
    fused = backend.fuse_layernorm_and_linear()
    fc1 = backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear()
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=backend.row_parallel_linear()),
    )


def prenorm_layer_spec(
    backend: BackendSpecProvider,
    *,
    rms_norm: bool,
    qk_norm: bool,
    attn_mask_type: AttnMaskType,
    num_experts: int | None = None,
    grouped_gemm: bool = False,
    core_attention: type | None = None,
) -> ModuleSpec:
    """One pre-norm transformer layer: attention, then an MLP or MoE (activation, gating and
    biases come from the TransformerConfig). ``core_attention`` replaces the backend's.

    With TE the input norm (and the dense MLP's norm) are fused into the following linear;
    the local spec maps its separate norm keys onto those fused names so checkpoints move
    between CPU and GPU runs unchanged.
    """
    fused = backend.fuse_layernorm_and_linear()
    norm = backend.layer_norm(rms_norm=rms_norm, for_qk=False)
    qk = backend.layer_norm(rms_norm=True, for_qk=True) if qk_norm else IdentityOp
    moe = bool(num_experts)
    keys_map = {}
    if not fused:
        keys_map["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
        if not moe:
            keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=(
                        backend.column_parallel_layer_norm_linear()
                        if fused
                        else backend.column_parallel_linear()
                    ),
                    core_attention=core_attention or backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk,
                    k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm if (moe or not fused) else IdentityOp,
            mlp=_mlp_spec(backend, num_experts=num_experts, grouped_gemm=grouped_gemm),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def qwen3_layer_spec(
    backend: BackendSpecProvider, *, num_experts: int | None = None, grouped_gemm: bool = False
) -> ModuleSpec:
    """One Qwen3 decoder layer: RMSNorm, causal GQA attention with QK-norm, SwiGLU or MoE."""
    return prenorm_layer_spec(
        backend, rms_norm=True, qk_norm=True, attn_mask_type=AttnMaskType.causal,
        num_experts=num_experts, grouped_gemm=grouped_gemm,
    )


def moe_layer_pattern(config: TransformerConfig) -> list[int]:
    """1 for a MoE layer, 0 for a dense one, for every layer of the whole model."""
    return schema.moe_layer_pattern(config.num_layers, config.moe_layer_freq if config.num_moe_experts else None)


def qwen3_block_spec(
    config: TransformerConfig, *, use_te: bool, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The layer specs this pipeline stage (and virtual stage) builds, plus the final norm."""
    backend = backend_provider(use_te=use_te)
    specs = [
        qwen3_layer_spec(
            backend,
            num_experts=config.num_moe_experts if is_moe else None,
            grouped_gemm=config.moe_grouped_gemm,
        )
        for is_moe in moe_layer_pattern(config)
    ]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + count],
        layer_norm=backend.layer_norm(rms_norm=True, for_qk=False),
    )
