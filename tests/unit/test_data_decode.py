"""The training path's decoding: DALI (batched per loader step) against the Pillow reference,
counted fallbacks, per-sample isolation of a corrupt image, HF-exact in-memory videos, and the
video decoder choice (``data.video_decoder``).

DALI only decodes; resize, crop and normalize are megavlm.data.image_pixels for every route,
so the two paths agree to float rounding (asserted: 1e-5) wherever the decoders agree, which
they do bit for bit on PNG and, here, on baseline JPEG (both libjpeg-turbo, same IDCT).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.config import load_config
from megavlm.data.build import sample_encoder
from megavlm.data.sample import Media, Message, Sample
from megavlm.data.vlm_dataset import COUNT_NAMES, EncodedDataset

ROOT = ["data.dataset=synthetic_multimodal", "data.seq_length=8192", "data.min_pixels=4096", "data.max_pixels=65536"]


def _encoder(preset: str, decoder: str):
    return sample_encoder(load_config(None, [f"model.preset={preset}", *ROOT, f"data.image_decoder={decoder}"]))


def _image_sample(i: int, data: bytes) -> Sample:
    return Sample(id=f"s{i}", media=[Media("image", data=data)], messages=[
        Message("user", [{"type": "image", "index": 0}, {"type": "text", "text": "What is it?"}]),
        Message("assistant", [{"type": "text", "text": "a picture"}])])


def _encoded(h: int, w: int, fmt: str = "PNG", mode: str = "RGB", seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    a = np.clip(smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt, **save)
    return buf.getvalue()


SIZES = [(100, 150, "PNG"), (64, 640, "PNG"), (300, 200, "JPEG"), (400, 760, "PNG"), (20, 400, "PNG")]


@pytest.mark.parametrize("preset", ["qwen3vl-tiny", "step3vl-tiny"])
def test_dali_path_equals_pillow_reference(preset):
    """Same samples through data.image_decoder=dali and =pillow: same tokens and grids, equal
    pixels (1e-5); batched (prefetch) and one-by-one DALI results are identical. The sizes
    cover Qwen3-VL up- and downscales and STEP3-VL's crops, kept short sides and square pad."""
    dali, pillow = _encoder(preset, "dali"), _encoder(preset, "pillow")
    samples = [_image_sample(i, _encoded(h, w, fmt, seed=i, **({"quality": 90} if fmt == "JPEG" else {})))
               for i, (h, w, fmt) in enumerate(SIZES)]
    alone = [dali(s) for s in samples]
    dali.prefetch(samples)
    assert len(dali._decoded) == len(samples)
    for s, one in zip(samples, alone):
        a, b = dali(s), pillow(s)
        assert a.decode_counts == {"images_dali": 1} and b.decode_counts == {"images_pillow": 1}
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, one.tokens)
        assert torch.equal(a.pixel_values, one.pixel_values)
        assert torch.equal(a.image_grid_thw, b.image_grid_thw)
        assert (a.pixel_values - b.pixel_values).abs().max() < 1e-5, s.id


