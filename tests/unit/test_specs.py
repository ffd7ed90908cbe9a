"""Layer-spec selection: backend choice, per-layer MoE pattern, checkpoint key compatibility."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.mlp import MLP

from megavlm.config import load_config
from megavlm.models.language.core_attention import SDPAAttention
from megavlm.models.transformer_config import transformer_config
from megavlm.models.language.specs import LocalBackend, backend_provider, moe_layer_pattern, qwen3_layer_spec
from megavlm.models.norms import Norm


def _tconfig(*overrides):
    cfg = load_config(None, ["model.preset=qwen3-moe-tiny", *overrides])
    return transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False)


def test_local_backend_on_cpu():
    backend = backend_provider(use_te=False)
    assert isinstance(backend, LocalBackend)
    spec = qwen3_layer_spec(backend)
    attn = spec.submodules.self_attention.submodules
    assert attn.core_attention is SDPAAttention and attn.q_layernorm is Norm
    # local layers keep TE's fused key names in checkpoints, so CPU and GPU runs interchange
    assert spec.submodules.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }


def test_moe_layer_frequency_is_per_layer():
    assert moe_layer_pattern(_tconfig()) == [1, 1, 1, 1]
    assert moe_layer_pattern(_tconfig("model.language.moe.layer_freq=2")) == [1, 0, 1, 0]
    assert moe_layer_pattern(_tconfig("model.language.moe.layer_freq=[0,1,1,0]")) == [0, 1, 1, 0]
    dense, moe = qwen3_layer_spec(LocalBackend()), qwen3_layer_spec(LocalBackend(), num_experts=4)
    assert dense.submodules.mlp.module is MLP and moe.submodules.mlp.module is MoELayer
    assert "pre_mlp_layernorm." not in moe.submodules.sharded_state_dict_keys_map


def test_fp8_and_moe_settings_reach_megatron():
    cfg = load_config(None, ["model.preset=qwen3-moe-tiny", "model.fp8.recipe=tensorwise", "model.fp8.amax_history_len=16"])
    t = transformer_config(cfg.model, cfg.parallel, dtype=torch.float32, use_te=False)
    assert (t.fp8, t.fp8_recipe, t.fp8_amax_history_len) == (None, "tensorwise", 16)
    assert (t.num_moe_experts, t.moe_router_topk, t.moe_ffn_hidden_size) == (4, 2, 32)
    assert t.moe_router_pre_softmax is False  # top-k on logits then softmax == softmax, top-k, renormalize
    assert t.calculate_per_token_loss and t.qk_layernorm and t.gated_linear_unit
