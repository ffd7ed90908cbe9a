"""A sample generation at the end of a run, so a user sees what the model learned."""

from __future__ import annotations

import torch.distributed as dist

from megavlm.data.synthetic_text import SyntheticTextDataset
from megavlm.inference.engine import Prompt
from megavlm.inference.greedy import greedy_generate


def print_synthetic_sample(trainer, *, prompt_length: int = 8, new_tokens: int = 8) -> None:
    """Continue a held-out synthetic sequence greedily and print it next to the truth."""
    cfg = trainer.cfg
    dataset = SyntheticTextDataset(
        vocab_size=cfg.model.language.vocab_size, seq_length=prompt_length + new_tokens, seed=cfg.data.seed + 1
    )
    truth = dataset[0].tokens[0]
    out = greedy_generate(trainer.model, Prompt(tokens=truth[:prompt_length]), max_new_tokens=new_tokens)
    if dist.get_rank() == 0:
        generated, expected = out.tolist(), truth[prompt_length:].tolist()
        correct = sum(g == e for g, e in zip(generated, expected))
        print(f"sample: prompt   {truth[:prompt_length].tolist()}", flush=True)
        print(f"sample: model    {generated}", flush=True)
        print(f"sample: expected {expected}  ({correct}/{new_tokens} tokens right)", flush=True)
