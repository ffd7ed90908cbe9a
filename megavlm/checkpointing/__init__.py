"""Checkpoint directories: shared by training, inference, conversion and RL.

``directories``: naming, the completion marker, finding the newest complete checkpoint,
atomic writes, ``config.yaml``. ``weights``: the model's sharded state in and out of a
directory (any layout), and reading its full tensors without launching that layout.
Train state and optimizer glue stay in ``megavlm.training.checkpoint``.
"""

from megavlm.checkpointing.directories import (
    COMPLETE_MARKER,
    atomic_write_bytes,
    checkpoint_dir,
    latest_complete,
    mark_complete,
    read_config,
    require_complete,
    write_config,
)
from megavlm.checkpointing.weights import load_model_weights, model_sharded_state_dict, read_model_tensors

__all__ = [
    "COMPLETE_MARKER", "atomic_write_bytes", "checkpoint_dir", "latest_complete", "load_model_weights",
    "mark_complete", "model_sharded_state_dict", "read_config", "read_model_tensors", "require_complete",
    "write_config",
]
