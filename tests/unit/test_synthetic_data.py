"""Built-in multimodal data: exact answers, tokenizer, chat template, encoding vs HF's processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megavlm.data.chat_template import Qwen3VLChatTemplate
from megavlm.data.encode import SampleEncoder, SampleError
from megavlm.data.synthetic import COLORS, SyntheticMultimodalDataset
from megavlm.data.tokenizer import QWEN3VL_SPECIAL, STEP3VL_SPECIAL, synthetic_tokenizer, token_ids_config
from megavlm.config import presets


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(Qwen3VLChatTemplate(synthetic_tokenizer()), min_pixels=4096, max_pixels=16384, max_length=512)


def test_dataset_is_deterministic_and_covers_every_task():
    a, b = SyntheticMultimodalDataset(seed=3), SyntheticMultimodalDataset(seed=3)
    for i in range(20):
        x, y = a[i], b[i]
        assert x.id == y.id and x.targets == y.targets
        assert all(np.array_equal(m.array, n.array) for m, n in zip(x.media, y.media))
    tasks = {a[i].id.rsplit("-", 1)[1] for i in range(200)}
    assert tasks == {"caption", "count", "box", "point", "ocr", "motion", "appear", "text"}


def test_count_answers_match_the_pixels():
    """Count the shapes of the asked colour from the drawn image: one per 4x4 grid cell."""
    data = SyntheticMultimodalDataset(seed=5, tasks=("count",))
    for i in range(30):
        sample = data[i]
        color = sample.messages[0].content[-1]["text"].split()[2]
        image = sample.media[0].array.astype(int)
        h, w = image.shape[:2]
        found = 0
        for cell in range(16):
            cy, cx = int((cell // 4 + 0.5) * h / 4), int((cell % 4 + 0.5) * w / 4)
            found += np.abs(image[cy, cx] - COLORS[color]).sum() < 10
        assert str(found) == sample.targets["answer"], sample.id


def test_tokenizer_has_single_id_special_tokens_and_round_trips():
    tok = synthetic_tokenizer()
    assert tok.vocab_size == presets.TINY_VLM_VOCAB
    assert [tok.token_id(t) for t in (*QWEN3VL_SPECIAL, *STEP3VL_SPECIAL)] == list(range(13))
    assert token_ids_config(tok) == presets.TINY_VLM_TOKEN_IDS
    assert token_ids_config(tok, family="step3vl") == presets.TINY_STEP3_TOKEN_IDS
    text = "Where is the red circle? Answer with a box. [12, 250, 1000, 3]"
    assert tok.decode(tok.encode(text)) == text
    assert tok.token_id("<|image_pad|>") not in tok.encode("<|image_pad|>")  # text cannot forge one


def test_checked_in_tokenizer_is_what_training_gives():
    """The asset loads without training (every process start used to pay ~4 s) and is exactly
    the tokenizer the synthetic corpus trains, so changing the corpus fails here."""
    from megavlm.data.tokenizer import train_synthetic_tokenizer_from_corpus

    assert synthetic_tokenizer().backend.to_str() == train_synthetic_tokenizer_from_corpus().backend.to_str()


def test_chat_template_supervises_assistant_turns_only(encoder):
    tok = encoder.template.tok
    data = SyntheticMultimodalDataset(seed=2)
    for i in range(30):
        sample = data[i]
        enc = encoder(sample)
        answer = sample.messages[-1].content[0]["text"]
        assert tok.decode(enc.labels[enc.loss_mask.bool()].tolist()) == answer + "<|im_end|>"
        if enc.image_grid_thw is not None:
            assert int((enc.tokens == 5).sum()) == int(enc.image_grid_thw.prod(-1).sum()) // 4
        if enc.video_grid_thw is not None:
            t, h, w = enc.video_grid_thw[0].tolist()
            assert int((enc.tokens == 6).sum()) == t * h * w // 4
            assert tok.decode(enc.tokens.tolist()).count(" seconds>") == t  # one timestamp per pair


def test_image_patches_equal_hf_processor(encoder):
    """A 96x128 image (already a multiple of 32, so no resize): our pixel_values equal HF's."""
    from transformers import Qwen2VLImageProcessor

    data = SyntheticMultimodalDataset(seed=0, image_sides=(96, 128), tasks=("count",))
    image = next(s for s in (data[i] for i in range(50)) if s.media[0].array.shape[:2] == (96, 128)).media[0].array
    hf = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                               image_std=[0.5] * 3, min_pixels=4096, max_pixels=16384)
    ref = hf(images=[image], return_tensors="pt")
    media, _ = encoder.media(type("S", (), {"id": "x", "media": [data[0].media[0].__class__("image", array=image)]})())
    assert torch.equal(media["image_grid_thw"], ref["image_grid_thw"])
    assert (media["pixel_values"] - ref["pixel_values"]).abs().max().item() < 1e-5


def test_bad_samples_are_named(encoder, tmp_path):
    from megavlm.data.sample import Media, Message, Sample

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    for media, reason in ((Media("image", path=str(bad)), "bad_image"),
                          (Media("image", path=str(tmp_path / "nope.png")), "missing_media"),
                          (Media("image", array=np.zeros((4, 64, 3), np.uint8)), "image_too_small"),
                          (Media("image", array=np.zeros((10, 3000, 3), np.uint8)), "image_aspect")):
        sample = Sample("s1", [Message("user", [{"type": "image", "index": 0}])], [media])
        with pytest.raises(SampleError, match=f"sample s1: {reason}") as err:
            encoder(sample)
        assert err.value.reason == reason


@pytest.mark.usefixtures("single_rank_megatron")
def test_step3vl_sample_encodes_its_crop_layout_and_runs():
    """A 100x400 image: 4 crops of 81 tokens in one row, then the 169-token global view
    (REFERENCE 5); the step3vl-tiny VLM consumes exactly those placeholders."""
    from megatron.core.utils import unwrap_model

    from megavlm.config import load_config
    from megavlm.data.build import sample_encoder
    from megavlm.data.sample import Media, Message, Sample
    from megavlm.models.build import build_model_chunks

    cfg = load_config(None, ["model.preset=step3vl-tiny", "data.dataset=synthetic_multimodal", "data.seq_length=1024"])
    encoder = sample_encoder(cfg)
    image = np.full((100, 400, 3), 128, np.uint8)
    sample = Sample("wide", [Message("user", [{"type": "image", "index": 0}, {"type": "text", "text": "Size?"}]),
                             Message("assistant", [{"type": "text", "text": "wide"}])], [Media("image", array=image)])
    enc = encoder(sample)
    tok = encoder.template.tok
    assert enc.image_grid_thw.tolist() == [[1, 36, 36]] * 4 + [[1, 52, 52]]
    assert int((enc.tokens == tok.token_id("<im_patch>")).sum()) == 4 * 81 + 169
    assert int((enc.tokens == tok.token_id("<patch_start>")).sum()) == 4
    assert int((enc.tokens == tok.token_id("<patch_newline>")).sum()) == 0  # one row of crops
    (chunk,), _ = build_model_chunks(cfg)
    with torch.no_grad():
        out = unwrap_model(chunk).eval()(enc.tokens[None], torch.arange(len(enc.tokens))[None],
                                         pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)
    assert out.shape[:2] == (1, len(enc.tokens)) and torch.isfinite(out).all()
