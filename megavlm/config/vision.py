"""Typed configuration of the vision side of a VLM: encoder, projector, DeepStack, RoPE, tokens.

Field names are user-facing keys under ``model.`` (``model.vision.num_layers``,
``model.rope.kind``, ...). Constants are those of REFERENCE.md sections 1-5.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class VisionConfig:
    """A ViT encoder: Qwen3-VL style (``kind="qwen3vl"``) or Perception Encoder (``kind="pe"``)."""

    kind: str = "qwen3vl"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    patch_size: int = 16
    # Frames per patch along time: 2 for Qwen3-VL (an image is duplicated), 1 for PE.
    temporal_patch_size: int = 2
    in_channels: int = 3
    # Side of the learned absolute position-embedding grid (48 -> 2304 entries for Qwen3-VL),
    # bilinearly interpolated to each image's patch grid.
    position_embedding_size: int = 48
    # "gelu_tanh" (Qwen3-VL), "gelu" (PE reference) or "quick_gelu".
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # PE only: LayerScale on both residual branches (None: off) and a LayerNorm before the blocks.
    layerscale_init: float | None = None
    ln_pre: bool = False
    # ViT block indices (0-based, output after the block) whose features feed DeepStack into
    # decoder layers 0, 1, 2, ...; empty: DeepStack off.
    deepstack_layers: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class ProjectorConfig:
    """Vision -> language projector: Qwen3-VL 2x2 patch merger or STEP3-VL conv downsampler."""

    kind: str = "patch_merger"  # "patch_merger" or "conv_downsample"
    spatial_merge_size: int = 2  # patch_merger: a merge block is size x size patches
    norm_eps: float = 1e-6


@dataclass(kw_only=True)
class RopeConfig:
    """Decoder position encoding."""

    # "mrope_interleaved" (Qwen3-VL), "mrope_chunked" (Qwen2-VL), or "rope" (1D, STEP3-VL).
    kind: str = "mrope_interleaved"
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])


@dataclass(kw_only=True)
class TokenIdsConfig:
    """Ids of the special tokens the model itself needs (placeholders of media features)."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
