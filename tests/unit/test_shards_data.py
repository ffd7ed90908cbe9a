"""Sample formats -> shards -> training rows, with every kind of bad input counted by reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megavlm.config import load_config
from megavlm.data.build import sample_encoder
from megavlm.data.shards import ShardDataset, prepare
from megavlm.data.batch import merge_accounting
from megavlm.data.sampler import micro_batches
from megavlm.data.vlm_dataset import BAD_REASONS, EncodedDataset
from megavlm.training.loop import DataQualityError, _check_bad_samples

# a fresh process picks its own rendezvous port (not the one of this pytest process)
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}, "PYTHONWARNINGS": "ignore"}


def _png(path, size=(64, 64), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path.name


def _write_inputs(tmp_path):
    (tmp_path / "img").mkdir()
    good = _png(tmp_path / "img" / "red.png")
    hf = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": f"img/{good}"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"}]}
    llava = {"id": "llava-1", "image": f"img/{good}", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]}
    corrupt = tmp_path / "img" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = tmp_path / "img" / "truncated.png"
    full = tmp_path / "img" / "full.png"
    _png(full, (96, 96))
    truncated.write_bytes(full.read_bytes()[:60])
    tiny = _png(tmp_path / "img" / "tiny.png", (4, 4))
    huge = _png(tmp_path / "img" / "huge.png", (1100, 1000))
    (tmp_path / "img" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))

    def hf_image(name, text="Colour?"):
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": f"img/{name}"},
                                                          {"type": "text", "text": text}]},
                             {"role": "assistant", "content": "red"}]}

    bad_video = {"messages": [{"role": "user", "content": [{"type": "video", "video": "img/noise.mp4"},
                                                           {"type": "text", "text": "Motion?"}]},
                              {"role": "assistant", "content": "left"}]}
    lines = [json.dumps(hf), json.dumps(llava)] * 3 + [
        "{not json",  # malformed_json (prepare)
        json.dumps(hf_image("missing.png")),  # missing_media (prepare)
        json.dumps(hf_image("corrupt.png")), json.dumps(hf_image("truncated.png")),  # bad_image x2
        json.dumps(hf_image(tiny)), json.dumps(hf_image(huge)),  # image_too_small, image_too_large
        json.dumps(hf_image(good, text="word " * 400)),  # too_long
        json.dumps(bad_video),  # bad_video
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.jsonl"


def test_formats_prepare_and_bad_input_accounting(tmp_path):
    src = _write_inputs(tmp_path)
    written, bad = prepare(tmp_path / "shards", inputs=[str(src)], shard_size=4, seed=1)
    assert written == 12 and {k: len(v) for k, v in bad.items()} == {"malformed_json": 1, "missing_media": 1}
    assert "data.jsonl:7" in bad["malformed_json"][0]
    data = ShardDataset(tmp_path / "shards")
    assert len(data) == 12 and len(list((tmp_path / "shards").glob("shard-*.tar"))) == 3
    by_id = {data[i].id: data[i] for i in range(len(data))}
    llava = by_id["llava-1"]
    assert [m.role for m in llava.messages] == ["user", "assistant"]
    assert llava.messages[0].content == [{"type": "image", "index": 0}, {"type": "text", "text": "What colour is it?"}]
    assert llava.media[0].data == (tmp_path / "img" / "red.png").read_bytes()  # relative path resolved

    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=shards", f"data.path={tmp_path / 'shards'}",
                             "data.seq_length=256", "data.min_pixels=4096", "data.max_pixels=16384"])
    rows = EncodedDataset(data, sample_encoder(cfg), cfg.model)
    counts = merge_accounting([rows[i] for i in range(len(rows))])  # what batches carry to the trainer
    seen, *bad = counts["sample_counts"].tolist()
    assert seen == 12 and sum(rows[i].tokens.shape[-1] > 0 for i in range(len(rows))) == 6
    assert {r: c for r, c in zip(BAD_REASONS, bad) if c} == {
        "bad_image": 2, "image_too_small": 1, "image_too_large": 1, "too_long": 1, "bad_video": 1}
    assert len(counts["notes"]) == 6 and all(n.startswith("sample ") for n in counts["notes"])
    metrics = _check_bad_samples(cfg, [100.0, 1.0] + [0.0] * 7, counts["notes"])  # 1% is tolerated
    assert metrics["bad_samples"] == 1 and metrics["bad/bad_image"] == 1
    with pytest.raises(DataQualityError, match=r"2 of 100 samples were bad .* examples on this rank: \['sample "):
        _check_bad_samples(cfg, [100.0, 2.0] + [0.0] * 7, counts["notes"])


def test_training_on_bad_shards_counts_every_reason(tmp_path):
    """12 samples, 6 bad: 3 steps of 4 padded samples see them all; nothing stops the run."""
    prepare(tmp_path / "shards", inputs=[str(_write_inputs(tmp_path))], seed=1)
    proc = subprocess.run(
        [sys.executable, "tools/pretrain_vlm.py", "--config", "examples/tiny/pretrain_vlm.yaml", "data.dataset=shards",
         f"data.path={tmp_path / 'shards'}", "data.pack=false", "train.micro_batch_size=1", "train.global_batch_size=4",
         "train.iters=3", "checkpoint.save=null", f"logging.dir={tmp_path / 'run'}", "logging.tensorboard=false",
         "data.num_workers=2"],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bad_samples"] == 6
    assert {k: v for k, v in last.items() if k.startswith("bad/")} == {
        "bad/bad_image": 2, "bad/bad_video": 1, "bad/image_too_small": 1, "bad/image_too_large": 1, "bad/too_long": 1}


def test_order_is_the_same_with_workers_and_after_resume(tmp_path):
    """DP=2 x 2 loader workers: the micro-batches equal the in-process ones, and resuming
    at consumed_samples=k gives exactly the tail of the uninterrupted sequence, also into
    DP=1 x 3 workers (the loader state is one integer, the same on every DP rank)."""
    prepare(tmp_path, synthetic=40, seed=3)
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=shards", f"data.path={tmp_path}",
                             "data.seq_length=256", "data.min_pixels=4096", "data.max_pixels=16384"])
    rows = EncodedDataset(ShardDataset(tmp_path), sample_encoder(cfg), cfg.model)

    def tokens(consumed, rank, workers, n, dp=2):
        it = micro_batches(rows, consumed_samples=consumed, micro_batch_size=1, dp_rank=rank, dp_size=dp,
                           num_workers=workers)
        return [next(it).tokens.tolist() for _ in range(n)]

    full = {rank: tokens(0, rank, 0, 6) for rank in (0, 1)}
    for rank in (0, 1):
        assert tokens(0, rank, 2, 6) == full[rank]
        assert tokens(6, rank, 2, 3) == full[rank][3:]  # resumed after 3 global batches of 2
    # global order of the DP=2 run: batch k holds rank 0's then rank 1's k-th micro-batch
    global_order = [full[rank][k] for k in range(6) for rank in (0, 1)]
    assert tokens(6, 0, 3, 6, dp=1) == global_order[6:]  # DP=2 x 2 workers -> DP=1 x 3 workers
    assert len({str(t) for t in global_order}) == 12  # twelve distinct samples, none repeated


def test_prepare_data_cli_writes_synthetic_shards(tmp_path):
    proc = subprocess.run([sys.executable, "tools/prepare_data.py", "--synthetic", "20", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 20 samples" in proc.stdout and len(ShardDataset(tmp_path)) == 20
