"""STEP3-VL multi-crop plans, token layouts and pixels (REFERENCE 5) against transformers'
Step3p7ImageProcessor, the open STEP3 processor."""

from __future__ import annotations

import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from megavlm.data import image_rules as R

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
    # h 300 < 504 is kept (each crop is 300 high, stretched to 504 later); 2 crops: 2 * 83 + 171 = 337.
    ("short side < window 1000x300", (300, 1000), 504, (300, 1008), 1, 2, 337),
    # 400x20: short 20 < 32 and aspect 20 > 4 -> zero-padded to 400 x 400 -> no crops; 171.
    ("tiny thin 400x20", (20, 400), 0, (400, 400), 0, 0, 171),
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
    # crops tile `resized` exactly, without overlap, row-major (cut at a kept short side)
    cover = np.zeros(resized, dtype=np.int32)
    for top, left, size in plan.crops:
        assert size == window
        cover[top : top + size, left : left + size] += 1
    if plan.crops:
        assert (cover == 1).all()


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


# Sizes (h, w) for the comparisons with transformers: thin, tiny, square-padded, kept short
# sides, snapped sides on both sides of the 20 % rule, window = short side, downscaled.
HF_SIZES = [
    (20, 400), (400, 20), (31, 200), (10, 3000), (16, 16), (40, 40), (31, 120), (32, 200),
    (300, 800), (480, 854), (200, 300), (400, 728), (300, 1000), (600, 2000), (2000, 600),
    (500, 3000), (1100, 1100), (1000, 700), (729, 729), (605, 1210), (4000, 6000), (9000, 3001),
    (3024, 40), (700, 300),
]


class _HF:
    """transformers' Step3p7ImageProcessor planning and cropping methods, as installed, and its
    torchvision backend's fused ``rescale_and_normalize``, with the three torchvision calls
    replaced by what torchvision does for uint8 CPU tensors (resize: bilinear antialiased
    ``interpolate`` on uint8; pad: zeros at the bottom/right; normalize: ``normalize_image``,
    subtract then divide by the ``[C, 1, 1]`` mean and std). torchvision is not installed here,
    so transformers exposes the class as a dummy: its methods are compiled from the installed
    module's source (ast) into a plain class."""

    METHODS = ("_is_extreme_aspect", "_plan_patches", "get_number_of_image_patches", "_get_image_patches")

    def __init__(self):
        import ast
        import importlib.util

        from transformers.image_transforms import divide_to_patches
        from transformers.image_utils import PILImageResampling, SizeDict

        path = Path(importlib.util.find_spec("transformers.models.step3p7").origin).parent / "image_processing_step3p7.py"
        tree = ast.parse(path.read_text())
        (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Step3p7ImageProcessor"]
        body = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in self.METHODS]
        assert {n.name for n in body} == set(self.METHODS)
        module = ast.Module(body=[ast.ClassDef(name="Step3p7", bases=[], keywords=[], body=body, decorator_list=[])],
                            type_ignores=[])
        scope = {"torch": torch, "SizeDict": SizeDict, "divide_to_patches": divide_to_patches,
                 "PILImageResampling": PILImageResampling}
        exec(compile(ast.fix_missing_locations(module), str(path), "exec"), scope)
        self.proc = scope["Step3p7"]()
        self.proc.max_image_size, self.proc.size, self.proc.patch_size = 3024, {"height": 728, "width": 728}, 504
        self.proc.resize = lambda image, size, resample=None, **kw: torch.nn.functional.interpolate(
            image, size=(size.height, size.width), mode="bilinear", antialias=True, align_corners=False)
        self.proc.pad = lambda images, pad_size, **kw: [torch.nn.functional.pad(
            img, (0, pad_size.width - img.shape[-1], 0, pad_size.height - img.shape[-2])) for img in images]

        def normalize(image, mean, std, inplace=False, **kw):  # torchvision's normalize_image
            mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
            return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)

        from transformers.image_processing_backends import TorchvisionBackend

        self.proc.normalize = normalize
        for name in ("rescale_and_normalize", "_fuse_mean_std_and_rescale_factor"):
            setattr(self.proc, name, types.MethodType(getattr(TorchvisionBackend, name), self.proc))

    def plan(self, h, w):
        return self.proc._plan_patches(w, h, 728, 504)

    def views(self, image: np.ndarray):
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict

        # Step3p7ImageProcessor's defaults: resample BILINEAR, CLIP mean/std, size 728, patch 504

        chw = torch.from_numpy(image).permute(2, 0, 1)
        glob, patches, _, _ = self.proc._get_image_patches(chw, 728, 504, PILImageResampling.BILINEAR)
        local = [self.proc.resize(p[None], SizeDict(height=504, width=504))[0] for p in patches]
        def norm(x):  # the processor's call: do_rescale, 1 / 255, do_normalize, CLIP mean and std
            return self.proc.rescale_and_normalize(x, True, 1 / 255, True, tuple(OPENAI_CLIP_MEAN),
                                                   tuple(OPENAI_CLIP_STD))

        return norm(glob), [norm(p) for p in local]


