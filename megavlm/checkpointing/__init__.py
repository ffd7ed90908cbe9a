"""Checkpoint directories: shared by training, inference, conversion and RL.

``directories``: naming, the completion marker, finding the newest complete checkpoint,
atomic writes, ``config.yaml``, rotation. ``integrity``: the marker's checksums, verified on load. ``weights``: the model's sharded state in and out of a
directory (any layout), and reading its full tensors without launching that layout.
Train state and optimizer glue stay in ``megavlm.training.checkpoint``.
"""

from megavlm.checkpointing.assets import ASSETS_DIR, assets_of, copy_assets, tokenizer_file
from megavlm.checkpointing.directories import (
    COMPLETE_MARKER,
    atomic_write_bytes,
    checkpoint_dir,
    complete_checkpoints,
    is_complete,
    latest_complete,
    mark_complete,
    read_config,
    require_complete,
    require_new_dir,
    rotate,
    write_config,
)
from megavlm.checkpointing.integrity import CheckpointCorruptError, verify_checkpoint
from megavlm.checkpointing.weights import (
    iter_model_tensors,
    load_model_weights,
    model_sharded_state_dict,
    model_tensor_shapes,
    read_model_layer,
    read_model_tensors,
)

__all__ = [
    "ASSETS_DIR", "assets_of", "copy_assets", "is_complete", "tokenizer_file",
    "COMPLETE_MARKER", "atomic_write_bytes", "checkpoint_dir", "iter_model_tensors", "latest_complete",
    "load_model_weights", "model_tensor_shapes", "read_model_layer",
    "mark_complete", "model_sharded_state_dict", "read_config", "read_model_tensors", "require_complete", "require_new_dir",
    "write_config", "complete_checkpoints", "rotate", "CheckpointCorruptError", "verify_checkpoint",
]
