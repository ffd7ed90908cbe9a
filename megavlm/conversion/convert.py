"""Hugging Face <-> megavlm checkpoints: what ``tools/convert_checkpoint.py`` runs.

Import builds the model in the layout asked for (``parallel.*``, under torchrun for more
than one rank), lets every rank stream just its slices of the HF tensors into its shards
(``load_weights``) and saves them with megatron-core's ``dist_checkpointing``: the result is
an ordinary megavlm checkpoint (weights, ``config.yaml``, the tokenizer and processor files
in ``hf_assets/``), loadable at any other layout. It holds no optimizer or train state:
start training from it with ``checkpoint.pretrained``.

Export reads a checkpoint saved at any layout in one process, without launching that layout
(``checkpointing.read_model_layer``), one layer of one tensor at a time, into sharded
safetensors.
Both write to a temporary directory that is renamed when complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megavlm.checkpointing import (
    ASSETS_DIR,
    assets_of,
    checkpoint_dir,
    copy_assets,
    latest_complete,
    mark_complete,
    model_sharded_state_dict,
    model_tensor_shapes,
    read_config,
    read_model_layer,
    require_new_dir,
    write_config,
)
from megavlm.config import Config, ConfigError, validate
from megavlm.conversion.hf_checkpoint import DEFAULT_MAX_SHARD_BYTES, hf_dir_config, write_hf_model_dir
from megavlm.conversion.load_weights import load_hf_model_weights
from megavlm.models.build import build_model_chunks
from megavlm.platform.distributed import initialize
from megavlm.platform.launch import detect_dist_env

# What an import may set besides the model (which config.json defines).
IMPORT_OVERRIDE_SECTIONS = ("parallel.", "train.precision=")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def import_config(hf_dir: Path, overrides: Sequence[str], world_size: int) -> Config:
    """The checkpoint's config: the model from ``config.json``, the layout from ``parallel.*``."""
    refused = [o for o in overrides if not o.startswith(IMPORT_OVERRIDE_SECTIONS)]
    if refused:
        raise ConfigError(
            f"import: {refused[0]!r} is not allowed; the model comes from {hf_dir / 'config.json'} and an import "
            f"takes only parallel.* and train.precision overrides"
        )
    cfg = hf_dir_config(hf_dir, overrides)
    validate(cfg, world_size)
    return cfg


def import_hf(hf_dir: str | Path, out: str | Path, overrides: Sequence[str] = ()) -> Path:
    """HF model directory -> megavlm checkpoint at ``out`` (``out/iter_0000000``); collective."""
    hf_dir, out = Path(hf_dir), Path(out)
    env = detect_dist_env()
    cfg = import_config(hf_dir, overrides, env.world_size)
    require_new_dir(out)
    initialize(cfg.parallel, cfg.train.seed, env)
    chunks, _ = build_model_chunks(cfg)
    load_hf_model_weights(chunks, hf_dir)
    tmp = out.with_name(f".{out.name}.importing")  # the same name on every rank
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoint_dir(tmp, 0).mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(checkpoint_dir(tmp, 0)))
    dist.barrier()
    if rank == 0:
        saved = checkpoint_dir(tmp, 0)
        write_config(saved, dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, save=None, load=None)))
        copy_assets(assets_of(hf_dir), saved / ASSETS_DIR)
        mark_complete(saved, 0)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    dist.barrier()
    return checkpoint_dir(out, 0)


class CheckpointTensors:
    """A checkpoint's model tensors for export (``hf_checkpoint.MegavlmTensors``).

    A layer-stacked tensor of at most ``whole_key_bytes`` is read once and served by layer (DCP
    deserializes whole saved chunks, so layer-by-layer reads of a small stack would read it
    once per layer); a bigger one is read a layer at a time, bounding memory by the saved
    chunks that hold one layer.
    """

    def __init__(self, checkpoint: Path, *, whole_key_bytes: int = 2 * 2**30):
        self.checkpoint, self.whole_key_bytes = checkpoint, whole_key_bytes
        self.shapes = model_tensor_shapes(checkpoint)
        self._cached: tuple[str, torch.Tensor] | None = None

    def keys(self):
        return self.shapes.keys()

    def nbytes(self, key: str, layer: int | None) -> int:
        size, dtype = self.shapes[key]
        return size[1 if layer is not None else 0:].numel() * dtype.itemsize

    def read(self, key: str, layer: int | None) -> torch.Tensor:
        if layer is None:
            self._cached = None
            return read_model_layer(self.checkpoint, key, None)
        if self.nbytes(key, None) > self.whole_key_bytes:
            self._cached = None
            return read_model_layer(self.checkpoint, key, layer)
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the previous key first
            self._cached = (key, read_model_layer(self.checkpoint, key, None))
        return self._cached[1][layer]


def export_hf(load: str | Path, out: str | Path, *, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """megavlm checkpoint (newest complete one under ``load``) -> HF directory, one process."""
    checkpoint = latest_complete(load)
    if checkpoint is None:
        raise FileNotFoundError(f"{load}: no complete megavlm checkpoint (iter_* folders with a 'complete' marker)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = read_config(checkpoint)
    write_hf_model_dir(
        out, cfg.model, CheckpointTensors(checkpoint), dtype=DTYPES.get(dtype), max_shard_bytes=max_shard_bytes,
        assets=assets_of(checkpoint),
    )
    return Path(out)