def test_pillow_fallbacks_are_counted_and_match_hf():
    """RGBA (composited onto white), 16-bit PNG (scaled) and an EXIF-rotated JPEG go through
    Pillow, counted; their patches equal HF's Qwen2-VL/Qwen3-VL image processor (Pillow)."""
    from transformers import Qwen2VLImageProcessor

    enc = _encoder("qwen3vl-tiny", "dali")
    rgba = np.zeros((80, 120, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.linspace(0, 255, 120, dtype=np.uint8)[None, :]
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    deep = io.BytesIO()
    Image.fromarray((np.arange(96 * 96).reshape(96, 96) * 7).astype(np.uint16)).save(deep, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = _encoded(64, 128, "JPEG", quality=95, exif=exif)
    hf = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                               image_std=[0.5] * 3, min_pixels=4096, max_pixels=65536)
    for i, data in enumerate([buf.getvalue(), deep.getvalue()]):
        out = enc(_image_sample(i, data))
        assert out.decode_counts == {"images_pillow": 1}
        ref = hf(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
        if i == 0:  # HF composites alpha onto white; 16-bit: HF clips, megavlm scales (documented)
            assert torch.equal(out.image_grid_thw, ref["image_grid_thw"])
            assert (out.pixel_values - ref["pixel_values"]).abs().max() < 1e-5
        else:
            assert out.pixel_values.max() < 1.0 and out.pixel_values.std() > 0.1  # not clipped to white
    out = enc(_image_sample(9, rotated))
    assert out.decode_counts == {"images_dali": 1}  # DALI applies EXIF orientation itself
    assert out.image_grid_thw.tolist() == [[1, 8, 4]]  # 128 x 64 after rotation


def test_corrupt_image_in_a_dali_batch_is_isolated():
    """One loader step (``__getitems__``) with a truncated and a garbage image among good ones:
    the good rows decode by DALI, the bad ones become empty rows counted as bad_image."""
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", *ROOT])
    good = [_encoded(120, 90, "JPEG", seed=i, quality=90) for i in range(4)]
    samples = [_image_sample(0, good[0]), _image_sample(1, good[1][: len(good[1]) // 2]),
               _image_sample(2, good[2]), _image_sample(3, b"\xff\xd8\xff garbage"), _image_sample(4, good[3])]
    rows = EncodedDataset(samples, sample_encoder(cfg), cfg.model).__getitems__(list(range(5)))
    names = {n: COUNT_NAMES.index(n) for n in ("bad_image", "images_dali", "images_pillow")}
    for i, row in enumerate(rows):
        counts = {n: int(row.sample_counts[k]) for n, k in names.items()}
        if i in (1, 3):
            assert row.tokens.numel() == 0 and counts["bad_image"] == 1 and "s%d" % i in row.notes[0]
        else:
            assert row.tokens.numel() > 0 and counts == {"bad_image": 0, "images_dali": 1, "images_pillow": 0}


# (frames, fps or None, height, width): lengths, rates and sizes that differ; None = no metadata
VIDEOS = [(30, 10.0, 48, 64), (13, None, 120, 160), (75, 25.0, 90, 200)]


@pytest.mark.parametrize("n,fps,h,w", VIDEOS)
def test_in_memory_video_equals_hf_video_processor(monkeypatch, n, fps, h, w):
    """Frames given as arrays, against transformers' Qwen3-VL video processor on the same
    frames: its ``sample_frames`` (24 fps without metadata), its processor's
    ``_calculate_timestamps``, and its pixels and grid: the processor itself with the released
    bounds on the sampled frames (test_video.hf_qwen3vl_video: HF's code, with a stand-in for
    torchvision's uint8 CPU resize and normalize, absent here). Measured max |d| 0.0."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    from megavlm.data.video import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS
    from tests.unit.test_video import hf_qwen3vl_video

    rng = np.random.default_rng(n)
    frames = np.clip(rng.normal(128, 40, (n, h, w, 3)), 0, 255).astype(np.uint8)
    sample = Sample(id="v", media=[Media("video", array=frames, fps=fps)], messages=[
        Message("user", [{"type": "video", "index": 0}, {"type": "text", "text": "Motion?"}]),
        Message("assistant", [{"type": "text", "text": "none"}])])
    enc = _encoder("qwen3vl-tiny", "dali")
    out = enc(sample)
    meta = VideoMetadata(total_num_frames=n, fps=fps, width=w, height=h)
    index = Qwen3VLVideoProcessor().sample_frames(meta)
    ref, grid, _ = hf_qwen3vl_video(monkeypatch, frames[index], min_pixels=VIDEO_MIN_PIXELS,
                                    max_pixels=VIDEO_MAX_PIXELS)
    assert out.video_grid_thw.tolist() == [grid.tolist()]
    assert (out.pixel_values_videos - ref).abs().max() <= 1e-6
    times = Qwen3VLProcessor._calculate_timestamps(None, index, meta.fps)  # metadata.fps: 24 when missing
    rendered = enc.template.tok.decode(out.tokens.tolist())
    assert rendered.count(" seconds>") == len(times) == grid[0]
    for t in times:
        assert f"<{t:.1f} seconds>" in rendered


def test_video_decoder_pyav_gives_ffmpeg_frames_through_hf_processor(monkeypatch):
    """``data.video_decoder``: "pyav" decodes a VP9 file with PyAV (FFmpeg, the frames HF's pyav
    video loader reads) and its pixels equal HF's video processor on those frames; "dali"
    decodes it with DALI, counted as such, whose YUV -> RGB conversion differs from FFmpeg's by
    the bound test_video.py measures (here on a smooth clip: about one level)."""
    from megavlm.data.video import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VideoDecoder
    from tests.unit.test_video import _encode, hf_qwen3vl_video

    clip = _encode("libvpx-vp9", "webm", {"crf": "20", "b:v": "0"})
    sample = Sample(id="v", media=[Media("video", data=clip)], messages=[
        Message("user", [{"type": "video", "index": 0}, {"type": "text", "text": "Motion?"}]),
        Message("assistant", [{"type": "text", "text": "to the right"}])])
    outs = {}
    for decoder in ("pyav", "dali"):
        cfg = load_config(None, ["model.preset=qwen3vl-tiny", *ROOT, f"data.video_decoder={decoder}"])
        outs[decoder] = sample_encoder(cfg)(sample)
        assert outs[decoder].decode_counts == {f"videos_{decoder}": 1}
    (ffmpeg,) = VideoDecoder(mode="frames", device="cpu", dali_codecs=frozenset()).decode([clip])
    assert ffmpeg.backend == "pyav"
    ref, grid, _ = hf_qwen3vl_video(monkeypatch, ffmpeg.frames.numpy(), min_pixels=VIDEO_MIN_PIXELS,
                                    max_pixels=VIDEO_MAX_PIXELS)
    for out in outs.values():
        assert out.video_grid_thw.tolist() == [grid.tolist()]
    assert (outs["pyav"].pixel_values_videos - ref).abs().max() <= 1e-6
    levels = (outs["dali"].pixel_values_videos - ref).abs() * 127.5  # normalized by (x - 127.5) / 127.5
    assert levels.mean() < 2 and levels.max() <= 8.01  # measured: mean 1.0, max 1 level


def test_video_decoder_key_is_validated():
    from megavlm.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.video_decoder: 'decord' is not one of dali, pyav"):
        validate(load_config(None, ["model.preset=qwen3vl-tiny", *ROOT, "data.video_decoder=decord"]), 1)
