"""The rollout API: the engine's log-probs equal a teacher-forced forward of prompt + response
(fp32, CPU, TP=1), and a generated media placeholder is a plain text token."""

from __future__ import annotations

import contextlib

import pytest
import torch
from megatron.core.utils import unwrap_model

from megavlm.config import load_config
from megavlm.inference.engine import GenerationEngine, Prompt, SamplingParams
from megavlm.models.build import build_model_chunks
from megavlm.positions import sample_position_ids
from tests.parity.qwen3vl_case import processor_inputs

pytestmark = pytest.mark.usefixtures("single_rank_megatron")


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "model.init_std=0.2"])
    (chunk,), _ = build_model_chunks(cfg)
    return cfg, unwrap_model(chunk)


def _prompts(cfg) -> list[Prompt]:
    rows = [[("text", 3), ("image", 4, 4), ("text", 4)], [("text", 5)], [("text", 2), ("image", 2, 4), ("text", 9)]]
    prompts = []
    for i, row in enumerate(rows):
        inputs = processor_inputs(cfg, [row], seed=10 + i)
        prompts.append(Prompt(tokens=inputs["input_ids"][0], pixel_values=inputs.get("pixel_values"),
                              image_grid_thw=inputs.get("image_grid_thw")))
    return prompts


@contextlib.contextmanager
def favour(chunk, token_id: int, by: float):
    """Add ``by`` to one token's logit, so the policy emits it often (an exploring policy can)."""
    def hook(_module, _args, out):
        logits, bias = out
        logits = logits.clone()
        logits[..., token_id] += by
        return logits, bias

    handle = chunk.language.output_layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def teacher_forced_logprobs(chunk, prompt: Prompt, response: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference: one prompt alone (no padding, no cache), the whole prompt + response in one
    forward; the response is text (positions continue as text, its placeholders take no media)."""
    cfg = chunk.model_cfg
    n, r = prompt.tokens.numel(), response.numel()
    tokens = torch.cat([prompt.tokens, response])
    positions = sample_position_ids(prompt.tokens, prompt.image_grid_thw, None, cfg, new_tokens=r).unsqueeze(-2)
    media_mask = (torch.arange(n + r) < n)[None]
    logits = chunk(tokens[None], positions, runtime_gather_output=True, media_mask=media_mask,
                   pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
    logits = logits[0, n - 1 : n + r - 1, : cfg.language.vocab_size].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0]


def test_rollout_logprobs_equal_teacher_forcing_and_generated_placeholders_are_text(model):
    """A batch of different prompt lengths, two with an image, sampled (T = 0.8, top-p 0.9) under a
    policy pushed towards ``<image_pad>``: the engine does not mistake the generated placeholders
    for media, and each token's log-prob equals the full forward's within 1e-5."""
    cfg, chunk = model
    image_pad = cfg.model.token_ids.image_token_id
    prompts = _prompts(cfg)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=1)
    with favour(chunk, image_pad, by=5.0):
        completions = GenerationEngine([chunk]).rollout(prompts, params)
        assert (completions[0].tokens == image_pad).any()  # in the row that has an image
        for prompt, c in zip(prompts, completions):
            assert c.tokens.dtype == torch.long and c.logprobs.dtype == torch.float32
            assert c.finish_reason == "length" and c.tokens.numel() == 10
            want = teacher_forced_logprobs(chunk, prompt, c.tokens, params.temperature)
            torch.testing.assert_close(c.logprobs, want, atol=1e-5, rtol=0)
    assert len({tuple(c.tokens.tolist()) for c in completions}) == len(completions)


def test_stop_token_ends_a_row_with_finish_reason_stop(model):
    """Greedy: a row ends at its first stop token (kept, with its log-prob); the others run to the
    length limit. ``generate`` returns the same tokens."""
    cfg, chunk = model
    prompts = _prompts(cfg)
    engine = GenerationEngine([chunk])
    free = engine.rollout(prompts, SamplingParams(max_new_tokens=6))
    stop = int(free[0].tokens[2])
    got = engine.rollout(prompts, SamplingParams(max_new_tokens=6, stop_token_ids=[stop]))
    for row, full in zip(got, free):
        full_list = full.tokens.tolist()
        end = full_list.index(stop) + 1 if stop in full_list else len(full_list)
        assert row.tokens.tolist() == full_list[:end]
        torch.testing.assert_close(row.logprobs, full.logprobs[:end], atol=1e-6, rtol=0)
        assert row.finish_reason == ("stop" if stop in full_list else "length")
    assert got[0].finish_reason == "stop" and got[0].tokens.numel() <= 3
    generated = engine.generate(prompts, SamplingParams(max_new_tokens=6, stop_token_ids=[stop]))
    assert [t.tolist() for t in generated] == [c.tokens.tolist() for c in got]
    # greedy log-probs are those of T = 1: each is the max log-prob, so <= 0 and finite
    assert all(bool((c.logprobs <= 0).all() and c.logprobs.isfinite().all()) for c in free)
