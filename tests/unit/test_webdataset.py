"""Existing webdataset shards (plain tars and Megatron-Energon-prepared folders) as training data.

The plain tars are written with webdataset's own ``TarWriter``; the Energon folder with
``TarWriter`` plus Energon's own prepare step (``BaseWebdatasetFactory.prepare_dataset``:
``split.yaml``, ``.info.json``, ``<shard>.tar.idx``, ``index.sqlite``) and a ``dataset.yaml``
written by hand in the form ``energon prepare --sample-type VQASample --field-map ...`` writes.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
import webdataset
from PIL import Image

from megavlm.config import ConfigError, load_config, validate
from megavlm.data.batch import merge_accounting
from megavlm.data.build import sample_encoder, training_rows
from megavlm.data.sampler import MicroBatchIndices, micro_batches
from megavlm.data.vlm_dataset import BAD_REASONS, EncodedDataset
from megavlm.data.webdataset import WebdatasetSource, conversation_sample, energon_sample


def _png(size=(40, 40), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _chat(image_ref: str, answer: str) -> bytes:
    return json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": image_ref}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": answer}]}).encode()


def _plain_tars(root, *, shards=2, per_shard=5, bad=False):
    """``shards`` x ``per_shard`` good conversation samples (HF chat and LLaVA JSON + PNG);
    with ``bad``, three more in a last shard: malformed JSON, a corrupt PNG, a missing member."""
    root.mkdir()
    n = 0
    for s in range(shards):
        with webdataset.TarWriter(str(root / f"part-{s:03d}.tar")) as tar:
            for _ in range(per_shard):
                key = f"{n:06d}"
                if n % 2:
                    record = json.dumps({"conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                           {"from": "gpt", "value": f"answer {n}"}],
                                         "image": f"{key}.png"}).encode()
                else:
                    record = _chat("png", f"answer {n}")
                tar.write({"__key__": key, "json": record, "png": _png(color=(n * 20, 30, 30))})
                n += 1
    if bad:
        with webdataset.TarWriter(str(root / f"part-{shards:03d}.tar")) as tar:
            tar.write({"__key__": "bad000", "json": b"{not json", "png": _png()})
            tar.write({"__key__": "bad001", "json": _chat("png", "red"), "png": b"\x89PNG\r\n\x1a\n garbage"})
            tar.write({"__key__": "bad002", "json": _chat("jpg", "red"), "png": _png()})
    return root


def _energon(root, *, shards=2, per_shard=4, splits=(("train", 1.0),)):
    """VQA samples (``png`` + ``json`` with question/answers/weights), Energon-prepared."""
    from megatron.energon.flavors.webdataset.base_webdataset import BaseWebdatasetFactory

    root.mkdir()
    names = []
    for s in range(shards):
        names.append(f"shard_{s}.tar")
        with webdataset.TarWriter(str(root / names[-1])) as tar:
            for k in range(per_shard):
                n = s * per_shard + k
                qa = {"question": f"What is {n}?", "answers": [f"wrong {n}", f"right {n}"], "weights": [0.2, 0.8]}
                tar.write({"__key__": f"s{n:04d}", "png": _png(color=(30, n * 20, 30)), "json": json.dumps(qa).encode()})
    BaseWebdatasetFactory.prepare_dataset(root, names, split_parts_ratio=list(splits), shuffle_seed=None,
                                          workers=1)
    (root / ".nv-meta" / "dataset.yaml").write_text(
        "sample_type:\n  __module__: megatron.energon\n  __class__: VQASample\n"
        "field_map:\n  image: png\n  context: json[question]\n  answers: json[answers]\n"
        "  answer_weights: json[weights]\n")
    return root


def _global_order(source, consumed, count, dp):
    """Sample ids in global order for ``count`` samples after ``consumed`` (micro-batch 1)."""
    out = []
    ranks = [iter(MicroBatchIndices(consumed_samples=consumed, micro_batch_size=1, dp_rank=r, dp_size=dp))
             for r in range(dp)]
    while len(out) < count:
        for it in ranks:
            out += [source[i].id for i in next(it)]
    return out[:count]


def test_plain_and_energon_read_every_sample_once_and_resume_exactly(tmp_path):
    """An epoch reads each stored sample once, in a seeded order that repeats; resuming
    mid-epoch (DP=2 -> DP=1) gives exactly the remaining samples; Energon's field map and
    split/count/offset files give the VQA conversation."""
    plain = _plain_tars(tmp_path / "plain")
    energon = _energon(tmp_path / "energon")
    for path, n in ((plain, 10), (energon, 8)):
        source = WebdatasetSource(path, seed=7)
        assert len(source) == n
        epoch = _global_order(source, 0, n, dp=2)
        assert len(set(epoch)) == n  # all samples, once
        assert _global_order(WebdatasetSource(path, seed=7), 0, n, dp=1) == epoch  # deterministic
        assert epoch != sorted(epoch)  # shuffled (seed 7)
        assert _global_order(source, 4, n - 4, dp=1) == epoch[4:]  # resumed into another DP size
        assert set(_global_order(source, n, n, dp=2)) == set(epoch)  # the next epoch: all again
    sample = WebdatasetSource(energon, shuffle=False)[5]  # shard_1.tar, second sample (by .tar.idx)
    assert sample.id == "shard_1.tar/s0005"
    assert [m.role for m in sample.messages] == ["user", "assistant"]
    assert sample.messages[0].content == [{"type": "image", "index": 0}, {"type": "text", "text": "What is 5?"}]
    assert sample.messages[1].content == [{"type": "text", "text": "right 5"}]  # highest weight
    assert Image.open(io.BytesIO(sample.media[0].data)).getpixel((0, 0)) == (30, 100, 30)
    llava = WebdatasetSource(plain, shuffle=False)[7]
    assert llava.id == "part-001.tar/000007" and llava.messages[1].content == [{"type": "text", "text": "answer 7"}]
    assert Image.open(io.BytesIO(llava.media[0].data)).getpixel((0, 0)) == (140, 30, 30)


def test_corrupt_members_are_counted_by_reason(tmp_path):
    plain = _plain_tars(tmp_path / "plain", shards=1, per_shard=2, bad=True)
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=webdataset", f"data.path={plain}",
                             "data.seq_length=256", "data.min_pixels=1024", "data.max_pixels=16384",
                             "data.image_decoder=pillow"])
    validate(cfg, world_size=1)
    rows = EncodedDataset(WebdatasetSource(plain, seed=0), sample_encoder(cfg), cfg.model)
    counts = merge_accounting([rows[i] for i in range(len(rows))])
    seen, *bad = counts["sample_counts"].tolist()[: 1 + len(BAD_REASONS)]
    assert seen == 5
    assert {r: c for r, c in zip(BAD_REASONS, bad) if c} == {"bad_record": 1, "bad_image": 1, "missing_media": 1}
    notes = " ".join(counts["notes"])
    assert "part-001.tar/bad000" in notes and "malformed JSON" in notes and "'jpg' is not a member" in notes
    # the caption mappings (Energon CaptioningSample; image + txt in plain tars) encode and supervise the text
    caption = energon_sample("s/1", {"jpg": _png(), "json": b'{"text": "a red square"}', "meta.json": b"{bad"},
                             "CaptioningSample", {"image": "png,jpg", "caption": "json[text]"})
    plain_caption = conversation_sample("s/2", {"png": _png(), "txt": b"a red square"})
    for sample in (caption, plain_caption):
        assert sample.messages[1].content == [{"type": "text", "text": "a red square"}]
        encoded = sample_encoder(cfg)(sample)
        assert encoded.image_grid_thw.shape[0] == 1 and encoded.loss_mask.sum() > 0


def test_config_errors_name_the_key(tmp_path):
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=webdataset"])
    with pytest.raises(ConfigError, match="data.dataset=webdataset needs data.path"):
        validate(cfg, world_size=1)
    (tmp_path / "empty").mkdir()
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=webdataset", f"data.path={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match="holds no .tar file and no .nv-meta/"):
        validate(cfg, world_size=1)


@pytest.mark.usefixtures("single_rank_megatron")
def test_one_training_step_on_an_energon_folder(tmp_path):
    """``training_rows`` packs the Energon samples; one forward/backward/SGD step on the first
    micro-batch reaches the vision encoder and changes the loss."""
    from megatron.core.utils import unwrap_model

    from megavlm.models.build import build_model_chunks
    from megavlm.training.step import forward_step

    energon = _energon(tmp_path / "energon", shards=1, per_shard=4)
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=webdataset", f"data.path={energon}",
                             "data.seq_length=256", "data.pack=true", "data.min_pixels=1024",
                             "data.max_pixels=4096", "data.image_decoder=pillow"])
    validate(cfg, world_size=1)
    batch = next(micro_batches(training_rows(cfg), consumed_samples=0, micro_batch_size=1, dp_rank=0, dp_size=1))
    assert batch.pixel_values is not None and batch.image_grid_thw.shape[0] >= 2  # several packed samples
    (chunk,), _ = build_model_chunks(cfg)
    model = unwrap_model(chunk)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss():
        output, loss_fn = forward_step(iter([batch]), model)
        total, tokens, _ = loss_fn(output)
        return total / tokens

    before = loss()
    before.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert torch.isfinite(before) and after < before


def test_held_out_data_energon_val_split_and_rl_prompts(tmp_path):
    """Held-out data never overlaps training data: evaluation without eval.data.path reads an
    Energon folder's ``val`` split; PPO prompts hold out the val split (Energon) or the last
    ``rl.eval_prompts`` samples (plain tars). Energon VQA answers are the samples' targets."""
    from megavlm.rl.prompt_data import prompt_sources
    from megavlm.training.evaluation import eval_config

    energon = _energon(tmp_path / "energon", shards=2, per_shard=4, splits=(("train", 0.5), ("val", 0.5)))
    base = ["model.preset=qwen3vl-tiny", "data.dataset=webdataset", f"data.path={energon}"]
    cfg = load_config(None, base + ["eval.interval=2"])
    validate(cfg, world_size=1)  # no eval.data.path needed: the val split is held out
    held = eval_config(cfg)
    assert held.data.split == "val" and held.data.path == str(energon)
    train_ids = {WebdatasetSource(energon, split="train")[i].id for i in range(4)}
    val = WebdatasetSource(energon, split="val")
    val_ids = {val[i].id for i in range(len(val))}
    assert len(val) == 4 and len(train_ids) == 4 and not train_ids & val_ids
    n = int(val[0].id.rsplit("/", 1)[-1][1:])  # key s000n
    assert val[0].targets == {"answer": f"right {n}"}  # the answer of highest weight

    rl_cfg = load_config(None, base + ["model.preset=qwen3vl-tiny", "rl.eval_prompts=2"])
    train, held_out = prompt_sources(rl_cfg)
    assert {train[i].id for i in range(len(train))} == train_ids
    assert {held_out[i].id for i in range(len(held_out))} == val_ids

    plain = _plain_tars(tmp_path / "plain")
    plain_cfg = load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=webdataset", f"data.path={plain}",
                                   "rl.eval_prompts=3"])
    train, held_out = prompt_sources(plain_cfg)
    assert len(train) == 7 and len(held_out) == 3
    assert not {train[i].id for i in range(7)} & {held_out[i].id for i in range(3)}
    with pytest.raises(ConfigError, match="data.split=val needs"):
        validate(load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=webdataset", f"data.path={plain}",
                                    "data.split=val"]), world_size=1)
    with pytest.raises(ConfigError, match="needs eval.data.path"):
        validate(load_config(None, ["model.preset=qwen3vl-tiny", "data.dataset=webdataset", f"data.path={plain}",
                                    "eval.interval=2"]), world_size=1)
