"""Decoder position encodings: MRoPE (interleaved and chunked) and 1D RoPE (REFERENCE 1).

Position ids: text tokens count up on all three axes; a vision block (one image, or one
temporal pair of video frames) with merged grid (gh, gw) gets T = start, H = start + row,
W = start + col, and the text after it continues from max + 1. This equals HF's
``Qwen3VLModel.get_rope_index`` (transformers 5.23), which also splits each video's
``[t, h, w]`` grid into t blocks of one frame pair, each preceded by its timestamp text.

Rotary frequencies: megatron-core's ``MultimodalRotaryEmbedding`` implements only the
chunked (Qwen2-VL) section layout; Qwen3-VL interleaves the axes over the frequencies.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    MultimodalRotaryEmbedding,
    get_pos_emb_on_this_cp_rank,
)
from torch import Tensor

from megavlm.config.vision import TokenIdsConfig


def _vision_runs(tokens: Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of ``token_id`` in a 1-D token tensor."""
    is_pad = (tokens == token_id).int()
    edges = torch.diff(is_pad, prepend=is_pad.new_zeros(1), append=is_pad.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def split_video_grids(video_grid_thw: Tensor | None) -> Tensor | None:
    """One ``[1, h, w]`` row per temporal pair: each pair is its own block (REFERENCE 4)."""
    if video_grid_thw is None:
        return None
    grids = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0).clone()
    grids[:, 0] = 1
    return grids


def mrope_position_ids(
    tokens: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    *,
    token_ids: TokenIdsConfig,
    spatial_merge_size: int = 2,
) -> tuple[Tensor, int]:
    """``[3, S]`` MRoPE ids of one unpadded sample and its ``rope_delta`` for decoding."""
    blocks = []  # (start, end, grid) in sequence order
    for token_id, grids, kind in (
        (token_ids.image_token_id, image_grid_thw, "image"),
        (token_ids.video_token_id, split_video_grids(video_grid_thw), "video"),
    ):
        runs = _vision_runs(tokens, token_id)
        n_grids = 0 if grids is None else len(grids)
        if len(runs) != n_grids:
            raise ValueError(
                f"{len(runs)} {kind} placeholder runs (token id {token_id}) but {n_grids} {kind} "
                f"blocks in the grids ({'video frame pairs' if kind == 'video' else 'images'})"
            )
        for (start, end), grid in zip(runs, grids if grids is not None else []):
            t, h, w = (int(x) for x in grid)
            expected = t * h * w // spatial_merge_size ** 2
            if end - start != expected:
                raise ValueError(
                    f"{kind} block at token {start} has {end - start} placeholders but its grid "
                    f"{[t, h, w]} gives {expected} tokens after the {spatial_merge_size}x{spatial_merge_size} merge"
                )
            blocks.append((start, end, (t, h // spatial_merge_size, w // spatial_merge_size)))
    blocks.sort()

    parts, pos, cursor = [], 0, 0
    for start, end, (t, gh, gw) in blocks:
        if start > cursor:  # text before the block
            parts.append(torch.arange(start - cursor).expand(3, -1) + pos)
            pos += start - cursor
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        parts.append(torch.stack([tt.flatten() + pos, hh.flatten() + pos, ww.flatten() + pos]))
        pos += max(gh, gw)
        cursor = end
    if cursor < tokens.numel():
        parts.append(torch.arange(tokens.numel() - cursor).expand(3, -1) + pos)
    ids = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    delta = int(ids.max()) + 1 - tokens.numel() if tokens.numel() else 0
    return ids.long(), delta


def batched_mrope_position_ids(
    input_ids: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    *,
    attention_mask: Tensor | None = None,
    token_ids: TokenIdsConfig,
    spatial_merge_size: int = 2,
) -> tuple[Tensor, Tensor]:
    """``[3, B, S]`` ids and ``[B, 1]`` rope deltas of a (left- or right-) padded batch.

    Grids are consumed in batch order, as the HF processor lays them out; padding slots
    get position 0.
    """
    b, s = input_ids.shape
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    videos_per_row = _count_blocks(input_ids, keep, token_ids.video_token_id)
    images_per_row = _count_blocks(input_ids, keep, token_ids.image_token_id)
    image_grids = _split_rows(image_grid_thw, images_per_row)
    video_grids = _split_rows(split_video_grids(video_grid_thw), videos_per_row)
    out = torch.zeros(3, b, s, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(b, 1, dtype=torch.long, device=input_ids.device)
    for i in range(b):
        ids, delta = mrope_position_ids(
            input_ids[i][keep[i]].cpu(), image_grids[i], video_grids[i], token_ids=token_ids,
            spatial_merge_size=spatial_merge_size,
        )
        out[:, i, keep[i]] = ids.to(out.device)
        deltas[i] = delta
    return out, deltas


def _count_blocks(input_ids: Tensor, keep: Tensor, token_id: int) -> list[int]:
    return [len(_vision_runs(row[k].cpu(), token_id)) for row, k in zip(input_ids, keep)]


def _split_rows(grids: Tensor | None, counts: list[int]) -> list[Tensor | None]:
    if grids is None:
        if any(counts):
            raise ValueError(f"the batch has media placeholders ({counts} blocks per row) but no grid_thw")
        return [None] * len(counts)
    if sum(counts) != len(grids):
        raise ValueError(f"{sum(counts)} placeholder blocks in the batch but {len(grids)} grid rows")
    parts = torch.split(grids, counts)
    return [p if len(p) else None for p in parts]


def decode_position_ids(cache_position: Tensor, rope_deltas: Tensor) -> Tensor:
    """``[3, B, n]`` positions of generated tokens: ``cache_position + rope_delta`` on every axis."""
    return (cache_position[None, None, :] + rope_deltas[None, :, :]).expand(3, -1, -1)


class InterleavedMRotaryEmbedding(MultimodalRotaryEmbedding):
    """Qwen3-VL's MRoPE: frequency j uses H if j % 3 == 1, W if j % 3 == 2 (within 3 x the
    section), else T; then ``cat(f, f)`` for megatron's rotate-half application."""

    def forward(self, position_ids: Tensor, mrope_section: list[int], cp_group=None) -> Tensor:
        seq = position_ids.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)  # [3, b, s]
        if self.seq_len_interpolation_factor is not None:
            seq = seq / self.seq_len_interpolation_factor
        freqs = seq[..., None] * self.inv_freq  # [3, b, s, d/2]
        axis = torch.zeros(freqs.shape[-1], dtype=torch.long, device=freqs.device)
        j = torch.arange(freqs.shape[-1], device=freqs.device)
        axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
        axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
        freqs = freqs.gather(0, axis.expand(1, *freqs.shape[1:-1], -1)).squeeze(0)  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        emb = emb[..., None, :].transpose(0, 1).contiguous()  # [s, b, 1, d]
        if cp_group is None:
            cp_group = self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb


def multimodal_rotary_embedding(kind: str, *, kv_channels: int, rotary_base: float) -> MultimodalRotaryEmbedding:
    """The rotary module for ``model.rope.kind`` (``mrope_interleaved`` or ``mrope_chunked``)."""
    classes = {"mrope_interleaved": InterleavedMRotaryEmbedding, "mrope_chunked": MultimodalRotaryEmbedding}
    if kind not in classes:
        raise ValueError(f"model.rope.kind: {kind!r} is not one of {', '.join(classes)}")
    return classes[kind](kv_channels=kv_channels, rotary_percent=1.0, rotary_base=rotary_base)
