"""The micro-batch every stage consumes (pretraining, SFT, RL, inference)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64, the next token of each position
    loss_mask: torch.Tensor  # [b, s] float, 1 where the label is supervised
    position_ids: torch.Tensor  # [b, s] (1D RoPE) or [3, b, s] (MRoPE)
    # Packed sequences (b = 1): boundaries [n + 1] (int32) of the samples, padding included
    # as a last segment, so attention never crosses a sample boundary.
    cu_seqlens: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
        })

    @staticmethod
    def collate(samples: list["Batch"]) -> "Batch":
        if len(samples) > 1 and samples[0].cu_seqlens is not None:
            raise ValueError("packed sequences need train.micro_batch_size=1 (one packed row per micro-batch)")

        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(s, name) for s in samples]
            if parts[0] is None or name == "cu_seqlens":
                return parts[0]
            batch_dim = 1 if parts[0].dim() == 3 else 0  # MRoPE position ids are [3, b, s]
            return torch.cat(parts, dim=batch_dim)

        return Batch(**{f.name: cat(f.name) for f in fields(Batch)})
