"""Image throughput of megavlm's DALI CPU pipeline against a Pillow + numpy pipeline.

What is measured: images/s of ``megavlm.data.dali_images.ImageDecoder`` (DALI, CPU operators,
``device_id=None``) against ``PillowImageDecoder`` doing the same work — decode, EXIF
orientation, resize, normalize to float32 CHW, then the same torch post-processing (STEP3-VL:
728 x 728 global view + 504 x 504 crops of the crop canvas; Qwen3-VL: smart_resize + patchify)
— with the same thread count (DALI ``num_threads`` = Pillow ``ThreadPoolExecutor`` workers;
torch intra-op threads set to the same). Pillow releases the GIL while decoding and resizing,
so its threads do run in parallel.

Images are generated in memory: JPEG (quality 90) of smooth content plus noise, width and
height drawn independently from 640..3000 px. Both decoders first decode a small warm-up
batch (pipeline build, allocations; untimed), then decode all images in ``--rounds``
interleaved rounds (DALI, Pillow, DALI, ...), timed. Since DALI only decodes (resize, crop and
normalize are the shared ``data.image_pixels`` code, so that both give equal pixels), the
ratio measures DALI's decoding against Pillow's. Both
results are checked to agree (same crop plans, mean |diff| printed). Besides images/s the
process CPU time per image is printed (``time.process_time`` counts DALI's and the pool's
threads): on a shared machine it moves less with other load than wall time does.

With ``--mode qwen3vl`` it also times the whole training input path (decode, resize,
patchify, tokenize, pack: ``EncodedDataset`` + ``PackedDataset``) with data.image_decoder=dali
against =pillow, one thread each (images/s per CPU core), and what one of N readers (DP
ranks, loader workers) spends on its share of packed rows when the packer plans from header
lengths, against decoding every sample to plan. Last, the packing efficiency of the
synthetic mix in 1024- and 8192-token rows.

Usage: ``python bench/data_throughput.py [--mode step3vl|qwen3vl] [--images 96] [--threads 2]``
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavlm.data.dali_images import ImageDecoder, PillowImageDecoder


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["step3vl", "qwen3vl"], default="step3vl")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=16, help="DALI batch size")
    p.add_argument("--threads", type=int, default=min(len(os.sched_getaffinity(0)), 16))
    p.add_argument("--min-side", type=int, default=640)
    p.add_argument("--max-side", type=int, default=3000)
    p.add_argument("--max-pixels", type=int, default=1280 * 32 * 32, help="qwen3vl smart_resize bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="interleaved DALI / Pillow rounds")
    return p.parse_args()


def make_images(n: int, lo: int, hi: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 12, size=(hi, hi, 3)).astype(np.float32)  # shared; sliced per image
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        # 127 + 90 sin(x/a + y/b + phase_c), expanded as sin(X)cos(Y) + cos(X)sin(Y) (outer products)
        x = np.arange(w, dtype=np.float32)[None, :, None] / rng.uniform(20, 80)
        y = np.arange(h, dtype=np.float32)[:, None, None] / rng.uniform(20, 80)
        y = y + rng.uniform(0, 6, size=3).astype(np.float32)
        img = 127 + 90 * (np.sin(x) * np.cos(y) + np.cos(x) * np.sin(y)) + noise[:h, :w]
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def summarize(results) -> tuple[int, int]:
    views = tokens = 0
    for r in results:
        assert r.ok, r
        views += sum(v.shape[0] for v in r.pixel_values.values()) if isinstance(r.pixel_values, dict) else 1
        tokens += r.num_tokens
    return views, tokens


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    images = make_images(a.images, a.min_side, a.max_side, a.seed)
    mpix = 0.0
    for b in images:
        with Image.open(io.BytesIO(b)) as im:
            mpix += im.width * im.height / 1e6
    print(f"{len(images)} JPEGs, {mpix / len(images):.2f} Mpx mean, {sum(map(len, images)) / 2**20:.1f} MiB "
          f"(generated in {time.perf_counter() - t0:.1f}s); mode {a.mode}; {a.threads} threads; DALI batch {a.batch}")

    kw = {"mode": a.mode, "num_threads": a.threads, "max_pixels": a.max_pixels}
    dali = ImageDecoder(batch_size=a.batch, device="cpu", **kw)
    pil = PillowImageDecoder(**kw)
    warm = images[: min(4, len(images))]
    dali.decode(warm)
    pil.decode(warm)

    # interleaved rounds in one process: load changes on a shared machine hit both alike
    t_dali = c_dali = t_pil = c_pil = 0.0
    for _ in range(a.rounds):
        t, c = time.perf_counter(), time.process_time()
        out_dali = dali.decode(images)
        t_dali, c_dali = t_dali + time.perf_counter() - t, c_dali + time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        out_pil = pil.decode(images)
        t_pil, c_pil = t_pil + time.perf_counter() - t, c_pil + time.process_time() - c
    pil.close()

    v_d, tok_d = summarize(out_dali)
    v_p, tok_p = summarize(out_pil)
    assert (v_d, tok_d) == (v_p, tok_p), ((v_d, tok_d), (v_p, tok_p))
    diffs = []
    for x, y in zip(out_dali, out_pil):
        if isinstance(x.pixel_values, dict):
            diffs += [(x.pixel_values[k] - y.pixel_values[k]).abs().mean().item() for k in x.pixel_values if x.pixel_values[k].numel()]
        else:
            diffs.append((x.pixel_values - y.pixel_values).abs().mean().item())
    print(f"work: {v_d} views, {tok_d} tokens; DALI vs Pillow mean |diff| {np.mean(diffs):.4f} (normalized units)")
    n = len(images) * a.rounds
    print(f"DALI CPU     : {n / t_dali:7.2f} images/s ({t_dali:.2f} s; {1e3 * c_dali / n:.0f} CPU-ms/image)")
    print(f"Pillow+numpy : {n / t_pil:7.2f} images/s ({t_pil:.2f} s; {1e3 * c_pil / n:.0f} CPU-ms/image)")
    print(f"ratio DALI / Pillow: {t_pil / t_dali:.2f}x images/s, {c_pil / c_dali:.2f}x CPU time per image")
    if a.mode == "qwen3vl":
        training_path(images, a.max_pixels)
    packing_efficiency()


def training_path(images: list[bytes], max_pixels: int, seq_length: int = 8192) -> None:
    """images/s of the whole training input path, one thread each (per CPU core): decode,
    resize, patchify, tokenize and pack (``EncodedDataset`` + ``PackedDataset``), with
    data.image_decoder=dali (1 DALI thread) against =pillow, on the same samples."""
    from megavlm.config import load_config
    from megavlm.data.build import sample_encoder
    from megavlm.data.packing import PackedDataset
    from megavlm.data.sample import Media, Message, Sample
    from megavlm.data.vlm_dataset import EncodedDataset

    samples = [Sample(id=f"b{i}", media=[Media("image", data=b)], messages=[
        Message("user", [{"type": "image", "index": 0}, {"type": "text", "text": "Describe the image."}]),
        Message("assistant", [{"type": "text", "text": "Waves of light and shade, in many colours."}])])
        for i, b in enumerate(images)]
    torch.set_num_threads(1)
    rates = {}
    for decoder in ("dali", "pillow"):
        cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal",
                                 f"data.seq_length={seq_length}", f"data.max_pixels={max_pixels}",
                                 f"data.image_decoder={decoder}", "data.decode_threads=1"])
        rows = EncodedDataset(samples + samples[:64], sample_encoder(cfg), cfg.model)  # tail: the last window
        EncodedDataset(samples[:2], sample_encoder(cfg), cfg.model).__getitems__([0, 1])  # warm-up (build)
        packed = PackedDataset(rows, seq_length=seq_length)
        t, c = time.perf_counter(), time.process_time()
        k = 0
        while packed._next < len(samples):
            packed[k]
            k += 1
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        rates[decoder] = packed._next / wall
        print(f"training input path, {decoder:6}: {rates[decoder]:6.2f} images/s on 1 thread ({packed._next} samples "
              f"into {k} rows of {seq_length}, {1e3 * cpu / packed._next:.0f} CPU-ms/image, "
              f"{1 - packed.padding_fraction():.1%} real tokens)")
    print(f"training input path ratio DALI / Pillow: {rates['dali'] / rates['pillow']:.2f}x images/s per core")
    per_reader_cost(samples, cfg, rows=len(samples) // 8)


class _DecodeToPlan:
    """The rows without ``length``: the packer decodes every sample to learn its length, as
    it did before it planned from headers."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, i):
        return self.rows[i]


