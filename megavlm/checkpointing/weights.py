"""Model weights in and out of a checkpoint directory, in megatron's sharded key space.

Each model chunk's ``sharded_state_dict()`` says where its local tensors sit in the full
model, so one directory loads into any TP/PP/VPP/EP layout. The chunks of a rank are saved
under ``model0``, ``model1``, ... (one per virtual pipeline stage); their keys are global,
so the split into chunks does not matter when reading.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from megavlm.checkpointing.directories import require_complete


def model_sharded_state_dict(model) -> dict:
    """``{"model<i>": chunk.sharded_state_dict()}`` for each (unwrapped) chunk."""
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(unwrap_model(model))}


def load_model_state(path: Path, model, extra: dict | None = None) -> dict:
    """Load the model (and any ``extra`` sharded entries, e.g. the optimizer) from ``path``
    into the current layout; returns what was loaded."""
    loaded = dist_checkpointing.load({**model_sharded_state_dict(model), **(extra or {})}, str(path))
    for i, chunk in enumerate(unwrap_model(model)):
        chunk.load_state_dict(loaded[f"model{i}"])
    return loaded


def load_model_weights(path: str | Path, model) -> None:
    """Only the model weights of a complete checkpoint, into any layout (inference, RL init)."""
    load_model_state(require_complete(path), model)


def read_model_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every full model tensor of a complete checkpoint, by global sharded key, read in
    this one process whatever layout saved it (conversion, inspection).

    Vocabulary-sized tensors keep the padded rows of the saving layout; callers trim them.
    """
    path = require_complete(path)
    tensors = dist_checkpointing.load_plain_tensors(str(path))
    # Model keys are the sharded keys themselves (the "model<i>" prefix is only the nesting
    # of the state dict); the optimizer's live under "optimizer.".
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
