"""The generative judge's prompts and score parsing, with a scripted engine in place of the model."""

from __future__ import annotations

import torch

from megavlm.config import load_config
from megavlm.config.schema import RewardTerm
from megavlm.data.build import sample_encoder
from megavlm.data.synthetic import SyntheticMultimodalDataset
from megavlm.inference.engine import Completion
from megavlm.rl.judge import GenerativeJudge
from megavlm.rl.rewards import build_reward


class ScriptedEngine:
    """Answers each prompt with the next scripted text; records the prompts."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.prompts = tokenizer, list(answers), []

    def rollout(self, prompts, params):
        self.prompts += prompts
        assert params.temperature == 0.0
        return [Completion(tokens=torch.tensor(self.tokenizer.encode(self.answers.pop(0))),
                           logprobs=torch.zeros(1), finish_reason="stop") for _ in prompts]


def _judge(mode, answers):
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal",
                             "data.min_pixels=4096", "data.max_pixels=4096"])
    encoder = sample_encoder(cfg)
    judge = GenerativeJudge.__new__(GenerativeJudge)  # the model itself is replaced by the script
    judge.encoder, judge.mode, judge.max_new_tokens = encoder, mode, 8
    judge.tokenizer, judge.stop = encoder.template.tok, encoder.template.tok.token_id("<|im_end|>")
    judge.engine = ScriptedEngine(judge.tokenizer, answers)
    return judge


def test_pointwise_score_and_prompt_keeps_the_image():
    sample = SyntheticMultimodalDataset(seed=0, tasks=("count",))[0]
    judge = _judge("pointwise", ["7"])
    reward = build_reward([RewardTerm(name="judge")], judge=judge)
    total, parts = reward("3", sample.targets, "How many?", sample)
    assert total == parts["judge"] == 0.7
    (prompt,) = judge.engine.prompts
    assert prompt.pixel_values is not None  # the judge sees the image
    assert "Reference answer" in judge.tokenizer.decode(prompt.tokens.tolist())


def test_pairwise_averages_both_orders():
    sample = SyntheticMultimodalDataset(seed=0, tasks=("count",))[0]
    assert _judge("pairwise", ["A", "B"]).score("3", sample.targets, sample) == 1.0  # preferred both times
    assert _judge("pairwise", ["A", "A"]).score("3", sample.targets, sample) == 0.5  # position bias only
    assert _judge("pairwise", ["B", "A"]).score("3", sample.targets, sample) == 0.0
    assert _judge("pointwise", ["no idea"]).score("3", sample.targets, sample) == 0.0
