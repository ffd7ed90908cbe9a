"""Build a VLMModel for inference from a megavlm checkpoint or a Hugging Face model directory.

The directory kind is detected: ``config.json`` + ``*.safetensors`` is Hugging Face
(Qwen3-VL / Qwen3-VL-MoE); a folder with ``iter_*`` checkpoints (or one ``iter_*`` folder)
is megavlm's. Either way the weights are resharded into the layout the overrides ask for
(``parallel.tp=2`` ...), under torchrun or as one process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from megavlm.checkpointing import assets_of, latest_complete, load_model_weights, read_config, tokenizer_file
from megavlm.config import Config, validate
from megavlm.conversion.hf_checkpoint import hf_dir_config, is_hf_model_dir
from megavlm.conversion.load_weights import load_hf_model_weights
from megavlm.platform.distributed import initialize
from megavlm.platform.launch import detect_dist_env
from megavlm.models.build import build_model_chunks


SINGLE_RANK_LAYOUT = ("parallel.tp=1", "parallel.pp=1", "parallel.vpp=null", "parallel.cp=1", "parallel.ep=1",
                      "parallel.etp=null", "parallel.sequence_parallel=false")


def load_for_inference(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, list[torch.nn.Module]]:
    """Config and this rank's model chunks, weights loaded, in eval mode."""
    path = Path(path)
    env = detect_dist_env()
    from_hf = is_hf_model_dir(path)
    if from_hf:
        model_dir = path
        cfg = hf_dir_config(path, overrides)
    else:
        model_dir = latest_complete(path)
        if model_dir is None:
            raise FileNotFoundError(
                f"{path}: neither a Hugging Face model directory (config.json + *.safetensors) nor a "
                "megavlm checkpoint (iter_* folders with a 'complete' marker)"
            )
        # The training layout is not the inference one: start from one rank (checkpoints
        # reshard on load) and take the layout from the overrides.
        cfg = read_config(model_dir, [*SINGLE_RANK_LAYOUT, *overrides, "checkpoint.load=null", "checkpoint.save=null"])
        # The weights come from the files: skip the (slow, pointless) random initialization.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="megatron"))
    validate(cfg, env.world_size)
    initialize(cfg.parallel, cfg.train.seed, env)
    chunks, _ = build_model_chunks(cfg)
    if from_hf:
        load_hf_model_weights(chunks, path)
    else:
        load_model_weights(model_dir, chunks)
    for chunk in chunks:
        chunk.eval()
    return with_model_tokenizer(cfg, model_dir), chunks


def with_model_tokenizer(cfg: Config, model_dir: Path) -> Config:
    """``data.tokenizer`` = the tokenizer stored with the model, when it has one (an HF
    directory's, or a checkpoint's ``hf_assets``); else the config's own (or the synthetic one)."""
    tokenizer = tokenizer_file(assets_of(model_dir))
    if tokenizer is None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer)))
