"""KV-cache generation equals recomputing the full sequence (fp32, CPU, TP=1)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.utils import unwrap_model
from torch._dynamo.utils import counters

from megavlm.config import load_config
from megavlm.inference.engine import GenerationEngine, Prompt, SamplingParams, _sample
from megavlm.models.build import build_model_chunks
from megavlm.positions import sample_position_ids
from megavlm.training.compile import compile_layers
from tests.parity.qwen3vl_case import processor_inputs

pytestmark = pytest.mark.usefixtures("single_rank_megatron")


def _prompts(cfg) -> list[Prompt]:
    rows = [[("text", 5)], [("text", 3), ("image", 4, 4), ("text", 4)], [("video", 2, 4, 2), ("text", 2)]]
    prompts = []
    for i, row in enumerate(rows):
        inputs = processor_inputs(cfg, [row], seed=i)
        prompts.append(Prompt(
            tokens=inputs["input_ids"][0], pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"), pixel_values_videos=inputs.get("pixel_values_videos"),
            video_grid_thw=inputs.get("video_grid_thw"),
        ))
    return prompts


@torch.no_grad()
def recompute_greedy(chunk, prompt: Prompt, new_tokens: int) -> list[int]:
    """The reference: no cache, the whole sequence run again for every token, its positions
    recomputed as those of a prompt that contains the generated tokens as text."""
    cfg = chunk.model_cfg
    media = {k: v for k, v in prompt.__dict__.items() if k != "tokens"}
    tokens = prompt.tokens
    for _ in range(new_tokens):
        positions = sample_position_ids(tokens, prompt.image_grid_thw, prompt.video_grid_thw, cfg).unsqueeze(-2)
        logits = chunk(tokens[None], positions, runtime_gather_output=True, **media)  # [1, s, vocab]
        tokens = torch.cat([tokens, logits[0, -1, : cfg.language.vocab_size].argmax()[None]])
    return tokens[prompt.tokens.numel():].tolist()


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "model.init_std=0.2"])
    (chunk,), _ = build_model_chunks(cfg)
    return cfg, unwrap_model(chunk)


def test_kv_cache_generation_equals_recompute(model):
    """Three prompts of different lengths (text, image, video) decoded together with the
    cache give, token for token, what full recomputation gives for each alone."""
    cfg, chunk = model
    prompts = _prompts(cfg)
    got = GenerationEngine([chunk]).generate(prompts, SamplingParams(max_new_tokens=8))
    for prompt, tokens in zip(prompts, got):
        assert tokens.tolist() == recompute_greedy(chunk, prompt, 8)
    assert len({tuple(t.tolist()) for t in got}) > 1  # the prompts really differ


def test_stop_tokens_end_each_row(model):
    cfg, chunk = model
    prompts = _prompts(cfg)
    free = GenerationEngine([chunk]).generate(prompts, SamplingParams(max_new_tokens=6))
    stop = free[1][-1].item()
    got = GenerationEngine([chunk]).generate(prompts, SamplingParams(max_new_tokens=6, stop_token_ids=[stop]))
    for row, full in zip(got, free):  # each row ends at its first stop token, or runs to the end
        full = full.tolist()
        end = full.index(stop) + 1 if stop in full else len(full)
        assert row.tolist() == full[:end]
    assert len(got[1]) < 6 or free[1].tolist().count(stop) == 1


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=3)
    a = _sample(logits, params, torch.Generator().manual_seed(3))
    b = _sample(logits, params, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # p = softmax = [0.64, 0.24, 0.09, 0.03]: the 0.7 nucleus is {0, 1}
    assert set(a.tolist()) == {0, 1}
    assert torch.equal(_sample(logits, SamplingParams(), torch.Generator()), torch.zeros(200, dtype=torch.long))


def test_kv_cache_generation_equals_recompute_with_1d_rope():
    """A text model with 1D RoPE (megatron's table covers the whole cache and is sliced by cache
    offset; keys enter the cache rotated): the cache gives what full recomputation gives."""
    cfg = load_config(None, ["model.preset=qwen3-tiny", "model.init_std=0.2"])
    (chunk,), _ = build_model_chunks(cfg)
    chunk = unwrap_model(chunk)
    g = torch.Generator().manual_seed(3)
    prompts = [Prompt(tokens=torch.randint(0, cfg.model.language.vocab_size, (6,), generator=g)) for _ in range(2)]
    got = GenerationEngine([chunk]).generate(prompts, SamplingParams(max_new_tokens=6))
    for prompt, tokens in zip(prompts, got):
        assert tokens.tolist() == recompute_greedy(chunk, prompt, 6)


def test_compiled_decoding_equals_recompute_and_the_eager_engine(model):
    """``inference.compile_decode``: the decoding steps through torch.compile give the tokens of
    full recomputation (greedy, text/image/video prompts of different lengths), and, sampled,
    the eager engine's tokens and log-probs. 10 steps: the first compiled step is static, the
    second recompiles with the cache length dynamic, the rest reuse that graph."""
    cfg, chunk = model
    prompts = _prompts(cfg)
    compiled = GenerationEngine([chunk], compile_decode=True)
    counters.clear()
    got = compiled.generate(prompts, SamplingParams(max_new_tokens=10))
    # compiled indeed, as one graph per shape regime: no graph break inside the step (megatron's
    # tp_group warning and make_viewless_tensor each split it before megavlm avoided them)
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    for prompt, tokens in zip(prompts, got):
        assert tokens.tolist() == recompute_greedy(chunk, prompt, 10)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    want = GenerationEngine([chunk]).rollout(prompts, sampled)
    for a, b in zip(compiled.rollout(prompts, sampled), want):
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


def test_compiled_decoding_with_1d_rope():
    """1D RoPE under compile_decode: the table covers the whole cache and is sliced at the
    cache offset, an int that changes every step (dynamic after the first recompilation)."""
    cfg = load_config(None, ["model.preset=qwen3-tiny", "model.init_std=0.2"])
    (chunk,), _ = build_model_chunks(cfg)
    chunk = unwrap_model(chunk)
    g = torch.Generator().manual_seed(4)
    prompts = [Prompt(tokens=torch.randint(0, cfg.model.language.vocab_size, (n,), generator=g)) for n in (6, 9)]
    got = GenerationEngine([chunk], compile_decode=True).generate(prompts, SamplingParams(max_new_tokens=8))
    for prompt, tokens in zip(prompts, got):
        assert tokens.tolist() == recompute_greedy(chunk, prompt, 8)


def test_layers_compiled_for_training_run_eager_in_generation():
    """train.compile compiles layers for training shapes (PPO's actor); generation runs them
    eager unless inference.compile_decode says otherwise (with an inference context they would
    recompile per layer up to dynamo's limit): nothing is compiled by a rollout."""
    cfg = load_config(None, ["model.preset=qwen3-tiny", "model.init_std=0.2"])
    (chunk,), _ = build_model_chunks(cfg)
    chunk = unwrap_model(chunk)
    g = torch.Generator().manual_seed(5)
    prompts = [Prompt(tokens=torch.randint(0, cfg.model.language.vocab_size, (n,), generator=g)) for n in (4, 7)]
    want = GenerationEngine([chunk]).generate(prompts, SamplingParams(max_new_tokens=4))
    assert compile_layers([chunk]) == cfg.model.language.num_layers
    counters.clear()
    got = GenerationEngine([chunk]).generate(prompts, SamplingParams(max_new_tokens=4))
    assert counters["stats"]["unique_graphs"] == 0
    assert [t.tolist() for t in got] == [t.tolist() for t in want]


def test_ppo_models_honour_train_compile(single_rank_megatron, monkeypatch):
    """rl.models builds the actor and critic through one _trained, which compiles their layers
    under train.compile as pretraining does (the compilation itself: tests/unit/test_compile.py)."""
    from megavlm.rl import models

    compiled = []
    monkeypatch.setattr(models, "compile_layers", lambda chunks: compiled.append(chunks))
    cfg = load_config(None, ["model.preset=qwen3-tiny", "train.compile=true"])
    chunks, tconfig = build_model_chunks(cfg)
    models._trained(cfg, chunks, tconfig, cfg.train.lr)
    assert compiled == [chunks]
