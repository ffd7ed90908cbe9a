"""Hidden states entering megatron's TransformerBlock during generation: never a view.

The block makes a view "viewless" with ``make_viewless_tensor``, which assigns ``.data``:
torch.compile cannot trace that (a graph break in every compiled decoding step,
``inference.compile_decode``), and on a later pipeline stage inductor miscompiled it (it
then rejected the next step's input). Without autograd the block's input is therefore
copied when it is a view; training keeps the view (megatron aliases it for free, and no
compiled graph spans the block's entry there).
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_input(hidden: Tensor) -> Tensor:
    """``hidden``, or a copy of it when it is a view and autograd is off."""
    if hidden._base is None or torch.is_grad_enabled():
        return hidden
    return hidden.clone()
