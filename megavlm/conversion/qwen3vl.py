"""Qwen3-VL / Qwen3-VL-MoE: the HF key map as data (REFERENCE 9).

The decoder reuses the Qwen3 rules under ``model.language_model.``; the vision side maps
``model.visual.*``. One layout rule is not a rename: HF's fused ViT ``qkv`` rows are
``[q (all heads); k; v]`` while megatron groups them per head ``[q_h; k_h; v_h]``.
"""

from __future__ import annotations

from torch import Tensor

from megavlm.config.schema import ModelConfig
from megavlm.conversion.engine import KeyRule
from megavlm.conversion.qwen3 import qwen3_rules


def _per_head(qkv: Tensor, heads: int) -> Tensor:
    """[3 * heads * d, ...] HF order -> megatron's per-head [heads * 3 * d, ...] order."""
    rest = qkv.shape[1:]
    return qkv.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(qkv.shape)


def _hf_order(qkv: Tensor, heads: int) -> Tensor:
    rest = qkv.shape[1:]
    return qkv.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(qkv.shape)


def vit_block_rules(block: str, names: dict[str, str], param: str, *, layer: str, heads: int,
                    depth: int) -> list[KeyRule]:
    """One pre-norm ViT block's weights (or biases) on megatron's layer (megavlm prefix ``layer``):
    HF names of the block's ``norm1``, fused ``qkv``, ``proj``, ``norm2``, ``fc1``, ``fc2`` under
    ``block`` (``{i}`` the layer)."""
    return [
        KeyRule((block + f"{names['norm1']}.{param}",), layer + f"self_attention.linear_qkv.layer_norm_{param}", layers=depth),
        KeyRule(
            (block + names["qkv"].format(param=param),), layer + f"self_attention.linear_qkv.{param}",
            join=lambda t: _per_head(t[0], heads), split=lambda t: [_hf_order(t, heads)], layers=depth,
        ),
        KeyRule((block + f"{names['proj']}.{param}",), layer + f"self_attention.linear_proj.{param}", layers=depth),
        KeyRule((block + f"{names['norm2']}.{param}",), layer + f"mlp.linear_fc1.layer_norm_{param}", layers=depth),
        KeyRule((block + f"{names['fc1']}.{param}",), layer + f"mlp.linear_fc1.{param}", layers=depth),
        KeyRule((block + f"{names['fc2']}.{param}",), layer + f"mlp.linear_fc2.{param}", layers=depth),
    ]


QWEN3VL_BLOCK = {"norm1": "norm1", "qkv": "attn.qkv.{param}", "proj": "attn.proj", "norm2": "norm2",
                 "fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"}


def vision_rules(model: ModelConfig) -> list[KeyRule]:
    v = model.vision
    heads, depth = v.num_attention_heads, v.num_layers  # the ViT's depth is not the decoder's
    block = "model.visual.blocks.{i}."
    layer = "vision.encoder.layers."
    rules = [
        KeyRule(("model.visual.patch_embed.proj.weight",), "vision.patch_embed.proj.weight"),
        KeyRule(("model.visual.patch_embed.proj.bias",), "vision.patch_embed.proj.bias"),
        KeyRule(("model.visual.pos_embed.weight",), "vision.pos_embed.table.weight"),
    ]
    for param in ("weight", "bias"):
        rules += vit_block_rules(block, QWEN3VL_BLOCK, param, layer=layer, heads=heads, depth=depth)
        mergers = [("model.visual.merger.", "vision.merger.")] + [
            (f"model.visual.deepstack_merger_list.{k}.", f"vision.deepstack_mergers.{k}.")
            for k in range(len(v.deepstack_layers))
        ]
        for hf, mv in mergers:
            rules += [KeyRule((f"{hf}{part}.{param}",), f"{mv}{part}.{param}") for part in ("norm", "linear_fc1", "linear_fc2")]
    return rules


def qwen3vl_rules(model: ModelConfig) -> list[KeyRule]:
    """Rules for the whole model: decoder, then vision encoder and mergers."""
    language = qwen3_rules(model.language, hf_prefix="model.language_model.")
    return language + vision_rules(model)