@pytest.fixture(scope="module")
def hf():
    return _HF()


def test_step3_plans_equal_transformers(hf):
    """Window, snapped size, crop grid and patch count of every size in HF_SIZES plus 3000
    random ones (thin and tiny included) equal Step3p7ImageProcessor's ``_plan_patches``."""
    rng = random.Random(1)
    sizes = HF_SIZES + [(rng.randint(1, 8000), rng.randint(1, 8000)) for _ in range(2000)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 900)) for _ in range(1000)]
    for h, w in sizes:
        (gw, gh), (cw, ch), window, nx, ny, pad = hf.plan(h, w)
        plan = R.step3_crop_plan(h, w)
        assert plan.pad_square == pad and plan.scaled == (gh, gw) and plan.window == window, (h, w)
        if window:
            assert plan.resized == (ch, cw) and (plan.rows, plan.cols) == (ny, nx), (h, w)
            assert hf.proc.get_number_of_image_patches(h, w) == plan.num_crops
        else:
            assert plan.num_crops == 0


@pytest.mark.parametrize("h,w", [(20, 400), (300, 800), (400, 728), (1000, 700), (31, 120)])
def test_step3_pixels_equal_transformers(hf, h, w):
    """The views megavlm feeds the encoder (global 728 and every 504 crop) equal the
    processor's bit for bit, for padded, kept-short-side, window-not-504 and plain plans."""
    from megavlm.data.image_pixels import step3_views_u8

    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    glob, crops = step3_views_u8(image)
    ref_glob, ref_crops = hf.views(image)
    assert len(crops) == len(ref_crops) == R.step3_crop_plan(h, w).num_crops
    assert torch.equal(glob[0], ref_glob)
    for ours, theirs in zip(crops, ref_crops):
        assert torch.equal(ours, theirs)


def test_step3_matches_vllm_processor_counts():
    # STEP3-VL ImagePatcher.get_num_patches (vLLM / SGLang ports), transcribed: the number of crops
    # and of newlines agree with megavlm (= transformers) except where a remainder is exactly 20 %
    # of the window, where vLLM's float ``r - v // win > 0.2`` rounds up (3024 / 70 = 43.2000...03)
    # and transformers' ``v % win > 0.2 * win`` does not (e.g. 117 x 5043: 44 crops against 43).
    def ref(w, h):
        if max(w, h) > 3024:
            s = 3024 / max(w, h)
            w, h = int(w * s), int(h * s)
        long, short = max(w, h), min(w, h)
        win = (short if long / short > 1.5 else 0) if long <= 728 else (min(short, 504) if long / short > 4 else 504)
        if win == 0:
            return (0, 0), False
        def side(v):
            r = v / win
            if r < 1:
                return v
            return win * (int(r) + 1 if r - v // win > 0.2 else int(r))
        nw, nh = side(w), side(h)
        xn = 1 if nw <= win else -(-(nw - win) // win) + 1
        yn = 1 if nh <= win else -(-(nh - win) // win) + 1
        return (xn * yn, yn - 1), any(v >= win and 5 * (v % win) == win for v in (w, h))

    rng = random.Random(1)
    boundary = 0
    for _ in range(2000):
        h, w = rng.randint(16, 8000), rng.randint(16, 8000)
        if min(h, w) < 32 and max(h, w) / min(h, w) > 4:
            continue  # both square-pad these first; the transcription above does not
        plan = R.step3_crop_plan(h, w)
        counts, on_boundary = ref(w, h)
        if (plan.num_crops, max(plan.rows - 1, 0)) != counts:
            assert on_boundary, (h, w)
            boundary += 1
    assert boundary <= 5
