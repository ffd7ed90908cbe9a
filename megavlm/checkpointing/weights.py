"""Model weights in and out of a checkpoint directory, in megatron's sharded key space.

Each model chunk's ``sharded_state_dict()`` says where its local tensors sit in the full
model, so one directory loads into any TP/PP/VPP/EP layout. The chunks of a rank are saved
under ``model0``, ``model1``, ... (one per virtual pipeline stage); their keys are global,
so the split into chunks does not matter when reading.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.msc_utils import MultiStorageClientFeature
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megavlm.checkpointing.directories import COMPLETE_MARKER, require_complete
from megavlm.checkpointing.integrity import verify_checkpoint

# megatron-core routes dist_checkpointing's reads and writes through multi-storage-client
# whenever that package imports (megatron-energon, a data dependency, installs it), with its
# own reader threads. megavlm's checkpoints are POSIX directories -- the completion marker,
# its checksums, rotation and the fault-injection guarantees are built and tested on that
# path -- so keep megatron on it in every process that touches checkpoints (Megatron-LM's
# --disable-msc does the same). Object stores would be a config key, not a side effect.
MultiStorageClientFeature.disable()

# Keys of a training checkpoint that are not model weights (megatron's optimizer state).
_NOT_MODEL = ("optimizer.",)


def model_sharded_state_dict(model) -> dict:
    """``{"model<i>": chunk.sharded_state_dict()}`` for each (unwrapped) chunk."""
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(unwrap_model(model))}


def load_model_state(path: Path, model, extra: dict | None = None) -> dict:
    """Load the model (and any ``extra`` sharded entries, e.g. the optimizer) from ``path``
    into the current layout; returns what was loaded. The files are checked against the
    marker's checksums first (collective under torch.distributed)."""
    verify_checkpoint(path)
    loaded = dist_checkpointing.load({**model_sharded_state_dict(model), **(extra or {})}, str(path))
    for i, chunk in enumerate(unwrap_model(model)):
        chunk.load_state_dict(loaded[f"model{i}"])
    return loaded


def load_model_weights(path: str | Path, model) -> None:
    """Only the model weights of a complete checkpoint, into any layout (inference, RL init)."""
    load_model_state(require_complete(path), model)


@functools.lru_cache(maxsize=4)
def _metadata(path: str, mtime_ns: int):
    """DCP metadata of a checkpoint, read once per process (a big model's is tens of MB and an
    export asks for it per layer); keyed by the marker's mtime, so a rewritten directory rereads."""
    return FileSystemReader(path).read_metadata()


def model_tensor_shapes(path: str | Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Global shape and dtype of every model tensor of a complete checkpoint, from its metadata."""
    path = require_complete(path)
    metadata = _metadata(str(path), (path / COMPLETE_MARKER).stat().st_mtime_ns)
    return {
        key: (meta.size, meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and not key.startswith(_NOT_MODEL)
    }


def iter_model_tensors(path: str | Path, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(global sharded key, full tensor)`` of a complete checkpoint, one tensor at a time, read
    in this one process whatever layout saved it (conversion, inspection), with no process group.

    megatron's ``load_plain_tensors`` would do the same but needs a process group and loads
    everything at once; the files are torch DCP underneath, whose reader takes a
    ``no_dist`` load of any subset. Memory stays at one full tensor.
    """
    for key in model_tensor_shapes(path) if keys is None else keys:
        yield key, read_model_layer(path, key, None)


class _RegionLoadPlanner(DefaultLoadPlanner):
    """torch DCP's default planner, asked for one region of each tensor instead of all of it:
    ``state_dict[key]`` is a buffer whose global position starts at ``offsets[key]``. DCP
    computes which saved chunks overlap it (``create_read_items_for_chunk_list``, its own
    resharding rule) and reads only those bytes."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__(allow_partial_load=True)
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, buffer in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=buffer.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        self.plan = LoadPlan(items)
        return self.plan

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]


def read_model_layer(path: str | Path, key: str, layer: int | None) -> torch.Tensor:
    """One layer of a layer-stacked model tensor (``layer`` indexes the first axis), or the whole
    tensor (``None``), read in this process from whatever layout saved it.

    torch DCP's reader deserializes each saved chunk it touches whole, so a layer costs the
    saved chunks that hold it (one rank's layers of that key), not the whole stack.
    """
    path = require_complete(path)
    shapes = model_tensor_shapes(path)
    if key not in shapes:
        raise KeyError(f"{path}: no model tensor {key!r} (it has {len(shapes)}, e.g. {next(iter(shapes), None)!r})")
    size, dtype = shapes[key]
    if layer is None:
        tensor = torch.empty(size, dtype=dtype)
        dcp.load({key: tensor}, storage_reader=FileSystemReader(str(path)), no_dist=True)
        return tensor
    if not 0 <= layer < size[0]:
        raise IndexError(f"{path}: {key} has {size[0]} layers, asked for layer {layer}")
    buffer = torch.empty((1, *size[1:]), dtype=dtype)
    planner = _RegionLoadPlanner({key: (layer,) + (0,) * (len(size) - 1)})
    dcp.load({key: buffer}, storage_reader=FileSystemReader(str(path)), planner=planner, no_dist=True)
    return buffer[0]


def read_model_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every full model tensor of a checkpoint (small models; stream with ``iter_model_tensors``)."""
    return dict(iter_model_tensors(path))
