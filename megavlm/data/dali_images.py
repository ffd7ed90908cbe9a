"""Image decoding for Qwen3-VL (dynamic resolution) and STEP3-VL (multi-crop) with NVIDIA DALI.

One pipeline definition serves both machines: on a GPU (``megavlm.platform.device.has_cuda()``)
the decoder runs ``device="mixed"`` (nvJPEG) and resize/normalize follow on the GPU; without
one the pipeline is built with ``device_id=None`` and everything runs on DALI's CPU
operators. The size arithmetic comes from :mod:`megavlm.data.image_rules`.

Flow of ``ImageDecoder.decode(encoded, names)``:

1. *Probe* every image with Pillow (header only, ~50-90 us for a JPEG): size, format and EXIF
   orientation (DALI applies EXIF orientation, so the probe swaps h/w for orientations
   5-8). Unreadable headers and formats DALI cannot decode (e.g. GIF) become
   :class:`DecodeError` entries before DALI sees them. A JPEG that does not end with an
   end-of-image marker, or a PNG that does not end with its IEND chunk, is a *suspect*
   (truncated, or with data appended, e.g. a motion photo): suspects are decoded in batches
   of their own, so they cannot take a batch of sound images down. ``Image.verify()`` is not
   used: it checks nothing for JPEG (a truncated JPEG passes), and for PNG it reads every
   chunk (measured 1.5 ms for a 2.1 MB PNG, 8% of a full Pillow decode of it) to find what
   the O(1) IEND check finds for truncation; with one truncated JPEG in a batch of 16
   (1000x800, STEP3-VL) the suspect route took 0.52 s against 0.61 s for failing the batch
   and splitting it.
2. DALI decodes (``fn.decoders.image``, RGB, EXIF orientation applied) to uint8 HWC;
   ``fn.peek_image_shape`` (orientation-aware) is returned too; a sample whose decoded shape
   differs from the probe is re-run with sizes from the real shape.
3. Resize, crop and normalize follow in :mod:`megavlm.data.image_pixels`, the code every
   decode route shares: Qwen3-VL resizes with Pillow BICUBIC (HF's Pillow backend, exactly),
   STEP3-VL with torch's uint8 bilinear kernel (transformers' Step3p7ImageProcessor, exactly).
   DALI's own ``fn.resize`` is not used: its cubic/linear resampling differs from both
   references (measured: mean 0.6, max 26 levels against Pillow BICUBIC), so a DALI-decoded
   image would train on other pixels than the same image read by Pillow.
4. Qwen3-VL images are patchified (``image_rules.patchify``); STEP3-VL's crops come out as
   ``[n, 3, 504, 504]``. On a GPU the decoded image is copied to the host for step 3.

A DALI batch with a corrupt image raises for the whole batch and leaves the pipeline
unusable. The decoder then rebuilds the pipeline (~10-20 ms on CPU) and splits the batch:
the sample DALI names in its error ("Failed to decode sample #k") is tried alone and the
rest again as a batch; with no such hint the batch is bisected. Only the images that fail
alone become ``DecodeError(name, reason)``.

:class:`PillowImageDecoder` does the same work with Pillow + numpy on a thread pool, with the
same API: a fallback without DALI, the reference in tests and the baseline in
``bench/data_throughput.py``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from megavlm.data import image_pixels as P
from megavlm.data import image_rules as R

Mode = Literal["qwen3vl", "step3vl"]

# Pillow format names of what DALI's image decoder reads (MPO: multi-picture JPEG from cameras).
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "PPM", "JPEG2000", "WEBP"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC: the last 8 bytes of a PNG
_TAIL = 64  # bytes at the end of a file searched for the end marker (allows a little padding)
_ORIENTATION_TAG = 0x0112
_SAMPLE_HINT = re.compile(r"sample #(\d+)")


@dataclass(frozen=True)
class DecodeError:
    """An image that could not be decoded; takes its place in ``decode``'s result list."""

    name: str
    reason: str
    ok: bool = field(default=False, init=False)


@dataclass
class Qwen3VLImage:
    name: str
    source_size: tuple[int, int]  # (h, w) after EXIF orientation
    resized_size: tuple[int, int]  # smart_resize target (h, w)
    pixel_values: torch.Tensor  # [grid_t*grid_h*grid_w, 3*2*16*16] float32, HF layout
    grid_thw: torch.Tensor  # long [3]: (1, h/16, w/16)
    ok: bool = field(default=True, init=False)

    @property
    def num_tokens(self) -> int:
        return R.qwen3vl_num_tokens(self.grid_thw)


