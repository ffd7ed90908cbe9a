"""STEP3-VL multi-crop plans and token layouts (REFERENCE 5); no Hugging Face module needed."""

from __future__ import annotations

import random

import numpy as np
import pytest

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
