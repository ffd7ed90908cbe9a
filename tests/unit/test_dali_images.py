"""DALI image decoding (CPU pipeline) for Qwen3-VL and STEP3-VL: shapes, token counts, pixel
values against Pillow / HF references, and per-image error isolation.

DALI only decodes; the pixel arithmetic is megavlm.data.image_pixels for both decoders, so
DALI, Pillow and HF's processors agree to float rounding (asserted 1e-5): DALI and Pillow
decode these JPEGs and PNGs bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.data import image_rules as R
from megavlm.data.dali_images import DecodeError, ImageDecoder, PillowImageDecoder

MAX_PX = 1024 * 1024  # keep the Qwen3-VL images small: the test is about layout and values


def _pixels(w, h, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(h, dtype=np.float32)[:, None, None] / 53.0
    x = np.arange(w, dtype=np.float32)[None, :, None] / 37.0
    base = 127 + 90 * np.sin(x + y + np.arange(3, dtype=np.float32))
    return (base + rng.normal(0, 20, (h, w, 3)).astype(np.float32)).clip(0, 255).astype(np.uint8)


def _encode(arr, fmt="JPEG", **kw):
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", 90)
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


# (W, H, format)
SIZES = [(300, 200, "PNG"), (728, 728, "JPEG"), (2000, 600, "JPEG"), (600, 2000, "JPEG"),
         (3000, 500, "JPEG"), (3200, 1000, "JPEG"), (640, 480, "JPEG")]


@pytest.fixture(scope="module")
def images():
    return [_encode(_pixels(w, h, i), f) for i, (w, h, f) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def qwen():
    return ImageDecoder(mode="qwen3vl", batch_size=8, num_threads=2, max_pixels=MAX_PX, device="cpu")


@pytest.fixture(scope="module")
def step3():
    return ImageDecoder(mode="step3vl", batch_size=4, num_threads=2, device="cpu")


@pytest.fixture(scope="module")
def step3_results(step3, images):
    return step3.decode(images, [f"img{i}" for i in range(len(images))])


@pytest.fixture(scope="module")
def step3_pillow(images):
    dec = PillowImageDecoder(mode="step3vl", num_threads=2)
    yield dec.decode(images)
    dec.close()


def test_qwen3vl_shapes_tokens_and_values_vs_hf(qwen, images):
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_mod

    hf = hf_mod.Qwen2VLImageProcessorPil(  # Qwen3-VL's config, max_pixels lowered like ours
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        min_pixels=R.QWEN3VL_MIN_PIXELS, max_pixels=MAX_PX,
    )
    out = qwen.decode(images, [f"img{i}" for i in range(len(images))])
    for (w, h, _), enc, res in zip(SIZES, images, out):
        assert res.ok, res
        th, tw = R.smart_resize(h, w, min_pixels=R.QWEN3VL_MIN_PIXELS, max_pixels=MAX_PX)
        assert res.source_size == (h, w) and res.resized_size == (th, tw)
        assert res.grid_thw.tolist() == [1, th // 16, tw // 16]
        assert res.pixel_values.shape == (th // 16 * tw // 16, 1536)
        assert res.pixel_values.dtype == torch.float32
        assert res.num_tokens == th * tw // (32 * 32)
        ref = hf(images=[Image.open(io.BytesIO(enc)).convert("RGB")], return_tensors="np")
        assert ref["image_grid_thw"][0].tolist() == res.grid_thw.tolist()
        d = np.abs(res.pixel_values.numpy() - ref["pixel_values"])
        assert d.max() < 1e-5, (w, h, d.max())


def test_step3vl_shapes_and_tokens(step3_results):
    for (w, h, _), res in zip(SIZES, step3_results):
        assert res.ok, res
        plan = R.step3_crop_plan(h, w)
        assert res.plan == plan and res.source_size == (h, w)
        assert res.pixel_values[728].shape == (1, 3, 728, 728)
        assert res.pixel_values[504].shape == (plan.num_crops, 3, 504, 504)
        assert res.num_tokens == len(res.token_layout) == R.step3_num_tokens(plan)
    # the hand-computed table of test_image_rules, through the decoder
    crops = [r.plan.num_crops for r in step3_results]
    # 300x200: 0; 728: 0; 2000x600: 1x4; 600x2000: 4x1; 3000x500: 1x6 (window 500);
    # 3200x1000: downscale to 3024x945, window 504, 6 x (945/504 = 1.875 -> 2) = 12; 640x480: 0
    assert crops == [0, 0, 4, 4, 6, 12, 0]
    assert [r.num_tokens for r in step3_results] == [171, 171, 503, 506, 669, 12 * 83 + 1 + 171, 171]


def test_step3vl_values_vs_pillow(step3_results, step3_pillow):
    for (w, h, _), a, b in zip(SIZES, step3_results, step3_pillow):
        for size in (728, 504):
            x, y = a.pixel_values[size], b.pixel_values[size]
            assert x.shape == y.shape
            if x.numel():
                assert (x - y).abs().max() < 1e-5, (w, h, size)


def test_corrupt_truncated_and_unsupported_images(step3, images):
    good_jpeg, good_png = images[6], images[0]
    bmp = _encode(_pixels(400, 300, 9), "BMP")
    gif = _encode(_pixels(64, 64, 3), "GIF")
    batch = [
        good_jpeg,
        good_jpeg[: len(good_jpeg) // 2],  # truncated JPEG (no EOI): probe marks it suspect
        b"\x00not an image at all" * 10,  # garbage: Pillow header fails
        good_png,
        good_png[: len(good_png) // 2],  # truncated PNG: Image.verify() fails
        bmp[: len(bmp) // 2],  # truncated BMP: header fine, only DALI notices -> batch split
        gif,  # DALI cannot decode GIF
        bmp,
    ]
    names = ["ok.jpg", "trunc.jpg", "junk.bin", "ok.png", "trunc.png", "trunc.bmp", "anim.gif", "ok.bmp"]
    rebuilds = step3.rebuilds
    out = step3.decode(batch, names)
    errors = {r.name: r.reason for r in out if isinstance(r, DecodeError)}
    assert set(errors) == {"trunc.jpg", "junk.bin", "trunc.png", "trunc.bmp", "anim.gif"}, errors
    assert "GIF" in errors["anim.gif"] and "DALI" in errors["trunc.bmp"]
    assert [r.name for r in out] == names
    assert step3.rebuilds > rebuilds  # the truncated BMP failed a DALI batch
    # good images decode as they would alone, and the decoder still works afterwards
    ok = {r.name: r for r in out if r.ok}
    assert ok["ok.bmp"].source_size == (300, 400)
    [alone] = step3.decode([good_jpeg], ["again"])
    assert torch.equal(alone.pixel_values[728], ok["ok.jpg"].pixel_values[728])
    assert torch.equal(ok["ok.png"].pixel_values[728], step3.decode([good_png])[0].pixel_values[728])


def test_exif_orientation_gray_rgba_and_chunking(qwen):
    arr = _pixels(320, 256, 5)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = _encode(arr, "JPEG", exif=exif)
    gray = _encode(arr[..., 0], "PNG")
    rgba = _encode(np.dstack([arr, arr[..., :1]]), "PNG")
    batch = [rotated, gray, rgba] * 4  # 12 images > batch_size 8: two DALI batches
    out = qwen.decode(batch)
    pil = PillowImageDecoder(mode="qwen3vl", num_threads=2, max_pixels=MAX_PX).decode(batch)
    for r, p in zip(out, pil):
        assert r.ok and p.ok
        assert r.grid_thw.tolist() == p.grid_thw.tolist()
        assert (r.pixel_values - p.pixel_values).abs().max() < 1e-5
    assert out[0].source_size == (320, 256)  # EXIF-rotated: h and w swapped
    assert out[1].source_size == out[2].source_size == (256, 320)


def test_aspect_ratio_over_200_is_an_error_entry(qwen, images):
    thin = _encode(_pixels(2010, 10, 1), "PNG")
    out = qwen.decode([thin, images[6]], ["thin.png", "ok.jpg"])
    assert isinstance(out[0], DecodeError) and "thin.png" in out[0].reason and "200" in out[0].reason
    assert out[1].ok


def test_step3vl_thin_image_crop_bound(step3):
    # 9000x40: not square-padded (short side 40 >= 32), downscaled to 3024 x 13, aspect > 4 ->
    # window 13 -> 232 crops > max_crops 128 (a 3000x10 image is padded to a square: 36 crops)
    thin = _encode(_pixels(9000, 40, 2), "PNG")
    [res] = step3.decode([thin], ["banner.png"])
    assert isinstance(res, DecodeError) and "banner.png" in res.reason and "max_crops" in res.reason
