"""Qwen3 decoder: Hugging Face key map as data, plus the two non-trivial layout rules.

Full (unsharded) tensors on both sides; megatron-core's sharded state dict does the TP/PP
split. The rules: megatron fuses Q, K and V into one matrix grouped per KV head
([q heads of group g, k_g, v_g] for each g), and fuses SwiGLU's gate and up projections.
"""

from __future__ import annotations

import torch

from megavlm.config.schema import LanguageModelConfig

# (HF key pattern, megavlm key pattern, rule); {i} is the layer index.
QWEN3_KEY_MAP: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight", "copy"),
    ("model.norm.weight", "decoder.final_layernorm.weight", "copy"),
    ("lm_head.weight", "output_layer.weight", "copy_untied"),
    ("model.layers.{i}.input_layernorm.weight", "decoder.layers.{i}.input_layernorm.weight", "copy"),
    ("model.layers.{i}.post_attention_layernorm.weight", "decoder.layers.{i}.pre_mlp_layernorm.weight", "copy"),
    ("model.layers.{i}.self_attn.{{q,k,v}}_proj.weight", "decoder.layers.{i}.self_attention.linear_qkv.weight", "qkv"),
    ("model.layers.{i}.self_attn.o_proj.weight", "decoder.layers.{i}.self_attention.linear_proj.weight", "copy"),
    ("model.layers.{i}.self_attn.q_norm.weight", "decoder.layers.{i}.self_attention.q_layernorm.weight", "copy"),
    ("model.layers.{i}.self_attn.k_norm.weight", "decoder.layers.{i}.self_attention.k_layernorm.weight", "copy"),
    ("model.layers.{i}.mlp.{{gate,up}}_proj.weight", "decoder.layers.{i}.mlp.linear_fc1.weight", "gate_up"),
    ("model.layers.{i}.mlp.down_proj.weight", "decoder.layers.{i}.mlp.linear_fc2.weight", "copy"),
)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lm: LanguageModelConfig) -> torch.Tensor:
    groups, d = lm.num_query_groups, lm.head_dim
    q = q.view(groups, lm.num_attention_heads // groups * d, -1)  # [g, heads per group * d, h]
    return torch.cat([q, k.view(groups, d, -1), v.view(groups, d, -1)], dim=1).reshape(-1, q.shape[-1])


def hf_to_megavlm(hf: dict[str, torch.Tensor], lm: LanguageModelConfig) -> dict[str, torch.Tensor]:
    """Map a dense Qwen3 HF state dict to megavlm (GPTModel) parameter names."""
    out = {}
    for hf_pattern, mv_pattern, rule in QWEN3_KEY_MAP:
        layers = range(lm.num_layers) if "{i}" in hf_pattern else [None]
        for i in layers:
            src = hf_pattern.format(i=i)
            dst = mv_pattern.format(i=i)
            if rule == "copy" or (rule == "copy_untied" and not lm.tie_embeddings):
                out[dst] = hf[src]
            elif rule == "qkv":
                q, k, v = (hf[src.replace("{q,k,v}", p)] for p in "qkv")
                out[dst] = fuse_qkv(q, k, v, lm)
            elif rule == "gate_up":
                out[dst] = torch.cat([hf[src.replace("{gate,up}", p)] for p in ("gate", "up")], dim=0)
    return out
