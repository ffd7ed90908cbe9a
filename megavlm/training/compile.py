"""``train.compile``: torch.compile of every transformer layer (decoder and ViT).

Granularity: one compiled function per layer class and input shape, as Megatron-LM and HF
do it: a layer is where the elementwise work (norms, RoPE, SwiGLU, residuals) sits between
the GEMMs and attention, which inductor fuses; the model around the layers (embedding,
DeepStack scatter, loss, pipeline schedule) keeps its Python control flow and host-side
shapes. ``nn.Module.compile`` compiles the call in place, so parameter names, state dicts,
checkpoints and conversion are unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_block import TransformerBlock


def compile_layers(chunks: list[torch.nn.Module], **options) -> int:
    """Compile every layer of every megatron ``TransformerBlock`` in ``chunks`` (the
    decoder's and the vision encoder's); returns the number of layers compiled.
    ``options`` go to ``torch.compile``."""
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerBlock):
                for layer in module.layers:
                    layer.compile(**options)
                    count += 1
    return count
