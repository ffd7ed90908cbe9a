"""Qwen3-VL patch embedding, learned position-embedding interpolation and 2D RoPE (REFERENCE 3).

Patches arrive flattened as the HF processor lays them out: per image/frame group, in
2x2 merge-block order (block row, block col, row in block, col in block), so every 4
consecutive patches are one merge block. Everything positional here follows that order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megavlm.config.vision import VisionConfig


class PatchEmbed(torch.nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch): one vector per patch.

    The parameters are those of the released Conv3d (same names and shapes, so checkpoints
    and HF conversion are unchanged), but the forward is the equivalent linear layer over
    the flattened patches: with kernel = stride every output is one dot product of the
    weight with one ``C*T*P*P`` patch, in the ``(C, T, P, P)`` order of both flattenings.
    One GEMM forward and backward instead of a convolution, whose backward (on CPU
    especially) is several times slower.
    """

    def __init__(self, vision: VisionConfig):
        super().__init__()
        self.shape = (vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        kernel = self.shape[1:]
        self.proj = torch.nn.Conv3d(vision.in_channels, vision.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: Tensor) -> Tensor:
        weight = self.proj.weight.flatten(1)  # [hidden, C*T*P*P]
        x = pixel_values.reshape(-1, weight.shape[1]).to(weight.dtype)  # [N, C*T*P*P]
        return F.linear(x, weight, self.proj.bias)  # [N, hidden]


def merge_block_order(rows: Tensor, merge: int) -> Tensor:
    """Reorder a ``[h, w, ...]`` grid to the flattened merge-block order ``[h*w, ...]``."""
    h, w = rows.shape[:2]
    blocks = rows.reshape(h // merge, merge, w // merge, merge, *rows.shape[2:]).transpose(1, 2)
    return blocks.reshape(h * w, *rows.shape[2:])


class PositionEmbedding(torch.nn.Module):
    """A learned ``side x side`` table, bilinearly resampled (align corners) to each grid."""

    def __init__(self, vision: VisionConfig, merge: int):
        super().__init__()
        self.side = vision.position_embedding_size
        self.merge = merge
        self.table = torch.nn.Embedding(self.side * self.side, vision.hidden_size)

    def forward(self, grid_thw: Tensor) -> Tensor:
        table = self.table.weight.view(1, self.side, self.side, -1).permute(0, 3, 1, 2)  # [1, C, side, side]
        out = []
        for t, h, w in grid_thw.tolist():
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # [C, h, w]
            out.append(merge_block_order(grid.permute(1, 2, 0), self.merge).repeat(t, 1))
        return torch.cat(out)  # [N, C]


def rope_2d(grid_thw: Tensor, *, head_dim: int, theta: float, merge: int) -> Tensor:
    """``[N, 1, 1, head_dim]`` angles: ``cat(row * inv, col * inv)`` twice (rotate-half layout)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2))
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = merge_block_order(torch.stack([rows, cols], dim=-1), merge).repeat(t, 1)  # [h*w*t, 2]
        out.append(coords)
    coords = torch.cat(out).float()
    freqs = torch.cat([coords[:, :1] * inv, coords[:, 1:] * inv], dim=-1)  # [N, head_dim / 2]
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


def vision_cu_seqlens(grid_thw: Tensor) -> Tensor:
    """Boundaries of the attention segments: every temporal slice of every image or video."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
