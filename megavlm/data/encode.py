"""One Sample -> model inputs: tokens, next-token labels on assistant turns, media patches.

Images follow Qwen3-VL's processor (``smart_resize`` within ``[min_pixels, max_pixels]``,
bicubic, mean = std = 0.5, ``patchify``); videos follow its *video* processor (sampled at
2 fps, HF's video ``smart_resize`` and pixel bounds, in ``data.video``), each frame pair its
own vision block with its timestamp. Every error names the sample.

Decoding (``data.image_decoder``): "dali" decodes encoded images (files, bytes) with NVIDIA
DALI (``dali_images.ImageDecoder``), batched over a loader step by ``prefetch``; "pillow"
decodes them with Pillow. With DALI, Pillow still takes what DALI cannot do as HF does
(transparency composited onto white, 16-bit scaled, formats DALI lacks, files DALI fails
on) and each such image is counted (``DECODE_COUNTS``). Videos (``data.video_decoder``) are
decoded by DALI, PyAV where DALI lacks the codec (``video.VideoDecoder``), counted the same
way; "pyav" decodes every video with PyAV (FFmpeg). In-memory arrays need no decoding.

Process model: on a CUDA machine the decoder in the training process uses DALI's mixed
(nvJPEG / NVDEC) decoding on the current device (images and videos come back to the host for
the HF-exact resize of ``data.image_pixels``) and media are moved there; loader
worker processes (``data.num_workers``) are *spawned* (``data.sampler``; forking after CUDA
is initialized breaks CUDA) and decode on DALI's CPU operators, since their tensors cross
the process boundary through shared CPU memory anyway.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from megavlm.data import image_pixels
from megavlm.data.chat_template import MediaLayout, Qwen3VLChatTemplate
from megavlm.data.image_rules import (
    QWEN3VL_PATCH_SIZE,
    STEP3_GLOBAL_SIZE,
    STEP3_LOCAL_SIZE,
    qwen3vl_num_tokens,
    smart_resize,
    step3_crop_plan,
    step3_token_layout,
)
from megavlm.data.sample import Media, Sample
from megavlm.data.video import (
    VIDEO_MAX_PIXELS,
    VideoDecodeError,
    VIDEO_MIN_PIXELS,
    pair_timestamps,
    sample_frame_indices,
    video_smart_resize,
)

# HF's video processor takes 24 fps for frames given without metadata.
IN_MEMORY_VIDEO_FPS = 24.0
# How each image and video was decoded, counted per sample and reported as data metrics.
DECODE_COUNTS = ("images_dali", "images_pillow", "videos_dali", "videos_pyav")
# Pillow modes DALI's RGB output would get wrong: alpha is composited onto white (as HF's
# convert_to_rgb does), 16-bit and float images are scaled, palettes may hold transparency.
_PILLOW_MODES = frozenset({"CMYK", "RGBA", "LA", "PA", "P", "I;16", "I;16B", "I;16L", "I", "F", "La", "RGBa"})
_ORIENTATION_TAG = 0x0112


# Images are rejected, not resized, below MIN_SIDE pixels a side (nothing to see) or above
# MAX_PIXELS_FACTOR x data.max_pixels (decoding them costs more than the sample is worth).
MIN_SIDE = 8
MAX_PIXELS_FACTOR = 64


def to_rgb(im: Image.Image) -> np.ndarray:
    """Pillow image -> uint8 ``[H, W, 3]`` as HF's processors see it: EXIF orientation
    applied, transparency composited onto white, 16-bit / 32-bit levels scaled to 8 bits."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        gray = np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return np.asarray(white.convert("RGB"))
    return np.asarray(im.convert("RGB"))


