"""One forward pass on tensors laid out as the HF Qwen3-VL processor produces them.

This is the tool for debugging parity with transformers: save the processor's output with
``torch.save(dict(inputs), "inputs.pt")``, run ``tools/generate.py --load DIR --inputs
inputs.pt --dump-logits out.pt``, compare with HF's logits. Every check names the tensor,
the row and the numbers, because a silent mismatch here is what makes parity hunts long.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from megavlm.config.schema import ModelConfig
from megavlm.inference.engine import Prompt, padding_mask, sequence_parallel_off, te_mask_types
from megavlm.positions import batched_mrope_position_ids

KNOWN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw")


class InputsError(ValueError):
    pass


def read_hf_inputs(path: str | Path, model: ModelConfig) -> dict[str, Tensor]:
    """Load and check a saved processor output against the model's configuration."""
    path = Path(path)
    raw = torch.load(path, weights_only=False)
    if hasattr(raw, "data") and not isinstance(raw, dict):  # a BatchFeature saved as is
        raw = dict(raw.data)
    if not isinstance(raw, dict):
        raise InputsError(f"{path}: expected a dict of tensors (the processor's output), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise InputsError(f"{path}: unknown keys {unknown}; expected some of {', '.join(KNOWN_KEYS)}")
    if "input_ids" not in raw:
        raise InputsError(f"{path}: 'input_ids' is required")
    inputs = {k: torch.as_tensor(v) for k, v in raw.items() if v is not None}
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise InputsError(f"{path}: input_ids must be an integer tensor [batch, seq], got {ids.dtype} {list(ids.shape)}")
    inputs["input_ids"] = ids = ids.long()
    if ids.max() >= model.language.vocab_size or ids.min() < 0:
        raise InputsError(f"{path}: input_ids hold ids outside [0, {model.language.vocab_size}) (max {int(ids.max())})")
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs and tuple(inputs[key].shape) != tuple(ids.shape):
            raise InputsError(f"{path}: {key} has shape {list(inputs[key].shape)}, input_ids {list(ids.shape)}")
    _check_media(path, inputs, model)
    return inputs


def _check_media(path: Path, inputs: dict[str, Tensor], model: ModelConfig) -> None:
    ids = inputs["input_ids"]
    tok = model.token_ids
    merge = model.projector.spatial_merge_size if model.projector else 2
    v = model.vision
    for kind, pixels_key, grid_key, token_id, type_id in (
        ("image", "pixel_values", "image_grid_thw", tok.image_token_id, 1),
        ("video", "pixel_values_videos", "video_grid_thw", tok.video_token_id, 2),
    ):
        placeholders = ids == token_id
        if "mm_token_type_ids" in inputs:
            typed = inputs["mm_token_type_ids"] == type_id
            if not torch.equal(typed, placeholders):
                row, col = (typed ^ placeholders).nonzero()[0].tolist()
                raise InputsError(
                    f"{path}: mm_token_type_ids marks {kind} tokens (={type_id}) where input_ids has no "
                    f"{kind} placeholder (id {token_id}) or vice versa; first at row {row}, position {col}"
                )
        has_pixels, has_grid = pixels_key in inputs, grid_key in inputs
        if has_pixels != has_grid:
            raise InputsError(f"{path}: {pixels_key} and {grid_key} must come together")
        if not has_pixels:
            if placeholders.any():
                raise InputsError(f"{path}: {int(placeholders.sum())} {kind} placeholders (id {token_id}) but no {pixels_key}")
            continue
        if v is None:
            raise InputsError(f"{path}: {pixels_key} given but the model has no vision encoder")
        pixels, grid = inputs[pixels_key], inputs[grid_key].long()
        inputs[grid_key] = grid
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        if pixels.dim() != 2 or pixels.shape[1] != patch_dim:
            raise InputsError(
                f"{path}: {pixels_key} must be [patches, {patch_dim}] (channels x temporal_patch x patch^2), "
                f"got {list(pixels.shape)}"
            )
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise InputsError(f"{path}: {grid_key} must be [n, 3] (t, h, w), got {list(grid.shape)}")
        patches = int(grid.prod(-1).sum())
        if patches != pixels.shape[0]:
            raise InputsError(f"{path}: {grid_key} implies {patches} patches but {pixels_key} has {pixels.shape[0]}")
        tokens = patches // merge ** 2
        if tokens != int(placeholders.sum()):
            raise InputsError(
                f"{path}: {grid_key} gives {tokens} {kind} tokens after the {merge}x{merge} merge but input_ids "
                f"holds {int(placeholders.sum())} placeholders (id {token_id})"
            )


@torch.no_grad()
def forward_logits(model_chunks, inputs: dict[str, Tensor], model_cfg: ModelConfig) -> Tensor:
    """Full logits ``[batch, seq, vocab]`` (fp32) for checked processor inputs; PP=1."""
    model = model_chunks[0]
    dev = next(model.parameters()).device
    ids = inputs["input_ids"].to(dev)
    attention = inputs.get("attention_mask", torch.ones_like(ids)).to(dev).bool()
    positions, _ = batched_mrope_position_ids(
        ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), attention_mask=attention,
        token_ids=model_cfg.token_ids,
        spatial_merge_size=model_cfg.projector.spatial_merge_size if model_cfg.projector else 2,
    )
    mask = padding_mask(~attention, 0, ids.shape[1])
    media = {k: inputs[k].to(dev) for k in KNOWN_KEYS[3:] if k in inputs}
    was_training = model.training
    model.eval()
    with sequence_parallel_off(model), te_mask_types(model):
        logits = model(ids, positions.to(dev), attention_mask=mask, runtime_gather_output=True, **media)
    model.train(was_training)
    return logits[..., : model_cfg.language.vocab_size].float()


def prompts_from_hf_inputs(inputs: dict[str, Tensor], model: ModelConfig) -> list[Prompt]:
    """One engine prompt per row of checked processor inputs: the row's real tokens (padding
    dropped, on either side) and its own images and videos (the processor concatenates them in
    batch order; a row takes as many grids as its placeholders need)."""
    ids, keep = inputs["input_ids"], inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    merge = model.projector.spatial_merge_size if model.projector else 2
    tok = model.token_ids
    rows = [row[k] for row, k in zip(ids, keep)]
    per_kind = {}
    for kind, pixels_key, grid_key, token_id in (("image", "pixel_values", "image_grid_thw", tok.image_token_id),
                                                 ("video", "pixel_values_videos", "video_grid_thw", tok.video_token_id)):
        if grid_key not in inputs:
            per_kind[kind] = [(None, None)] * len(rows)
            continue
        grid = inputs[grid_key]
        tokens_per_grid = (grid.prod(-1) // merge ** 2).tolist()
        patches = torch.split(inputs[pixels_key], grid.prod(-1).tolist())
        split, g = [], 0
        for row in rows:
            need, first = int((row == token_id).sum()), g
            while need > 0:
                need -= tokens_per_grid[g]
                g += 1
            split.append((torch.cat(patches[first:g]), grid[first:g]) if g > first else (None, None))
        per_kind[kind] = split
    return [
        Prompt(tokens=row, pixel_values=image[0], image_grid_thw=image[1], pixel_values_videos=video[0],
               video_grid_thw=video[1])
        for row, image, video in zip(rows, per_kind["image"], per_kind["video"])
    ]