def per_reader_cost(samples, cfg, *, rows: int) -> None:
    """CPU time of one reader (a DP rank, or a loader worker) serving its share of ``rows``
    packed rows, when the packer plans from header lengths against decoding every sample to
    plan. Every reader plans every row; only its own rows' samples need decoding."""
    from megavlm.data.build import sample_encoder
    from megavlm.data.packing import PackedDataset
    from megavlm.data.vlm_dataset import EncodedDataset

    for readers in (1, 2, 4, 8):
        cost = {}
        for name in ("headers", "decode"):
            source = EncodedDataset(samples, sample_encoder(cfg), cfg.model)
            packed = PackedDataset(source if name == "headers" else _DecodeToPlan(source),
                                   seq_length=cfg.data.seq_length)
            c = time.process_time()
            for k in range(0, rows, readers):
                packed[k]
            cost[name] = time.process_time() - c
        print(f"one of {readers} readers, its rows of the first {rows} x {cfg.data.seq_length} tokens: planned from headers "
              f"{cost['headers']:.2f} CPU-s, decoding to plan {cost['decode']:.2f} CPU-s "
              f"({cost['decode'] / cost['headers']:.2f}x)")


def packing_efficiency(samples: int = 2048, seq_lengths=(1024, 8192)) -> None:
    """Padding left by packing the built-in multimodal samples (rows until ``samples`` are read)."""
    from megavlm.config import load_config
    from megavlm.data.build import sample_encoder
    from megavlm.data.packing import PackedDataset
    from megavlm.data.synthetic import SyntheticMultimodalDataset
    from megavlm.data.vlm_dataset import EncodedDataset
    for seq in seq_lengths:
        cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal",
                                 f"data.seq_length={seq}", "data.min_pixels=4096", "data.max_pixels=16384"])
        rows = EncodedDataset(SyntheticMultimodalDataset(seed=0), sample_encoder(cfg), cfg.model)
        packed = PackedDataset(rows, seq_length=seq)
        k = 0
        while packed._next < samples:
            packed[k]
            k += 1
        print(f"packing {samples} synthetic samples into rows of {seq}: {packed._found} rows, "
              f"{1 - packed.padding_fraction():.1%} of tokens are real (padding {packed.padding_fraction():.1%})")


if __name__ == "__main__":
    main()
