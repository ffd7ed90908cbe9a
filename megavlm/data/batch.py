"""The micro-batch every stage consumes (pretraining, SFT, RL, inference)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# Media travel as flattened patches concatenated over the micro-batch (one grid row per block).
MEDIA_FIELDS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
ACCOUNTING_FIELDS = ("sample_counts", "notes")


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64, the next token of each position
    loss_mask: torch.Tensor  # [b, s] float, 1 where the label is supervised
    position_ids: torch.Tensor  # [b, s] (1D RoPE) or [3, b, s] (MRoPE)
    # Packed sequences (b = 1): boundaries [n + 1] (int32) of the samples, padding included
    # as a last segment, so attention never crosses a sample boundary.
    cu_seqlens: torch.Tensor | None = None
    # [b, s] index of the sample each token belongs to within its row (-1: padding); None
    # means one sample per row. Used for per-sample loss normalization.
    sample_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None  # [N, C*T*P*P] image patches
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    pixel_values_videos: torch.Tensor | None = None  # [M, C*T*P*P] video patches
    video_grid_thw: torch.Tensor | None = None  # [n_video_blocks, 3]
    # [b, s] weight of each token's loss (training.losses), set per step; None: loss_mask.
    loss_weights: torch.Tensor | None = None
    # Data accounting, summed over the samples in the batch: [seen, skipped per reason]
    # (data.vlm_dataset.BAD_REASONS), plus what was wrong with the skipped ones. Carried in
    # the batch so counts survive loader worker processes.
    sample_counts: torch.Tensor | None = None
    notes: list[str] | None = None

    def to(self, device: torch.device) -> "Batch":
        def move(value):
            return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def media(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in MEDIA_FIELDS}

    def with_loss_weights(self, weights: torch.Tensor) -> "Batch":
        return replace(self, loss_weights=weights)

    @staticmethod
    def collate(samples: list["Batch"]) -> "Batch":
        if len(samples) > 1 and samples[0].cu_seqlens is not None:
            raise ValueError("packed sequences need train.micro_batch_size=1 (one packed row per micro-batch)")

        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(s, name) for s in samples if getattr(s, name) is not None]
            if not parts or name == "cu_seqlens":
                return parts[0] if parts else None
            batch_dim = 1 if name == "position_ids" and parts[0].dim() == 3 else 0  # MRoPE [3, b, s]
            return torch.cat(parts, dim=batch_dim)

        rows = {f.name: cat(f.name) for f in fields(Batch) if f.name not in (*MEDIA_FIELDS, *ACCOUNTING_FIELDS)}
        return Batch(**rows, **concat_media(samples), **merge_accounting(samples))


def merge_accounting(samples: list[Batch]) -> dict:
    """Counts summed and notes joined over the samples of one row or micro-batch."""
    counts = [s.sample_counts for s in samples if s.sample_counts is not None]
    notes = [n for s in samples for n in (s.notes or [])]
    return {"sample_counts": torch.stack(counts).sum(0) if counts else None, "notes": notes or None}


def concat_media(samples: list[Batch]) -> dict[str, torch.Tensor | None]:
    """Media of several samples in sample order, as one micro-batch carries them."""
    out = {}
    for name in MEDIA_FIELDS:
        parts = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        out[name] = torch.cat(parts, dim=0) if parts else None
    return out
