"""Video decoding and frame sampling for Qwen3-VL (REFERENCE.md section 4) with NVIDIA DALI.

Like :mod:`megavlm.data.dali_images`, DALI only decodes, and one pipeline definition serves
both machines: on a GPU (``megavlm.platform.device.has_cuda()``) the decoder runs
``device="mixed"`` (NVDEC) and the frames are copied to the host; without one the pipeline is
built with ``device_id=None`` and runs DALI's CPU decoder.

Flow of ``VideoDecoder.decode(sources, names)``:

1. *Load and probe* each video with PyAV (container header + demux of the video stream's
   packets, no decoding; ~2 ms for a 30-frame clip on this 2-core CPU): codec, frame rate,
   size and the frame count. The count is the number of packets, not the header's claim:
   WebM headers carry no frame count, and a truncated file has fewer packets than its header
   promises, which is how truncation is detected (see ``probe_video``). Missing files, unreadable containers and
   truncated files become :class:`VideoDecodeError` entries here.
2. *Sample* exactly as HF's ``Qwen3VLVideoProcessor.sample_frames`` (``sample_frame_indices``)
   and compute the per-pair timestamps as HF's ``Qwen3VLProcessor._calculate_timestamps``
   (``pair_timestamps``). REFERENCE's "frame count a multiple of 2" holds the way HF makes it
   hold: an odd sample count is padded with its last frame (patchify, timestamps), not
   resampled. For Qwen3-VL the resize target comes from the video processor's own
   ``smart_resize`` (``video_smart_resize``: temporal factor, video min/max pixels).
3. *Route* by codec (``select_backend``): DALI decodes VP8, VP9 and MJPEG on the CPU, and
   additionally H.264, HEVC, AV1 and MPEG-4 through NVDEC on a GPU. Everything else is
   decoded by PyAV. Both give uint8 frames ``[T, H, W, 3]`` on the host.
4. Resize and normalize, the same code for both routes (and for in-memory frames in
   ``data.encode``): :mod:`megavlm.data.image_pixels` (``qwen3vl_video_pixels``) does what HF's
   video processor does on the CPU, its default: torchvision's uint8 bicubic antialiased
   resize, which on a CPU is torch's native uint8 kernel (``resize_video_u8``), then HF's
   fused rescale + normalize (``torchvision_normalize``), bit for bit. DALI's ``fn.resize``
   is not used: its cubic is another kernel (measured up to 4 uint8 levels off, test_video).
5. Qwen3-VL frames are patchified by ``image_rules.patchify`` (an odd frame count is padded
   with the last frame, as HF does).

Per-sample isolation follows dali_images: a DALI batch with a bad video raises for the whole
batch and leaves the pipeline unusable, so the decoder rebuilds it and bisects the batch (the
video decoder's error does not name the sample). A video that fails alone in DALI is retried
with PyAV (e.g. a pixel format DALI's CPU decoder does not take); only if that fails as well
does it become ``VideoDecodeError(name, reason)`` with both reasons.

Timestamps are ``index / fps`` with the container's average rate, as HF computes them (not
the frames' PTS, which differ for variable-frame-rate video). Not handled: rotation metadata
(frames are returned as stored), and a video whose *content* is corrupt but whose packets
are all present may decode to garbage in DALI without an error.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import numpy as np
import torch

from megavlm.data import image_pixels as P
from megavlm.data import image_rules as R
from megavlm.data.dali_images import DecodeError

Mode = Literal["qwen3vl", "normalized", "frames"]
Backend = Literal["dali", "pyav"]
TimestampStyle = Literal["seconds", "hms"]

# Codecs (FFmpeg canonical names) that DALI's video decoder takes, per DALI 2.4's docs.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}

# Qwen3-VL's released video_preprocessor_config.json (the HF class defaults differ: size
# {"shortest_edge": 131072, "longest_edge": 786432}; pass those to match an unconfigured
# Qwen3VLVideoProcessor()).
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 4096
VIDEO_MAX_PIXELS = 25165824
VIDEO_MAX_TOKENS_PER_FRAME = 768  # HF's max_video_tokens, used only with cap_pixels_per_frame


# --- sampling, timestamps, sizes (pure; mirror HF transformers 5.23) ---------------------------


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = VIDEO_FPS,
    num_frames: int | None = None,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
) -> np.ndarray:
    """Frame indices to decode: HF ``Qwen3VLVideoProcessor.sample_frames``, line for line.

    ``n = int(total / video_fps * fps)`` clamped to ``[min_frames, max_frames]`` and to
    ``total`` (so a 3-frame clip keeps 3 frames, below min_frames: HF does the same and
    pads the odd frame in patchify); ``linspace(0, total - 1, n).round()``. The count is not
    forced to a multiple of the temporal patch size: the last pair repeats its frame.
    """
    if fps is not None and num_frames is not None:
        raise ValueError("sample_frame_indices: pass fps or num_frames, not both")
    if total_frames <= 0:
        raise ValueError(f"sample_frame_indices: total_frames must be > 0, got {total_frames}")
    if num_frames is None and fps is not None:
        num_frames = int(total_frames / video_fps * fps)
        num_frames = min(max(num_frames, min_frames), max_frames, total_frames)
    if num_frames is None:
        num_frames = min(max(total_frames, min_frames), max_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int)


def pair_timestamps(frame_indices: Sequence[int], fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Time (s) of each temporal patch: the mean of its first and last frame's times.

    Mirrors HF ``Qwen3VLProcessor._calculate_timestamps``, including its padding of an odd
    frame count by repeating the last index (the patch of a padded pair is the frame twice).
    """
    if fps <= 0:
        raise ValueError(f"pair_timestamps: fps must be > 0, got {fps}")
    idx = [int(i) for i in frame_indices]
    if rem := len(idx) % temporal_patch_size:
        idx.extend(idx[-1] for _ in range(temporal_patch_size - rem))
    times = [i / fps for i in idx]
    k = temporal_patch_size
    return [(times[i] + times[i + k - 1]) / 2 for i in range(0, len(times), k)]


