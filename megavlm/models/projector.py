"""Vision -> language projectors (REFERENCE 2, 5).

* ``PatchMerger`` (Qwen3-VL): 2x2 neighbouring patches concatenated to one ``4 * H`` vector,
  LayerNorm (per patch before the concat; over the concat for the DeepStack mergers), then
  Linear -> exact GELU -> Linear to the decoder width. The linears are megatron's column /
  row parallel pair, so TP splits the ``4 * H`` intermediate.
* ``ConvDownsampler`` (STEP3-VL): two stride-2 3x3 convolutions (C -> 2C -> 4C, no
  activation between) and a bias-free Linear to the decoder width: 16x fewer tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megavlm.models.linear import RowParallelLinear


class PatchMerger(MegatronModule):
    def __init__(self, config: TransformerConfig, *, vit_hidden: int, out_hidden: int, merge: int,
                 eps: float, norm_after_merge: bool):
        super().__init__(config=config)
        self.merged = vit_hidden * merge * merge
        self.norm_after_merge = norm_after_merge
        self.norm = torch.nn.LayerNorm(self.merged if norm_after_merge else vit_hidden, eps=eps)
        self.linear_fc1 = ColumnParallelLinear(
            self.merged, self.merged, config=config, init_method=config.init_method, bias=True, gather_output=False,
        )
        self.linear_fc2 = RowParallelLinear(
            self.merged, out_hidden, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[N, H]`` patches in merge-block order -> ``[N / merge^2, out_hidden]``."""
        x = self.norm(x.reshape(-1, self.merged)) if self.norm_after_merge else self.norm(x).reshape(-1, self.merged)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x


class ConvDownsampler(torch.nn.Module):
    def __init__(self, vit_hidden: int, out_hidden: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(vit_hidden, 2 * vit_hidden, kernel_size=3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(2 * vit_hidden, 4 * vit_hidden, kernel_size=3, stride=2, padding=1)
        self.proj = torch.nn.Linear(4 * vit_hidden, out_hidden, bias=False)

    def forward(self, grid: Tensor) -> Tensor:
        """``[n, h, w, C]`` patch features -> ``[n, ceil(h/4), ceil(w/4), out_hidden]``."""
        x = self.conv2(self.conv1(grid.permute(0, 3, 1, 2)))  # [n, 4C, h/4, w/4]
        return self.proj(x.permute(0, 2, 3, 1))
