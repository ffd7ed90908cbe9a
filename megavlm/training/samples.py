"""Sample generations at the end of a run, so a user sees what the model learned."""

from __future__ import annotations

import torch.distributed as dist

from megavlm.data.build import sample_encoder
from megavlm.data.synthetic import SyntheticMultimodalDataset
from megavlm.data.synthetic_text import SyntheticTextDataset
from megavlm.inference.engine import GenerationEngine, Prompt, SamplingParams


def print_samples(trainer, *, count: int = 6) -> None:
    if trainer.cfg.data.dataset == "synthetic_multimodal":
        print_multimodal_samples(trainer, count=count)
    else:
        print_synthetic_sample(trainer)


def print_synthetic_sample(trainer, *, prompt_length: int = 8, new_tokens: int = 8) -> None:
    """Continue a held-out synthetic sequence greedily and print it next to the truth."""
    cfg = trainer.cfg
    dataset = SyntheticTextDataset(
        vocab_size=cfg.model.language.vocab_size, seq_length=prompt_length + new_tokens, seed=cfg.data.seed + 1
    )
    truth = dataset[0].tokens[0]
    (out,) = GenerationEngine(trainer.model).generate(
        [Prompt(tokens=truth[:prompt_length])], SamplingParams(max_new_tokens=new_tokens)
    )
    if dist.get_rank() == 0:
        generated, expected = out.tolist(), truth[prompt_length:].tolist()
        correct = sum(g == e for g, e in zip(generated, expected))
        print(f"sample: prompt   {truth[:prompt_length].tolist()}", flush=True)
        print(f"sample: model    {generated}", flush=True)
        print(f"sample: expected {expected}  ({correct}/{new_tokens} tokens right)", flush=True)


def print_multimodal_samples(trainer, *, count: int) -> None:
    """Answer held-out synthetic questions (KV-cache engine, greedy); print them with the truth."""
    encoder = sample_encoder(trainer.cfg)
    tokenizer = encoder.template.tok
    held_out = SyntheticMultimodalDataset(seed=trainer.cfg.data.seed + 1)
    samples = [held_out[i] for i in range(count)]
    prompts = []
    for sample in samples:
        tokens, media = encoder.prompt(sample)
        prompts.append(Prompt(tokens=tokens, **media))
    stop = tokenizer.token_id("<|im_end|>")
    answers = GenerationEngine(trainer.model).generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=[stop]))
    if dist.get_rank() != 0:
        return
    right = 0
    for sample, answer in zip(samples, answers):
        text = tokenizer.decode([t for t in answer.tolist() if t != stop]).strip()
        truth = sample.messages[-1].content[0]["text"]
        right += text == truth
        question = next(p["text"] for p in sample.messages[0].content if p["type"] == "text")
        media = ", ".join(m.kind for m in sample.media) or "text only"
        print(f"sample [{media}] {question!r} -> model {text!r} | expected {truth!r}", flush=True)
    print(f"sample: {right}/{len(samples)} answers exactly right", flush=True)
