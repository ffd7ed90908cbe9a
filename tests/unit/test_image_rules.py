"""Size rules, patchify and token layouts of megavlm.data.image_rules against HF and by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.data import image_rules as R

# HF transformers is a test dependency: a broken install fails here rather than skipping.
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2vl  # noqa: E402

MIN_PX, MAX_PX = R.QWEN3VL_MIN_PIXELS, R.QWEN3VL_MAX_PIXELS


# --- smart_resize --------------------------------------------------------------------------

SIZE_TABLE = [  # (h, w)
    (1, 1), (32, 32), (200, 300), (224, 224), (480, 640), (333, 1001), (10, 2000), (2000, 10),
    (4000, 250), (3000, 4000), (4100, 4100), (8192, 8192), (1080, 1920), (16, 3200), (47, 9400),
    (1000, 48), (255, 257), (48, 48), (100, 20000),  # the last: aspect exactly 200 is allowed
]


@pytest.mark.parametrize("min_px,max_px", [(MIN_PX, MAX_PX), (56 * 56, 28 * 28 * 1280), (256 * 32 * 32, 1280 * 32 * 32)])
def test_smart_resize_matches_hf(min_px, max_px):
    rng = random.Random(0)
    sizes = SIZE_TABLE + [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(400)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 60)) for _ in range(100)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for factor in (32, 28):
            ours = R.smart_resize(h, w, factor=factor, min_pixels=min_px, max_pixels=max_px)
            theirs = hf_qwen2vl.smart_resize(h, w, factor=factor, min_pixels=min_px, max_pixels=max_px)
            assert ours == tuple(theirs), (h, w, factor)
            assert ours[0] % factor == 0 and ours[1] % factor == 0


def test_smart_resize_aspect_error_names_image():
    with pytest.raises(R.AspectRatioError, match="banner.png") as info:
        R.smart_resize(10, 2001, min_pixels=MIN_PX, max_pixels=MAX_PX, name="banner.png")
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError):  # HF raises too
        hf_qwen2vl.smart_resize(10, 2001, factor=32, min_pixels=MIN_PX, max_pixels=MAX_PX)


# --- patchify ------------------------------------------------------------------------------


def _hf_processor(min_px=MIN_PX, max_px=MAX_PX):
    # Qwen3-VL's preprocessor_config.json (transformers 5.23 maps "qwen3_vl" to Qwen2VLImageProcessor,
    # torchvision backend, and falls back to this PIL backend when torchvision is absent).
    return hf_qwen2vl.Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        min_pixels=min_px, max_pixels=max_px,
    )


def _picture(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 127 + 90 * np.sin(x[..., None] / 17.0 + y[..., None] / 23.0 + np.arange(3))
    return (base + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _normalize(img_u8: np.ndarray) -> torch.Tensor:  # HWC uint8 -> CHW float, mean = std = 0.5
    x = torch.from_numpy(img_u8).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("h,w", [(64, 64), (32, 96), (256, 320), (448, 224)])
def test_patchify_exact_on_pre_resized_images(h, w):
    # sizes already satisfy smart_resize, so HF's resize is the identity and patchify is isolated
    img = _picture(h, w, seed=h + w)
    hf = _hf_processor(min_px=32 * 32, max_px=MAX_PX)(images=[Image.fromarray(img)], return_tensors="np")
    patches, grid = R.patchify(_normalize(img))
    assert grid.tolist() == hf["image_grid_thw"][0].tolist() == [1, h // 16, w // 16]
    assert patches.shape == (h // 16 * w // 16, 3 * 2 * 16 * 16)
    np.testing.assert_allclose(patches.numpy(), hf["pixel_values"], rtol=0, atol=1e-6)


def test_patchify_end_to_end_matches_hf_processor():
    # smart_resize + Pillow BICUBIC (HF's resample for Qwen3-VL) + normalize + patchify == HF
    sizes = [(200, 300), (333, 1001), (1080, 720), (40, 700)]
    imgs = [_picture(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    hf = _hf_processor()(images=[Image.fromarray(a) for a in imgs], return_tensors="np")
    ours, grids = [], []
    for a in imgs:
        th, tw = R.smart_resize(*a.shape[:2], min_pixels=MIN_PX, max_pixels=MAX_PX)
        resized = np.asarray(Image.fromarray(a).resize((tw, th), Image.BICUBIC))
        p, g = R.patchify(_normalize(resized))
        ours.append(p)
        grids.append(g)
    assert torch.stack(grids).tolist() == hf["image_grid_thw"].tolist()
    np.testing.assert_allclose(torch.cat(ours).numpy(), hf["pixel_values"], rtol=0, atol=1e-6)
    assert sum(R.qwen3vl_num_tokens(g) for g in grids) * 4 == hf["pixel_values"].shape[0]


def _hf_video_patchify(videos: torch.Tensor, patch=16, merge=2, tp=2):
    # transformers 5.23 Qwen3VLVideoProcessor.patchify, transcribed (its module needs torchvision):
    # pad frames with the last one, view (B, gt, tp, C, gh/m, m, p, gw/m, m, p), permute, flatten.
    b, t, c, h, w = videos.shape
    if pad := -t % tp:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        t += pad
    gt, gh, gw = t // tp, h // patch, w // patch
    p = videos.view(b, gt, tp, c, gh // merge, merge, patch, gw // merge, merge, patch)
    p = p.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return p.reshape(b, gt * gh * gw, c * tp * patch * patch), (gt, gh, gw)


@pytest.mark.parametrize("frames", [4, 5])
def test_patchify_video_matches_hf_layout(frames):
    vid = torch.randn(frames, 3, 64, 96)
    patches, grid = R.patchify(vid)
    ref, thw = _hf_video_patchify(vid[None])
    assert tuple(grid.tolist()) == thw == ((frames + 1) // 2, 4, 6)
    assert torch.equal(patches, ref[0])


def test_patchify_image_equals_two_identical_frames():
    img = torch.randn(3, 32, 64)
    a, ga = R.patchify(img)
    b, gb = R.patchify(torch.stack([img, img]))
    assert torch.equal(a, b) and ga.tolist() == gb.tolist() == [1, 2, 4]


def test_patchify_rejects_unmerged_sizes():
    with pytest.raises(ValueError, match="multiples of 32"):
        R.patchify(torch.zeros(3, 48, 64))
