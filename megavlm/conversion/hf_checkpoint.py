"""Read and write Hugging Face Qwen3-VL model directories (config.json + safetensors).

Import gives a ``ModelConfig`` and full megavlm tensors (sharded key space) that any
layout loads with ``full_tensors.load_full_tensors``; export writes what the installed
transformers loads. MoE expert tensors exist on disk in two layouts (REFERENCE 9):
released checkpoints store ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]``, while
transformers 5 saves its in-memory ``[E, 2I, H]`` / ``[E, H, I]``. The reader decides by
shape; only when the shapes cannot tell (H == 2I, or H == I) it uses the version that wrote
the file (``transformers_version`` >= 5: in-memory layout), and never guesses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megavlm.config.schema import ModelConfig
from megavlm.conversion.engine import hf_to_megavlm, megavlm_to_hf
from megavlm.conversion.hf_config import hf_config_from_model, model_config_from_hf
from megavlm.conversion.qwen3vl import qwen3vl_rules


def is_hf_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _written_by_transformers_5(hf_config: dict) -> bool:
    version = str(hf_config.get("transformers_version", "0"))
    return int(version.split(".")[0]) >= 5


def _normalize_experts(tensors: dict[str, torch.Tensor], model: ModelConfig, hf_config: dict, path: Path) -> None:
    """Bring fused expert tensors to transformers' in-memory layout, in place."""
    moe = model.language.moe
    if moe is None:
        return
    h, i = model.language.hidden_size, moe.ffn_hidden_size
    expected = {"mlp.experts.gate_up_proj": (2 * i, h), "mlp.experts.down_proj": (h, i)}
    for key, tensor in tensors.items():
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
            if transposed:
                tensors[key] = tensor.transpose(1, 2).contiguous()


def load_hf_model_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``ModelConfig`` and full megavlm tensors from an HF Qwen3-VL directory."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    model = model_config_from_hf(hf_config)
    tensors = _read_safetensors(path)
    _normalize_experts(tensors, model, hf_config, path)
    return model, hf_to_megavlm(tensors, qwen3vl_rules(model), num_layers=model.language.num_layers)


def save_hf_model_dir(path: str | Path, model: ModelConfig, full: dict[str, torch.Tensor]) -> None:
    """Write config.json + model.safetensors in the layout the installed transformers saves."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = megavlm_to_hf(full, qwen3vl_rules(model), num_layers=model.language.num_layers)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    config = {**hf_config_from_model(model), "transformers_version": transformers.__version__}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
