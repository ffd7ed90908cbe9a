"""One generic engine for HF <-> megavlm weights, driven by declarative key maps.

The megavlm side is megatron-core's *sharded* key space (what ``dist_checkpointing`` writes
and ``full_tensors.iter_shards`` yields): full, unsharded tensors whose transformer layers
(and MoE experts) are stacked along prepended axes, e.g.
``language.decoder.layers.self_attention.linear_qkv.weight [L, (q+2kv)*d, h]``. Any TP / PP /
EP layout loads from and gathers to this space, so a map is written once, for no layout.

A ``KeyRule`` pairs HF key patterns (``{i}`` a layer) with one megavlm key and a pair of
functions: ``join`` (HF tensors of one layer -> the megavlm tensor of that layer) and
``split`` (its inverse). Both are pure reshapes/concatenations, so a round trip is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor


def _identity_join(tensors: list[Tensor]) -> Tensor:
    return tensors[0]


def _identity_split(tensor: Tensor) -> list[Tensor]:
    return [tensor]


@dataclass(frozen=True)
class KeyRule:
    hf: tuple[str, ...]  # HF key patterns, ``{i}`` for the layer index
    mv: str  # megavlm sharded key; stacked over layers when the patterns contain {i}
    join: Callable[[list[Tensor]], Tensor] = _identity_join
    split: Callable[[Tensor], list[Tensor]] = _identity_split
    # Layer count of a per-layer rule when it is not the engine's ``num_layers`` (a vision
    # tower whose depth differs from the decoder's).
    layers: int | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]


def hf_keys(rule: KeyRule, layer: int | None) -> list[str]:
    """The HF keys of one rule, for one layer (``None`` for a rule without layers)."""
    return [pattern.format(i=layer) for pattern in rule.hf]


def megavlm_layer(rule: KeyRule, hf: Mapping[str, Tensor], layer: int | None) -> Tensor:
    """One layer's megavlm tensor (the whole tensor for a rule without layers) from HF tensors;
    ``hf`` may be lazy, so only that layer's tensors are read."""
    keys = hf_keys(rule, layer)
    missing = [k for k in keys if k not in hf]
    if missing:
        raise KeyError(f"HF checkpoint lacks {missing[0]!r} (needed for megavlm {rule.mv!r})")
    return rule.join([hf[k] for k in keys])


def hf_pieces(rule: KeyRule, layer_tensor: Tensor, layer: int | None) -> dict[str, Tensor]:
    """HF tensors of one layer, given that layer's megavlm tensor (the whole tensor for a rule
    without layers)."""
    pieces = rule.split(layer_tensor)
    return {key: piece.contiguous() for key, piece in zip(hf_keys(rule, layer), pieces)}


def layers_of(rule: KeyRule, num_layers: int) -> range | list[None]:
    """The layer indices of a rule: its own count, else ``num_layers`` (the decoder's); ``[None]``
    for a rule without layers."""
    if not rule.per_layer:
        return [None]
    return range(num_layers if rule.layers is None else rule.layers)


def hf_to_megavlm(hf: Mapping[str, Tensor], rules: list[KeyRule], *, num_layers: int) -> dict[str, Tensor]:
    """Full megavlm tensors (sharded key space) from an HF state dict."""
    out: dict[str, Tensor] = {}
    for rule in rules:
        parts = [megavlm_layer(rule, hf, i) for i in layers_of(rule, num_layers)]
        out[rule.mv] = torch.stack(parts) if rule.per_layer else parts[0]
    return out


def megavlm_to_hf(full: Mapping[str, Tensor], rules: list[KeyRule], *, num_layers: int) -> dict[str, Tensor]:
    """The inverse of ``hf_to_megavlm``."""
    out: dict[str, Tensor] = {}
    for rule in rules:
        if rule.mv not in full:
            raise KeyError(f"megavlm weights lack {rule.mv!r}")
        for i in layers_of(rule, num_layers):
            out.update(hf_pieces(rule, full[rule.mv] if i is None else full[rule.mv][i], i))
    return out
