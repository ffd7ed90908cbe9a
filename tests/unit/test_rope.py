"""MRoPE position ids and rotary frequencies against HF Qwen3-VL (transformers >= 5), REFERENCE 1."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    MultimodalRotaryEmbedding,
)
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLModel,
    Qwen3VLTextRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.processing_utils import ProcessorMixin

from megavlm.config.vision import TokenIdsConfig
from megavlm.config import load_config
from megavlm.models.rope import InterleavedMRotaryEmbedding, multimodal_rotary_embedding
from megavlm.platform import device
from megavlm.positions import batched_mrope_position_ids, mrope_position_ids, sample_position_ids

IDS = TokenIdsConfig()
MERGE = 2


class _HFRopeIndex:
    """All that ``Qwen3VLModel.get_rope_index`` reads from ``self``: the merge size and one helper."""

    get_rope_index = Qwen3VLModel.get_rope_index
    get_vision_position_ids = Qwen3VLModel.get_vision_position_ids

    def __init__(self):
        self.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=MERGE))


def hf_rope_index(input_ids, images, videos, mask):
    # mm_token_type_ids built by the HF processor's own rule, not ours.
    stub = SimpleNamespace(image_token_ids=[IDS.image_token_id], video_token_ids=[IDS.video_token_id], audio_token_ids=[])
    types = torch.tensor(ProcessorMixin.create_mm_token_type_ids(stub, input_ids))
    return _HFRopeIndex().get_rope_index(input_ids, types, images, videos, attention_mask=mask)


def random_sample(rng: random.Random) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Tokens, image grids, video grids of one sample laid out as the Qwen3-VL processor does:
    ``<|vision_start|> pads <|vision_end|>`` per image, and per video frame pair a timestamp
    (``<1.5 seconds>``, a few text tokens) before its own framed block. Some blocks are bare
    (no start/end) to put placeholders at the sequence edges and image next to video."""
    tokens, images, videos = [], [], []

    def text(n):
        tokens.extend(rng.randrange(1, 1000) for _ in range(n))

    def block(token, n, framed):
        if not framed and tokens and tokens[-1] == token:
            text(1)  # two same-kind runs must not touch, or they are one run
        tokens.extend([IDS.vision_start_token_id] * framed + [token] * n + [IDS.vision_end_token_id] * framed)

    text(rng.randrange(0, 4))
    for _ in range(rng.randrange(0, 5)):
        kind, framed = rng.choice(("text", "image", "video")), rng.random() < 0.7
        h, w = 2 * rng.randrange(1, 6), 2 * rng.randrange(1, 6)
        if kind == "text":
            text(rng.randrange(1, 8))
        elif kind == "image":
            t = 1 if rng.random() < 0.85 else 2  # t > 1 never comes from the processor; HF still defines it
            images.append([t, h, w])
            block(IDS.image_token_id, t * h * w // MERGE**2, framed)
        else:
            t = rng.randrange(1, 5)
            videos.append([t, h, w])
            for _ in range(t):
                text(rng.randrange(3, 7))
                block(IDS.video_token_id, h * w // MERGE**2, framed)
    text(rng.randrange(0 if tokens else 1, 4))  # HF cannot take an empty row
    return tokens, images, videos


def grids(rows: list[list[int]]) -> torch.Tensor | None:
    return torch.tensor(rows, dtype=torch.long) if rows else None


def test_random_batches_equal_hf_get_rope_index():
    """200 seeded batches (1-3 rows, left or right padding, text/images/videos mixed) equal HF
    exactly: batched ids and deltas, and the per-sample ids of each unpadded row."""
    rng = random.Random(0)
    for case in range(200):
        samples = [random_sample(rng) for _ in range(rng.randrange(1, 4))]
        s = max(len(tok) for tok, _, _ in samples) + rng.randrange(0, 3)
        left = rng.random() < 0.5
        input_ids = torch.full((len(samples), s), 151643)  # <|endoftext|> as padding
        mask = torch.zeros(len(samples), s, dtype=torch.long)
        for i, (tok, _, _) in enumerate(samples):
            cols = slice(s - len(tok), s) if left else slice(0, len(tok))
            input_ids[i, cols], mask[i, cols] = torch.tensor(tok, dtype=torch.long), 1
        if len(samples) == 1 and s == len(samples[0][0]) and case % 2:
            mask = None  # HF's unmasked path
        images = grids([g for _, im, _ in samples for g in im])
        videos = grids([g for _, _, vid in samples for g in vid])

        ref_ids, ref_deltas = hf_rope_index(input_ids, images, videos, mask)
        ids, deltas = batched_mrope_position_ids(input_ids, images, videos, attention_mask=mask, token_ids=IDS)
        assert torch.equal(ids, ref_ids), f"case {case}"
        assert torch.equal(deltas, ref_deltas), f"case {case}"
        for i, (tok, im, vid) in enumerate(samples):
            one, delta = mrope_position_ids(torch.tensor(tok), grids(im), grids(vid), token_ids=IDS)
            keep = torch.ones(s, dtype=torch.bool) if mask is None else mask[i].bool()
            assert torch.equal(one, ref_ids[:, i, keep]) and delta == ref_deltas[i, 0], f"case {case} row {i}"


def test_video_pairs_each_start_after_their_timestamp():
    """A 2-pair video of 4x4 patches: each pair is a t=1 block of 2x2, placed after its text."""
    v, s, e = IDS.video_token_id, IDS.vision_start_token_id, IDS.vision_end_token_id
    tokens = torch.tensor([7, 8, s, v, v, v, v, e, 9, s, v, v, v, v, e])
    ids, delta = mrope_position_ids(tokens, None, torch.tensor([[2, 4, 4]]), token_ids=IDS)

    def block(p):  # 2x2 merged grid starting at p: T, H (row), W (col)
        return [[p] * 4, [p, p, p + 1, p + 1], [p, p + 1, p, p + 1]]

    expected = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    expected = torch.cat([expected, torch.tensor(block(3)), torch.tensor([[5, 6, 7]] * 3),
                          torch.tensor(block(8)), torch.tensor([[10]] * 3)], dim=1)
    assert torch.equal(ids, expected)
    assert delta == 11 - 15


@pytest.mark.parametrize(
    ("tokens", "image", "video", "message"),
    [
        ([1, "i", "i", "i", 2], [[1, 4, 4]], None,
         r"3 image placeholder tokens but image_grid_thw \[\[1, 4, 4\]\] implies 4"),
        ([1, "i", "i", "i", "i", 2], None, None, r"4 image placeholder tokens but image_grid_thw \[\] implies 0"),
        ([1, "v", "v", 2], None, [[2, 2, 2]], r"1 runs of video placeholder tokens but video_grid_thw gives 2"),
        ([1, "i", 2, "i", "i", "i", "i"], [[1, 4, 4], [1, 2, 2]], None,
         r"image block 0: 1 placeholder tokens but grid \[1, 4, 4\] implies 4"),
    ],
)
def test_placeholder_grid_mismatch_names_the_counts(tokens, image, video, message):
    tokens = torch.tensor([{"i": IDS.image_token_id, "v": IDS.video_token_id}.get(t, t) for t in tokens])
    with pytest.raises(ValueError, match=message):
        mrope_position_ids(tokens, grids(image or []), grids(video or []), token_ids=IDS)


def test_batched_grid_rows_must_match_placeholder_runs():
    i = IDS.image_token_id
    input_ids = torch.tensor([[5, i, 6], [5, 6, 7]])
    with pytest.raises(ValueError, match=r"1 placeholder runs \(\[1, 0\] per row\) but image_grid_thw gives 2"):
        batched_mrope_position_ids(input_ids, torch.tensor([[1, 2, 2]] * 2), None, token_ids=IDS)


def test_decode_positions_continue_after_the_prompt():
    """Generated token k of a prompt of length S sits at S + k + delta = max + 1 + k on every
    axis (REFERENCE 1); 1D RoPE models (STEP3-VL) count plain indices through media."""
    model = load_config(None, ["model.preset=qwen3vl-tiny"]).model
    ids_cfg = model.token_ids
    tokens = torch.tensor([3, ids_cfg.image_token_id, ids_cfg.image_token_id, 4])
    grid = torch.tensor([[1, 2, 4]])
    prompt, delta = mrope_position_ids(tokens, grid, None, token_ids=ids_cfg)
    pos = sample_position_ids(tokens, grid, None, model, new_tokens=3)
    assert pos.shape == (3, 7)
    assert torch.equal(pos[:, :4], prompt)
    assert torch.equal(pos[:, 4:], (prompt.max() + 1 + torch.arange(3)).expand(3, -1))
    assert torch.equal(pos[:, 4:], (torch.arange(4, 7) + delta).expand(3, -1))
    one_d = load_config(None, ["model.preset=step3vl-tiny"]).model
    assert torch.equal(sample_position_ids(tokens, grid, None, one_d, new_tokens=2), torch.arange(6))


# ---------------------------------------------------------------- rotary frequencies


@pytest.fixture(scope="module")
def megatron_on_cpu():
    """megatron's rotary constructor calls torch.cuda.current_device()."""
    if not device.has_cuda():
        from megavlm.platform import cpu_adapter

        cpu_adapter.install()


def hf_cos_sin(head_dim, section, theta, positions):
    cfg = Qwen3VLTextConfig(
        head_dim=head_dim, hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section,
                         "mrope_interleaved": True},
    )
    return Qwen3VLTextRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions)  # [b, s, d] each


