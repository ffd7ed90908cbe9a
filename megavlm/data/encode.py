"""One Sample -> model inputs: tokens, next-token labels on assistant turns, media patches.

Images follow Qwen3-VL's processor (``smart_resize`` within ``[min_pixels, max_pixels]``,
bicubic, mean = std = 0.5, ``patchify``); videos are sampled at 2 fps (HF's rule in
``data.video``), each frame pair its own vision block with its timestamp. Decoding here is
Pillow for files and bytes; the DALI decoders (``dali_images``, ``video``) are the
throughput path for shard datasets. Every error names the sample.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from megavlm.data.chat_template import MediaLayout, Qwen3VLChatTemplate
from megavlm.data.image_rules import (
    QWEN3VL_MEAN,
    QWEN3VL_STD,
    STEP3_GLOBAL_SIZE,
    STEP3_LOCAL_SIZE,
    STEP3_MEAN,
    STEP3_STD,
    patchify,
    qwen3vl_num_tokens,
    smart_resize,
    step3_crop_plan,
    step3_token_layout,
)
from megavlm.data.sample import Media, Sample
from megavlm.data.video import VIDEO_FPS, pair_timestamps, sample_frame_indices


# Images are rejected, not resized, below MIN_SIDE pixels a side (nothing to see) or above
# MAX_PIXELS_FACTOR x data.max_pixels (decoding them costs more than the sample is worth).
MIN_SIDE = 8
MAX_PIXELS_FACTOR = 64


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is a short category for bad-input counts."""

    def __init__(self, sample_id: str, reason: str, detail: str):
        super().__init__(f"sample {sample_id}: {reason}: {detail}")
        self.sample_id, self.reason, self.detail = sample_id, reason, detail


@dataclass
class EncodedSample:
    sample_id: str
    tokens: torch.Tensor  # [n] int64
    labels: torch.Tensor  # [n] int64: the next token (0 where not supervised)
    loss_mask: torch.Tensor  # [n] float: 1 where labels[t] is an assistant token
    pixel_values: torch.Tensor | None = None  # [N, 3*2*16*16]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None  # [videos, 3], t = frame pairs


def _normalize(frames: np.ndarray, mean=QWEN3VL_MEAN, std=QWEN3VL_STD) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]`` with the model's mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(255.0)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.movedim(-1, -3)


def _raster_patches(view: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, H, W]`` -> row-major ``[h*w, 3*p*p]`` patches and grid ``[1, h, w]`` (STEP3-VL / PE)."""
    c, height, width = view.shape
    h, w = height // patch, width // patch
    x = view.reshape(c, h, patch, w, patch).permute(1, 3, 0, 2, 4).reshape(h * w, c * patch * patch)
    return x, torch.tensor([1, h, w])


def step3_views(image: np.ndarray, patch: int = 14) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """STEP3-VL multi-crop (REFERENCE 5): local crops row-major, then the 728 global view,
    as (patches, grid) per view, and the image's token layout."""
    plan = step3_crop_plan(*image.shape[:2])
    views = []
    if plan.num_crops:
        ch, cw = plan.canvas
        canvas = _normalize(_resize(image, (ch, cw)), STEP3_MEAN, STEP3_STD)
        for r in range(plan.rows):
            for c in range(plan.cols):
                crop = canvas[:, r * STEP3_LOCAL_SIZE:(r + 1) * STEP3_LOCAL_SIZE, c * STEP3_LOCAL_SIZE:(c + 1) * STEP3_LOCAL_SIZE]
                views.append(_raster_patches(crop, patch))
    views.append(_raster_patches(_normalize(_resize(image, (STEP3_GLOBAL_SIZE,) * 2), STEP3_MEAN, STEP3_STD), patch))
    return views, step3_token_layout(plan)


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if frame.shape[:2] == (h, w):
        return frame
    return np.asarray(Image.fromarray(frame).resize((w, h), Image.BICUBIC))


