"""The rollout API: the engine's log-probs equal a teacher-forced forward of prompt + response
(fp32, CPU, TP=1), and a generated media placeholder is a plain text token."""

from __future__ import annotations

import contextlib

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import unwrap_model

from megavlm.config import load_config
from megavlm.inference import engine as engine_module
from megavlm.inference.engine import GenerationEngine, Prompt, SamplingParams, padding_mask, te_mask_type
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


def test_te_mask_type_selection():
    """TE reads the mask only for padding-aware types; left padding needs it read as given."""
    assert te_mask_type(masked=True, query_len=7, key_len=7) == AttnMaskType.arbitrary
    assert te_mask_type(masked=True, query_len=1, key_len=9) == AttnMaskType.arbitrary
    assert te_mask_type(masked=False, query_len=7, key_len=7) == AttnMaskType.causal
    assert te_mask_type(masked=False, query_len=1, key_len=9) == AttnMaskType.no_mask
    assert te_mask_type(masked=False, query_len=3, key_len=9) == AttnMaskType.causal_bottom_right
    # the complete mask: row 0 left-padded by 2, queries 0..3 of a prompt
    mask = padding_mask(torch.tensor([[True, True, False, False], [False] * 4]), 0, 4)[:, 0]
    keep = ~mask
    assert keep[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert keep[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


class TEStandIn(torch.nn.Module):
    """Transformer Engine's reading of the mask, on CPU: ``causal`` and ``no_mask`` ignore
    ``attention_mask``; ``arbitrary`` applies it alone (no causal mask added)."""

    def __init__(self, local):
        super().__init__()
        self.local = local
        self.te_forward_mask_type = True  # the attribute megatron's TEDotProductAttention has
        self.seen = set()

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None, packed_seq_params=None):
        self.seen.add(attn_mask_type)
        if attn_mask_type == AttnMaskType.arbitrary:
            return self.local(query, key, value, attention_mask, AttnMaskType.no_mask)
        assert attn_mask_type in (AttnMaskType.causal, AttnMaskType.no_mask)
        return self.local(query, key, value, None, attn_mask_type)


def test_padded_batch_is_correct_under_te_mask_semantics(model, monkeypatch):
    """With every layer's attention reading masks as TE does, a left-padded batch decodes what
    the local attention decodes; without the mask-type selection it would not."""
    cfg, chunk = model
    prompts = _prompts(cfg)
    params = SamplingParams(max_new_tokens=5)
    want = GenerationEngine([chunk]).rollout(prompts, params)
    layers = chunk.language.decoder.layers
    local = [layer.self_attention.core_attention for layer in layers]
    try:
        for layer, attention in zip(layers, local):
            layer.self_attention.core_attention = TEStandIn(attention)
        got = GenerationEngine([chunk]).rollout(prompts, params)
        seen = set().union(*(layer.self_attention.core_attention.seen for layer in layers))
        monkeypatch.setattr(engine_module, "te_mask_types", lambda model: contextlib.nullcontext())
        unselected = GenerationEngine([chunk]).rollout(prompts, params)
    finally:
        for layer, attention in zip(layers, local):
            layer.self_attention.core_attention = attention
    assert seen == {AttnMaskType.arbitrary}
    for g, w in zip(got, want):
        assert g.tokens.tolist() == w.tokens.tolist()
        torch.testing.assert_close(g.logprobs, w.logprobs, atol=1e-5, rtol=0)
    assert any(not torch.allclose(u.logprobs, w.logprobs, atol=1e-3) for u, w in zip(unselected, want))


def test_context_parallel_off_lifts_and_restores_every_cp_reader(monkeypatch):
    """Under CP a rollout decodes whole rows on each CP rank: megavlm's ring attention
    (``cp_size``), TE's attention (its own ``set_context_parallel_group`` API: TE does not run
    on this machine, so a module with that API stands in) and megatron's rotary table
    (``cp_group``, its ``lru_cache`` cleared) lose CP inside, and get it back afterwards."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class Group:
        def size(self):
            return 2

        def rank(self):
            return 0

    group = Group()

    class TEAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cp_group, self.cp_global_ranks, self.cp_stream, self.cp_comm_type = group, [0, 1], "stream", "a2a"

        def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p"):
            self.cp_group, self.cp_global_ranks, self.cp_stream, self.cp_comm_type = (
                cp_group, cp_global_ranks, cp_stream, cp_comm_type)

    class Ring(torch.nn.Module):
        cp_size = 2

    model = torch.nn.ModuleList([TEAttention(), Ring(), RotaryEmbedding(kv_channels=8, rotary_percent=1.0,
                                                                       cp_group=group)])
    te, ring, rope = model
    rope(16, packed_seq=True)  # a cached table (the CP cut itself needs CUDA)
    monkeypatch.setattr(engine_module.parallel_state, "get_context_parallel_world_size", lambda: 2)
    with engine_module.context_parallel_off(model):
        assert te.cp_group is None and te.cp_global_ranks is None and ring.cp_size == 1 and rope.cp_group is None
        assert RotaryEmbedding.forward.cache_info().currsize == 0
    assert (te.cp_group, te.cp_global_ranks, te.cp_stream, te.cp_comm_type) == (group, [0, 1], "stream", "a2a")
    assert ring.cp_size == 2 and rope.cp_group is group
