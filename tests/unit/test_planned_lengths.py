"""The packer plans rows from lengths read off headers (``SampleEncoder.num_tokens``: image
size and EXIF orientation, the video container), so that each DP rank and loader worker
decodes only the samples of the rows it serves. The planned lengths must be the encoded
lengths exactly, for every kind of medium, and the rows must be those of a packer that
decodes every sample to learn its length."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.config import load_config
from megavlm.data.build import sample_encoder
from megavlm.data.encode import SampleError
from megavlm.data.packing import PackedDataset
from megavlm.data.sample import Media, Message, Sample
from megavlm.data.synthetic import SyntheticMultimodalDataset
from megavlm.data.vlm_dataset import EncodedDataset


def _image(h: int, w: int, fmt: str, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(h * w)
    pixels = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt, **save)
    return buf.getvalue()


def _video(codec: str, fmt: str, n: int, fps: int, w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = np.full((h, w, 3), 40 + 5 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _cut(jpeg: bytes) -> bytes:
    """The JPEG up to half of its entropy-coded data: the header (size) reads, the pixels do not."""
    start = jpeg.index(b"\xff\xda")  # start of scan
    return jpeg[: start + (len(jpeg) - start) // 2]


def _sample(sid: str, media: list[Media]) -> Sample:
    parts = [{"type": m.kind, "index": i} for i, m in enumerate(media)] + [{"type": "text", "text": "What is it?"}]
    return Sample(id=sid, media=media, messages=[Message("user", parts),
                                                 Message("assistant", [{"type": "text", "text": "A test."}])])


def _files() -> list[Sample]:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: the planned grid must be the rotated one
    rng = np.random.default_rng(0)
    return [
        _sample("jpeg", [Media("image", data=_image(96, 160, "JPEG", quality=90))]),
        _sample("exif", [Media("image", data=_image(64, 128, "JPEG", quality=95, exif=exif))]),
        _sample("rgba", [Media("image", data=_image(80, 48, "PNG", "RGBA"))]),
        _sample("two", [Media("image", data=_image(64, 64, "PNG")), Media("image", data=_image(128, 96, "WEBP"))]),
        _sample("h264", [Media("video", data=_video("libx264", "mp4", 30, 10))]),
        _sample("vp9", [Media("video", data=_video("libvpx-vp9", "webm", 17, 12))]),
        _sample("frames", [Media("video", array=rng.integers(0, 256, (9, 48, 80, 3), dtype=np.uint8), fps=6.0)]),
        _sample("tiny", [Media("image", data=_image(8, 64, "PNG"))]),  # skipped: a side under the minimum
        _sample("broken", [Media("image", data=_cut(_image(64, 64, "JPEG", quality=95)))]),  # header fine, body cut
    ]


@pytest.mark.parametrize("preset", ["qwen3vl-tiny", "step3vl-tiny"])
def test_header_lengths_equal_encoded_lengths(preset):
    cfg = load_config(None, [f"model.preset={preset}", "data.dataset=synthetic_multimodal", "data.seq_length=8192",
                             "data.image_decoder=dali"])
    encoder = sample_encoder(cfg)
    synthetic = SyntheticMultimodalDataset(seed=3)
    samples = [synthetic[i] for i in range(24)] + [s for s in _files() if preset == "qwen3vl-tiny" or s.id in
                                                   ("jpeg", "exif", "rgba", "two", "tiny", "broken")]
    checked = 0
    for sample in samples:
        try:
            planned = encoder.num_tokens(sample)
        except SampleError as e:
            with pytest.raises(SampleError) as encoded:  # skipped for the same reason either way
                encoder(sample)
            assert encoded.value.reason == e.reason, (sample.id, e, encoded.value)
            continue
        try:
            encoded = encoder(sample).tokens.numel()
        except SampleError:
            assert sample.id == "broken"  # a body that fails to decode: an empty row, under the plan
            continue
        assert planned == encoded, (sample.id, planned, encoded)
        checked += 1
    assert checked >= (31 if preset == "qwen3vl-tiny" else 20)  # STEP3-VL skips videos (images only)


class _Counting:
    """The encoder, counting the samples it decodes."""

    def __init__(self, encoder):
        self.encoder, self.decoded = encoder, []

    def __call__(self, sample):
        self.decoded.append(sample.id)
        return self.encoder(sample)

    def num_tokens(self, sample):
        return self.encoder.num_tokens(sample)


class _NoLengths:
    """A source without ``length``: the packer decodes every sample to learn its length."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, i):
        return self.rows[i]


def test_a_reader_decodes_only_the_rows_it_serves():
    cfg = load_config("examples/tiny/pretrain_vlm.yaml", ["data.seq_length=512", "data.image_decoder=pillow"])
    synthetic = SyntheticMultimodalDataset(seed=cfg.data.seed)
    counting = _Counting(sample_encoder(cfg))
    planned = PackedDataset(EncodedDataset(synthetic, counting, cfg.model), seq_length=512)
    while planned._found <= 4:
        planned._extend()
    assert counting.decoded == []  # planning read headers only
    members = [i for k in (0, 2, 4) for i in planned._bins[k]]
    mine = [planned[k] for k in (0, 2, 4)]  # worker 0 of 2
    assert counting.decoded == [synthetic[i].id for i in members]
    reference = PackedDataset(_NoLengths(EncodedDataset(synthetic, sample_encoder(cfg), cfg.model)), seq_length=512)
    for k, row in zip((0, 2, 4), mine):
        want = reference[k]
        assert torch.equal(row.tokens, want.tokens) and torch.equal(row.cu_seqlens, want.cu_seqlens)
        for name in ("pixel_values", "pixel_values_videos"):
            a, b = getattr(row, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), name