def image_header(data: bytes) -> tuple[tuple[int, int], bool]:
    """((h, w) after EXIF orientation, whether Pillow must decode it) from the header only."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        orientation = 1
        if im.format in ("JPEG", "MPO", "TIFF", "WEBP"):
            orientation = im.getexif().get(_ORIENTATION_TAG, 1)
        needs_pillow = im.mode in _PILLOW_MODES or im.format not in ("JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP")
    return ((w, h) if orientation in (5, 6, 7, 8) else (h, w)), needs_pillow


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
    decode_counts: dict[str, int] | None = None  # DECODE_COUNTS name -> media decoded that way


def step3_views(image: np.ndarray, patch: int = 14) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """STEP3-VL multi-crop (REFERENCE 5, transformers' Step3p7ImageProcessor): local crops
    row-major, then the 728 global view, as (patches, grid) per view, and the token layout."""
    plan = step3_crop_plan(*image.shape[:2])
    global_view, crops = image_pixels.step3_views_u8(image, plan)
    views = [image_pixels.raster_patches(c, patch) for c in crops]
    views.append(image_pixels.raster_patches(global_view[0], patch))
    return views, step3_token_layout(plan)


def _decode_device() -> str:
    """"gpu" in the training process of a CUDA machine, "cpu" in loader workers and without CUDA."""
    from megavlm.platform.device import has_cuda

    return "gpu" if has_cuda() and torch.utils.data.get_worker_info() is None else "cpu"


class SampleEncoder:
    """Callable ``Sample -> EncodedSample`` for one tokenizer and preprocessing setting."""

    def __init__(self, template: Qwen3VLChatTemplate, *, min_pixels: int, max_pixels: int, max_length: int,
                 family: str = "qwen3vl", image_decoder: str = "dali", video_decoder: str = "dali",
                 decode_threads: int = 2):
        if family not in ("qwen3vl", "step3vl"):
            raise ValueError(f"model family {family!r} is not one of qwen3vl, step3vl")
        if image_decoder not in ("dali", "pillow"):
            raise ValueError(f"data.image_decoder={image_decoder!r} is not one of dali, pillow")
        if video_decoder not in ("dali", "pyav"):
            raise ValueError(f"data.video_decoder={video_decoder!r} is not one of dali, pyav")
        self.video_decoder = video_decoder
        self.family = family
        self.template = template
        self.min_pixels, self.max_pixels, self.max_length = min_pixels, max_pixels, max_length
        self.image_decoder, self.decode_threads = image_decoder, decode_threads
        self._decoders: dict[str, object] = {}  # built on first use, per process (never pickled)
        self._decoded: dict[tuple[str, int], object] = {}  # prefetched DALI results by (sample id, media)
        self._counts: dict[str, int] = {}

    def __getstate__(self):  # loader workers build their own decoders (DALI pipelines do not pickle)
        return {**self.__dict__, "_decoders": {}, "_decoded": {}}

    def _decoder(self, kind: str):
        if self._decoders.get("pid") != os.getpid():
            # A forked loader worker inherits the parent's pipelines without their threads: never
            # use them there (DALI is not fork-safe); each process builds its own.
            self._decoders = {"pid": os.getpid()}
        if kind not in self._decoders:
            if kind == "image":
                from megavlm.data.dali_images import ImageDecoder

                self._decoders[kind] = ImageDecoder(
                    mode=self.family, batch_size=16, num_threads=self.decode_threads, min_pixels=self.min_pixels,
                    max_pixels=self.max_pixels, device=_decode_device(),
                )
            else:
                from megavlm.data.video import VideoDecoder

                # HF's video processor bounds (not the image ones), as the released model was trained
                # "pyav": no codec is routed to DALI (``video.select_backend``)
                self._decoders[kind] = VideoDecoder(
                    mode="qwen3vl", num_threads=self.decode_threads, device=_decode_device(),
                    dali_codecs=frozenset() if self.video_decoder == "pyav" else None)
        return self._decoders[kind]

    @property
    def media_device(self) -> torch.device:
        """Where decoded media live: the DALI decoder's device (the GPU in a CUDA training process)."""
        if self.image_decoder == "dali" and _decode_device() == "gpu":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _count(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1

    def _decoded_video(self, sample: Sample, media: Media):
        """A video file or bytes through the DALI/PyAV decoder: patches, grid, pair times."""
        source = media.path if media.path is not None else media.data
        (result,) = self._decoder("video").decode([source], [f"{sample.id}:{media.path or 'video'}"])
        if not result.ok:
            reason = "missing_media" if "not found" in result.reason else "bad_video"
            raise SampleError(sample.id, reason, result.reason)
        self._count("videos_pyav" if result.backend == "pyav" else "videos_dali")
        return result.pixel_values, result.grid_thw.cpu(), result.timestamps

    def _bytes(self, sample: Sample, media: Media) -> bytes:
        if media.data is not None:
            return media.data
        try:
            with open(media.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise SampleError(sample.id, "missing_media", str(media.path)) from None
        except OSError as e:
            raise SampleError(sample.id, "bad_image", f"{media.path}: {e}") from None

    @staticmethod
    def _header(sample: Sample, data: bytes, name: str) -> tuple[tuple[int, int], bool]:
        """``image_header``, its failure named as the sample's ``bad_image``."""
        try:
            return image_header(data)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for unreadable headers
            raise SampleError(sample.id, "bad_image", f"{name}: {type(e).__name__}: {e}") from None

    def _checked_header(self, sample: Sample, data: bytes, name: str) -> bool:
        """Size rules on the header (before anything is decoded); True when Pillow must decode."""
        (h, w), needs_pillow = self._header(sample, data, name)
        self._size(sample, h, w)
        if self.family == "step3vl":
            self._step3_plan(sample, h, w)
        return needs_pillow

    def prefetch(self, samples: list[Sample]) -> None:
        """Decode the encoded images of ``samples`` in one DALI run (a loader step's worth);
        ``__call__`` then takes them from here. Bad images are left for ``__call__`` to name."""
        if self.image_decoder != "dali":
            return
        keys, data, names = [], [], []
        for sample in samples:
            for j, media in enumerate(sample.media):
                if media.kind != "image" or media.array is not None or (sample.id, j) in self._decoded:
                    continue
                name = f"{sample.id}:{media.path or f'image {j}'}"
                try:
                    raw = self._bytes(sample, media)
                    if self._checked_header(sample, raw, name):
                        continue
                except SampleError:
                    continue
                keys.append((sample.id, j))
                data.append(raw)
                names.append(name)
        if data:
            self._decoded.update(zip(keys, self._decoder("image").decode(data, names)))

    def drop_prefetched(self) -> None:
        self._decoded.clear()

    def _image(self, sample: Sample, j: int, media: Media):
        """(patches, grid) list and token layout of one image: DALI, else Pillow (counted)."""
        if media.array is not None:
            return self._image_from_pixels(sample, media.array)
        name = f"{sample.id}:{media.path or f'image {j}'}"
        raw = self._bytes(sample, media)
        needs_pillow = self._checked_header(sample, raw, name)
        if self.image_decoder == "dali" and not needs_pillow:
            result = self._decoded.pop((sample.id, j), None)
            if result is None:
                (result,) = self._decoder("image").decode([raw], [name])
            if result.ok:
                self._count("images_dali")
                if self.family == "qwen3vl":
                    return [(result.pixel_values, result.grid_thw.cpu())], qwen3vl_num_tokens(result.grid_thw), None
                crops = result.pixel_values[STEP3_LOCAL_SIZE]
                views = [image_pixels.raster_patches(c, 14) for c in crops]
                views.append(image_pixels.raster_patches(result.pixel_values[STEP3_GLOBAL_SIZE][0], 14))
                return views, 0, result.token_layout
        try:  # Pillow: what DALI cannot decode as HF does, or a file DALI failed on
            with Image.open(io.BytesIO(raw)) as im:
                pixels = to_rgb(im)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt or truncated files
            raise SampleError(sample.id, "bad_image", f"{name}: {type(e).__name__}: {e}") from None
        self._count("images_pillow")
        return self._image_from_pixels(sample, pixels)

    def _image_from_pixels(self, sample: Sample, pixels: np.ndarray):
        if self.family == "step3vl":
            self._size(sample, *pixels.shape[:2])  # the same too-small / too-large rules
            self._step3_plan(sample, *pixels.shape[:2])
            views, names = step3_views(pixels)
            return views, 0, names
        size = self._size(sample, *pixels.shape[:2])
        patches, grid = image_pixels.qwen3vl_patches(pixels, size)
        return [(patches, grid)], qwen3vl_num_tokens(grid), None

    def _step3_plan(self, sample: Sample, h: int, w: int) -> None:
        from megavlm.data.dali_images import DEFAULT_MAX_CROPS

        plan = step3_crop_plan(h, w)
        if plan.num_crops > DEFAULT_MAX_CROPS:
            raise SampleError(sample.id, "image_aspect", f"{h}x{w}: {plan.num_crops} crops > {DEFAULT_MAX_CROPS}")

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

    def _frames_plan(self, sample: Sample, media: Media) -> tuple[np.ndarray, tuple[int, int], float]:
        """(sampled frame indices, resize target, fps) of in-memory frames, as HF's video
        processor takes them (24 fps when none is given)."""
        pixels = media.array
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or len(pixels) == 0:
            raise SampleError(sample.id, "bad_video", f"frames of shape {pixels.shape}, expected [T>0, H, W, 3]")
        fps = media.fps or IN_MEMORY_VIDEO_FPS
        index = sample_frame_indices(len(pixels), fps)
        h, w = pixels.shape[1:3]
        if min(h, w) < MIN_SIDE:
            raise SampleError(sample.id, "image_too_small", f"video frames {h}x{w}, a side is under {MIN_SIDE}")
        try:
            size = video_smart_resize(len(index), h, w, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS,
                                      name=sample.id)
        except ValueError as e:
            raise SampleError(sample.id, "image_aspect", str(e)) from None
        return index, size, fps

    def _video_from_frames(self, sample: Sample, media: Media):
        index, size, fps = self._frames_plan(sample, media)
        patches, grid = image_pixels.qwen3vl_video_patches(media.array[index], size)
        return patches, grid, pair_timestamps(index, fps)

    def layouts(self, sample: Sample) -> list[MediaLayout]:
        """Each medium's token layout from headers alone: an image's size and EXIF orientation,
        a video's container (frame count, rate, size). Nothing is decoded, and the rules are
        ``media``'s (a medium they reject raises the same ``SampleError``), so a packer can plan
        rows with every rank reading headers only and decoding only the rows it serves."""
        layouts = []
        for j, media in enumerate(sample.media):
            name = f"{sample.id}:{media.path or f'{media.kind} {j}'}"
            if media.kind == "image":
                if media.array is not None:
                    h, w = media.array.shape[:2]
                else:
                    (h, w), _ = self._header(sample, self._bytes(sample, media), name)
                size = self._size(sample, h, w)
                if self.family == "step3vl":
                    self._step3_plan(sample, h, w)
                    layouts.append(MediaLayout("image", 0, token_names=step3_token_layout(step3_crop_plan(h, w))))
                else:
                    grid = [1, size[0] // QWEN3VL_PATCH_SIZE, size[1] // QWEN3VL_PATCH_SIZE]
                    layouts.append(MediaLayout("image", qwen3vl_num_tokens(grid)))
            elif self.family == "step3vl":
                raise SampleError(sample.id, "other", "STEP3-VL takes images only")
            elif media.array is not None:
                index, size, fps = self._frames_plan(sample, media)
                grid = [1, size[0] // QWEN3VL_PATCH_SIZE, size[1] // QWEN3VL_PATCH_SIZE]
                layouts.append(MediaLayout("video", qwen3vl_num_tokens(grid), pair_timestamps(index, fps)))
            else:
                source = media.path if media.path is not None else media.data
                planned = self._decoder("video").layout(source, name)
                if isinstance(planned, VideoDecodeError):
                    reason = "missing_media" if "not found" in planned.reason else "bad_video"
                    raise SampleError(sample.id, reason, planned.reason)
                grid, times = planned
                layouts.append(MediaLayout("video", qwen3vl_num_tokens([1, *grid[1:]]), times))
        return layouts

    def num_tokens(self, sample: Sample) -> int:
        """Length of ``sample``'s training row from ``layouts`` (nothing decoded); raises the
        ``SampleError`` that ``__call__`` raises for a sample it skips (media rules, template,
        length)."""
        if not sample.messages:
            raise SampleError(sample.id, "empty_conversation", "no messages")
        return len(self._render(sample, self.layouts(sample)).tokens)

    def media(self, sample: Sample) -> tuple[dict, list[MediaLayout]]:
        """The model inputs of ``sample``'s images and videos (``pixel_values``,
        ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``; None when absent) and
        each one's layout for the chat template: decode once, render many prompts with them."""
        images, videos, layouts = [], [], []
        self._counts = {}
        for j, media in enumerate(sample.media):
            if media.kind == "image":
                views, n, names = self._image(sample, j, media)
                images += views
                layouts.append(MediaLayout("image", n, token_names=names) if names else MediaLayout("image", n))
            elif self.family == "step3vl":
                raise SampleError(sample.id, "other", "STEP3-VL takes images only")
            else:
                if media.array is None:
                    patches, grid, times = self._decoded_video(sample, media)
                else:
                    patches, grid, times = self._video_from_frames(sample, media)
                videos.append((patches, grid))
                layouts.append(MediaLayout("video", qwen3vl_num_tokens([1, *grid[1:]]), times))
        device = self.media_device
        media = {
            "pixel_values": torch.cat([p.to(device) for p, _ in images]) if images else None,
            "image_grid_thw": torch.stack([g for _, g in images]) if images else None,
            "pixel_values_videos": torch.cat([p.to(device) for p, _ in videos]) if videos else None,
            "video_grid_thw": torch.stack([g for _, g in videos]) if videos else None,
        }
        return media, layouts

    def __call__(self, sample: Sample) -> EncodedSample:
        if not sample.messages:
            raise SampleError(sample.id, "empty_conversation", "no messages")
        media, layouts = self.media(sample)
        rendered = self._render(sample, layouts)
        tokens = torch.tensor(rendered.tokens, dtype=torch.long)
        supervised = torch.tensor(rendered.supervised + [False])[1:]  # is labels[t] = tokens[t+1] supervised
        labels = torch.cat([tokens[1:], tokens.new_zeros(1)])
        return EncodedSample(sample_id=sample.id, tokens=tokens, labels=labels * supervised,
                             loss_mask=supervised.float(), decode_counts=dict(self._counts), **media)

    def _render(self, sample: Sample, layouts: list[MediaLayout]):
        """The training text of ``sample`` with its media layouts; the skip rules on it."""
        try:
            rendered = self.template.render(sample, layouts)
        except (ValueError, KeyError, IndexError, TypeError) as e:  # roles, part types, media indices
            raise SampleError(sample.id, "bad_record", f"{type(e).__name__}: {e}") from None
        if not any(rendered.supervised):
            raise SampleError(sample.id, "empty_conversation", "no supervised (assistant) tokens")
        n = len(rendered.tokens)
        if n > self.max_length:
            raise SampleError(sample.id, "too_long", f"{n} tokens > data.seq_length={self.max_length}")
        return rendered

    def prompt(self, sample: Sample) -> tuple[torch.Tensor, dict]:
        """Tokens of every turn before the last assistant turn plus the generation prompt,
        and the media: what a model answers from at inference."""
        media, layouts = self.media(sample)
        assistant = [i for i, m in enumerate(sample.messages) if m.role == "assistant"]
        last = assistant[-1] if assistant else len(sample.messages)
        context = Sample(id=sample.id, messages=sample.messages[:last], media=sample.media)
        rendered = self.template.render(context, layouts, add_generation_prompt=True)
        return torch.tensor(rendered.tokens, dtype=torch.long), media
