"""Rollouts as the trainer sees them, and their micro-batches.

Every per-token quantity of a response (rollout and trainer log-probs, values, advantages)
is a ``[n]`` tensor over its n generated tokens. A micro-batch lays the sequences
``prompt + response`` out right-padded to one fixed length (pipeline stages exchange
fixed-shape tensors), and maps the response onto the *label frame*: position ``t``
predicts token ``t + 1``, so response token j of a prompt of length L sits at
``L - 1 + j``. Right padding needs no attention mask: causal attention never lets a real
token see the padding after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from megavlm.config.schema import ModelConfig
from megavlm.data.batch import concat_media
from megavlm.inference.engine import Prompt
from megavlm.positions import sample_position_ids

PER_TOKEN = ("rollout_logp", "old_logp", "ref_logp", "values", "advantages", "returns", "entropy")


@dataclass
class Experience:
    prompt: Prompt
    response: Tensor  # [n] int64 generated tokens (stop token included)
    rollout_logp: Tensor  # [n] fp32, the engine's log-probs
    group: int  # index of the prompt within the iteration (its K rollouts share it)
    score: float = 0.0
    task: str = ""
    finish_reason: str = "stop"
    reward_parts: dict = field(default_factory=dict)
    old_logp: Tensor | None = None  # [n] the trainer's, before the update
    ref_logp: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    entropy: Tensor | None = None


@dataclass
class MicroBatch:
    tokens: Tensor  # [b, S]
    position_ids: Tensor  # [b, S] or [3, b, S]
    labels: Tensor  # [b, S] next token
    mask: Tensor  # [b, S] 1 where the label is a response token
    media_mask: Tensor  # [b, S] bool, the prompt's positions: only there is a placeholder media
    media: dict
    index: list[int]  # which experience each real row is (rows beyond are padding rows)
    per_token: dict[str, Tensor]  # name -> [b, S] in the label frame

    def to(self, device) -> "MicroBatch":
        move = lambda x: x.to(device) if isinstance(x, Tensor) else x  # noqa: E731
        return MicroBatch(move(self.tokens), move(self.position_ids), move(self.labels), move(self.mask),
                          move(self.media_mask), {k: move(v) for k, v in self.media.items()}, self.index,
                          {k: move(v) for k, v in self.per_token.items()})


def sequence_length(experiences: list[Experience]) -> int:
    return max(e.prompt.tokens.numel() + e.response.numel() for e in experiences)


def make_micro_batch(experiences: list[Experience], index: list[int], *, rows: int, seq_length: int,
                     model: ModelConfig, pad_token_id: int = 0) -> MicroBatch:
    """``rows`` rows (real experiences first, then all-padding rows with an empty mask)."""
    mrope = model.rope.kind.startswith("mrope")
    tokens = torch.full((rows, seq_length), pad_token_id, dtype=torch.long)
    labels = torch.zeros(rows, seq_length, dtype=torch.long)
    mask = torch.zeros(rows, seq_length)
    media_mask = torch.zeros(rows, seq_length, dtype=torch.bool)
    positions = torch.zeros((3, rows, seq_length) if mrope else (rows, seq_length), dtype=torch.long)
    per_token = {name: torch.zeros(rows, seq_length) for name in PER_TOKEN}
    for row, i in enumerate(index):
        e = experiences[i]
        p, n = e.prompt.tokens.numel(), e.response.numel()
        seq = torch.cat([e.prompt.tokens, e.response])
        tokens[row, : p + n] = seq
        labels[row, : p + n - 1] = seq[1:]
        mask[row, p - 1: p + n - 1] = 1
        media_mask[row, :p] = True  # a generated <image_pad> is text (as in the engine)
        ids = sample_position_ids(e.prompt.tokens, e.prompt.image_grid_thw, e.prompt.video_grid_thw, model,
                                  new_tokens=n)
        positions[..., row, : p + n] = ids
        for name in PER_TOKEN:
            value = getattr(e, name)
            if value is not None:
                per_token[name][row, p - 1: p + n - 1] = value.float()
    media = concat_media([experiences[i].prompt for i in index])
    return MicroBatch(tokens, positions, labels, mask, media_mask, media, list(index), per_token)


def from_label_frame(batch: MicroBatch, values: Tensor, experiences: list[Experience]) -> dict[int, Tensor]:
    """``[b, S]`` label-frame values -> ``{experience index: [n]}`` for the real rows."""
    out = {}
    for row, i in enumerate(batch.index):
        e = experiences[i]
        p, n = e.prompt.tokens.numel(), e.response.numel()
        out[i] = values[row, p - 1: p + n - 1].detach().float().cpu()
    return out