ROTARY_CASES = [(16, [3, 3, 2], 5e6), (16, [4, 2, 2], 1e4), (128, [24, 20, 20], 5e6)]


@pytest.mark.parametrize(("head_dim", "section", "theta"), ROTARY_CASES)
def test_interleaved_frequencies_equal_hf(head_dim, section, theta, megatron_on_cpu):
    positions = torch.randint(0, 262144, (3, 2, 37), generator=torch.Generator().manual_seed(head_dim))
    cos, sin = hf_cos_sin(head_dim, section, theta, positions)
    rope = multimodal_rotary_embedding("mrope_interleaved", kv_channels=head_dim, rotary_base=theta)
    assert isinstance(rope, InterleavedMRotaryEmbedding)
    emb = rope(positions, section)  # [s, b, 1, d]
    assert emb.shape == (37, 2, 1, head_dim)
    ours = emb[:, :, 0].transpose(0, 1)  # [b, s, d]
    assert (ours.cos() - cos).abs().max().item() <= 1e-6
    assert (ours.sin() - sin).abs().max().item() <= 1e-6

    # and as megatron's attention applies it (rotate_half, [s, b, h, d]) equals HF's q rotation
    q = torch.randn(37, 2, 3, head_dim, generator=torch.Generator().manual_seed(1))
    ref, _ = apply_rotary_pos_emb(q.permute(1, 2, 0, 3), q.permute(1, 2, 0, 3), cos, sin)  # [b, h, s, d]
    got = _apply_rotary_pos_emb_bshd(q, emb, rotary_interleaved=False)
    assert (got.permute(1, 2, 0, 3) - ref).abs().max().item() <= 1e-5