def format_timestamp(seconds: float, style: TimestampStyle = "seconds") -> str:
    """Text placed before a temporal patch's vision block, brackets included.

    ``"seconds"``: ``<3.5 seconds>``, exactly HF's ``f"<{t:.1f} seconds>"``. ``"hms"``:
    ``<0h:1m:3s>`` (unpadded fields, seconds truncated toward zero: the form only has whole
    seconds and a pair at 2.75 s has not reached 3 s yet).
    """
    if style == "seconds":
        return f"<{seconds:.1f} seconds>"
    if style == "hms":
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"format_timestamp: seconds must be finite and >= 0, got {seconds}")
        total = int(seconds)
        return f"<{total // 3600}h:{total % 3600 // 60}m:{total % 60}s>"
    raise ValueError(f"format_timestamp: style must be 'seconds' or 'hms', got {style!r}")


def video_smart_resize(
    num_frames: int,
    height: int,
    width: int,
    *,
    temporal_factor: int = R.QWEN3VL_TEMPORAL_PATCH_SIZE,
    factor: int = R.QWEN3VL_FACTOR,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    name: str | None = None,
) -> tuple[int, int]:
    """Per-frame target (h, w) of HF's Qwen3-VL *video* ``smart_resize``, line for line.

    Differs from the image rule (``image_rules.smart_resize``): the pixel budget covers all
    frames (``t_bar * h * w`` against min/max pixels, ``t_bar`` = frames rounded to the
    temporal factor), and sides shorter than ``factor`` are first scaled up (int()
    truncation). Raises ValueError naming the video for fewer than ``temporal_factor`` frames
    or aspect ratio > 200, as HF raises.
    """
    who = name or "<unnamed>"
    if num_frames < temporal_factor:
        raise ValueError(
            f"video {who}: {num_frames} sampled frame(s), needs at least temporal_factor={temporal_factor}"
        )
    if height <= 0 or width <= 0:
        raise ValueError(f"video {who}: empty frame size {height}x{width} (h x w)")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > R.MAX_ASPECT_RATIO:
        raise R.AspectRatioError(
            f"video {who} ({height}x{width}, h x w): absolute aspect ratio must be smaller than "
            f"{R.MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_max_pixels(
    num_frames: int,
    *,
    min_pixels: int,
    max_pixels: int,
    cap_pixels_per_frame: bool,
    max_video_tokens: int = VIDEO_MAX_TOKENS_PER_FRAME,
    factor: int = R.QWEN3VL_FACTOR,
) -> int:
    """The ``max_pixels`` HF's video ``resize`` hands to ``smart_resize``.

    With ``cap_pixels_per_frame`` (qwen-vl-utils' rule, HF's future default) each frame gets
    at most ``max_video_tokens`` merged patches or an even share of the budget, floored at
    1.05 x min_pixels, so a short clip cannot spend the whole budget on a few frames.
    """
    if not cap_pixels_per_frame:
        return max_pixels
    per_frame = max(min(max_video_tokens * factor * factor, max_pixels // num_frames), int(min_pixels * 1.05))
    return per_frame * num_frames


def select_backend(codec: str, *, gpu: bool, dali_codecs: frozenset[str] | None = None) -> Backend:
    """``"dali"`` when DALI's decoder on this machine takes ``codec`` (FFmpeg canonical name,
    from the probe, never the file extension), else ``"pyav"``. ``dali_codecs`` overrides
    the table (an empty set sends everything to PyAV)."""
    table = dali_codecs if dali_codecs is not None else (DALI_GPU_CODECS if gpu else DALI_CPU_CODECS)
    return "dali" if codec in table else "pyav"


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoDecodeError(DecodeError):
    """A video that could not be decoded; takes its place in ``decode``'s result list.

    A :class:`~megavlm.data.dali_images.DecodeError`, so batch code handles images and videos
    alike (``ok`` is False, ``name`` and ``reason`` say which file and why)."""


@dataclass
class DecodedVideo:
    """One decoded video. ``frames`` holds, by mode: ``"frames"``: uint8 ``[T, H, W, 3]`` at
    source size; ``"normalized"``: float32 ``[T, 3, h, w]`` resized and normalized;
    ``"qwen3vl"``: None (the patches are a permuted copy, keeping both doubles the memory)."""

    name: str
    codec: str  # FFmpeg canonical codec name from the probe
    backend: str  # "dali-cpu", "dali-gpu" or "pyav"
    source_fps: float
    total_frames: int  # packets in the video stream (see probe_video)
    source_size: tuple[int, int]  # (h, w)
    frame_indices: np.ndarray  # int64 [T]: decoded frames, HF's sample_frames
    timestamps: list[float]  # seconds, one per temporal pair (ceil(T / temporal_patch_size))
    frames: torch.Tensor | None = None
    resized_size: tuple[int, int] | None = None  # video_smart_resize target (h, w)
    pixel_values: torch.Tensor | None = None  # qwen3vl: [grid_t*grid_h*grid_w, 3*2*16*16] float32
    grid_thw: torch.Tensor | None = None  # qwen3vl: long [3]
    ok: bool = field(default=True, init=False)

    @property
    def num_tokens(self) -> int:
        return R.qwen3vl_num_tokens(self.grid_thw)

    @property
    def tokens_per_pair(self) -> int:
        """``<|video_pad|>`` tokens of one temporal pair's block (each pair is its own block)."""
        _, h, w = (int(v) for v in self.grid_thw)
        return h * w // (R.QWEN3VL_MERGE_SIZE**2)

    def timestamp_texts(self, style: TimestampStyle = "seconds") -> list[str]:
        return [format_timestamp(t, style) for t in self.timestamps]


Result = DecodedVideo | VideoDecodeError


# --- loading and probing -------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoProbe:
    codec: str
    fps: float
    num_frames: int  # video packets in the stream: one per displayed frame
    hw: tuple[int, int]


def load_source(source, name: str) -> bytes | VideoDecodeError:
    """Bytes of an in-memory video or a file path; a missing/unreadable file is an error entry."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, np.ndarray):
        return source.tobytes()
    try:
        with open(os.fspath(source), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return VideoDecodeError(name, f"file not found: {os.fspath(source)}")
    except (OSError, TypeError) as e:
        return VideoDecodeError(name, f"cannot read {source!r}: {type(e).__name__}: {e}")


def probe_video(data: bytes, name: str) -> VideoProbe | VideoDecodeError:
    """Codec, frame rate, size and frame count from the container, without decoding.

    The frame count is the number of non-empty packets of the first video stream (exact for
    the containers and codecs in use: one packet per displayed frame, VP9 superframes
    included). A *truncated* file is one with fewer packets than the header promises: the
    stream's frame count when the container indexes it (MP4, AVI; 1% slack for dropped-frame
    markers), else duration x fps (WebM/MKV; 10% slack, since the duration may include a
    longer audio track). Without a frame rate in the header, frames / duration is used.
    """
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # noqa: BLE001 - any PyAV failure means an unreadable container
        return VideoDecodeError(name, f"unreadable container (not a video, or truncated): {type(e).__name__}: {e}")
    with container:
        if not container.streams.video:
            return VideoDecodeError(name, "no video stream in container")
        stream = container.streams.video[0]
        try:
            dec = stream.codec_context.codec
            codec = getattr(dec, "canonical_name", None) or dec.name  # "av1" even when libdav1d decodes it
        except Exception as e:  # noqa: BLE001
            return VideoDecodeError(name, f"no decoder for the video stream: {type(e).__name__}: {e}")
        hw = (stream.codec_context.height, stream.codec_context.width)
        rate = stream.average_rate or stream.guessed_rate
        declared = stream.frames
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / 1e6 if container.duration else None
        count = 0
        try:
            for packet in container.demux(stream):
                count += packet.size > 0
        except Exception as e:  # noqa: BLE001 - a demux error mid-file is truncation or corruption
            return VideoDecodeError(
                name, f"truncated or corrupt: demuxing failed after {count} frames: {type(e).__name__}: {e}"
            )
    if count == 0:
        return VideoDecodeError(name, "no video frames in container")
    if hw[0] <= 0 or hw[1] <= 0:
        return VideoDecodeError(name, f"no frame size in container ({hw[0]}x{hw[1]})")
    if rate:
        fps = float(Fraction(rate))
    elif duration:
        fps = count / duration
    else:
        return VideoDecodeError(name, "container gives neither a frame rate nor a duration")
    if declared > 0:
        expected, slack, what = declared, max(1, declared // 100), "the container index lists"
    elif duration:
        expected = round(duration * fps)
        slack, what = max(2, expected // 10), f"duration {duration:.2f} s x {fps:g} fps gives"
    else:
        expected = None
    if expected is not None and count < expected - slack:
        return VideoDecodeError(name, f"truncated: {what} {expected} frames but only {count} are in the file")
    return VideoProbe(codec=codec, fps=fps, num_frames=count, hw=hw)


def decode_frames_pyav(data: bytes, indices: np.ndarray, *, threads: int = 0) -> np.ndarray:
    """Decode ``indices`` (ascending, may repeat) with PyAV: uint8 ``[T, H, W, 3]``.

    Decodes sequentially up to the last wanted frame and converts only the wanted ones to RGB
    (the conversion, not the decoding, dominates for small sampled subsets). Raises
    RuntimeError with the reason when the stream ends early or the decoder fails.
    """
    import av

    wanted = {int(i) for i in indices}
    last = int(indices[-1])
    got: dict[int, np.ndarray] = {}
    k = -1
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        try:
            for k, frame in enumerate(container.decode(stream)):
                if k in wanted:
                    got[k] = frame.to_ndarray(format="rgb24")
                if k >= last:
                    break
        except Exception as e:
            raise RuntimeError(f"PyAV decoding failed at frame {k + 1}: {type(e).__name__}: {e}") from e
    if k < last:
        raise RuntimeError(f"PyAV decoded only {k + 1} frames, frame {last} was requested")
    return np.stack([got[int(i)] for i in indices])


# --- DALI ----------------------------------------------------------------------------------------


def build_pipeline(*, batch_size: int, num_threads: int, device_id: int | None, build: bool = True):
    """The one DALI pipeline definition, CPU (``device_id=None``) or GPU (``device_id=k``): it
    only decodes.

    Inputs ``encoded`` (uint8 bytes) and ``indices`` (int32 frame indices, per sample) into
    ``fn.decoders.video`` (``device="mixed"`` on a GPU: NVDEC); output uint8 ``[F, H, W, 3]``
    (FHWC). ``build=False`` returns the pipeline unbuilt (its graph can be inspected without
    CUDA, which is how the GPU placement is unit-tested).
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device="cpu" if device_id is None else "mixed", frames=indices)

    p = pipe()
    if build:
        p.build()
    return p


