"""Read and write Hugging Face Qwen3-VL and STEP3-VL model directories (config.json + safetensors).

The family comes from config.json on import and from the model on export
(``hf_config.is_step3vl_model``); each has its key map (``qwen3vl_rules``, ``step3vl_rules``).

Import gives a ``ModelConfig`` and full megavlm tensors (sharded key space) that any
layout loads with ``full_tensors.load_full_tensors``; export writes what the installed
transformers loads. MoE expert tensors exist on disk in two layouts (REFERENCE 9):
released checkpoints store ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]``, while
transformers 5 saves its in-memory ``[E, 2I, H]`` / ``[E, H, I]``. The reader decides by
shape; only when the shapes cannot tell (H == 2I, or H == I) it uses the version that wrote
the file (``transformers_version`` >= 5: in-memory layout), and never guesses.

Tensors stream: the reader opens each tensor when asked (safetensors is memory-mapped), and
the writer fills shards of at most ``max_shard_bytes`` with an index, so converting a model
holds about one tensor and one output shard, not the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors import safe_open

from megavlm.checkpointing import copy_assets, require_new_dir
from megavlm.config import Config, ConfigError, load_config
from megavlm.config.schema import ModelConfig
from megavlm.conversion.engine import KeyRule, hf_keys, hf_pieces, hf_to_megavlm, layers_of
from megavlm.conversion.hf_config import hf_config_from_model, is_step3vl_model, model_config_from_hf
from megavlm.conversion.qwen3vl import qwen3vl_rules
from megavlm.conversion.step3vl import check_model as check_step3vl_model
from megavlm.conversion.step3vl import step3vl_rules


SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's 5 GB shards


def is_hf_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    return json.loads(file.read_text())


def hf_dir_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A run's config for an HF model directory: its config.json defines the model (``model.*``
    overrides are refused), and megatron's cheap init, since the weights come from the files."""
    refused = [o for o in overrides if o.split("=", 1)[0].startswith("model.")]
    if refused:
        raise ConfigError(f"{path} is a Hugging Face model: its config.json defines the model; drop {refused[0]!r}")
    model = model_config_from_hf(read_hf_config(path))
    return dataclasses.replace(load_config(None, overrides), model=dataclasses.replace(model, init="megatron"))


def hf_rules(model: ModelConfig) -> list[KeyRule]:
    """The key map of the model's family."""
    if is_step3vl_model(model):
        check_step3vl_model(model)
        return step3vl_rules(model)
    return qwen3vl_rules(model)


def _written_by_transformers_5(hf_config: dict) -> bool:
    version = str(hf_config.get("transformers_version", "0"))
    return int(version.split(".")[0]) >= 5


def _normalize_expert(key: str, tensor: torch.Tensor, model: ModelConfig, hf_config: dict, path: Path) -> torch.Tensor:
    """A fused expert tensor in transformers' in-memory layout (others unchanged)."""
    moe = model.language.moe
    if moe is None:
        return tensor
    h, i = model.language.hidden_size, moe.ffn_hidden_size
    expected = {"mlp.experts.gate_up_proj": (2 * i, h), "mlp.experts.down_proj": (h, i)}
    for suffix, (rows, cols) in expected.items():
        if not key.endswith(suffix):
            continue
        shape = tuple(tensor.shape[1:])
        if rows == cols:  # square: the shape cannot tell the layouts apart
            transposed = not _written_by_transformers_5(hf_config)
        elif shape == (rows, cols):
            transposed = False
        elif shape == (cols, rows):
            transposed = True
        else:
            raise ValueError(
                f"{path}: {key} has shape {list(tensor.shape)}; expected [E, {rows}, {cols}] or "
                f"[E, {cols}, {rows}] from config.json (hidden {h}, moe_intermediate_size {i})"
            )
        return tensor.transpose(1, 2).contiguous() if transposed else tensor
    return tensor


class HFTensors(Mapping[str, torch.Tensor]):
    """The tensors of an HF model directory, read one at a time on access (in memory layout)."""

    def __init__(self, path: str | Path, model: ModelConfig, hf_config: dict):
        self.path, self.model, self.hf_config = Path(path), model, hf_config
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors files")
        self.file_of: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key in self.file_of:
                        raise ValueError(f"{self.path}: tensor {key!r} is in both {self.file_of[key].name} and {f.name}")
                    self.file_of[key] = f

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.file_of:
            raise KeyError(key)
        with safe_open(str(self.file_of[key]), framework="pt") as handle:
            tensor = handle.get_tensor(key)
        return _normalize_expert(key, tensor, self.model, self.hf_config, self.path)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


def check_hf_keys(tensors: Mapping[str, torch.Tensor], rules: list[KeyRule], model: ModelConfig, path: Path) -> None:
    """Every tensor the model needs is there and every tensor there is used (names the key)."""
    needed = {k for rule in rules for i in layers_of(rule, model.language.num_layers) for k in hf_keys(rule, i)}
    present = set(tensors)
    # transformers may also save a tied lm_head; it is the embedding, not a separate weight
    ignorable = {"lm_head.weight"} if model.language.tie_embeddings else set()
    missing, unexpected = sorted(needed - present), sorted(present - needed - ignorable)
    if missing:
        raise KeyError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all) for this config.json")
    if unexpected:
        raise KeyError(
            f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all); config.json "
            "describes a different model, or the format is not supported"
        )