class SampleEncoder:
    """Callable ``Sample -> EncodedSample`` for one tokenizer and preprocessing setting."""

    def __init__(self, template: Qwen3VLChatTemplate, *, min_pixels: int, max_pixels: int, max_length: int,
                 family: str = "qwen3vl"):
        if family not in ("qwen3vl", "step3vl"):
            raise ValueError(f"model family {family!r} is not one of qwen3vl, step3vl")
        self.family = family
        self.template = template
        self.min_pixels, self.max_pixels, self.max_length = min_pixels, max_pixels, max_length
        self._video_decoder = None  # built on the first video file (a DALI pipeline)

    def _decoded_video(self, sample: Sample, media: Media):
        """A video file or bytes through the DALI/PyAV decoder: patches, grid, pair times."""
        if self._video_decoder is None:
            from megavlm.data.video import VideoDecoder

            self._video_decoder = VideoDecoder(mode="qwen3vl", min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        source = media.path if media.path is not None else media.data
        (result,) = self._video_decoder.decode([source], [f"{sample.id}:{media.path or 'video'}"])
        if not result.ok:
            reason = "missing_media" if "not found" in result.reason else "bad_video"
            raise SampleError(sample.id, reason, result.reason)
        return result.pixel_values.cpu(), result.grid_thw.cpu(), result.timestamps

    def _pixels(self, sample: Sample, media: Media) -> np.ndarray:
        if media.array is not None:
            return media.array
        try:
            source = media.path if media.path is not None else io.BytesIO(media.data)
            return np.asarray(Image.open(source).convert("RGB"))
        except FileNotFoundError:
            raise SampleError(sample.id, "missing_media", str(media.path)) from None
        except Exception as e:  # Pillow raises many types for corrupt or truncated files
            raise SampleError(sample.id, "bad_image", f"{media.path or 'bytes'}: {e}") from None

    def _size(self, sample: Sample, h: int, w: int) -> tuple[int, int]:
        if min(h, w) < MIN_SIDE:
            raise SampleError(sample.id, "image_too_small", f"{h}x{w} pixels, a side is under {MIN_SIDE}")
        if h * w > MAX_PIXELS_FACTOR * self.max_pixels:
            raise SampleError(sample.id, "image_too_large",
                              f"{h}x{w} pixels > {MAX_PIXELS_FACTOR} x data.max_pixels ({self.max_pixels})")
        try:
            return smart_resize(h, w, min_pixels=self.min_pixels, max_pixels=self.max_pixels, name=sample.id)
        except ValueError as e:
            raise SampleError(sample.id, "image_aspect", str(e)) from None

    def _media(self, sample: Sample):
        """Patches of every image and video, and what the chat template needs of each."""
        images, videos, layouts = [], [], []
        for media in sample.media:
            if media.kind == "video" and media.array is None:
                patches, grid, times = self._decoded_video(sample, media)
                videos.append((patches, grid))
                layouts.append(MediaLayout("video", qwen3vl_num_tokens([1, *grid[1:]]), times))
                continue
            pixels = self._pixels(sample, media)
            if media.kind == "image" and self.family == "step3vl":
                self._size(sample, *pixels.shape[:2])  # the same too-small / too-large rules
                views, names = step3_views(pixels)
                images += views
                layouts.append(MediaLayout("image", 0, token_names=names))
            elif media.kind == "video" and self.family == "step3vl":
                raise SampleError(sample.id, "other", "STEP3-VL takes images only")
            elif media.kind == "image":
                size = self._size(sample, *pixels.shape[:2])
                patches, grid = patchify(_normalize(_resize(pixels, size)))
                images.append((patches, grid))
                layouts.append(MediaLayout("image", qwen3vl_num_tokens(grid)))
            else:
                fps = media.fps or VIDEO_FPS
                index = sample_frame_indices(len(pixels), fps)
                size = self._size(sample, *pixels.shape[1:3])
                frames = np.stack([_resize(pixels[i], size) for i in index])
                patches, grid = patchify(_normalize(frames))
                videos.append((patches, grid))
                layouts.append(MediaLayout("video", qwen3vl_num_tokens([1, *grid[1:]]), pair_timestamps(index, fps)))
        media = {
            "pixel_values": torch.cat([p for p, _ in images]) if images else None,
            "image_grid_thw": torch.stack([g for _, g in images]) if images else None,
            "pixel_values_videos": torch.cat([p for p, _ in videos]) if videos else None,
            "video_grid_thw": torch.stack([g for _, g in videos]) if videos else None,
        }
        return media, layouts

    def __call__(self, sample: Sample) -> EncodedSample:
        media, layouts = self._media(sample)
        rendered = self.template.render(sample, layouts)
        n = len(rendered.tokens)
        if n > self.max_length:
            raise SampleError(sample.id, "too_long", f"{n} tokens > data.seq_length={self.max_length}")
        tokens = torch.tensor(rendered.tokens, dtype=torch.long)
        supervised = torch.tensor(rendered.supervised + [False])[1:]  # is labels[t] = tokens[t+1] supervised
        labels = torch.cat([tokens[1:], tokens.new_zeros(1)])
        return EncodedSample(sample_id=sample.id, tokens=tokens, labels=labels * supervised,
                             loss_mask=supervised.float(), **media)

    def prompt(self, sample: Sample) -> tuple[torch.Tensor, dict]:
        """Tokens of every turn before the last assistant turn plus the generation prompt,
        and the media: what a model answers from at inference."""
        media, layouts = self._media(sample)
        assistant = [i for i, m in enumerate(sample.messages) if m.role == "assistant"]
        last = assistant[-1] if assistant else len(sample.messages)
        context = Sample(id=sample.id, messages=sample.messages[:last], media=sample.media)
        rendered = self.template.render(context, layouts, add_generation_prompt=True)
        return torch.tensor(rendered.tokens, dtype=torch.long), media
