"""Decoder position ids, the one implementation: MRoPE (Qwen3-VL) and 1D (STEP3-VL), prompt and decode.

Data (training batches), inference (prompts and generated tokens) and the HF-input bridge
all take their positions from here; ``models.rope`` only turns positions into rotary
frequencies. It depends on the config alone, so data never imports models to get them.

MRoPE ids equal HF's ``Qwen3VLModel.get_rope_index`` (transformers 5.23; REFERENCE 1). A
sequence is cut into runs of one modality (text / image placeholders / video placeholders).
Text runs count up on all three axes; a vision run with merged grid (t, gh, gw) starting at
position p gets T = p + frame, H = p + row, W = p + col, and the next run starts at
p + max(gh, gw). Each video's ``[t, h, w]`` grid is split into t blocks ``[1, h, w]``, one
per temporal pair of frames, because the processor puts timestamp text before each pair
(REFERENCE 4). HF takes the runs from ``mm_token_type_ids``; we derive them from the
placeholder token ids, which is what the processor does to build ``mm_token_type_ids``.
Generated token k after an n-token prompt sits at ``n + k + rope_delta`` on every axis,
``rope_delta = max(prompt ids) + 1 - n``; 1D positions are plain indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megavlm.config.schema import ModelConfig
from megavlm.config.vision import TokenIdsConfig

TEXT, IMAGE, VIDEO = 0, 1, 2  # HF's mm_token_type_ids values


def mm_token_type_ids(input_ids: Tensor, token_ids: TokenIdsConfig) -> Tensor:
    """Modality of each token (0 text, 1 image, 2 video), as the HF processor builds it."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == token_ids.image_token_id] = IMAGE
    types[input_ids == token_ids.video_token_id] = VIDEO
    return types


def split_video_grids(video_grid_thw: Tensor | None) -> Tensor | None:
    """``[sum t, 3]``: one ``[1, h, w]`` row per temporal pair, each its own block (REFERENCE 4)."""
    if video_grid_thw is None:
        return None
    grids = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
    grids[:, 0] = 1
    return grids


def _runs(types: Tensor) -> list[tuple[int, int, int]]:
    """(modality, start, end) of each maximal run of equal values in a 1-D tensor."""
    if types.numel() == 0:
        return []
    starts = torch.cat([types.new_zeros(1), (types[1:] != types[:-1]).nonzero().flatten() + 1])
    ends = starts[1:].tolist() + [types.numel()]
    return list(zip(types[starts].tolist(), starts.tolist(), ends))


def _check_counts(
    runs: list[tuple[int, int, int]], types: Tensor, grids: Tensor | None, modality: int, merge: int,
) -> None:
    """Placeholders must be exactly what the grids imply: per modality, in total and per block."""
    name, key = ("image", "image_grid_thw") if modality == IMAGE else ("video", "video_grid_thw")
    lengths = [e - s for m, s, e in runs if m == modality]
    n_tokens = int((types == modality).sum())
    grids = grids if grids is not None else torch.zeros(0, 3, dtype=torch.long)
    implied = grids.prod(-1) // merge**2
    if n_tokens != int(implied.sum()):
        raise ValueError(
            f"{n_tokens} {name} placeholder tokens but {key} {grids.tolist()} implies {int(implied.sum())} "
            f"(t*h*w/{merge**2} per block)"
        )
    if len(lengths) != len(grids):
        what = "temporal-pair blocks (each needs its own run, after its timestamp text)" if modality == VIDEO else "images"
        raise ValueError(f"{len(lengths)} runs of {name} placeholder tokens but {key} gives {len(grids)} {what}")
    for i, (length, grid, n) in enumerate(zip(lengths, grids.tolist(), implied.tolist())):
        if length != n or grid[1] % merge or grid[2] % merge:
            raise ValueError(
                f"{name} block {i}: {length} placeholder tokens but grid {grid} implies {n}; h and w must be "
                f"multiples of spatial_merge_size={merge}"
            )