@dataclass
class Step3VLImage:
    name: str
    source_size: tuple[int, int]  # (h, w) after EXIF orientation
    plan: R.CropPlan
    # view size -> [n_views, 3, size, size] float32: {728: [1, ...], 504: [plan.num_crops, ...]}
    pixel_values: dict[int, torch.Tensor]
    ok: bool = field(default=True, init=False)

    @property
    def num_tokens(self) -> int:
        return R.step3_num_tokens(self.plan)

    @property
    def token_layout(self) -> list[str]:
        return R.step3_token_layout(self.plan)


Result = Qwen3VLImage | Step3VLImage | DecodeError


# --- probing and shared post-processing ------------------------------------------------------


@dataclass
class _Probe:
    index: int
    name: str
    data: np.ndarray  # uint8 view of the encoded bytes
    hw: tuple[int, int]
    suspect: bool


def probe(data: bytes, name: str) -> tuple[tuple[int, int], bool] | DecodeError:
    """Header check: ((h, w) after EXIF orientation, suspect) or a DecodeError."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            w, h = im.size
            orientation = 1
            if fmt in _JPEG_FORMATS or fmt in ("TIFF", "WEBP"):  # PNG's getexif() would decode it all
                orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as e:  # noqa: BLE001 - any Pillow failure means an unreadable image
        return DecodeError(name, f"unreadable image: {type(e).__name__}: {e}")
    if fmt not in DALI_FORMATS:
        return DecodeError(name, f"unsupported image format {fmt}")
    if w <= 0 or h <= 0:
        return DecodeError(name, f"empty image {w}x{h}")
    if orientation in (5, 6, 7, 8):
        h, w = w, h
    tail = bytes(data[-_TAIL:])
    suspect = (fmt in _JPEG_FORMATS and _EOI not in tail) or (fmt == "PNG" and _PNG_IEND not in tail)
    return (h, w), suspect


DEFAULT_MAX_CROPS = 128


def _plan_sizes(mode: Mode, hw: tuple[int, int], name: str, min_pixels: int, max_pixels: int, max_crops: int):
    """Resize target: (smart_resize size, None) for Qwen3-VL, (None, crop plan) for STEP3-VL.

    Raises ValueError for Qwen3-VL aspect > 200 and for STEP3-VL plans with more than
    ``max_crops`` crops: a thin image gets windows of its short side (9000 x 40, downscaled to
    3024 x 13: 232 crops, 19K tokens), which the multi-crop rule does not bound. Normal plans
    stay far below: 36 crops for 3024 x 3024, 95 for 3024 x 32."""
    if mode == "qwen3vl":
        return R.smart_resize(*hw, min_pixels=min_pixels, max_pixels=max_pixels, name=name), None
    plan = R.step3_crop_plan(*hw)
    if plan.num_crops > max_crops:
        raise ValueError(
            f"image {name} ({hw[0]}x{hw[1]}, h x w): STEP3-VL plan has {plan.num_crops} crops of "
            f"{plan.window} px, more than max_crops={max_crops}"
        )
    return None, plan


def _result(mode: Mode, name, hw, target, plan, image: np.ndarray) -> Qwen3VLImage | Step3VLImage:
    """A decoded uint8 ``[H, W, 3]`` image -> its result (copies: never DALI's reused buffers)."""
    if mode == "qwen3vl":
        patches, grid = P.qwen3vl_patches(image, target)  # normalize() copies out of ``image``
        return Qwen3VLImage(name, tuple(hw), tuple(target), patches, grid)
    global_view, crops = P.step3_views_u8(image, plan)
    return Step3VLImage(name, tuple(hw), plan, {plan.global_size: global_view, plan.local_size: crops})


# --- DALI --------------------------------------------------------------------------------------


def build_pipeline(*, batch_size: int, num_threads: int, device_id: int | None):
    """The one DALI pipeline definition, CPU (``device_id=None``) or GPU (``device_id=k``).

    Input (``feed_input``): ``encoded`` (uint8 bytes). Outputs: ``(image, shape)``, the image
    uint8 HWC RGB with EXIF orientation applied, ``shape`` the orientation-aware (H, W, C)
    from ``fn.peek_image_shape``.
    """
    from nvidia.dali import fn, pipeline_def, types

    decoder_device = "cpu" if device_id is None else "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        shape = fn.peek_image_shape(encoded)
        return fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB), shape

    p = pipe()
    p.build()
    return p


