"""Decoder rotary frequencies: MRoPE (interleaved and chunked) and 1D RoPE (REFERENCE 1).

The position ids themselves live in ``megavlm.positions`` (shared with data and inference).

Rotary frequencies: megatron-core's ``MultimodalRotaryEmbedding`` implements only the
chunked (Qwen2-VL) section layout; Qwen3-VL interleaves the axes over the frequencies.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
from torch import Tensor


def _axis_of_frequency(n_freq: int, mrope_section: list[int], device: torch.device) -> Tensor:
    """``[n_freq]`` axis (0 T, 1 H, 2 W) of each rotary frequency, Qwen3-VL interleaved layout."""
    if len(mrope_section) != 3 or sum(mrope_section) != n_freq:
        raise ValueError(
            f"model.rope.mrope_section {list(mrope_section)} must have 3 entries summing to the "
            f"{n_freq} rotary frequencies (head_dim / 2)"
        )
    j = torch.arange(n_freq, device=device)
    axis = torch.zeros(n_freq, dtype=torch.long, device=device)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


class InterleavedMRotaryEmbedding(MultimodalRotaryEmbedding):
    """Qwen3-VL MRoPE: frequency j takes its angle from H if j % 3 == 1 and j < 3 * section[1],
    from W if j % 3 == 2 and j < 3 * section[2], else from T (HF ``apply_interleaved_mrope``).

    Interleaving spreads every axis over low and high frequencies instead of giving T only the
    fastest ones (the chunked layout). Same constructor and forward as megatron's class, so
    GPTModel(position_embedding_type="mrope") can use it in place.

    Frequencies are computed for exactly the position ids given, token by token. Under
    context parallelism the ids arrive already split like the tokens
    (``megavlm.parallel.context``), so there is no CP slicing here (megatron's module slices
    a full-length table per CP rank, which is wrong for per-sample MRoPE ids and CUDA-only).
    """

    def forward(self, position_ids: Tensor, mrope_section: list[int], cp_group=None) -> Tensor:
        """``[s, b, 1, head_dim]`` angles of ``position_ids [3, b, s]``; ``cp_group`` is ignored
        (see the class docstring)."""
        seq = position_ids.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)  # [3, b, s]
        if self.seq_len_interpolation_factor is not None:
            seq = seq * (1 / self.seq_len_interpolation_factor)
        axis = _axis_of_frequency(self.inv_freq.numel(), mrope_section, seq.device)  # [d/2]
        freqs = seq[axis].permute(2, 1, 0) * self.inv_freq  # [s, b, d/2]
        if self.rotary_interleaved:  # GPT-J pairs: (f0, f0, f1, f1, ...)
            emb = freqs.repeat_interleave(2, dim=-1)
        else:  # NeoX rotate_half: (f, f)
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, :, None, :].contiguous()  # [s, b, 1, d]


def multimodal_rotary_embedding(
    kind: str,
    *,
    kv_channels: int,
    rotary_base: float,
    rotary_percent: float = 1.0,
    rotary_interleaved: bool = False,
    seq_len_interpolation_factor: float | None = None,
    cp_group: torch.distributed.ProcessGroup | None = None,
) -> MultimodalRotaryEmbedding:
    """The decoder's rotary module for ``model.rope.kind``: ``mrope_interleaved`` (Qwen3-VL) or
    ``mrope_chunked`` (Qwen2-VL, megatron-core's own class)."""
    classes = {"mrope_interleaved": InterleavedMRotaryEmbedding, "mrope_chunked": MultimodalRotaryEmbedding}
    if kind not in classes:
        raise ValueError(
            f"model.rope.kind: {kind!r} has no multimodal rotary module; use one of {', '.join(classes)} "
            f"(1D 'rope' is GPTModel's own RotaryEmbedding)"
        )
    return classes[kind](
        kv_channels=kv_channels, rotary_percent=rotary_percent, rotary_interleaved=rotary_interleaved,
        seq_len_interpolation_factor=seq_len_interpolation_factor, rotary_base=rotary_base, cp_group=cp_group,
    )
