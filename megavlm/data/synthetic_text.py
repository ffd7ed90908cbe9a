"""Token sequences the repo generates itself, so training runs with nothing downloaded.

Each sample is an arithmetic progression modulo a prime below the vocabulary size, with a
random start and a step of 1, 2 or 3: the next token is determined by the previous two, so
a tiny model's loss falls visibly within a few dozen steps (first to ~ln 3 by learning
token successors, then lower by reading the step from context). Sample ``i`` depends only
on (seed, i).
"""

from __future__ import annotations

import torch

from megavlm.data.batch import Batch

_MAX_STEP = 3


def _largest_prime_at_most(n: int) -> int:
    for candidate in range(n, 1, -1):
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            return candidate
    raise ValueError(f"model.language.vocab_size={n} is too small for the synthetic dataset")


class SyntheticTextDataset:
    def __init__(self, *, vocab_size: int, seq_length: int, seed: int, min_length: int = 0):
        """``min_length`` > 0 draws each sample's length from [min_length, seq_length]."""
        self.modulus = _largest_prime_at_most(vocab_size)
        self.seq_length = seq_length
        self.min_length = min_length
        self.seed = seed

    def __getitem__(self, index: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = int(torch.randint(0, self.modulus, (1,), generator=g))
        step = int(torch.randint(1, _MAX_STEP + 1, (1,), generator=g))
        length = self.seq_length
        if self.min_length:
            length = int(torch.randint(self.min_length, self.seq_length + 1, (1,), generator=g))
        seq = (start + step * torch.arange(length + 1)) % self.modulus
        tokens, labels = seq[:-1], seq[1:]
        loss_mask = torch.ones(length)
        loss_mask[0] = 0.0  # the first step is not predictable from one token
        return Batch(
            tokens=tokens[None],
            labels=labels[None],
            loss_mask=loss_mask[None],
            position_ids=torch.arange(length)[None],
        )
