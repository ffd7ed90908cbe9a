"""What tools/generate.py does once the model is loaded."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megavlm.config import Config
from megavlm.inference.hf_inputs import forward_logits, read_hf_inputs


def dump_logits(cfg: Config, model, inputs_path: str, out_path: str) -> None:
    inputs = read_hf_inputs(inputs_path, cfg.model)
    logits = forward_logits(model, inputs, cfg.model)
    if dist.get_rank() == 0:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(logits.cpu(), out_path)
        print(f"megavlm: logits {list(logits.shape)} written to {out_path}", flush=True)
