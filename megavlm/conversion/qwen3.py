"""Qwen3 decoder (dense and MoE): the HF key map as data, for the generic engine.

Two layout rules are not renames: megatron fuses Q, K and V into one matrix grouped per KV
head ([q heads of group g, k_g, v_g] for each g), and fuses SwiGLU's gate and up
projections ([gate; up]). HF Qwen3-VL-MoE keeps all experts of a layer in two fused
tensors; megatron's sharded layout stacks experts on a prepended axis, in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megavlm.config.schema import LanguageModelConfig
from megavlm.conversion.engine import KeyRule


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, lm: LanguageModelConfig) -> Tensor:
    groups, d = lm.num_query_groups, lm.head_dim
    q = q.view(groups, lm.num_attention_heads // groups * d, -1)  # [g, heads per group * d, h]
    return torch.cat([q, k.view(groups, d, -1), v.view(groups, d, -1)], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv: Tensor, lm: LanguageModelConfig) -> list[Tensor]:
    groups, d = lm.num_query_groups, lm.head_dim
    per_group = lm.num_attention_heads // groups * d
    q, k, v = qkv.view(groups, per_group + 2 * d, -1).split([per_group, d, d], dim=1)
    return [t.reshape(-1, qkv.shape[-1]) for t in (q, k, v)]


def _halves(t: Tensor) -> list[Tensor]:
    return list(t.chunk(2, dim=-2))


def qwen3_rules(
    lm: LanguageModelConfig, *, hf_prefix: str = "model.", mv_prefix: str = "language.",
    lm_head: str = "lm_head.weight",
) -> list[KeyRule]:
    """Rules for a Qwen3 decoder whose HF keys start with ``hf_prefix`` (``model.`` for
    Qwen3ForCausalLM, ``model.language_model.`` for Qwen3-VL)."""
    layer = f"{hf_prefix}layers.{{i}}."
    mv = f"{mv_prefix}decoder.layers."
    rules = [
        KeyRule((f"{hf_prefix}embed_tokens.weight",), f"{mv_prefix}embedding.word_embeddings.weight"),
        KeyRule((f"{hf_prefix}norm.weight",), f"{mv_prefix}decoder.final_layernorm.weight"),
        KeyRule((layer + "input_layernorm.weight",), mv + "self_attention.linear_qkv.layer_norm_weight"),
        KeyRule(
            tuple(layer + f"self_attn.{p}_proj.weight" for p in "qkv"), mv + "self_attention.linear_qkv.weight",
            join=lambda t: fuse_qkv(*t, lm), split=lambda t: split_qkv(t, lm),
        ),
        KeyRule((layer + "self_attn.o_proj.weight",), mv + "self_attention.linear_proj.weight"),
        KeyRule((layer + "self_attn.q_norm.weight",), mv + "self_attention.q_layernorm.weight"),
        KeyRule((layer + "self_attn.k_norm.weight",), mv + "self_attention.k_layernorm.weight"),
    ]
    if not lm.tie_embeddings:
        rules.append(KeyRule((lm_head,), f"{mv_prefix}output_layer.weight"))
    if lm.moe is None:
        rules += [
            KeyRule((layer + "post_attention_layernorm.weight",), mv + "mlp.linear_fc1.layer_norm_weight"),
            KeyRule(
                (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"), mv + "mlp.linear_fc1.weight",
                join=lambda t: torch.cat(t, dim=0), split=_halves,
            ),
            KeyRule((layer + "mlp.down_proj.weight",), mv + "mlp.linear_fc2.weight"),
        ]
    else:
        # HF (transformers >= 5, in memory): gate_up_proj [E, 2I, H] with gate first, down_proj
        # [E, H, I]; exactly megatron's stacked expert fc1 / fc2. On-disk variants are
        # normalized to this by the checkpoint reader (conversion.hf_checkpoint).
        rules += [
            KeyRule((layer + "post_attention_layernorm.weight",), mv + "pre_mlp_layernorm.weight"),
            KeyRule((layer + "mlp.gate.weight",), mv + "mlp.router.weight"),
            KeyRule((layer + "mlp.experts.gate_up_proj",), mv + "mlp.experts.experts.linear_fc1.weight"),
            KeyRule((layer + "mlp.experts.down_proj",), mv + "mlp.experts.experts.linear_fc2.weight"),
        ]
    return rules
