"""Greedy decoding by recomputing the whole sequence each step.

Small and exact: the reference the KV-cache engine is tested against, and the sampler
at the end of a training run. It runs in the training layout (TP/SP, DP) with one
pipeline stage, one prompt at a time, with no padding and no cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from megavlm.data.vlm_dataset import position_ids_for
from megavlm.inference.engine import Prompt


@torch.no_grad()
def greedy_generate(model_chunks, prompt: Prompt, *, max_new_tokens: int) -> torch.Tensor:
    """The ``max_new_tokens`` argmax continuation of one prompt (same on every TP rank)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("greedy_generate needs parallel.pp=1; use the KV-cache engine for pipelines")
    model = unwrap_model(model_chunks)[0]
    cfg = model.model_cfg
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    tp = parallel_state.get_tensor_model_parallel_world_size()
    media = {k: None if v is None else v.to(dev) for k, v in prompt.__dict__.items() if k != "tokens"}
    tokens = prompt.tokens.to(dev)
    for _ in range(max_new_tokens):
        length = tokens.numel()
        positions = position_ids_for(tokens.cpu(), prompt.image_grid_thw, prompt.video_grid_thw, cfg).to(dev)
        # Sequence parallelism splits the sequence across TP ranks: pad on the right to a
        # multiple of TP; causal attention keeps the padding out of the logits we read.
        pad = -length % tp
        padded = F.pad(tokens, (0, pad))[None]
        positions = F.pad(positions, (0, pad))
        logits = model(padded, positions, runtime_gather_output=True, **media)  # [1, s, vocab]
        next_token = logits[0, length - 1, : cfg.language.vocab_size].argmax()
        tokens = torch.cat([tokens, next_token[None]])
    model.train(was_training)
    return tokens[prompt.tokens.numel():].cpu()
