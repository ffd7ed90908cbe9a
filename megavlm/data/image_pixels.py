"""Decoded pixels (uint8 ``[H, W, 3]``) -> the model's normalized views, as HF's processors compute them.

One home for the resize / crop / normalize arithmetic of both families, used by every decode
route (DALI, Pillow, in-memory arrays), so the same image gives the same pixels whichever
decoder read it (tests/unit/test_data_decode.py holds DALI against Pillow at 1e-5).

Qwen3-VL: HF's Qwen2-VL/Qwen3-VL image processor with its Pillow backend: Pillow BICUBIC
(antialiased, a = -0.5, Pillow's fixed-point two-pass resampler), rescale 1/255, mean = std = 0.5,
``patchify``. Pillow is used, not a resize of DALI's or torch's: neither equals Pillow's integer
resampler (torch's uint8 antialiased bicubic is up to 21 levels off on a 1000x700 -> 728 downscale,
DALI's cubic up to 26), and HF's Pillow backend is the reference the released model documents.

STEP3-VL: transformers' ``Step3p7ImageProcessor`` (torchvision backend): square zero-padding of
tiny thin images, the global view resized to the (downscaled) size and then to 728 x 728, the
image resized to the crop plan's size, cut into windows, each window resized to 504 x 504;
bilinear, antialiased, on uint8 (torchvision resizes uint8 CPU tensors with torch's native
uint8 kernel, ``interpolate(..., antialias=True)``, which this calls directly); the backend's
fused rescale and CLIP normalization in float32 (``torchvision_normalize``): bit for bit.

Qwen3-VL videos: HF's ``Qwen3VLVideoProcessor``, which has only the torchvision backend and runs
on the CPU unless given a ``device``: torchvision's ``resize(BICUBIC, antialias=True)`` of the
stacked uint8 frames, which for a uint8 CPU tensor is torch's native uint8 kernel
(``resize_video_u8``), then the fused rescale + normalize ``(x - 255 mean) / (255 std)`` in
float32 (``torchvision_normalize``) and ``patchify``: bit for bit (tests/unit/test_video.py runs
HF's processor itself against every video route). DALI only decodes videos, as it only decodes
images: its cubic resize differs from torch's uint8 kernel.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from megavlm.data import image_rules as R


def normalize(frames: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]``: ``(x / 255 - mean) / std``."""
    # astype copies (DALI's and Pillow's arrays are read-only views)
    x = torch.from_numpy(frames.astype(np.float32)) if isinstance(frames, np.ndarray) else frames.float()
    x = x.div(255.0)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.movedim(-1, -3)


