"""Generative reward model: a megavlm checkpoint prompted as a judge (REFERENCE 7).

The judge is a ``VLMModel`` built in the run's layout (it generates with the KV-cache
engine, across pipeline stages too), loaded from ``rl.judge``. It sees the question (with the sample's
images and videos), the reference answer when the sample has one, and the response, and
answers with a number (pointwise) or a letter (pairwise); its greedy answer is parsed into
a scalar in [0, 1]. Pairwise compares the response with the reference answer in both
orders (A/B and B/A) and averages, so the judge's position bias cancels.
"""

from __future__ import annotations

import dataclasses
import re

from megavlm.checkpointing import latest_complete, load_model_weights, read_config
from megavlm.config.schema import Config
from megavlm.data.sample import Message, Sample
from megavlm.inference.engine import GenerationEngine, Prompt, SamplingParams
from megavlm.models.build import build_model_chunks
from megavlm.rl.rewards import register

POINTWISE = ("Question: {question}\nReference answer: {reference}\nResponse: {response}\n"
             "Rate how correct the response is from 0 to 10. Reply with the number only.")
PAIRWISE = ("Question: {question}\nAnswer A: {a}\nAnswer B: {b}\n"
            "Which answer is better? Reply with A or B only.")


class GenerativeJudge:
    """``score(response, targets, sample)`` -> float in [0, 1]; collective over the TP group."""

    def __init__(self, cfg: Config, encoder, *, mode: str, max_new_tokens: int = 8):
        path = latest_complete(cfg.rl.judge)
        if path is None:
            raise FileNotFoundError(f"rl.judge={cfg.rl.judge!r}: no complete megavlm checkpoint there")
        judge_cfg = read_config(path)
        judge_cfg = dataclasses.replace(
            judge_cfg, parallel=cfg.parallel, train=cfg.train,
            model=dataclasses.replace(judge_cfg.model, init="megatron"),
        )
        self.chunks, _ = build_model_chunks(judge_cfg)
        load_model_weights(path, self.chunks)
        for chunk in self.chunks:
            chunk.requires_grad_(False).eval()
        self.engine = GenerationEngine(self.chunks, compile_decode=cfg.inference.compile_decode)
        self.encoder, self.mode, self.max_new_tokens = encoder, mode, max_new_tokens
        tokenizer = encoder.template.tok
        self.tokenizer, self.stop = tokenizer, tokenizer.token_id("<|im_end|>")

    def _ask(self, sample: Sample, texts: list[str]) -> list[str]:
        prompts = []
        for text in texts:
            user = [p for p in sample.messages[0].content if p["type"] != "text"] + [{"type": "text", "text": text}]
            tokens, media = self.encoder.prompt(Sample(id=sample.id, media=sample.media,
                                                       messages=[Message("user", user)]))
            prompts.append(Prompt(tokens=tokens, **media))
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, stop_token_ids=[self.stop])
        return [self.tokenizer.decode([t for t in c.tokens.tolist() if t != self.stop])
                for c in self.engine.rollout(prompts, params)]

    def score(self, response: str, targets: dict, sample: Sample) -> float:
        question = " ".join(p["text"] for p in sample.messages[0].content if p["type"] == "text")
        reference = str(targets.get("answer", targets.get("box", targets.get("point", "(none)"))))
        if self.mode == "pointwise":
            (answer,) = self._ask(sample, [POINTWISE.format(question=question, reference=reference, response=response)])
            numbers = re.findall(r"\d+(?:\.\d+)?", answer)
            return min(max(float(numbers[-1]) / 10.0, 0.0), 1.0) if numbers else 0.0
        first, second = self._ask(sample, [PAIRWISE.format(question=question, a=response, b=reference),
                                           PAIRWISE.format(question=question, a=reference, b=response)])
        return 0.5 * ((_letter(first) == "A") + (_letter(second) == "B"))


def _letter(text: str) -> str | None:
    """The first standalone A or B of the judge's answer."""
    found = re.search(r"\b([AB])\b", text.upper())
    return found.group(1) if found else None


@register("judge")
def judge_reward(judge: GenerativeJudge | None = None):
    """The generative reward model's score in [0, 1] (needs ``rl.judge``)."""
    if judge is None:
        raise ValueError("reward 'judge' needs rl.judge (a megavlm checkpoint to prompt as judge)")

    def score(response: str, targets: dict, prompt: str = "", sample=None) -> float | None:
        return None if sample is None else judge.score(response, targets, sample)
    return score
