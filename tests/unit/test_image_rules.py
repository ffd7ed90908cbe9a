"""Size rules, patchify and token layouts of megavlm.data.image_rules against HF and by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.data import image_rules as R

hf_qwen2vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

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


# --- STEP3-VL ------------------------------------------------------------------------------
# Sizes are written W x H in the names (as people quote them); the functions take (h, w).
# Token count = crops * (1 + 81 + 1) + (rows - 1) newlines + (1 + 169 + 1) for the global view.

STEP3_TABLE = [
    # name, (h, w), window, resized (h, w), rows, cols, tokens
    # 300x200: long 300 <= 728, aspect 300/200 = 1.5, not > 1.5 -> no crops; 171 tokens.
    ("small 300x200", (200, 300), 0, (200, 300), 0, 0, 171),
    # exactly 728x728: long 728 <= 728, aspect 1 -> no crops; 171.
    ("exactly 728", (728, 728), 0, (728, 728), 0, 0, 171),
    # 728x400: long 728 <= 728, aspect 1.82 > 1.5 -> window = short = 400;
    # w 728/400 = 1.82 (frac .82 > .2) -> 2 -> 800; h 400/400 = 1 -> 400; 1 x 2 crops;
    # 2 * 83 + 0 + 171 = 337.
    ("small wide 728x400", (400, 728), 400, (400, 800), 1, 2, 337),
    # 2000x600: long 2000 > 728, aspect 3.33 <= 4 -> window 504;
    # w 2000/504 = 3.968 (frac .968) -> 4 -> 2016; h 600/504 = 1.190 (frac .190 <= .2) -> 1 -> 504;
    # 1 row x 4 cols = 4 crops: 4 * 83 + 0 + 171 = 503.
    ("wide 2000x600", (600, 2000), 504, (504, 2016), 1, 4, 503),
    # 600x2000: transposed -> 4 rows x 1 col: 4 * 83 + 3 newlines + 171 = 506.
    ("tall 600x2000", (2000, 600), 504, (2016, 504), 4, 1, 506),
    # 6000x4000: long 6000 > 3024 -> scale 3024/6000 = .504 -> 3024 x 2016; aspect 1.5 -> 504;
    # w 3024/504 = 6.0 -> 6; h 2016/504 = 4.0 -> 4; 24 crops, 4 rows: 24 * 83 + 3 + 171 = 2166.
    ("huge 6000x4000", (4000, 6000), 504, (2016, 3024), 4, 6, 2166),
    # 3000x500: long 3000 <= 3024 (no downscale), aspect 6 > 4 -> window min(500, 504) = 500;
    # w 3000/500 = 6 -> 3000; h 1 -> 500; 6 crops in 1 row: 6 * 83 + 171 = 669.
    ("aspect>4 3000x500", (500, 3000), 500, (500, 3000), 1, 6, 669),
    # 1000x300: long > 728, aspect 3.33 -> 504; w 1000/504 = 1.98 -> 2 -> 1008;
    # h 300/504 = .595 < 1 (frac .595 > .2) -> rounds up to 504; 2 crops: 2 * 83 + 171 = 337.
    ("short side < window 1000x300", (300, 1000), 504, (504, 1008), 1, 2, 337),
    # 1100x1100: aspect 1 -> 504; 1100/504 = 2.18 (frac .18 <= .2) -> 2 -> 1008 both;
    # 2 x 2 crops: 4 * 83 + 1 + 171 = 504.
    ("square 1100", (1100, 1100), 504, (1008, 1008), 2, 2, 504),
]


@pytest.mark.parametrize("name,hw,window,resized,rows,cols,tokens", STEP3_TABLE, ids=[t[0] for t in STEP3_TABLE])
def test_step3_crop_plan_table(name, hw, window, resized, rows, cols, tokens):
    plan = R.step3_crop_plan(*hw)
    assert plan.window == window
    assert plan.resized == resized
    assert (plan.rows, plan.cols, plan.num_crops) == (rows, cols, rows * cols)
    assert plan.global_size == 728
    layout = R.step3_token_layout(plan)
    assert len(layout) == tokens == R.step3_num_tokens(plan)
    # crops tile `resized` exactly, without overlap, row-major
    cover = np.zeros(resized, dtype=np.int32)
    for top, left, size in plan.crops:
        assert size == window
        cover[top : top + size, left : left + size] += 1
    if plan.crops:
        assert (cover == 1).all()
        assert plan.canvas == (rows * 504, cols * 504)


def test_step3_downscale_huge_sizes():
    plan = R.step3_crop_plan(4000, 6000)
    assert plan.scaled == (2016, 3024)
    plan = R.step3_crop_plan(9000, 3001)  # scale 3024/9000 = .336 -> (3024, 1008)
    assert plan.scaled == (3024, int(3001 * (3024 / 9000)))
    assert max(plan.scaled) == 3024


def test_step3_token_layout_order():
    plan = R.step3_crop_plan(1100, 1100)  # 2 x 2 crops
    lay = R.step3_token_layout(plan)
    crop = [R.PATCH_START] + [R.IM_PATCH] * 81 + [R.PATCH_END]
    glob = [R.IM_START] + [R.IM_PATCH] * 169 + [R.IM_END]
    assert lay == crop + crop + [R.PATCH_NEWLINE] + crop + crop + glob
    assert R.step3_token_layout(R.step3_crop_plan(200, 300)) == glob


def test_step3_matches_reference_processor_counts():
    # STEP3-VL ImagePatcher.get_num_patches (vLLM / SGLang ports), transcribed: the number of crops
    # and of newlines must agree wherever the reference does not crop past the border.
    def ref(w, h):
        if max(w, h) > 3024:
            s = 3024 / max(w, h)
            w, h = int(w * s), int(h * s)
        long, short = max(w, h), min(w, h)
        win = (short if long / short > 1.5 else 0) if long <= 728 else (min(short, 504) if long / short > 4 else 504)
        if win == 0:
            return 0, 0
        def side(v):
            r = v / win
            if r < 1:
                return v
            return win * (int(r) + 1 if r - v // win > 0.2 else int(r))
        nw, nh = side(w), side(h)
        xn = 1 if nw <= win else -(-(nw - win) // win) + 1
        yn = 1 if nh <= win else -(-(nh - win) // win) + 1
        return xn * yn, yn - 1

    rng = random.Random(1)
    for _ in range(2000):
        h, w = rng.randint(16, 8000), rng.randint(16, 8000)
        if min(h, w) < 32 and max(h, w) / min(h, w) > 4:
            continue  # reference square-pads these; not part of REFERENCE.md
        plan = R.step3_crop_plan(h, w)
        assert (plan.num_crops, max(plan.rows - 1, 0)) == ref(w, h), (h, w)