def mrope_position_ids(
    tokens: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    *,
    token_ids: TokenIdsConfig,
    spatial_merge_size: int = 2,
) -> tuple[Tensor, int]:
    """``[3, S]`` MRoPE ids of one unpadded sample and its ``rope_delta`` (max + 1 - S) for decoding.

    Grids are in sequence order; videos are given per video (split into pairs here).
    Raises ValueError naming the counts when placeholders and grids disagree.
    """
    device = tokens.device
    tokens = tokens.cpu()
    types = mm_token_type_ids(tokens, token_ids)  # [S]
    runs = _runs(types)
    grids = {IMAGE: image_grid_thw, VIDEO: split_video_grids(video_grid_thw)}
    for modality in (IMAGE, VIDEO):
        _check_counts(runs, types, grids[modality], modality, spatial_merge_size)
    next_grid = {m: iter(g.tolist()) for m, g in grids.items() if g is not None}

    parts, pos = [], 0
    for modality, start, end in runs:
        if modality == TEXT:
            parts.append(torch.arange(end - start).expand(3, -1) + pos)  # [3, n]
            pos += end - start
            continue
        t, h, w = next(next_grid[modality])
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)  # [3, t*gh*gw]
        # HF advances by the spatial extent only (t is 1 for every Qwen3-VL block).
        pos += max(gh, gw)
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long, device=device), 0
    ids = torch.cat(parts, dim=1)  # [3, S]
    return ids.to(device), int(ids.max()) + 1 - tokens.numel()


def batched_mrope_position_ids(
    input_ids: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    *,
    attention_mask: Tensor | None = None,
    token_ids: TokenIdsConfig,
    spatial_merge_size: int = 2,
) -> tuple[Tensor, Tensor]:
    """``[3, B, S]`` ids and ``[B, 1]`` rope deltas of a left- or right-padded batch (inference).

    Grids are consumed in batch order, as the HF processor lays them out; padding slots get
    position 0 (as in HF), and each row's delta counts only its real tokens.
    """
    b, s = input_ids.shape
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = [row[k].cpu() for row, k in zip(input_ids, keep)]
    row_runs = [[m for m, _, _ in _runs(mm_token_type_ids(row, token_ids))] for row in rows]
    images = _split_by_row(image_grid_thw, [r.count(IMAGE) for r in row_runs], "image_grid_thw", "images")
    pairs = _split_by_row(split_video_grids(video_grid_thw), [r.count(VIDEO) for r in row_runs], "video_grid_thw",
                          "temporal-pair blocks")
    out = torch.zeros(3, b, s, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(b, 1, dtype=torch.long, device=input_ids.device)
    for i, row in enumerate(rows):
        # The row's pairs are re-joined as [1, h, w] videos; splitting them again is a no-op.
        ids, delta = mrope_position_ids(row, images[i], pairs[i], token_ids=token_ids,
                                        spatial_merge_size=spatial_merge_size)
        out[:, i, keep[i]] = ids.to(out.device)
        deltas[i] = delta
    return out, deltas


def _split_by_row(grids: Tensor | None, counts: list[int], key: str, what: str) -> list[Tensor | None]:
    if sum(counts) != (0 if grids is None else len(grids)):
        raise ValueError(
            f"the batch has {sum(counts)} placeholder runs ({counts} per row) but {key} gives "
            f"{0 if grids is None else len(grids)} {what}"
        )
    if grids is None:
        return [None] * len(counts)
    return [g if len(g) else None for g in torch.split(grids, counts)]


def sample_position_ids(
    tokens: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    model: ModelConfig,
    *,
    new_tokens: int = 0,
) -> Tensor:
    """Positions of one unpadded sample followed by ``new_tokens`` generated ones:
    ``[3, n + new_tokens]`` for MRoPE models (``model.rope.kind``), ``[n + new_tokens]`` for 1D RoPE."""
    n = tokens.numel()
    if not model.rope.kind.startswith("mrope"):
        return torch.arange(n + new_tokens, device=tokens.device)
    ids, delta = mrope_position_ids(
        tokens, image_grid_thw, video_grid_thw, token_ids=model.token_ids,
        spatial_merge_size=model.projector.spatial_merge_size if model.projector else 2,
    )
    after = torch.arange(n, n + new_tokens, device=ids.device) + delta  # [new_tokens]
    return torch.cat([ids, after.expand(3, -1)], dim=1)