@dataclass
class _Item:
    index: int
    name: str
    data: bytes
    probe: VideoProbe
    indices: np.ndarray
    size: tuple[int, int] | None  # resize target, None in "frames" mode
    dali_error: str | None = None  # why DALI failed, when PyAV took over


class VideoDecoder:
    """Batched video decoding into Qwen3-VL patches, normalized frames or raw frames.

    ``mode``: "qwen3vl" (patches + grid_thw), "normalized" (float frames) or "frames"
    (uint8, no resize). ``batch_size``: videos per DALI run. Sampling: ``fps`` /
    ``num_frames`` / ``min_frames`` / ``max_frames`` as HF's ``sample_frames``. Resize:
    ``min_pixels`` / ``max_pixels`` / ``cap_pixels_per_frame`` as HF's video processor (defaults:
    Qwen3-VL's released config, uncapped). ``device``: "cpu" / "gpu" to override
    ``has_cuda()``. ``dali_codecs``: override the codec routing table (``select_backend``).
    Results are CPU tensors, as ``ImageDecoder``'s: on a GPU, videos are decoded there (NVDEC)
    and copied to the host for the HF-exact resize. Not thread-safe: one decoder per loader
    worker.
    """

    def __init__(
        self,
        *,
        mode: Mode = "qwen3vl",
        batch_size: int = 4,
        num_threads: int = 2,
        fps: float | None = VIDEO_FPS,
        num_frames: int | None = None,
        min_frames: int = VIDEO_MIN_FRAMES,
        max_frames: int = VIDEO_MAX_FRAMES,
        min_pixels: int = VIDEO_MIN_PIXELS,
        max_pixels: int = VIDEO_MAX_PIXELS,
        cap_pixels_per_frame: bool = False,
        temporal_patch_size: int = R.QWEN3VL_TEMPORAL_PATCH_SIZE,
        device: Literal["cpu", "gpu"] | None = None,
        dali_codecs: frozenset[str] | None = None,
    ):
        from megavlm.platform.device import has_cuda

        if mode not in ("qwen3vl", "normalized", "frames"):
            raise ValueError(f"mode must be 'qwen3vl', 'normalized' or 'frames', got {mode!r}")
        if fps is not None and num_frames is not None:
            raise ValueError("VideoDecoder: pass fps or num_frames, not both (set fps=None to use num_frames)")
        self.mode = mode
        self.batch_size, self.num_threads = batch_size, num_threads
        self.fps, self.num_frames = fps, num_frames
        self.min_frames, self.max_frames = min_frames, max_frames
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.cap_pixels_per_frame = cap_pixels_per_frame
        self.temporal_patch_size = temporal_patch_size
        self.dali_codecs = dali_codecs
        self.gpu = has_cuda() if device is None else device == "gpu"
        self.device_id = torch.cuda.current_device() if self.gpu else None
        self.rebuilds = 0  # pipelines rebuilt after a failing batch (observability, tests)
        self._pipeline = None  # built on first use: a loader may only ever see PyAV's codecs

    # -- public ------------------------------------------------------------------------------

    def decode(self, sources: Sequence, names: Sequence[str] | None = None) -> list[Result]:
        """Decode videos given as bytes or file paths; a bad one yields a VideoDecodeError in its slot."""
        if names is None:
            names = [
                os.fspath(s) if isinstance(s, (str, os.PathLike)) else f"video[{i}]" for i, s in enumerate(sources)
            ]
        names = list(names)
        if len(names) != len(sources):
            raise ValueError(f"{len(sources)} videos but {len(names)} names")
        results: list[Result | None] = [None] * len(sources)
        routes: dict[Backend, list[_Item]] = {"dali": [], "pyav": []}
        for i, (src, name) in enumerate(zip(sources, names)):
            item = self._plan(i, src, name)
            if isinstance(item, VideoDecodeError):
                results[i] = item
                continue
            routes[select_backend(item.probe.codec, gpu=self.gpu, dali_codecs=self.dali_codecs)].append(item)
        for start in range(0, len(routes["dali"]), self.batch_size):
            self._run_group(routes["dali"][start : start + self.batch_size], results)
        self._run_pyav(routes["pyav"], results)
        return results  # type: ignore[return-value]

    # -- planning ----------------------------------------------------------------------------

    def layout(self, source, name: str) -> tuple[torch.Tensor, list[float]] | VideoDecodeError:
        """``(grid_thw, pair timestamps)`` that ``decode`` gives ``source`` ("qwen3vl" mode),
        from the container alone (nothing decoded): what a packer plans a row with."""
        item = self._plan(0, source, name)
        if isinstance(item, VideoDecodeError):
            return item
        t = -(-len(item.indices) // self.temporal_patch_size)  # patchify pads to a whole pair
        grid = torch.tensor([t, item.size[0] // R.QWEN3VL_PATCH_SIZE, item.size[1] // R.QWEN3VL_PATCH_SIZE])
        return grid, pair_timestamps(item.indices, item.probe.fps, self.temporal_patch_size)

    def _plan(self, i: int, src, name: str) -> _Item | VideoDecodeError:
        data = load_source(src, name)
        if isinstance(data, VideoDecodeError):
            return data
        pr = probe_video(data, name)
        if isinstance(pr, VideoDecodeError):
            return pr
        indices = sample_frame_indices(
            pr.num_frames, pr.fps, fps=self.fps, num_frames=self.num_frames,
            min_frames=self.min_frames, max_frames=self.max_frames,
        )
        size = None
        if self.mode != "frames":
            n = len(indices)
            max_px = video_max_pixels(
                n, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                cap_pixels_per_frame=self.cap_pixels_per_frame,
            )
            try:
                size = video_smart_resize(
                    n, *pr.hw, temporal_factor=self.temporal_patch_size,
                    min_pixels=self.min_pixels, max_pixels=max_px, name=name,
                )
            except ValueError as e:
                return VideoDecodeError(name, str(e))
        return _Item(i, name, data, pr, indices, size)

    # -- running -----------------------------------------------------------------------------

    def _pipe(self):
        if self._pipeline is None:
            self._pipeline = build_pipeline(
                batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id
            )
        return self._pipeline

    def _rebuild(self):
        self._pipeline = None  # drop the broken pipeline before building its replacement
        self._pipe()
        self.rebuilds += 1

    def _run_pyav(self, items: list[_Item], results: list) -> None:
        """PyAV decode, then the same resize/normalize as DALI's frames (``_result``)."""
        for it in items:
            try:
                frames = decode_frames_pyav(it.data, it.indices, threads=self.num_threads)
            except RuntimeError as e:
                reason = f"DALI: {it.dali_error}; PyAV: {e}" if it.dali_error else str(e)
                results[it.index] = VideoDecodeError(it.name, reason)
                continue
            results[it.index] = self._result(it, "pyav", torch.from_numpy(frames))

    def _run_group(self, items: list[_Item], results: list) -> None:
        """DALI-decode ``items`` as one batch; a failing batch is bisected, a video failing alone
        gets a PyAV try."""
        if not items:
            return
        pipe = self._pipe()
        try:
            pipe.feed_input("encoded", [np.frombuffer(it.data, dtype=np.uint8) for it in items])
            pipe.feed_input("indices", [it.indices.astype(np.int32) for it in items])
            (out,) = pipe.run()
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError for a bad sample, naming none
            self._rebuild()
            if len(items) > 1:
                half = len(items) // 2
                self._run_group(items[:half], results)
                self._run_group(items[half:], results)
            else:  # failed alone in DALI's decoder: PyAV gets a try
                items[0].dali_error = _dali_reason(e)
                self._run_pyav(items, results)
            return
        decoded = out if self.device_id is None else out.as_cpu()  # GPU: one copy per batch
        backend = "dali-gpu" if self.gpu else "dali-cpu"
        for j, it in enumerate(items):
            # a zero-copy view of DALI's buffer, valid until the next run: _result copies out of it
            frames = torch.from_numpy(np.asarray(decoded[j]))
            results[it.index] = self._result(it, backend, frames)

    def _result(self, it: _Item, backend: str, frames: torch.Tensor) -> DecodedVideo:
        """uint8 ``[T, H, W, 3]`` host frames -> the mode's result (never a view of ``frames``)."""
        pr = it.probe
        v = DecodedVideo(
            name=it.name, codec=pr.codec, backend=backend, source_fps=pr.fps, total_frames=pr.num_frames,
            source_size=pr.hw, frame_indices=it.indices.astype(np.int64),
            timestamps=pair_timestamps(it.indices, pr.fps, self.temporal_patch_size),
            resized_size=it.size,
        )
        if self.mode == "frames":
            v.frames = frames.clone()
        else:
            pixels = P.qwen3vl_video_pixels(frames, it.size)  # a new tensor, also when the size is unchanged
            if self.mode == "qwen3vl":
                v.pixel_values, v.grid_thw = R.patchify(pixels, temporal_patch_size=self.temporal_patch_size)
            else:
                v.frames = pixels
        return v


def _dali_reason(e: Exception) -> str:
    """The useful line of a DALI pipeline error (it wraps the operator's message in a
    traceback of the pipeline definition and "pipeline is no longer valid" lines)."""
    text = str(e)
    tail = text.split("encountered:")[-1] if "encountered:" in text else text
    lines = [
        ln.strip() for ln in tail.splitlines()
        if ln.strip() and "no longer valid" not in ln and not ln.strip().startswith("C++ context")
        and "Critical error in pipeline" not in ln
    ]
    detail = re.sub(r"\s+", " ", " ".join(lines))
    return "DALI decode failed" + (f": {detail[:300]}" if detail else "")