def open_hf_model_dir(path: str | Path) -> tuple[ModelConfig, HFTensors]:
    """``ModelConfig`` and the lazily read, checked tensors of an HF model directory."""
    path = Path(path)
    hf_config = read_hf_config(path)
    model = model_config_from_hf(hf_config)
    tensors = HFTensors(path, model, hf_config)
    check_hf_keys(tensors, hf_rules(model), model, path)
    return model, tensors


def load_hf_model_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``ModelConfig`` and full megavlm tensors from an HF directory (small models, tests)."""
    model, tensors = open_hf_model_dir(path)
    return model, hf_to_megavlm(tensors, hf_rules(model), num_layers=model.language.num_layers)


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def _write_safetensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a ``.safetensors`` file tensor by tensor from the tensors' own memory.

    By hand because ``safetensors.torch.save_file`` first turns every tensor into a bytes
    object, a second copy of the whole shard in memory; the format is a little-endian u64
    header length, a JSON header (padded to 8 bytes) and the raw data. Files are read back
    with the safetensors library (and transformers) in the tests.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class ShardedSafetensorsWriter:
    """Tensors in, ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_bytes``
    plus ``model.safetensors.index.json`` out (HF's layout; one file needs no index)."""

    def __init__(self, path: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.path, self.max_shard_bytes = path, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.file_of: dict[str, int] = {}
        self.total_bytes = 0

    def make_room(self, size: int) -> None:
        """Flush now if ``size`` more bytes would not fit: called before reading a tensor, so the
        pending shard and the tensor being read are not in memory at once."""
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.make_room(size)
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size
        self.file_of[key] = len(self.files)

    def _flush(self) -> None:
        file = self.path / f".shard-{len(self.files):05d}.safetensors"
        _write_safetensors(file, self.pending)
        self.files.append(file)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shards and write the index; returns the file names."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for file, name in zip(self.files, names):
            os.replace(file, self.path / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {key: names[k] for key, k in sorted(self.file_of.items())}}
            (self.path / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


class MegavlmTensors(Protocol):
    """Where an export reads megavlm tensors from: a checkpoint on disk or tensors in memory."""

    def keys(self) -> Iterable[str]: ...

    def read(self, key: str, layer: int | None) -> torch.Tensor:
        """Layer ``layer`` of a layer-stacked tensor, or the whole tensor (``None``)."""

    def nbytes(self, key: str, layer: int | None) -> int:
        """Size of what ``read`` returns, known before reading it."""


class InMemoryTensors:
    def __init__(self, full: Mapping[str, torch.Tensor]):
        self.full = full

    def keys(self) -> Iterable[str]:
        return self.full.keys()

    def read(self, key: str, layer: int | None) -> torch.Tensor:
        return self.full[key] if layer is None else self.full[key][layer]

    def nbytes(self, key: str, layer: int | None) -> int:
        tensor = self.read(key, layer)
        return tensor.numel() * tensor.element_size()


def write_hf_model_dir(
    path: str | Path,
    model: ModelConfig,
    source: MegavlmTensors,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    assets: Path | None = None,
) -> None:
    """Write an HF model directory from megavlm tensors, one layer at a time.

    Every tensor the model needs must be in ``source`` (and nothing else), or the error
    names the key before anything is written. Everything goes to a temporary sibling
    directory renamed at the end, so a failure never leaves a partial model at ``path``.
    """
    import transformers

    path = require_new_dir(path)
    rules = {rule.mv: rule for rule in hf_rules(model)}
    keys = list(source.keys())
    unexpected = [k for k in keys if k not in rules]
    if unexpected:
        raise KeyError(f"unexpected megavlm tensor {unexpected[0]!r}: no HF name for it in this model "
                       f"({len(unexpected)} unexpected in all)")
    missing = sorted(set(rules) - set(keys))
    if missing:
        raise KeyError(f"megavlm weights lack {missing[0]!r} ({len(missing)} missing in all)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
        for key in keys:
            for i in layers_of(rules[key], model.language.num_layers):
                writer.make_room(source.nbytes(key, i))  # as stored; a cast to a smaller dtype only flushes early
                for hf_key, piece in hf_pieces(rules[key], source.read(key, i), i).items():
                    writer.add(hf_key, piece if dtype is None else piece.to(dtype))
        writer.close()
        copy_assets(assets, tmp)
        config = {**hf_config_from_model(model), "transformers_version": transformers.__version__}
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not (tmp / "generation_config.json").is_file():
            generation = {"_from_model_config": True, "transformers_version": transformers.__version__}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if path.exists():
            path.rmdir()  # empty (checked above)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf_model_dir(path: str | Path, model: ModelConfig, full: dict[str, torch.Tensor]) -> None:
    """Write an HF directory from full megavlm tensors in memory (small models, tests)."""
    write_hf_model_dir(path, model, InMemoryTensors(full))
