"""STEP3-VL's vision side: PE-lang encoder + conv downsampler, behind the VLM's media contract.

Media arrive like Qwen3-VL's, as flattened patches plus one ``grid_thw = [1, h, w]`` row per
view (each 504 px local crop and the 728 px global view of an image, in token-layout order:
crops row-major, then the global view; REFERENCE 5). Each patch is ``[C, p, p]`` flattened,
patches in row-major order. Views of one size are encoded together (PE's batch), then each
view's ``[h, w]`` grid is downsampled 4x per side to ``h/4 * w/4`` tokens, row-major.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megavlm.config.schema import ParallelConfig
from megavlm.config.vision import VisionConfig
from megavlm.models.projector import ConvDownsampler
from megavlm.models.vision.pe import PEVisionModel, pe_transformer_config
from megavlm.platform import device


class Step3VisionModel(MegatronModule):
    def __init__(self, vision: VisionConfig, llm_hidden_size: int, parallel: ParallelConfig, *,
                 dtype: torch.dtype, use_te: bool):
        config = pe_transformer_config(vision, parallel, dtype=dtype, use_te=use_te)
        super().__init__(config=config)
        self.vision = vision
        self.encoder = PEVisionModel(config, vision, use_te=use_te)
        self.downsampler = ConvDownsampler(vision.hidden_size, llm_hidden_size)

    def encoder_parts(self) -> list[torch.nn.Module]:
        return [self.encoder]

    def projector_parts(self) -> list[torch.nn.Module]:
        return [self.downsampler]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``[N, C*p*p]`` patches + ``[n, 3]`` view grids -> ``[tokens, llm]`` (no DeepStack)."""
        p, c = self.vision.patch_size, self.vision.in_channels
        grids = grid_thw.cpu().long().tolist()
        if any(t != 1 for t, _, _ in grids):
            raise ValueError(f"STEP3-VL views are single frames: grid_thw t must be 1, got {grids}")
        sizes = [h * w for _, h, w in grids]
        views = torch.split(pixel_values, sizes)
        out: list[Tensor | None] = [None] * len(views)
        for shape in sorted({(h, w) for _, h, w in grids}):
            index = [i for i, (_, h, w) in enumerate(grids) if (h, w) == shape]
            h, w = shape
            images = torch.stack([
                views[i].view(h, w, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, h * p, w * p) for i in index
            ])  # [n, C, H, W]
            tokens = self.downsampler(self.encoder(images))  # [n, h/4, w/4, llm]
            for i, t in zip(index, tokens):
                out[i] = t.reshape(-1, t.shape[-1])
        return torch.cat(out), []


def build_step3_vision_model(vision: VisionConfig, llm_hidden_size: int, parallel: ParallelConfig, *,
                             dtype: torch.dtype, use_te: bool) -> Step3VisionModel:
    return Step3VisionModel(vision, llm_hidden_size, parallel, dtype=dtype, use_te=use_te).to(device.device())
