"""Greedy decoding by recomputing the whole sequence each step.

Small and exact, meant for samples at the end of a run and for tests; it runs in the
training layout (TP/SP, DP) with one pipeline stage. The KV-cache engine is the fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import unwrap_model


@torch.no_grad()
def greedy_generate(model_chunks, prompt: torch.Tensor, *, max_new_tokens: int, vocab_size: int) -> torch.Tensor:
    """Extend ``prompt`` [b, s] by ``max_new_tokens`` argmax tokens; every TP rank gets the same."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("greedy_generate needs parallel.pp=1; use the KV-cache engine for pipelines")
    model = unwrap_model(model_chunks)[0]
    was_training = model.training
    model.eval()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tokens = prompt
    for _ in range(max_new_tokens):
        length = tokens.shape[1]
        # Sequence parallelism splits the sequence across TP ranks, so pad on the right to a
        # multiple of TP; causal attention keeps the padding out of the logits we read.
        padded = F.pad(tokens, (0, -length % tp))
        positions = torch.arange(padded.shape[1], device=tokens.device).expand_as(padded)
        logits = model(padded, positions)  # [b, s, vocab / tp]
        logits = gather_from_tensor_model_parallel_region(logits)[:, length - 1, :vocab_size]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    model.train(was_training)
    return tokens