def pillow_resize(image: np.ndarray, size: tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    """uint8 ``[H, W, 3]`` resized to ``size`` (h, w) by Pillow (the identity when equal)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), resample))


def qwen3vl_patches(image: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL patches and grid of a uint8 image resized to ``size`` (the smart_resize target)."""
    return R.patchify(normalize(pillow_resize(image, size), R.QWEN3VL_MEAN, R.QWEN3VL_STD))


def _torchvision_resize_u8(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> ``[N, 3, h, w]`` as torchvision resizes a uint8 CPU tensor with
    ``mode`` ("bilinear" or "bicubic") and antialiasing: torch's native uint8 kernel
    (``interpolate`` straight on uint8, no float cast, no clamp/round); the input itself when
    the size is unchanged, as torchvision skips the resize then."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(x, size=tuple(size), mode=mode, antialias=True, align_corners=False)


def _resize_u8(chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> ``[3, h, w]``, bilinear (STEP3-VL's processor)."""
    return _torchvision_resize_u8(chw[None], size, "bilinear")[0]


def resize_video_u8(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` frames resized to ``size`` (h, w) as HF's video processor resizes
    them: uint8 ``[T, 3, h, w]``, on the host.

    HF processes videos on the CPU by default, where torchvision's ``resize(..., BICUBIC,
    antialias=True)`` of a uint8 tensor takes torch's native uint8 kernel (its
    ``_do_native_uint8_resize_on_cpu``): ``interpolate(mode="bicubic", antialias=True,
    align_corners=False)`` straight on uint8, fixed-point weights, no float cast and no
    clamp/round. That is this call. (torchvision's other path, cast to float, interpolate,
    clamp, round, is what it does on a GPU; it differs by up to a few uint8 levels.) The
    identity when the size is unchanged, as torchvision skips the resize then. Frames on a GPU
    (DALI's NVDEC decode) are copied to the host first: torch's uint8 antialiased kernel exists
    on the CPU only.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"resize_video_u8: expected uint8 [T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    # contiguous NCHW, as HF hands its stacked frames to torchvision
    return _torchvision_resize_u8(frames.cpu().contiguous(), size, "bicubic")


def torchvision_normalize(frames: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 ``(x - mean / r) / (std / r)``, r = 1/255: HF's fused
    rescale + normalize of its torchvision backend (``_fuse_mean_std_and_rescale_factor``, then
    torchvision's ``normalize``), bit for bit. ``normalize`` (``x / 255`` first) may differ by an
    ulp (~6e-8)."""
    scale = 1.0 / (1 / 255)  # HF: 1.0 / rescale_factor
    m = (torch.tensor(mean) * scale).view(-1, 1, 1).to(frames.device)
    s = (torch.tensor(std) * scale).view(-1, 1, 1).to(frames.device)
    return frames.to(torch.float32).sub(m).div_(s)


def qwen3vl_video_pixels(frames: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sampled uint8 ``[T, H, W, 3]`` video frames -> float32 ``[T, 3, h, w]`` resized to
    ``size`` (video_smart_resize's target) and normalized, as HF's Qwen3-VL video processor."""
    x = torch.from_numpy(np.asarray(frames)) if isinstance(frames, np.ndarray) else frames
    return torchvision_normalize(resize_video_u8(x.permute(0, 3, 1, 2), size), R.QWEN3VL_MEAN, R.QWEN3VL_STD)


def qwen3vl_video_patches(frames: np.ndarray | torch.Tensor, size: tuple[int, int],
                          temporal_patch_size: int = R.QWEN3VL_TEMPORAL_PATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL patches and grid_thw of sampled uint8 ``[T, H, W, 3]`` frames (an odd T is padded
    with its last frame by ``patchify``, as HF does)."""
    return R.patchify(qwen3vl_video_pixels(frames, size), temporal_patch_size=temporal_patch_size)


def step3_views_u8(image: np.ndarray, plan: R.CropPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """STEP3-VL views of a uint8 ``[H, W, 3]`` image: (global ``[1, 3, 728, 728]``, crops
    ``[n, 3, 504, 504]``) as float32, normalized, crops row-major."""
    plan = plan or R.step3_crop_plan(*image.shape[:2])
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if plan.pad_square:  # original at the top left, zeros elsewhere
        side = max(chw.shape[1:])
        chw = torch.nn.functional.pad(chw, (0, side - chw.shape[2], 0, side - chw.shape[1]))
    g = plan.global_size
    global_view = _resize_u8(_resize_u8(chw, plan.scaled), (g, g))
    s = plan.local_size
    crops = torch.empty((plan.num_crops, 3, s, s), dtype=torch.uint8)
    if plan.crops:
        resized = _resize_u8(chw, plan.resized)
        for k, (top, left, window) in enumerate(plan.crops):
            crops[k] = _resize_u8(resized[:, top:top + window, left:left + window], (s, s))
    # the processor's torchvision backend fuses rescale and normalize, as for videos
    return torchvision_normalize(global_view[None], R.STEP3_MEAN, R.STEP3_STD), \
        torchvision_normalize(crops, R.STEP3_MEAN, R.STEP3_STD)


def raster_patches(view: torch.Tensor, patch: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, H, W]`` -> row-major ``[h*w, 3*p*p]`` patches and grid ``[1, h, w]`` (STEP3-VL / PE)."""
    c, height, width = view.shape
    h, w = height // patch, width // patch
    x = view.reshape(c, h, patch, w, patch).permute(1, 3, 0, 2, 4).reshape(h * w, c * patch * patch)
    return x, torch.tensor([1, h, w])
