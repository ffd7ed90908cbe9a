"""tools/convert_checkpoint.py and checkpoint.pretrained, end to end, against HF transformers.

HF -> megavlm (imported at TP=2 x PP=2, or EP=2 for MoE) -> HF must be bit-exact for every
tensor; a fine-tuned checkpoint exported to HF must give transformers the logits megavlm's
own --dump-logits gives; generation from a converted checkpoint with a real tokenizer.json
must give HF's greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from megavlm.checkpointing import checkpoint_dir
from megavlm.config import ConfigError
from megavlm.config.loader import load_config_data
from megavlm.conversion.hf_checkpoint import InMemoryTensors, write_hf_model_dir
from megavlm.conversion.pretrained import resolve_pretrained
from megavlm.data.tokenizer import synthetic_tokenizer
from tests.parity.qwen3vl_case import CASES, hf_logits, hf_model, processor_inputs, tiny_config

REPO = Path(__file__).parents[2]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}, "PYTHONWARNINGS": "ignore",
       "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0"]
LOGITS_TOL = 1e-4


def run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def run_together(*cmds: list[str]) -> list[subprocess.CompletedProcess]:
    """Independent commands at the same time: each is one process that mostly imports torch and
    megatron-core on one core, so two of them keep both cores of a small machine busy."""
    with ThreadPoolExecutor(len(cmds)) as pool:
        return list(pool.map(run, cmds))


def hf_dir(tmp: Path, preset: str, extra: list[str] = ()) -> tuple[Path, torch.nn.Module]:
    """A tiny random HF Qwen3-VL(-MoE) model with a real tokenizer.json (built with `tokenizers`)."""
    cfg = tiny_config(preset, list(extra))
    model = hf_model(cfg)
    path = tmp / "hf"
    model.save_pretrained(path)
    synthetic_tokenizer().backend.save(str(path / "tokenizer.json"))
    return path, model


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def convert(hf: Path, out: Path, nproc: int, layout: list[str]) -> Path:
    run(TORCHRUN + [f"--nproc_per_node={nproc}", "tools/convert_checkpoint.py", "import", "--hf", str(hf),
                    "--out", str(out), *layout])
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """qwen3vl-tiny (untied) imported at TP=2 x PP=2 and exported in small shards."""
    tmp = tmp_path_factory.mktemp("dense")
    hf, model = hf_dir(tmp, "qwen3vl-tiny")
    ckpt = convert(hf, tmp / "ckpt", 4, ["parallel.tp=2", "parallel.pp=2"])
    run([sys.executable, "tools/convert_checkpoint.py", "export", "--load", str(ckpt), "--out", str(tmp / "back"),
         "--max-shard-bytes", "200000"])
    return hf, model, ckpt, tmp / "back"


def test_dense_round_trip_through_tp2_pp2_is_bit_exact(dense):
    hf, model, ckpt, back = dense
    original, exported = all_tensors(hf), all_tensors(back)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # several shards with HF's index, and the files that travel with the model
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in back.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(original)
    assert (ckpt / "iter_0000000" / "hf_assets" / "tokenizer.json").is_file()
    assert (back / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert (back / "generation_config.json").is_file()
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(back)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_moe_tied_round_trip_through_ep2_is_bit_exact(tmp_path):
    hf, _ = hf_dir(tmp_path, "qwen3vl-moe-tiny", ["model.language.tie_embeddings=true"])
    ckpt = convert(hf, tmp_path / "ckpt", 2, ["parallel.ep=2"])
    run([sys.executable, "tools/convert_checkpoint.py", "export", "--load", str(ckpt), "--out", str(tmp_path / "back")])
    original, exported = all_tensors(hf), all_tensors(tmp_path / "back")
    assert "lm_head.weight" not in exported  # tied: the embedding is the output layer
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    assert set(original) - set(exported) <= {"lm_head.weight"}


def test_generate_from_a_converted_checkpoint_equals_hf_generate(dense, tmp_path):
    """Real tokenizer.json, an image, greedy: tools/generate.py's answer is HF generate's."""
    hf, model, ckpt, _ = dense
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(image)
    prompt = "How many red shapes?"
    proc = run([sys.executable, "tools/generate.py", "--load", str(ckpt), "--prompt", prompt, "--image", str(image),
                "--max-new-tokens", "6"])
    ours = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""

    from megavlm.data.build import sample_encoder
    from megavlm.data.sample import Media, Message, Sample
    from megavlm.training.config import training_config

    cfg = training_config(None, [f"checkpoint.pretrained={hf}", "data.seq_length=4096"], log=lambda m: None)
    encoder = sample_encoder(cfg)
    sample = Sample(id="p", messages=[Message("user", [{"type": "image", "index": 0}, {"type": "text", "text": prompt}])],
                    media=[Media("image", path=str(image))])
    tokens, media = encoder.prompt(sample)
    tok = encoder.template.tok
    stop = tok.token_id("<|im_end|>")
    ids = tokens[None]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=media["pixel_values"],
            image_grid_thw=media["image_grid_thw"], mm_token_type_ids=(ids == cfg.model.token_ids.image_token_id).int(),
            max_new_tokens=6, do_sample=False, eos_token_id=stop, pad_token_id=0,
        )
    theirs = tok.decode([t for t in out[0, ids.shape[1]:].tolist() if t != stop])
    assert ours == theirs.strip() or ours == theirs


def test_pretrained_finetune_export_gives_hf_our_logits(tmp_path):
    """HF dir -> checkpoint.pretrained -> 3 steps at TP=2+SP -> export -> transformers' logits on
    an image + video sample equal tools/generate.py --dump-logits of the fine-tuned checkpoint,
    which reads the TP=2 checkpoint in one process. (A prompt answered from a TP=2 x PP=2
    checkpoint in one process, as `make demo` prints, is test_generate_from_a_converted_checkpoint.)"""
    hf, _ = hf_dir(tmp_path, "qwen3vl-tiny")
    ckpt = tmp_path / "ft"
    train = TORCHRUN + ["--nproc_per_node=2", "tools/pretrain_vlm.py", "--config", "examples/tiny/pretrain_vlm.yaml",
                        f"checkpoint.pretrained={hf}", "parallel.tp=2", "parallel.sequence_parallel=true",
                        "train.iters=3", "train.global_batch_size=2",
                        f"checkpoint.save={ckpt}", f"logging.dir={tmp_path / 'log'}", "logging.tensorboard=false"]
    proc = run(train)
    assert "gives way to the model of checkpoint.pretrained" in proc.stdout
    assert "fresh optimizer, iteration 0" in proc.stdout
    cfg = tiny_config("qwen3vl-tiny")
    inputs = processor_inputs(cfg, CASES["images_video"])
    torch.save(inputs, tmp_path / "inputs.pt")
    # export, --dump-logits and the resume below all at once: the first two read the step-3
    # checkpoint by name, so the resumed run's step-4 save in the same folder cannot reach them
    step3 = checkpoint_dir(ckpt, 3)
    # resume wins over pretrained: the same command with checkpoint.load continues at iteration 3
    resume = train[:-3] + ["train.iters=4", f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}",
                           f"logging.dir={tmp_path / 'log2'}", "logging.tensorboard=false"]
    _, _, resumed = run_together(
        [sys.executable, "tools/convert_checkpoint.py", "export", "--load", str(step3), "--out", str(tmp_path / "out")],
        [sys.executable, "tools/generate.py", "--load", str(step3), "--inputs", str(tmp_path / "inputs.pt"),
         "--dump-logits", str(tmp_path / "logits.pt")],
        resume,
    )
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # carried by the fine-tuning run's saves
    ours = torch.load(tmp_path / "logits.pt")
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    exported.config._attn_implementation = "eager"
    theirs = hf_logits(exported, inputs)
    keep = inputs["attention_mask"].bool()
    assert (ours[keep] - theirs[keep]).abs().max().item() <= LOGITS_TOL
    # and the weights did train: the export differs from the starting point
    assert not all(torch.equal(a, b) for a, b in zip(all_tensors(hf).values(), all_tensors(tmp_path / "out").values()))
    assert "at iteration 3" in resumed.stdout and "fresh optimizer" not in resumed.stdout


# --- precise errors, nothing partial -------------------------------------------------------------

@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return hf_dir(tmp_path_factory.mktemp("small"), "qwen3vl-tiny")[0]


def test_pretrained_contradicting_override_is_refused_by_name(small_hf):
    data = load_config_data(None, [f"checkpoint.pretrained={small_hf}", "model.preset=qwen3vl-tiny",
                                   "model.language.num_layers=3"])
    with pytest.raises(ConfigError, match=r"model\.language\.num_layers=3 contradicts checkpoint\.pretrained"):
        resolve_pretrained(data, log=lambda m: None)
    # run-time keys stay the user's; equal values are no contradiction
    layers = resolve_pretrained(load_config_data(None, [f"checkpoint.pretrained={small_hf}"]), log=lambda m: None)
    cfg = resolve_pretrained(load_config_data(None, [
        f"checkpoint.pretrained={small_hf}", f"model.language.num_layers={layers.model.language.num_layers}",
        "model.freeze=[vision]"]), log=lambda m: None)
    assert cfg.model.freeze == ["vision"] and cfg.data.tokenizer == str(small_hf / "tokenizer.json")


def test_import_refuses_model_overrides_and_a_used_output(small_hf, tmp_path):
    """Both fail before any process group starts."""
    from megavlm.conversion.convert import import_hf

    with pytest.raises(ConfigError, match=r"'model.language.num_layers=2' is not allowed"):
        import_hf(small_hf, tmp_path / "x", ["model.language.num_layers=2"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("user data")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        import_hf(small_hf, tmp_path / "x")
    assert (tmp_path / "x" / "keep").read_text() == "user data"


def test_export_errors_name_the_key_and_leave_nothing(tmp_path):
    cfg = tiny_config("qwen3vl-tiny")
    from megavlm.conversion.engine import hf_to_megavlm
    from megavlm.conversion.qwen3vl import qwen3vl_rules

    full = hf_to_megavlm(hf_model(cfg).state_dict(), qwen3vl_rules(cfg.model), num_layers=cfg.model.language.num_layers)
    missing = {k: v for k, v in full.items() if k != "vision.merger.norm.weight"}
    with pytest.raises(KeyError, match="vision.merger.norm.weight"):
        write_hf_model_dir(tmp_path / "a", cfg.model, InMemoryTensors(missing))
    extra = {**full, "language.mystery.weight": torch.zeros(2, 2)}
    with pytest.raises(KeyError, match=r"unexpected megavlm tensor 'language\.mystery\.weight'"):
        write_hf_model_dir(tmp_path / "b", cfg.model, InMemoryTensors(extra))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_import_errors_name_missing_unexpected_and_misshapen_tensors(small_hf, tmp_path):
    from safetensors.torch import save_file

    from megavlm.conversion.hf_checkpoint import open_hf_model_dir

    tensors = all_tensors(small_hf)
    for name, change, message in [
        ("missing", lambda t: t.pop("model.visual.merger.norm.weight"), "missing tensor 'model.visual.merger.norm.weight'"),
        ("unexpected", lambda t: t.update({"model.visual.extra.weight": torch.zeros(1)}), "unexpected tensor 'model.visual.extra.weight'"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((small_hf / "config.json").read_text())
        broken = dict(tensors)
        change(broken)
        save_file(broken, str(folder / "model.safetensors"))
        with pytest.raises(KeyError, match=message):
            open_hf_model_dir(folder)


def test_a_misshapen_tensor_names_the_key_and_both_shapes(single_rank_megatron):
    from megatron.core.utils import unwrap_model

    from megavlm.conversion.load_weights import load_hf_tensors
    from megavlm.models.build import build_model_chunks

    cfg = tiny_config("qwen3vl-tiny", ["model.init=megatron"])
    (chunk,), _ = build_model_chunks(cfg)
    tensors = dict(hf_model(cfg).state_dict())
    tensors["model.visual.merger.linear_fc2.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"vision\.merger\.linear_fc2\.bias: the HF weights give shape \[7\] but the model has \[\d+\]"):
        load_hf_tensors([unwrap_model(chunk)], cfg.model, tensors)


def test_step3vl_released_layout_round_trip_through_tp2_is_bit_exact(single_rank_megatron, tmp_path):
    """STEP3-VL's released naming (vision_model.*, vit_large_projector, model.*, lm_head) through
    the CLI at TP=2: every tensor comes back bit-exact, with the STEP3-VL config.json."""
    from safetensors.torch import save_file

    from megavlm.conversion.hf_config import hf_config_from_model
    from tests.parity.test_step3vl import _config, _released_weights

    cfg = _config(tie=False)
    released = _released_weights(cfg)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(released, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({**hf_config_from_model(cfg.model), "transformers_version": "5.24.0"}))
    ckpt = convert(hf, tmp_path / "ckpt", 2, ["parallel.tp=2"])
    run([sys.executable, "tools/convert_checkpoint.py", "export", "--load", str(ckpt), "--out", str(tmp_path / "back")])
    exported = all_tensors(tmp_path / "back")
    assert exported.keys() == released.keys()
    assert all(torch.equal(exported[k], released[k]) for k in released)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == \
        json.loads((hf / "config.json").read_text())["architectures"]
