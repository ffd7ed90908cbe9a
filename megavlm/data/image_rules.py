"""Image-size rules, patchify and token layouts of Qwen3-VL and STEP3-VL (REFERENCE.md sections 3 and 5).

Pure Python / numpy / torch: no DALI. ``megavlm.data.dali_images`` runs the pixel work and
uses these rules for every size decision, so a sample's token count is known from its
header alone (``smart_resize`` / ``step3_crop_plan`` + ``step3_num_tokens``).

Qwen3-VL
    ``smart_resize`` is a line-for-line mirror of Hugging Face transformers'
    ``models/qwen2_vl/image_processing_qwen2_vl.smart_resize`` (the function Qwen3-VL's image
    processor uses in transformers 5.23: ``Qwen3VLProcessor`` pairs with
    ``Qwen2VLImageProcessor``, torchvision backend, or ``Qwen2VLImageProcessorPil`` without
    torchvision), including Python's round-half-to-even and the float arithmetic, so sizes
    agree exactly. Qwen3-VL's released ``preprocessor_config.json`` uses patch 16, merge 2,
    temporal patch 2, mean = std = 0.5, BICUBIC resampling,
    ``shortest_edge`` (min_pixels) 65536 and ``longest_edge`` (max_pixels) 16777216.
    ``patchify`` reproduces HF's ``pixel_values`` / ``image_grid_thw`` layout exactly.

STEP3-VL
    ``step3_crop_plan`` implements the multi-crop rule of REFERENCE section 5; where the
    text is terse it follows the public STEP3-VL processor (``ImagePatcher`` in the vLLM /
    SGLang ports) and keeps its float arithmetic so token counts agree with serving
    engines. Resolved ambiguities are listed in the docstring of ``step3_crop_plan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# --- Qwen3-VL ------------------------------------------------------------------------------

QWEN3VL_PATCH_SIZE = 16
QWEN3VL_TEMPORAL_PATCH_SIZE = 2
QWEN3VL_MERGE_SIZE = 2
QWEN3VL_FACTOR = QWEN3VL_PATCH_SIZE * QWEN3VL_MERGE_SIZE  # 32
QWEN3VL_MEAN = (0.5, 0.5, 0.5)
QWEN3VL_STD = (0.5, 0.5, 0.5)
# Qwen3-VL's preprocessor_config.json: size = {"shortest_edge": 65536, "longest_edge": 16777216}.
QWEN3VL_MIN_PIXELS = 65536
QWEN3VL_MAX_PIXELS = 16777216
MAX_ASPECT_RATIO = 200


class AspectRatioError(ValueError):
    """An image too elongated for ``smart_resize`` (HF raises ValueError on aspect ratio > 200)."""


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = QWEN3VL_FACTOR,
    min_pixels: int,
    max_pixels: int,
    name: str | None = None,
) -> tuple[int, int]:
    """Target (height, width) of Qwen2-VL / Qwen3-VL dynamic resolution.

    Both sides become multiples of ``factor``, the aspect ratio is kept as closely as
    possible and the pixel count is clamped into ``[min_pixels, max_pixels]``. Identical to
    HF's ``smart_resize`` (same rounding, same float expressions); raises
    :class:`AspectRatioError` (a ``ValueError``) naming the image when
    ``max(h, w) / min(h, w) > 200``, as HF does.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image {name or '<unnamed>'}: empty image size {height}x{width} (h x w)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise AspectRatioError(
            f"image {name or '<unnamed>'} ({height}x{width}, h x w): absolute aspect ratio must be "
            f"smaller than {MAX_ASPECT_RATIO}, got {ratio}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(
    pixels: torch.Tensor | np.ndarray,
    *,
    patch_size: int = QWEN3VL_PATCH_SIZE,
    temporal_patch_size: int = QWEN3VL_TEMPORAL_PATCH_SIZE,
    merge_size: int = QWEN3VL_MERGE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten a normalized image ``[3, H, W]`` or video ``[T, 3, H, W]`` into Qwen-VL patches.

    Returns ``(patches, grid_thw)``: ``patches`` is
    ``[grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2]`` in merge-block order
    (t, h/merge, w/merge, merge, merge), each row laid out (C, temporal, patch_y, patch_x) —
    exactly HF's ``pixel_values``; ``grid_thw`` is a long tensor ``[grid_t, grid_h, grid_w]``
    (HF's ``image_grid_thw`` / ``video_grid_thw`` row). An image is duplicated to
    ``temporal_patch_size`` frames (grid_t = 1); a video whose frame count is not a
    multiple of ``temporal_patch_size`` is padded by repeating its last frame (as HF's
    Qwen3-VL video processor does). H and W must be multiples of patch_size * merge_size.
    The output lives on the input's device and keeps its (floating) dtype.
    """
    x = torch.as_tensor(pixels)
    if x.dim() == 3:
        x = x.unsqueeze(0).expand(temporal_patch_size, -1, -1, -1)
    elif x.dim() != 4:
        raise ValueError(f"patchify expects [C, H, W] or [T, C, H, W], got shape {tuple(x.shape)}")
    t, c, h, w = x.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"patchify: H x W = {h} x {w} must be multiples of {unit} (smart_resize first)")
    if pad := -t % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = x.reshape(
        gt, temporal_patch_size, c,
        gh // merge_size, merge_size, patch_size,
        gw // merge_size, merge_size, patch_size,
    )
    # -> (gt, gh/m, gw/m, m, m, C, tp, p, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return patches, torch.tensor([gt, gh, gw], dtype=torch.long)


def qwen3vl_num_tokens(grid_thw, merge_size: int = QWEN3VL_MERGE_SIZE) -> int:
    """Number of ``<|image_pad|>`` tokens of one image/video block: t * h * w / merge**2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)


# --- STEP3-VL ------------------------------------------------------------------------------

STEP3_GLOBAL_SIZE = 728  # global view, 52 x 52 patches of 14 -> 13 x 13 = 169 tokens
STEP3_LOCAL_SIZE = 504  # each local crop is fed at 504, 36 x 36 patches -> 9 x 9 = 81 tokens
STEP3_GLOBAL_TOKENS = 169
STEP3_LOCAL_TOKENS = 81
STEP3_MAX_LONG_SIDE = 3024
STEP3_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP
STEP3_STD = (0.26862954, 0.26130258, 0.27577711)

IM_START, IM_END, IM_PATCH = "<im_start>", "<im_end>", "<im_patch>"
PATCH_START, PATCH_END, PATCH_NEWLINE = "<patch_start>", "<patch_end>", "<patch_newline>"


@dataclass(frozen=True)
class CropPlan:
    """How one STEP3-VL image becomes a global view plus non-overlapping local crops.

    Sizes are (height, width). ``source`` is the image size, ``pad_square`` whether it is
    zero-padded to a ``max(h, w)`` square first (bottom/right, as upstream), ``scaled`` the
    (padded) size after the 3024-long-side downscale, ``resized`` the size the image is resized
    to before cropping: each side a multiple of ``window``, or kept when shorter than the window
    (equal to ``scaled`` when there are no crops). ``crops`` are the (top, left, window) windows
    in ``resized`` coordinates, row-major, ``rows`` x ``cols`` of them; a window running past a
    kept short side is cut there. Every crop is then resized to ``local_size`` (504), the
    global view to ``global_size`` (728) square.
    """

    source: tuple[int, int]
    scaled: tuple[int, int]
    resized: tuple[int, int]
    window: int
    crops: tuple[tuple[int, int, int], ...]
    rows: int
    cols: int
    pad_square: bool = False
    global_size: int = STEP3_GLOBAL_SIZE
    local_size: int = STEP3_LOCAL_SIZE

    @property
    def num_crops(self) -> int:
        return len(self.crops)


def _step3_downscale(height: int, width: int) -> tuple[int, int]:
    # As STEP3-VL's processor: scale = 3024 / long side, int() truncation of each side.
    long = max(height, width)
    if long <= STEP3_MAX_LONG_SIDE:
        return height, width
    scale = STEP3_MAX_LONG_SIDE / long
    return int(height * scale), int(width * scale)


def _step3_window(long: int, short: int) -> int:
    if long <= STEP3_GLOBAL_SIZE:
        return short if long / short > 1.5 else 0
    return min(short, STEP3_LOCAL_SIZE) if long / short > 4 else STEP3_LOCAL_SIZE


def _step3_side(side: int, window: int) -> int:
    # A multiple of the window, one more when the remainder exceeds 20 % of it; a side shorter
    # than the window is kept (its crops are cut short and stretched to 504 afterwards).
    if side < window:
        return side
    return window * (side // window + (side % window > 0.2 * window))


def step3_crop_plan(height: int, width: int) -> CropPlan:
    """STEP3-VL multi-crop plan of an image of ``height`` x ``width`` pixels (REFERENCE §5).

    Follows transformers' ``Step3p7ImageProcessor._plan_patches`` (the open STEP3 processor;
    tests/unit/test_step3_crops.py holds the two equal on many sizes):

    0. Short side under 32 with aspect over 4: zero-pad to a square first (bottom/right).
    1. Long side over 3024: downscale so the long side is 3024 (``int(side * 3024 / long)``).
    2. Window: long side <= 728 -> no crops when aspect <= 1.5, else the short side; long
       side > 728 -> 504, or ``min(short, 504)`` when aspect > 4 (strict ``>`` throughout).
    3. Each side at least one window long becomes a multiple of it (one more window when the
       remainder exceeds 20 %); a shorter side is kept. Crops tile it row-major; a side
       shorter than the window gives one crop cut to that side.
    4. A global 728 x 728 view (aspect not kept) always exists.

    The vLLM/SGLang Pillow path crops a window past a short side with zero fill instead of
    cutting it (same token count, other pixels); megavlm follows transformers.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image size {height}x{width} (h x w)")
    pad = min(height, width) < 32 and max(width / height, height / width) > 4
    h, w = (max(height, width),) * 2 if pad else (height, width)
    sh, sw = _step3_downscale(h, w)
    window = _step3_window(max(sh, sw), min(sh, sw))
    if window == 0:
        return CropPlan(source=(height, width), scaled=(sh, sw), resized=(sh, sw), window=0, crops=(), rows=0,
                        cols=0, pad_square=pad)
    rh, rw = _step3_side(sh, window), _step3_side(sw, window)
    rows, cols = max(1, rh // window), max(1, rw // window)
    crops = tuple((r * window, c * window, window) for r in range(rows) for c in range(cols))
    return CropPlan(source=(height, width), scaled=(sh, sw), resized=(rh, rw), window=window, crops=crops,
                    rows=rows, cols=cols, pad_square=pad)


def step3_token_layout(plan: CropPlan) -> list[str]:
    """Token sequence of one STEP3-VL image: local crops row by row, then the global view.

    Per crop ``<patch_start>`` + 81 ``<im_patch>`` + ``<patch_end>``; ``<patch_newline>`` after
    each row of crops except the last; then ``<im_start>`` + 169 ``<im_patch>`` + ``<im_end>``.
    """
    out: list[str] = []
    for r in range(plan.rows):
        for _ in range(plan.cols):
            out.append(PATCH_START)
            out.extend([IM_PATCH] * STEP3_LOCAL_TOKENS)
            out.append(PATCH_END)
        if r < plan.rows - 1:
            out.append(PATCH_NEWLINE)
    out.append(IM_START)
    out.extend([IM_PATCH] * STEP3_GLOBAL_TOKENS)
    out.append(IM_END)
    return out


def step3_num_tokens(plan: CropPlan) -> int:
    """``len(step3_token_layout(plan))`` without building the list."""
    newlines = max(plan.rows - 1, 0)
    return plan.num_crops * (STEP3_LOCAL_TOKENS + 2) + newlines + STEP3_GLOBAL_TOKENS + 2
