"""Fuzzing the data path: generated bad samples of every kind through prepare_data and the
training rows, no crash, each counted under its reason.

``python -m tests.unit.test_data_fuzz 1000`` runs the full campaign (1,000 bad samples plus
good ones, through ``tools/prepare_data.py`` and ``tools/pretrain_vlm.py``) and prints the
table by reason; the test below runs the same generator, smaller, in process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

# kind -> (stage, expected reason): "prepare" records are dropped by prepare_data, "train"
# samples reach the shards and are skipped by the encoder, "ok" ones decode (via a fallback).
KINDS = {
    "truncated_jpeg": ("train", "bad_image"),
    "garbage_image": ("train", "bad_image"),
    "zero_size_image": ("train", "bad_image"),
    "huge_image": ("train", "image_too_large"),
    "tiny_image": ("train", "image_too_small"),
    "cmyk_jpeg": ("ok", "images_pillow"),
    "png_16bit": ("ok", "images_pillow"),
    "broken_video": ("train", "bad_video"),
    "empty_video": ("train", "bad_video"),
    "unknown_role": ("train", "bad_record"),
    "too_long": ("train", "too_long"),
    "malformed_json": ("prepare", "malformed_json"),
    "placeholder_mismatch": ("prepare", "media_mismatch"),
    "empty_conversation": ("prepare", "empty_conversation"),
    "invalid_utf8": ("prepare", "invalid_utf8"),
    "missing_media": ("prepare", "missing_media"),
}


def _media_files(root: Path) -> dict[str, str]:
    """One file per bad medium (records share them): name -> path relative to root."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(good, "JPEG", quality=90)
    files = {
        "good.jpg": good.getvalue(),
        "truncated.jpg": good.getvalue()[: len(good.getvalue()) // 2],
        "garbage.png": rng.bytes(2048),
        "zero.jpg": b"",
        "broken.mp4": b"\x00\x00\x00\x18ftypmp42" + rng.bytes(4096),
        "empty.mp4": b"",
    }
    for name, (mode, size, fmt) in {"huge.png": ("RGB", (6000, 6000), "PNG"), "tiny.png": ("RGB", (4, 4), "PNG"),
                                    "cmyk.jpg": ("CMYK", (80, 64), "JPEG")}.items():
        buf = io.BytesIO()
        Image.new(mode, size, (10, 200, 30, 0)[: len(mode)]).save(buf, fmt)
        files[name] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(buf, "PNG")
    files["deep.png"] = buf.getvalue()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: f"media/{name}" for name in files}


def _hf(media: str | None, kind: str = "image", text: str = "What is it?", role: str = "user") -> str:
    content = ([{"type": kind, kind: media}] if media else []) + [{"type": "text", "text": text}]
    return json.dumps({"messages": [{"role": role, "content": content}, {"role": "assistant", "content": "it"}]})