class ImageDecoder:
    """Batched DALI decoding into Qwen3-VL patches or STEP3-VL views; see the module docstring.

    ``mode``: "qwen3vl" or "step3vl". ``batch_size``: the DALI batch (longer inputs are
    chunked). ``min_pixels`` / ``max_pixels``: smart_resize bounds (Qwen3-VL; Qwen3-VL's
    released config uses ``image_rules.QWEN3VL_MIN_PIXELS`` / ``QWEN3VL_MAX_PIXELS``).
    ``device``: "cpu" / "gpu"
    to override ``has_cuda()``. ``max_crops``: STEP3-VL plans with more crops become
    DecodeErrors (see ``_plan_sizes``). Results are CPU tensors: on a GPU, images are
    decoded there (nvJPEG) and copied to the host for the HF-exact resize. Not thread-safe: one decoder per loader worker.
    """

    def __init__(
        self,
        *,
        mode: Mode,
        batch_size: int,
        num_threads: int,
        min_pixels: int = R.QWEN3VL_MIN_PIXELS,
        max_pixels: int = R.QWEN3VL_MAX_PIXELS,
        device: Literal["cpu", "gpu"] | None = None,
        max_crops: int = DEFAULT_MAX_CROPS,
    ):
        from megavlm.platform.device import has_cuda

        if mode not in ("qwen3vl", "step3vl"):
            raise ValueError(f"mode must be 'qwen3vl' or 'step3vl', got {mode!r}")
        self.mode = mode
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_crops = max_crops
        use_gpu = has_cuda() if device is None else device == "gpu"
        self.device_id = torch.cuda.current_device() if use_gpu else None
        self.torch_device = torch.device("cuda", self.device_id) if use_gpu else torch.device("cpu")
        self.rebuilds = 0  # pipelines rebuilt after a failing batch (observability, tests)
        self._pipe = self._build()

    def _build(self):
        return build_pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id)

    def _rebuild(self):
        old, self._pipe = self._pipe, None
        del old
        self._pipe = self._build()
        self.rebuilds += 1

    # -- public ------------------------------------------------------------------------------

    def decode(self, encoded: Sequence[bytes], names: Sequence[str] | None = None) -> list[Result]:
        """Decode a list of encoded images; a bad image yields a DecodeError in its slot."""
        names = list(names) if names is not None else [f"image[{i}]" for i in range(len(encoded))]
        if len(names) != len(encoded):
            raise ValueError(f"{len(encoded)} images but {len(names)} names")
        results: list[Result | None] = [None] * len(encoded)
        batchable: list[_Probe] = []
        suspects: list[_Probe] = []
        for i, (data, name) in enumerate(zip(encoded, names)):
            pr = probe(data, name)
            if isinstance(pr, DecodeError):
                results[i] = pr
                continue
            item = _Probe(i, name, np.frombuffer(data, dtype=np.uint8), *pr)
            (suspects if item.suspect else batchable).append(item)
        for group in (batchable, suspects):  # suspects apart: a truncated file spoils only its own batch
            for start in range(0, len(group), self.batch_size):
                self._run_group(group[start : start + self.batch_size], results)
        return results  # type: ignore[return-value]

    # -- internals ---------------------------------------------------------------------------

    def _run_group(self, items: list[_Probe], results: list, retry_shape: bool = True) -> None:
        if not items:
            return
        plans, runnable = [], []
        for it in items:
            try:
                size, plan = _plan_sizes(self.mode, it.hw, it.name, self.min_pixels, self.max_pixels, self.max_crops)
            except ValueError as e:
                results[it.index] = DecodeError(it.name, str(e))
                continue
            plans.append((size, plan))
            runnable.append(it)
        if not runnable:
            return
        try:
            self._pipe.feed_input("encoded", [it.data for it in runnable])
            outputs = self._pipe.run()
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError/IndexError for a bad sample
            self._rebuild()
            if len(runnable) == 1:
                results[runnable[0].index] = DecodeError(runnable[0].name, _reason(e, runnable[0].data))
                return
            m = _SAMPLE_HINT.search(str(e))
            k = int(m.group(1)) if m and int(m.group(1)) < len(runnable) else None
            if k is not None:
                self._run_group([runnable[k]], results)
                self._run_group(runnable[:k] + runnable[k + 1 :], results)
            else:
                half = len(runnable) // 2
                self._run_group(runnable[:half], results)
                self._run_group(runnable[half:], results)
            return
        shapes = outputs[-1]
        decoded = outputs[0] if self.device_id is None else outputs[0].as_cpu()  # GPU: one copy per batch
        redo: list[_Probe] = []
        for j, it in enumerate(runnable):
            decoded_hw = tuple(int(v) for v in np.asarray(shapes[j])[:2])
            if decoded_hw != it.hw:
                # EXIF orientation or size read differently by Pillow and DALI: redo with DALI's shape
                if retry_shape:
                    redo.append(_Probe(it.index, it.name, it.data, decoded_hw, it.suspect))
                else:
                    results[it.index] = DecodeError(it.name, f"decoded shape {decoded_hw} != probed {it.hw}")
                continue
            size, plan = plans[j]
            results[it.index] = _result(self.mode, it.name, it.hw, size, plan, self._fetch(decoded, j))
        if redo:
            self._run_group(redo, results, retry_shape=False)

    def _fetch(self, tensor_list, j: int) -> np.ndarray:
        """Sample j as uint8 ``[H, W, 3]`` on the host: a zero-copy view of DALI's buffer, valid
        until the next run (the post-processing never keeps it)."""
        return np.asarray(tensor_list[j])


