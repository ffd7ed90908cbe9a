"""Load Hugging Face weights straight into this rank's model chunks, at any layout.

Each rank walks its own shards (``full_tensors.iter_shards``: global key, global offset, the
layer and expert axes megatron prepends) and builds, from the lazily read HF tensors, only
the layer each shard needs; it keeps its slice. A rank therefore reads and holds one layer's
full tensor at a time, never the model: what importing a 235B checkpoint under its training
layout needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from megavlm.config.schema import ModelConfig
from megavlm.conversion.engine import KeyRule, megavlm_layer
from megavlm.conversion.hf_checkpoint import hf_rules, open_hf_model_dir
from megavlm.models.full_tensors import iter_shards


@torch.no_grad()
def load_hf_tensors(model_chunks: list[torch.nn.Module], model: ModelConfig, hf: Mapping[str, torch.Tensor]) -> int:
    """Copy every shard of the chunks from ``hf`` (HF names); returns the shards filled.

    A shape that differs from the model's names the key and both shapes.
    """
    rules: dict[str, KeyRule] = {rule.mv: rule for rule in hf_rules(model)}
    cached: tuple[str, int | None, torch.Tensor] | None = None
    filled = 0
    for shard in iter_shards(model_chunks):
        rule = rules.get(shard.key)
        if rule is None:
            raise KeyError(f"model tensor {shard.key!r} {list(shard.global_shape)} has no Hugging Face source")
        layer = shard.global_offset[0] if rule.per_layer else None
        if cached is None or cached[:2] != (shard.key, layer):
            cached = (shard.key, layer, megavlm_layer(rule, hf, layer))
        full = cached[2]
        expected = shard.global_shape[1:] if rule.per_layer else shard.global_shape
        if tuple(full.shape) != tuple(expected):
            raise ValueError(
                f"{shard.key}{f' layer {layer}' if layer is not None else ''}: the HF weights give shape "
                f"{list(full.shape)} but the model has {list(expected)}"
            )
        index = shard.slices()[1:] if rule.per_layer else shard.slices()
        shard.data.copy_(full[index].reshape(shard.data.shape))
        filled += 1
    return filled


def load_hf_model_weights(model_chunks: list[torch.nn.Module], path: str | Path) -> ModelConfig:
    """Fill the chunks from an HF model directory, streamed; returns its ``ModelConfig``."""
    model, tensors = open_hf_model_dir(path)
    load_hf_tensors(model_chunks, model, tensors)
    return model
