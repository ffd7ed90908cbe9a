"""``checkpoint.pretrained``: the model a run fine-tunes defines the run's architecture.

Resolved from what the user wrote (recipe + overrides), before presets expand and before any
process group starts: the pretrained directory's model replaces the recipe's
(``model.preset`` gives way, and the log says so); an explicit ``model.*`` architecture key
that contradicts it is refused by name; run-time model keys (freezing, FP8, layer
implementation, init) stay the user's. Without ``data.tokenizer`` the tokenizer stored with
the model is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from megavlm.checkpointing import assets_of, latest_complete, load_model_weights, read_config, tokenizer_file
from megavlm.config import ConfigError
from megavlm.config.loader import build_config, to_dict
from megavlm.config.schema import Config, ModelConfig
from megavlm.conversion.hf_checkpoint import is_hf_model_dir, read_hf_config
from megavlm.conversion.hf_config import model_config_from_hf
from megavlm.conversion.load_weights import load_hf_model_weights

# model keys that describe how to run, not what the model is
RUNTIME_MODEL_KEYS = ("preset", "init", "init_std", "transformer_impl", "fp8", "freeze")


def pretrained_source(path: str | Path) -> tuple[ModelConfig, Path]:
    """The model config of an HF directory or a megavlm checkpoint, and the directory that
    holds its weights (the newest complete ``iter_*`` for a checkpoint)."""
    path = Path(path)
    if is_hf_model_dir(path):
        return model_config_from_hf(read_hf_config(path)), path
    checkpoint = latest_complete(path)
    if checkpoint is None:
        raise ConfigError(
            f"checkpoint.pretrained={str(path)!r}: neither a Hugging Face model directory (config.json + "
            "*.safetensors) nor a megavlm checkpoint (iter_* folders with a 'complete' marker)"
        )
    return read_config(checkpoint).model, checkpoint


def _flatten(data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def resolve_pretrained(data: dict, *, log=print) -> Config:
    """The run's config with ``checkpoint.pretrained`` applied (``data``: recipe + overrides)."""
    pretrained = (data.get("checkpoint") or {}).get("pretrained")
    if not pretrained:
        return build_config(data)
    model, weights = pretrained_source(pretrained)
    written = dict(data.get("model") or {})
    if written.get("preset") is not None:
        log(f"megavlm: model.preset={written['preset']} gives way to the model of checkpoint.pretrained={pretrained}")
    theirs = _flatten(to_dict(model), "model")
    for key, value in _flatten({k: v for k, v in written.items() if k not in RUNTIME_MODEL_KEYS}, "model").items():
        if key in theirs and theirs[key] != value:
            raise ConfigError(
                f"{key}={value!r} contradicts checkpoint.pretrained={pretrained} ({key}={theirs[key]!r}); "
                "the pretrained model defines the architecture: drop the override"
            )
        if key not in theirs and not any(k.startswith(key + ".") for k in theirs):
            raise ConfigError(f"{key}={value!r}: the model of checkpoint.pretrained={pretrained} has no such key")
    runtime = {k: v for k, v in written.items() if k in RUNTIME_MODEL_KEYS and k != "preset"}
    resolved = {**data, "model": {**to_dict(model), "init": "megatron", **runtime}}
    data_section = dict(data.get("data") or {})
    tokenizer = tokenizer_file(assets_of(weights))
    if not data_section.get("tokenizer") and tokenizer is not None:
        data_section["tokenizer"] = str(tokenizer)
        log(f"megavlm: data.tokenizer = {tokenizer} (stored with the pretrained model)")
    resolved["data"] = data_section
    return build_config(resolved)


def architecture(model: ModelConfig) -> dict:
    """The keys of a model config that say what the model is (for consistency checks)."""
    return {k: v for k, v in to_dict(model).items() if k not in RUNTIME_MODEL_KEYS}


def load_pretrained_weights(model_chunks: list, cfg: Config) -> Path | None:
    """Fill this rank's chunks with the weights of ``checkpoint.pretrained`` (any layout);
    returns the folder of files that travel with the model (tokenizer, processor), if any."""
    model, weights = pretrained_source(cfg.checkpoint.pretrained)
    if architecture(model) != architecture(cfg.model):
        raise ConfigError(
            f"model differs from checkpoint.pretrained={cfg.checkpoint.pretrained}; build the config with "
            "megavlm.training.config.training_config (it takes the architecture from there)"
        )
    if is_hf_model_dir(weights):
        load_hf_model_weights(model_chunks, weights)
    else:
        load_model_weights(weights, model_chunks)
    return assets_of(weights)
