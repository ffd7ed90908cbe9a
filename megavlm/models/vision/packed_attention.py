"""Core attention for the ViT's packed rows on backends whose kernels take megatron's ``thd``.

The ViT packs all images and video slices as one ``sbhd`` row ``[t, 1, h, d]`` with the
sample boundaries in ``cu_seqlens`` (``megavlm.models.vision.qwen3vl``): megatron then
applies its RoPE one-to-one on that row. Tagged ``thd`` instead, megatron's unfused RoPE
would read ``cu_seqlens`` back with ``.tolist()`` / ``.item()`` twice per sample per layer,
each a host synchronization on a GPU (and a graph break under ``torch.compile``).
Transformer Engine's variable-length kernels, however, need ``thd``: this adapter hands them
the row as ``[t, h, d]`` with the same boundaries re-tagged ``thd`` and returns the
``[t, 1, h * d]`` that megatron's attention expects from an ``sbhd`` core attention.
(megavlm's ``SDPAAttention`` splits ``sbhd`` packed rows itself and needs no adapter.)
"""

from __future__ import annotations

import dataclasses
from functools import cache

from torch import Tensor


@cache
def thd_kernels_for_packed_rows(base: type) -> type:
    """A subclass of the core attention ``base`` (one that takes megatron's ``thd`` packed
    format, such as ``TEDotProductAttention``) that also takes packed ``sbhd`` rows."""

    class PackedRowsAttention(base):
        def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask, *args,
                    packed_seq_params=None, **kwargs) -> Tensor:
            if packed_seq_params is None or packed_seq_params.qkv_format != "sbhd":
                return super().forward(query, key, value, attention_mask, *args,
                                       packed_seq_params=packed_seq_params, **kwargs)
            if query.size(1) != 1:
                raise ValueError(f"a packed sbhd row has batch 1, got query {tuple(query.shape)}")
            thd = dataclasses.replace(packed_seq_params, qkv_format="thd")
            out = super().forward(query.squeeze(1), key.squeeze(1), value.squeeze(1), attention_mask, *args,
                                  packed_seq_params=thd, **kwargs)  # [t, h * d]
            return out.reshape(out.size(0), 1, -1)  # [t, 1, h * d], as megatron reshapes thd

    PackedRowsAttention.__name__ = PackedRowsAttention.__qualname__ = f"PackedRows{base.__name__}"
    return PackedRowsAttention
