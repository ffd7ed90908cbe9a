"""DeepStack: ViT features of intermediate layers added into the first decoder layers.

Level i (a ViT block's output after its own merger) is added to the output of decoder layer i
at visual-token positions only (REFERENCE 2). The addition is a forward hook on the decoder
layer, so megatron's ``TransformerBlock`` stays untouched, whatever the backend spec.

Pipeline parallelism: the features are computed with the vision encoder on the first stage,
but a target layer may live on a later stage (fewer than ``levels`` layers per stage, or
interleaved virtual stages). Those "late" levels travel with the hidden states: the tensor
sent between stages is ``[(1 + late) * s, b, h]``, the hidden states followed by one
``[s, b, h]`` addend per late level, so megatron's p2p and backward carry them (and their
gradients back to the vision encoder) without any extra communication path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megavlm.models.viewless import block_input


def late_levels(*, levels: int, num_layers: int, pp: int, vpp: int | None, first_stage_layers: int | None = None) -> int:
    """Levels whose target decoder layer is not in the first (virtual) pipeline stage
    (``first_stage_layers``: parallel.first_stage_layers of an uneven split)."""
    chunks = pp * (vpp if vpp and vpp > 1 else 1)
    first_chunk_layers = num_layers // chunks if first_stage_layers is None else first_stage_layers
    return max(0, levels - first_chunk_layers) if chunks > 1 else 0


class DeepStackInjector:
    """Holds this micro-batch's addends and adds them after the matching decoder layers."""

    def __init__(self, decoder_layers: torch.nn.ModuleList, *, levels: int, late: int):
        self.levels = levels
        self.late = late  # the last `late` levels travel between pipeline stages
        self.addends: dict[int, Tensor] = {}
        for layer in decoder_layers:
            level = layer.layer_number - 1  # global, 0-based
            if level < levels:
                layer.register_forward_hook(self._hook(level))

    def _hook(self, level: int):
        def add(module, args, output):
            addend = self.addends.get(level)  # None: no media in this micro-batch
            if addend is None:
                return output
            hidden, context = output
            return hidden + addend.to(hidden.dtype), context

        return add

    def set_from_vision(self, addends: list[Tensor]) -> None:
        """On the first stage: one ``[s, b, h]`` addend per level (zeros off visual positions);
        an empty list when the micro-batch has no media."""
        self.addends = dict(enumerate(addends))

    def split_received(self, received: Tensor) -> Tensor:
        """On later stages: keep the late addends, return the hidden states."""
        parts = received.chunk(1 + self.late, dim=0)
        first_late = self.levels - self.late
        self.addends = {first_late + i: part for i, part in enumerate(parts[1:])}
        return block_input(parts[0])

    def attach_to_output(self, hidden: Tensor) -> Tensor:
        """Before sending to the next stage: append the late addends to the hidden states."""
        if not self.late:
            return hidden
        first_late = self.levels - self.late
        late = [self.addends.get(first_late + i) for i in range(self.late)]
        return torch.cat([hidden] + [torch.zeros_like(hidden) if a is None else a for a in late], dim=0)
