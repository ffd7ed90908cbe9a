"""Video decoding (DALI CPU + PyAV fallback), HF-exact frame sampling/timestamps/resize rule,
and per-video error isolation.

Test videos are made here with PyAV: 64 x 48, 3 s at 10 fps (30 frames), a 6 x 6 white square
on grey moving 2 px right per frame, so a decoded frame's square position names its index.
VP9/WebM goes through DALI's CPU decoder, H.264/MP4 through PyAV (DALI's CPU decoder takes
only VP8, VP9 and MJPEG). A third, 160 x 90 VP9 at 25 fps (70 frames, 5 sampled: an odd count)
with a noise-textured background, checks the pixels at another size, rate and length.

Tolerances, measured here (DALI 2.4, PyAV 18.1 with its bundled FFmpeg):
* square centroid vs 2 * index + 2.5: exact (0.0 px) for both codecs; asserted <= 1 px.
* DALI vs PyAV decoding the same VP9 stream (their YUV -> RGB conversions round differently):
  mean |d| 0.99, max 1 uint8 step; asserted mean < 2, max <= 8.
* Qwen3-VL pixel_values vs HF's own ``Qwen3VLVideoProcessor`` on the same decoded uint8 frames
  (``test_qwen3vl_pixels_equal_hf_processor``): max |d| 0.0 (bit for bit) for the three videos,
  each at the released budget and at budgets forcing a downscale and an upscale, through
  DALI's CPU decoder, PyAV and the in-memory route; asserted <= 1e-6. Against this reference
  the replaced paths were: DALI ``fn.resize`` (cubic, antialiased) + ``crop_mirror_normalize``
  up to 0.0314 (4 uint8 levels; mean 1.9e-3) on the textured video and 0.0078 (1 level) on
  the smooth ones; the float resize (cast, interpolate, clamp, round) of in-memory frames up
  to 0.0235 (3 levels); the exact resize with ``image_pixels.normalize`` (``x / 255`` first)
  instead of HF's fused normalize 5.9e-8.
"""

from __future__ import annotations

import enum
import io
import types

import numpy as np
import pytest
import torch

import av

from megavlm.data import image_pixels as P
from megavlm.data import image_rules as R
from megavlm.data.dali_images import DecodeError
from megavlm.data.video import (
    DecodedVideo,
    VideoDecodeError,
    VideoDecoder,
    build_pipeline,
    decode_frames_pyav,
    format_timestamp,
    pair_timestamps,
    probe_video,
    sample_frame_indices,
    select_backend,
    video_max_pixels,
    video_smart_resize,
)

W, H, FPS, N = 64, 48, 10, 30
SQ = 6  # square side; x = 2 * i, so its centroid column is 2 * i + 2.5
EXPECTED_INDICES = [0, 6, 12, 17, 23, 29]  # HF: int(30 / 10 * 2) = 6 frames
EXPECTED_TIMESTAMPS = [0.3, 1.45, 2.5999999999999996]  # HF's float arithmetic, bit for bit


def _frame(i: int, h: int = H, w: int = W, texture: bool = False) -> np.ndarray:
    if texture:  # seeded noise: content whose resize rounds differently between kernels
        a = np.random.default_rng(7).integers(30, 200, (h, w, 3), dtype=np.uint8)
    else:
        a = np.full((h, w, 3), 60, np.uint8)
    a[20 : 20 + SQ, 2 * i : 2 * i + SQ] = 230
    return a