def write_fuzz_inputs(root: Path, n_bad: int, n_good: int) -> tuple[Path, Counter]:
    """A JSONL of ``n_bad`` bad records (kinds in turn) and ``n_good`` good ones; returns it
    and the expected count per (stage, reason)."""
    m = _media_files(root / "media")
    line = {
        "truncated_jpeg": lambda: _hf(m["truncated.jpg"]), "garbage_image": lambda: _hf(m["garbage.png"]),
        "zero_size_image": lambda: _hf(m["zero.jpg"]), "huge_image": lambda: _hf(m["huge.png"]),
        "tiny_image": lambda: _hf(m["tiny.png"]), "cmyk_jpeg": lambda: _hf(m["cmyk.jpg"]),
        "png_16bit": lambda: _hf(m["deep.png"]), "broken_video": lambda: _hf(m["broken.mp4"], "video"),
        "empty_video": lambda: _hf(m["empty.mp4"], "video"), "unknown_role": lambda: _hf(m["good.jpg"], role="robot"),
        "too_long": lambda: _hf(None, text="word " * 600),
        "malformed_json": lambda: _hf(m["good.jpg"])[:-7],
        "placeholder_mismatch": lambda: json.dumps({"image": m["good.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "yes"}]}),
        "empty_conversation": lambda: json.dumps({"messages": []}),
        "invalid_utf8": lambda: _hf(m["good.jpg"], text="caf@@"),  # @@ -> a lone 0xE9 byte below
        "missing_media": lambda: _hf("media/nowhere.png"),
    }
    names = list(KINDS)
    lines, expected = [], Counter()
    for i in range(n_bad):
        kind = names[i % len(names)]
        text = line[kind]()
        lines.append(text.encode().replace(b"@@", b"\xe9"))
        expected[KINDS[kind]] += 1
    lines += [_hf(m["good.jpg"]).encode()] * n_good
    expected[("ok", "images_dali")] += n_good
    path = root / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected


def run_rows(shards: Path, overrides: list[str]) -> Counter:
    """Every prepared sample through the training rows, a loader step (8) at a time."""
    from megavlm.config import load_config
    from megavlm.data.build import sample_encoder
    from megavlm.data.shards import ShardDataset
    from megavlm.data.vlm_dataset import COUNT_NAMES, EncodedDataset

    cfg = load_config("examples/tiny/pretrain_vlm.yaml", ["data.dataset=shards", f"data.path={shards}", *overrides])
    source = ShardDataset(shards)
    rows = EncodedDataset(source, sample_encoder(cfg), cfg.model)
    total = np.zeros(len(COUNT_NAMES))
    for start in range(0, len(source), 8):
        for row in rows.__getitems__(list(range(start, min(start + 8, len(source))))):
            total += row.sample_counts.numpy()
    return Counter({name: int(c) for name, c in zip(COUNT_NAMES, total) if c})


def test_fuzzed_samples_are_counted_by_reason(tmp_path):
    """48 bad records (3 of each of the 16 kinds) + 8 good: prepare drops the record-level ones
    by reason; the rest reach the shards and are skipped (or decoded by a counted fallback) by
    the training path, each under its reason; nothing raises."""
    from megavlm.data.shards import prepare

    jsonl, expected = write_fuzz_inputs(tmp_path, n_bad=3 * len(KINDS), n_good=8)
    written, bad = prepare(tmp_path / "shards", inputs=[str(jsonl)], seed=0)
    assert {r: len(w) for r, w in bad.items()} == {r: c for (stage, r), c in expected.items() if stage == "prepare"}
    counts = run_rows(tmp_path / "shards", [])
    assert counts["seen"] == written
    for (stage, reason), c in expected.items():
        if stage != "prepare":
            assert counts[reason] == c, (reason, counts)


def main(n_bad: int) -> None:
    """The full campaign: prepare_data and pretrain_vlm CLIs, the table by reason."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="megavlm-fuzz-"))
    n_good = n_bad // 4
    jsonl, expected = write_fuzz_inputs(root, n_bad, n_good)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}, "PYTHONWARNINGS": "ignore"}
    prep = subprocess.run([sys.executable, "tools/prepare_data.py", "--input", str(jsonl), "--output",
                           str(root / "shards")], capture_output=True, text=True, env=env)
    assert prep.returncode == 0, prep.stderr
    from megavlm.data.shards import ShardDataset

    written = len(ShardDataset(root / "shards"))
    prepared = Counter()
    for ln in prep.stderr.splitlines():
        if ln.startswith("skipped "):
            _, count, reason = ln.split(":")[0].split()[:3]
            prepared[reason] = int(count)
    gbs = 16
    iters = -(-written // gbs)
    train = subprocess.run(
        [sys.executable, "tools/pretrain_vlm.py", "--config", "examples/tiny/pretrain_vlm.yaml", "data.dataset=shards",
         f"data.path={root / 'shards'}", "data.pack=false", "train.micro_batch_size=1", f"train.global_batch_size={gbs}",
         f"train.iters={iters}", "checkpoint.save=null", f"logging.dir={root / 'run'}", "logging.tensorboard=false",
         "data.max_bad_fraction=1.0", "data.num_workers=2"], capture_output=True, text=True, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    last = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    trained = Counter({k.split("/", 1)[1]: int(v) for k, v in last.items() if k.startswith(("bad/", "decode/"))})
    print(f"{n_bad} bad + {n_good} good records; {written} written to shards; {iters} training steps x {gbs} "
          f"samples ({iters * gbs - written} samples seen twice, wrapping around)")
    print(f"{'kind':22} {'stage':8} {'reason':20} {'expected':>8} {'counted':>8}")
    for kind, (stage, reason) in KINDS.items():
        n = expected[(stage, reason)]
        got = prepared[reason] if stage == "prepare" else trained[reason]
        print(f"{kind:22} {stage:8} {reason:20} {n:8d} {got:8d}")
    print(f"{'good':22} {'ok':8} {'images_dali':20} {n_good:8d} {trained['images_dali']:8d}")
    print("training metrics:", {k: v for k, v in last.items() if k.startswith(("bad", "decode"))})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
