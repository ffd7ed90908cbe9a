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

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    @staticmethod
    def collate(samples: list["Batch"]) -> "Batch":
        def cat(name: str) -> torch.Tensor:
            parts = [getattr(s, name) for s in samples]
            batch_dim = 1 if parts[0].dim() == 3 else 0  # MRoPE position ids are [3, b, s]
            return torch.cat(parts, dim=batch_dim)

        return Batch(**{f.name: cat(f.name) for f in fields(Batch)})