def _encode(codec: str, fmt: str, options: dict | None = None, *, h: int = H, w: int = W, fps: int = FPS,
            n: int = N, texture: bool = False) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = options or {}
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(_frame(i, h, w, texture), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def vp9():
    return _encode("libvpx-vp9", "webm", {"crf": "20", "b:v": "0"})


@pytest.fixture(scope="module")
def h264():
    return _encode("libx264", "mp4", {"crf": "18"})


@pytest.fixture(scope="module")
def vp9_big():
    """160 x 90, 25 fps, 70 frames (HF samples 5), textured."""
    return _encode("libvpx-vp9", "webm", {"crf": "20", "b:v": "0"}, h=90, w=160, fps=25, n=70, texture=True)


@pytest.fixture(scope="module")
def raw():
    return VideoDecoder(mode="frames", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def qwen():
    return VideoDecoder(mode="qwen3vl", device="cpu", batch_size=4)


def _square_x(frame: np.ndarray) -> float:
    cols = frame[20 : 20 + SQ].astype(np.float32).mean(axis=(0, 2))  # [W]
    bright = np.nonzero(cols > 145)[0]
    return float(bright.mean())


# --- pure rules vs HF ---------------------------------------------------------------------------

# (total frames, video fps): short clips below min_frames, 1 frame, NTSC rates, the 768 cap,
# sub-1 fps, and a high-fps clip
SAMPLING_CASES = [(30, 10), (1, 30), (3, 10), (4, 25), (5, 24), (59, 29.97), (100, 23.976), (301, 30),
                  (7200, 30), (100000, 60), (12, 0.5), (2000, 1000 / 33), (17, 2), (9, 120)]


@pytest.mark.parametrize("total,fps", SAMPLING_CASES)
def test_sampling_and_timestamps_match_hf(total, fps):
    """Indices equal HF's sample_frames; pair timestamps and their text equal HF's processor's."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )
    from transformers.video_utils import VideoMetadata

    hf = Qwen3VLVideoProcessor().sample_frames(VideoMetadata(total_num_frames=total, fps=fps))
    ours = sample_frame_indices(total, fps)
    np.testing.assert_array_equal(ours, hf)
    hf_ts = Qwen3VLProcessor._calculate_timestamps(None, hf, fps, 2)
    assert pair_timestamps(ours, fps) == hf_ts  # exact floats
    assert [format_timestamp(t) for t in pair_timestamps(ours, fps)] == [f"<{t:.1f} seconds>" for t in hf_ts]


def test_sampling_num_frames_matches_hf():
    """A fixed frame count (fps=None) is HF's path too, duplicates for short clips included."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )
    from transformers.video_utils import VideoMetadata

    for total, n in [(10, 16), (100, 16), (7, 4)]:
        meta = VideoMetadata(total_num_frames=total, fps=30)
        hf = Qwen3VLVideoProcessor().sample_frames(meta, num_frames=n, fps=None)
        np.testing.assert_array_equal(sample_frame_indices(total, 30, fps=None, num_frames=n), hf)


def test_format_timestamp_styles():
    assert format_timestamp(0.25) == "<0.2 seconds>"  # Python's round-half-even on the float, as HF
    assert format_timestamp(1.45) == "<1.4 seconds>"  # 1.45 is 1.4499999... in binary
    assert format_timestamp(3725.9, "hms") == "<1h:2m:5s>"
    assert format_timestamp(42.0, style="hms") == "<0h:0m:42s>"
    assert format_timestamp(2.75, "hms") == "<0h:0m:2s>"
    with pytest.raises(ValueError, match="style"):
        format_timestamp(1.0, "frames")
    assert pair_timestamps([0, 5, 10], 10) == [0.25, 1.0]  # odd count: last frame repeated, as HF


# (num_frames, h, w, min_pixels, max_pixels): released config, HF class defaults, tiny / thin /
# huge frames, one frame short of the temporal factor's rounding
RESIZE_CASES = [(6, 48, 64, 4096, 25165824), (6, 48, 64, 131072, 786432), (768, 1080, 1920, 4096, 25165824),
                (4, 1080, 1920, 131072, 786432), (5, 20, 500, 4096, 25165824), (3, 720, 1280, 4096, 25165824),
                (120, 2160, 3840, 4096, 25165824), (2, 31, 31, 4096, 25165824), (9, 100, 3000, 131072, 786432)]


@pytest.mark.parametrize("n,h,w,lo,hi", RESIZE_CASES)
def test_video_smart_resize_matches_hf(n, h, w, lo, hi):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    assert video_smart_resize(n, h, w, min_pixels=lo, max_pixels=hi) == smart_resize(
        n, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi
    )


@pytest.mark.parametrize("cap", [False, True])
def test_video_patch_count_matches_hf(cap):
    """Patch counts with and without HF's per-frame pixel cap equal get_num_of_video_patches."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )

    size = {"shortest_edge": 4096, "longest_edge": 25165824}
    hf = Qwen3VLVideoProcessor(size=size, cap_pixels_per_frame=cap)
    for n, h, w in [(6, 1080, 1920), (40, 720, 1280), (768, 360, 640), (3, 2160, 3840)]:
        hi = video_max_pixels(n, min_pixels=4096, max_pixels=25165824, cap_pixels_per_frame=cap)
        rh, rw = video_smart_resize(n, h, w, min_pixels=4096, max_pixels=hi)
        ours = -(-n // 2) * (rh // 16) * (rw // 16)
        assert ours == hf.get_num_of_video_patches(n, h, w), (n, h, w)


def test_video_smart_resize_errors_name_the_video():
    with pytest.raises(ValueError, match="clip.mp4.*temporal_factor"):
        video_smart_resize(1, 48, 64, name="clip.mp4")
    with pytest.raises(R.AspectRatioError, match="thin.webm"):
        video_smart_resize(4, 32, 32 * 201, name="thin.webm")


def test_backend_selection():
    """Routing by probed codec: VP8/VP9/MJPEG in DALI on both machines, the NVDEC codecs in
    DALI only on a GPU, everything else in PyAV; an override table replaces the default."""
    for codec in ("vp8", "vp9", "mjpeg"):
        assert select_backend(codec, gpu=False) == "dali"
        assert select_backend(codec, gpu=True) == "dali"
    for codec in ("h264", "hevc", "av1", "mpeg4"):
        assert select_backend(codec, gpu=False) == "pyav"
        assert select_backend(codec, gpu=True) == "dali"
    for codec in ("prores", "theora", "mpeg2video"):
        assert select_backend(codec, gpu=True) == "pyav"
    assert select_backend("vp9", gpu=False, dali_codecs=frozenset()) == "pyav"


def test_gpu_graph_placement():
    """The GPU pipeline (not runnable here) only decodes: NVDEC ("mixed") fed from two CPU
    inputs, no resize or normalize in DALI (those are image_pixels' on the host). Checked on the
    unbuilt graph via DALI internals; skipped if those change."""
    p = build_pipeline(batch_size=2, num_threads=1, device_id=0, build=False)
    try:
        p._build_graph()
        ops = {o.name: (o._op.device, [i.device for i in o.inputs]) for o in p._ops}
    except AttributeError as e:
        pytest.skip(f"DALI graph internals changed: {e}")
    kinds = {name.strip("_").rsplit("_", 1)[0]: v for name, v in ops.items()}
    assert kinds == {"encoded": ("cpu", []), "indices": ("cpu", []), "Video": ("mixed", ["cpu", "cpu"])}


# --- decoding -----------------------------------------------------------------------------------


def test_probe_reads_codec_not_extension(vp9, h264):
    """The codec comes from the container: WebM has no frame count in its header, so the
    count is the stream's packets."""
    p, q = probe_video(vp9, "a.mp4"), probe_video(h264, "b.webm")
    assert (p.codec, p.num_frames, p.fps, p.hw) == ("vp9", N, FPS, (H, W))
    assert (q.codec, q.num_frames, q.fps, q.hw) == ("h264", N, FPS, (H, W))


@pytest.mark.parametrize("which,backend", [("vp9", "dali-cpu"), ("h264", "pyav")])
def test_decode_frames(raw, vp9, h264, which, backend):
    """Both routes decode exactly the sampled frames: indices, timestamps and square positions."""
    (v,) = raw.decode([{"vp9": vp9, "h264": h264}[which]], [f"clip.{which}"])
    assert isinstance(v, DecodedVideo) and v.ok, v
    assert v.backend == backend and v.name == f"clip.{which}"
    assert v.frame_indices.tolist() == EXPECTED_INDICES
    assert v.timestamps == EXPECTED_TIMESTAMPS
    assert v.timestamp_texts() == ["<0.3 seconds>", "<1.4 seconds>", "<2.6 seconds>"]
    assert v.frames.dtype == torch.uint8 and tuple(v.frames.shape) == (6, H, W, 3)
    for frame, i in zip(v.frames.numpy(), EXPECTED_INDICES):
        assert abs(_square_x(frame) - (2 * i + SQ / 2 - 0.5)) <= 1.0, (which, i, _square_x(frame))


def test_dali_and_pyav_agree_on_vp9(raw, vp9):
    """The same VP9 stream through DALI and through PyAV gives nearly the same pixels."""
    (a,) = raw.decode([vp9])
    b = decode_frames_pyav(vp9, np.asarray(EXPECTED_INDICES))
    d = np.abs(a.frames.numpy().astype(np.int16) - b.astype(np.int16))
    assert d.mean() < 2 and d.max() <= 8, (d.mean(), d.max())


def test_dali_and_pyav_bound_on_textured_vp9(raw, vp9_big):
    """The bound of DALI's VP9 decode against FFmpeg's on content with sharp chroma edges (the
    noise-textured clip): DALI's YUV -> RGB conversion rounds about one level higher and
    upsamples chroma differently, so edges differ more than on the smooth clip. Measured
    (DALI 2.4, PyAV's FFmpeg): mean |d| 6.2 levels, 99th percentile 22, max 39, mean signed
    +1.1. Asserted with margin; frames HF's own loaders would read: ``data.video_decoder=pyav``."""
    (a,) = raw.decode([vp9_big])
    assert a.backend == "dali-cpu"
    b = decode_frames_pyav(vp9_big, a.frame_indices)
    d = a.frames.numpy().astype(np.int16) - b.astype(np.int16)
    assert np.abs(d).mean() < 9 and np.percentile(np.abs(d), 99) <= 32 and np.abs(d).max() <= 64, (
        np.abs(d).mean(), np.percentile(np.abs(d), 99), np.abs(d).max())
    assert abs(d.mean()) < 3  # a rounding offset at most, not a shifted or swapped frame


# --- pixels vs HF's own video processor ---------------------------------------------------------


class _InterpolationMode(enum.Enum):
    """torchvision's InterpolationMode (the members HF's code names)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _tv_resize(image, size, interpolation=_InterpolationMode.BILINEAR, max_size=None, antialias=True):
    """torchvision's ``resize_image`` (v2 functional) for the only case HF's video processor
    reaches here: a uint8 tensor on the CPU with BICUBIC. ``_do_native_uint8_resize_on_cpu(BICUBIC)``
    is True, so uint8 is an acceptable dtype and torchvision calls ``interpolate`` on the uint8
    tensor itself (no float cast, no clamp/round); an unchanged size returns the input."""
    assert interpolation is _InterpolationMode.BICUBIC and max_size is None, (interpolation, max_size)
    assert image.dtype == torch.uint8 and image.device.type == "cpu", (image.dtype, image.device)
    shape = image.shape
    c, old_h, old_w = shape[-3:]
    new_h, new_w = (int(v) for v in size)
    if (new_h, new_w) == (old_h, old_w):
        return image
    x = image.reshape(-1, c, old_h, old_w)
    x = torch.nn.functional.interpolate(x, size=[new_h, new_w], mode="bicubic", align_corners=False,
                                        antialias=bool(antialias))
    return x.reshape(shape[:-3] + (c, new_h, new_w))


def _tv_normalize(image, mean, std, inplace=False):
    """torchvision's ``normalize_image``: mean/std as tensors of the image's dtype viewed
    ``[C, 1, 1]``, ``image.sub_(mean)`` when inplace else ``image.sub(mean)``, then ``.div_(std)``."""
    assert image.is_floating_point()
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def hf_qwen3vl_video(monkeypatch, frames: np.ndarray, *, min_pixels: int, max_pixels: int):
    """``(pixel_values_videos, video_grid_thw[0], resize calls)`` of HF's ``Qwen3VLVideoProcessor``
    (transformers' own code: ``preprocess``, ``_preprocess``, its ``resize``/``smart_resize``,
    the backend's fused ``rescale_and_normalize``, its ``patchify``) on uint8 ``[T, H, W, 3]``
    frames that are already sampled (``do_sample_frames=False``; RGB, so ``do_convert_rgb=False``).

    torchvision cannot be installed on this machine (PyPI's wheel is CUDA-built and fails to
    import), and transformers binds its ``tvF`` only when torchvision imports. Where it is
    missing, a stand-in is injected: ``tvF.resize`` = torchvision's ``resize_image`` for a uint8
    CPU tensor with BICUBIC (``_tv_resize``: torch's native uint8 ``interpolate``, what
    torchvision calls there), ``tvF.normalize`` = its ``normalize_image`` (``_tv_normalize``),
    ``tvF.InterpolationMode`` and the PIL -> InterpolationMode map. Everything else is HF's.
    The stand-in asserts HF hands it exactly that case, and nothing else of tvF exists, so a
    change in HF's path fails loudly instead of comparing something else.
    """
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    calls = []

    def resize(image, size, **kw):
        calls.append((tuple(image.shape[-2:]), tuple(size)))
        return _tv_resize(image, size, **kw)

    current = getattr(backends, "tvF", None)
    if current is None or getattr(current, "stand_in", False):  # absent, or an earlier call's stand-in
        stand_in = types.SimpleNamespace(resize=resize, normalize=_tv_normalize, InterpolationMode=_InterpolationMode,
                                         stand_in=True)
        monkeypatch.setattr(backends, "tvF", stand_in, raising=False)
        monkeypatch.setattr(video_utils, "tvF", stand_in, raising=False)
        monkeypatch.setattr(backends, "pil_torch_interpolation_mapping",
                            {PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC})
    hf = Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                               cap_pixels_per_frame=False)
    out = hf([np.ascontiguousarray(frames)], do_sample_frames=False, do_convert_rgb=False, return_tensors="pt")
    return out["pixel_values_videos"], out["video_grid_thw"][0], calls


# (min_pixels, max_pixels) as a function of the sampled count and frame size: the released config,
# a budget forcing a ~2x antialiased downscale, and one forcing a ~2x upscale
BUDGETS = {
    "released": lambda n, h, w: (4096, 25165824),
    "down": lambda n, h, w: (1024, n * h * w // 4),
    "up": lambda n, h, w: (n * h * w * 4, 25165824),
}
# video fixture -> the routes it takes (H.264 cannot go through DALI's CPU decoder)
ROUTES = {"vp9": ("dali-cpu", "pyav"), "h264": ("pyav",), "vp9_big": ("dali-cpu", "pyav")}


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("which", list(ROUTES))
def test_qwen3vl_pixels_equal_hf_processor(monkeypatch, request, which, budget):
    """pixel_values and grid_thw equal HF's ``Qwen3VLVideoProcessor`` run on the same decoded
    frames (see ``hf_qwen3vl_video``), through DALI's CPU decoder, PyAV (forced for VP9 with
    an empty DALI codec table) and the in-memory route (``image_pixels.qwen3vl_video_patches``,
    what ``SampleEncoder`` calls on array frames). Measured max |d| 0.0; asserted <= 1e-6."""
    data = request.getfixturevalue(which)
    pr = probe_video(data, which)
    n = len(sample_frame_indices(pr.num_frames, pr.fps))
    lo, hi = BUDGETS[budget](n, *pr.hw)
    for backend in ROUTES[which]:
        table = None if backend == "dali-cpu" else frozenset()
        (f,) = VideoDecoder(mode="frames", device="cpu", dali_codecs=table).decode([data])
        (q,) = VideoDecoder(mode="qwen3vl", device="cpu", dali_codecs=table, min_pixels=lo, max_pixels=hi).decode([data])
        assert f.backend == q.backend == backend and q.frames is None
        ref, grid, calls = hf_qwen3vl_video(monkeypatch, f.frames.numpy(), min_pixels=lo, max_pixels=hi)
        th, tw = q.resized_size
        if budget != "released":  # the budgets do force the direction they name
            assert (th * tw < pr.hw[0] * pr.hw[1]) == (budget == "down"), (q.resized_size, pr.hw)
        assert calls == [(pr.hw, (th, tw))]  # HF resized once, to our target (torchvision skips equal sizes)
        assert q.grid_thw.tolist() == grid.tolist() == [-(-n // 2), th // 16, tw // 16]
        assert q.pixel_values.shape == ref.shape
        d = (q.pixel_values - ref).abs().max().item()
        assert d <= 1e-6, (which, backend, budget, d)
        patches, g = P.qwen3vl_video_patches(f.frames.numpy(), q.resized_size)  # in-memory route
        assert g.tolist() == grid.tolist()
        assert (patches - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("size", [(32, 32), (96, 64), (48, 64), (20, 130), (130, 20)])
def test_resize_video_u8_is_torchvision_cpu_kernel(size):
    """``image_pixels.resize_video_u8`` equals the torchvision stand-in bit for bit on uint8
    (down, up, unchanged, mixed), and the stand-in is not the float path (cast, interpolate,
    clamp, round; torchvision's on a GPU), which this content tells apart."""
    frames = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (5, 48, 64, 3), dtype=np.uint8))
    chw = frames.permute(0, 3, 1, 2)
    ours = P.resize_video_u8(chw, size)
    ref = _tv_resize(chw.contiguous(), size, _InterpolationMode.BICUBIC)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (5, 3, *size)
    assert torch.equal(ours, ref)
    if size != (48, 64):
        x = torch.nn.functional.interpolate(chw.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        float_path = x.clamp(0, 255).round().to(torch.uint8)
        assert not torch.equal(float_path, ref)
    else:
        assert torch.equal(ours, chw)


def test_normalized_mode_equals_patches(vp9):
    """"normalized" mode returns the frames the patches are made of: [T, 3, h, w] float32."""
    (v,) = VideoDecoder(mode="normalized", device="cpu").decode([vp9])
    (q,) = VideoDecoder(mode="qwen3vl", device="cpu").decode([vp9])
    assert v.frames.dtype == torch.float32 and tuple(v.frames.shape) == (6, 3, *q.resized_size)
    assert torch.equal(R.patchify(v.frames)[0], q.pixel_values)


def _corrupt_mdat(mp4: bytes) -> bytes:
    """Garbage in place of the coded frames; the container index stays intact."""
    start = mp4.index(b"mdat") + 4
    end = mp4.index(b"moov") - 4 if mp4.index(b"moov") > start else len(mp4)
    rng = np.random.default_rng(0)
    return mp4[:start] + rng.integers(0, 256, end - start, dtype=np.uint8).tobytes() + mp4[end:]


def test_bad_videos_become_errors(tmp_path, qwen, vp9, h264):
    """Truncated, random, missing: an error entry naming the file and reason, in its slot; the
    good videos of the same call decode."""
    path = tmp_path / "good.webm"
    path.write_bytes(vp9)
    missing = tmp_path / "missing.mp4"
    # seeded garbage: os.urandom bytes now and then probe as some container, with another reason
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    sources = [vp9[: len(vp9) // 2], h264, garbage, str(path), missing, h264[: len(h264) // 2], vp9]
    names = ["half.webm", "ok.mp4", "random.bin", None, None, "half.mp4", "ok.webm"]
    names = [n or str(s) for n, s in zip(names, sources)]
    res = qwen.decode(sources, names)
    assert [r.ok for r in res] == [False, True, False, True, False, False, True]
    for r, n in zip(res, names):
        assert r.name == n
    assert isinstance(res[0], VideoDecodeError) and isinstance(res[0], DecodeError)
    assert "truncated" in res[0].reason and "30 frames" in res[0].reason
    assert "unreadable container" in res[2].reason
    assert "file not found" in res[4].reason and str(missing) in res[4].reason
    assert "unreadable container" in res[5].reason  # MP4 with its index (moov) at the cut-off end
    assert res[3].frame_indices.tolist() == EXPECTED_INDICES


def test_dali_failure_is_isolated_and_falls_back(vp9, h264):
    """H.264 forced into DALI's CPU decoder fails there: the batch is split, the good VP9s keep
    their DALI result, the H.264 is retried with PyAV; a stream neither can decode gets both
    reasons."""
    dec = VideoDecoder(mode="frames", device="cpu", batch_size=4, dali_codecs=frozenset({"vp9", "h264"}))
    garbage = _corrupt_mdat(h264)
    assert probe_video(garbage, "g").num_frames == N  # the index is intact: only decoding fails
    res = dec.decode([vp9, h264, garbage, vp9], ["a", "b", "garbage.mp4", "d"])
    assert [r.ok for r in res] == [True, True, False, True]
    assert [r.backend for r in res if r.ok] == ["dali-cpu", "pyav", "dali-cpu"]
    assert res[1].frame_indices.tolist() == EXPECTED_INDICES
    assert res[2].name == "garbage.mp4"
    assert res[2].reason.startswith("DALI: DALI decode failed") and "; PyAV: " in res[2].reason
    assert dec.rebuilds >= 2
    assert all(r.ok for r in dec.decode([vp9, vp9]))  # the rebuilt pipeline still works
