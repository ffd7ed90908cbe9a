"""2D RoPE of the Perception Encoder (REFERENCE 5): GPT-J pairs, column angles then row angles.

PE rotates channel pairs ``(2i, 2i+1)`` of each head (GPT-J / "interleaved" layout), unlike
Qwen3-VL's rotate-half pairs ``(i, i + d/2)``. megatron-core implements exactly this layout
with ``TransformerConfig.rotary_interleaved=True``: its ``_rotate_half`` maps each pair
``(x[2i], x[2i+1])`` to ``(-x[2i+1], x[2i])`` and multiplies by ``cos/sin`` of the angle at
channels ``2i`` and ``2i+1``, so the angles must be given per channel with every frequency
repeated twice in a row, which is what :func:`pe_rope_angles` returns.

Per axis, PE builds a 1D rotary table over ``d = head_dim / 2`` channels:
``inv = 1 / theta ** (arange(0, d, 2) / d)`` (``d / 2`` frequencies), angle = position * inv,
each repeated twice. The first half of ``head_dim`` takes the patch column (x), the second
half the patch row (y). Positions are plain grid indices 0..w-1 / 0..h-1 (no CLS token), so a
smaller crop uses the top-left part of the larger grid's table.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pe_inv_freq(head_dim: int, theta: float = 10000.0, device: torch.device | None = None) -> Tensor:
    """``[head_dim / 4]`` inverse frequencies of one axis (PE's ``RotaryEmbedding(head_dim // 2)``)."""
    if head_dim % 4:
        raise ValueError(
            f"PE 2D RoPE needs head_dim divisible by 4 (two axes x pairs), got head_dim={head_dim}: "
            "change model.vision.hidden_size or num_attention_heads"
        )
    d = head_dim // 2
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)


def pe_rope_angles(
    grid_h: int, grid_w: int, head_dim: int, *, theta: float = 10000.0, device: torch.device | None = None
) -> Tensor:
    """Rotary angles ``[grid_h * grid_w, head_dim]`` (fp32) for patches in row-major order.

    Channel ``c < head_dim/2`` of patch ``(r, col)`` rotates by ``col * inv[c // 2]``; channel
    ``head_dim/2 + c`` by ``r * inv[c // 2]``. The same fp32 operations as PE's ``rope.py``,
    so the angles are those its checkpoints were trained with.
    """
    inv = pe_inv_freq(head_dim, theta, device)  # [hd/4]
    x = torch.arange(grid_w, dtype=torch.float32, device=device)[:, None] * inv  # [w, hd/4]
    y = torch.arange(grid_h, dtype=torch.float32, device=device)[:, None] * inv  # [h, hd/4]
    x = x.repeat_interleave(2, dim=-1)  # [w, hd/2]: GPT-J pairs share one angle
    y = y.repeat_interleave(2, dim=-1)  # [h, hd/2]
    angles = torch.cat(
        [x[None, :, :].expand(grid_h, -1, -1), y[:, None, :].expand(-1, grid_w, -1)], dim=-1
    )  # [h, w, hd]
    return angles.reshape(grid_h * grid_w, head_dim)
