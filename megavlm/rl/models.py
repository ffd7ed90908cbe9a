"""Actor, critic and reference policy in the training layout, and log-probs of responses.

The actor is the ``VLMModel`` of ``models.build``; the critic is the same model whose
output layer is a scalar value head (``ValueHead``), so both share every layout
(TP/PP/VPP/EP, sequence parallelism) and megatron's schedules run both unchanged. Each
trains with megatron's optimizer (``training.optimizer``) at its own LR.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.utils import unwrap_model
from torch import Tensor

from megavlm.checkpointing import load_model_weights
from megavlm.config.schema import Config
from megavlm.models.build import build_model_chunks
from megavlm.training.compile import compile_layers
from megavlm.training.data_parallel import wrap_data_parallel
from megavlm.training.optimizer import build_lr_schedule, build_optimizer


class ValueHead(torch.nn.Module):
    """Scalar value per position, in place of ``GPTModel.output_layer`` (same call signature,
    returns ``(values [s, b, 1], None)``).

    TP-aware: the final hidden states are replicated over TP ranks, or split along the
    sequence with sequence parallelism; then they are gathered first (backward: the split,
    since every TP rank computes the same values and loss), so the head's weight sees the
    whole sequence and gets the same gradient on every TP rank, like any replicated weight.
    Zero-initialized: V = 0 at the start on every layout (then GAE's A = R at step one).
    """

    def __init__(self, hidden_size: int, *, dtype: torch.dtype, sequence_parallel: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: Tensor, weight: Tensor | None = None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        values = hidden_states.float() @ self.weight.float().t() + self.bias.float()  # [s, b, 1]
        return values, None


@dataclasses.dataclass
class TrainedModel:
    """Model chunks (DDP-wrapped) with their optimizer and LR schedule."""

    model: list
    optimizer: object
    schedule: object


def _trained(cfg: Config, chunks, tconfig, lr: float) -> TrainedModel:
    if cfg.train.compile:  # as pretraining does: every layer of the models PPO trains
        compile_layers(chunks)
    model = wrap_data_parallel(chunks, tconfig, cfg.parallel)
    tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    t = cfg.train
    scaled = dataclasses.replace(cfg, train=dataclasses.replace(
        t, lr=lr, min_lr=t.min_lr * lr / t.lr if t.lr else 0.0,
        lr_phases=[dataclasses.replace(p, end_lr=p.end_lr * lr / t.lr) for p in t.lr_phases],
    ))
    return TrainedModel(model, build_optimizer(scaled, model), build_lr_schedule(scaled))


def build_actor(cfg: Config, load_weights) -> TrainedModel:
    """The policy at ``train.lr``; ``load_weights(chunks)`` fills it (pretrained) or not."""
    chunks, tconfig = build_model_chunks(cfg)
    load_weights(chunks)
    return _trained(cfg, chunks, tconfig, cfg.train.lr)


def attach_value_heads(cfg: Config, chunks: list) -> None:
    for chunk in chunks:
        if chunk.post_process:
            chunk.language.output_layer = ValueHead(
                cfg.model.language.hidden_size, dtype=chunk.config.params_dtype,
                sequence_parallel=cfg.parallel.sequence_parallel,
            ).to(next(chunk.parameters()).device)


@torch.no_grad()
def copy_trunk(source_chunks: list, target_chunks: list) -> None:
    """Every parameter of the actor except its output layer into the critic (same layout)."""
    source = {n: p for chunk_i, c in enumerate(unwrap_model(source_chunks)) for n, p in
              ((f"{chunk_i}.{k}", v) for k, v in c.named_parameters())}
    for chunk_i, c in enumerate(unwrap_model(target_chunks)):
        for name, param in c.named_parameters():
            if ".output_layer." in f".{name}":
                continue
            param.copy_(source[f"{chunk_i}.{name}"])


def build_critic(cfg: Config, actor_chunks: list) -> TrainedModel:
    """VLMModel + value head at ``rl.critic_lr``: from ``rl.critic_pretrained`` (a checkpoint
    with a value head, any layout) or from the actor's current weights."""
    chunks, tconfig = build_model_chunks(cfg)
    attach_value_heads(cfg, chunks)
    if cfg.rl.critic_pretrained:
        load_model_weights(cfg.rl.critic_pretrained, chunks)
    else:
        copy_trunk(actor_chunks, chunks)
    return _trained(cfg, chunks, tconfig, cfg.rl.critic_lr)


def build_reference(cfg: Config, actor_chunks: list) -> list:
    """A frozen copy of the initial policy (the KL reference), unwrapped, no optimizer."""
    chunks, _ = build_model_chunks(cfg)
    copy_trunk(actor_chunks, chunks)
    with torch.no_grad():
        for a, r in zip(unwrap_model(actor_chunks), chunks):
            if r.post_process and r.language.output_layer.weight is not None:
                r.language.output_layer.weight.copy_(a.language.output_layer.weight)
    for chunk in chunks:
        chunk.requires_grad_(False).eval()
    return chunks


def token_logprobs(logits: Tensor, labels: Tensor, *, temperature: float, vocab_size: int,
                   entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities ``[b, s]`` of ``labels`` under ``log_softmax(logits / T)`` over the
    real vocabulary, from vocabulary-parallel logits ``[b, s, v / tp]`` (megatron's
    TP-aware cross entropy), and optionally the entropy of each position's distribution.
    T = temperature if > 0 else 1: the distribution the rollout engine sampled from."""
    scale = temperature if temperature > 0 else 1.0
    scaled = logits.float() / scale
    local = scaled.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    if start + local > vocab_size:  # vocabulary padded for TP: padding columns get no mass
        column = torch.arange(start, start + local, device=scaled.device)
        scaled = scaled.masked_fill(column >= vocab_size, -1e30)
    ent = None
    if entropy:
        group = parallel_state.get_tensor_model_parallel_group()
        top = scaled.detach().max(dim=-1, keepdim=True).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(scaled - top)
        total = reduce_from_tensor_model_parallel_region(exp.sum(-1))
        weighted = reduce_from_tensor_model_parallel_region((exp * (scaled - top)).sum(-1))
        ent = torch.log(total) - weighted / total  # H = log Z - E[z], z shifted by the max
    # megatron's cross entropy shifts its input in place: give it its own copy
    logp = -vocab_parallel_cross_entropy(scaled.clone() if entropy else scaled, labels)
    return logp, ent