def _reason(e: Exception, data: np.ndarray) -> str:
    """DALI's exception only says "Failed to decode sample #k" (the decoder's own message goes to
    its log), so a failing image is also decoded by Pillow, once, to name the cause."""
    text = str(e)
    tail = text.split("encountered:")[-1] if "encountered:" in text else text
    tail = re.sub(r"Failed to decode sample #\d+\s*:?", "", tail)
    detail = " ".join(ln.strip() for ln in tail.splitlines() if ln.strip() and "no longer valid" not in ln)
    reason = "DALI decode failed" + (f": {detail[:200]}" if detail else "")
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.load()
    except Exception as pe:  # noqa: BLE001
        reason += f" (Pillow: {type(pe).__name__}: {pe})"
    return reason


# --- Pillow + numpy (fallback, test reference, benchmark baseline) ------------------------------


class PillowImageDecoder:
    """The same contract as :class:`ImageDecoder`, computed with Pillow + numpy on a thread pool.

    Per image: ``Image.open`` -> ``ImageOps.exif_transpose`` -> RGB -> the same
    :mod:`megavlm.data.image_pixels` post-processing as :class:`ImageDecoder`.
    Decoding errors (Pillow raises on truncated files) become DecodeError entries.
    """

    def __init__(
        self,
        *,
        mode: Mode,
        num_threads: int,
        min_pixels: int = R.QWEN3VL_MIN_PIXELS,
        max_pixels: int = R.QWEN3VL_MAX_PIXELS,
        batch_size: int | None = None,  # accepted for API symmetry; unused
        max_crops: int = DEFAULT_MAX_CROPS,
    ):
        if mode not in ("qwen3vl", "step3vl"):
            raise ValueError(f"mode must be 'qwen3vl' or 'step3vl', got {mode!r}")
        self.mode = mode
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_crops = max_crops
        self._pool = ThreadPoolExecutor(max_workers=num_threads)

    def close(self):
        self._pool.shutdown()

    def decode(self, encoded: Sequence[bytes], names: Sequence[str] | None = None) -> list[Result]:
        names = list(names) if names is not None else [f"image[{i}]" for i in range(len(encoded))]
        if len(names) != len(encoded):
            raise ValueError(f"{len(encoded)} images but {len(names)} names")
        return list(self._pool.map(self.decode_one, encoded, names))

    def decode_one(self, data: bytes, name: str) -> Result:
        try:
            with Image.open(io.BytesIO(data)) as raw:
                im = ImageOps.exif_transpose(raw).convert("RGB")
        except Exception as e:  # noqa: BLE001
            return DecodeError(name, f"{type(e).__name__}: {e}")
        hw = (im.height, im.width)
        try:
            size, plan = _plan_sizes(self.mode, hw, name, self.min_pixels, self.max_pixels, self.max_crops)
        except ValueError as e:
            return DecodeError(name, str(e))
        return _result(self.mode, name, hw, size, plan, np.asarray(im))