def test_chunked_is_megatrons_class_and_differs_from_interleaved(megatron_on_cpu):
    positions = torch.randint(0, 5000, (3, 2, 11), generator=torch.Generator().manual_seed(0))
    chunked = multimodal_rotary_embedding("mrope_chunked", kv_channels=128, rotary_base=5e6)
    ref = MultimodalRotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=5e6)
    assert torch.equal(chunked(positions, [24, 20, 20]), ref(positions, [24, 20, 20]))
    interleaved = multimodal_rotary_embedding("mrope_interleaved", kv_channels=128, rotary_base=5e6)
    assert not torch.equal(interleaved(positions, [24, 20, 20]), ref(positions, [24, 20, 20]))


def test_text_positions_give_plain_rope(megatron_on_cpu):
    """With T = H = W every frequency sees the same angle: plain RoPE in either pair convention."""
    positions = torch.arange(9).expand(3, 1, -1)  # [3, b, s]
    half = torch.arange(9.0)[:, None] / 1e4 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)  # [s, d/2]
    for pairs, expected in ((False, torch.cat([half, half], -1)), (True, half.repeat_interleave(2, -1))):
        rope = multimodal_rotary_embedding("mrope_interleaved", kv_channels=16, rotary_base=1e4,
                                           rotary_interleaved=pairs)
        torch.testing.assert_close(rope(positions, [4, 2, 2])[:, 0, 0], expected)


def test_bad_kind_and_section_name_the_key(megatron_on_cpu):
    with pytest.raises(ValueError, match="model.rope.kind"):
        multimodal_rotary_embedding("rope", kv_channels=16, rotary_base=1e4)
    rope = multimodal_rotary_embedding("mrope_interleaved", kv_channels=16, rotary_base=1e4)
    with pytest.raises(ValueError, match=r"model.rope.mrope_section \[4, 4, 4\]"):
        rope(torch.zeros(3, 1, 2, dtype=torch.long), [4, 4, 4])
