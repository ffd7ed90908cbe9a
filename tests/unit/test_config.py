"""Config loading, overrides and validation: each rule fails with a message naming the key,
before any process group exists."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from megavlm.config import ConfigError, load_config, validate
from megavlm.config import presets


def _cfg(*overrides, preset="qwen3-tiny"):
    return load_config(None, [f"model.preset={preset}", *overrides])


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {preset: qwen3-tiny}\ntrain: {lr: 1.0e-3, iters: 10}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {iters: 20}\n")
    cfg = load_config(tmp_path / "child.yaml", ["parallel.tp=2", "train.lr=1e-5", "model.language.num_layers=8"])
    assert (cfg.train.iters, cfg.train.lr, cfg.parallel.tp) == (20, 1e-5, 2)
    assert cfg.model.language.num_layers == 8 and cfg.model.language.hidden_size == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ("paralel.tp=2", "did you mean 'parallel'"),
        ("parallel.tpp=2", "did you mean 'parallel.tp'"),
        ("train.iters=ten", "train.iters: expected an integer"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel: expected true or false"),
        ("model.language.moe={topk: 2}", "missing required config key(s): model.language.moe.num_experts"),
    ],
)
def test_bad_keys_and_types(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(override)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tp=3"], 3, r"num_attention_heads \(4\) must be a multiple of parallel.tp \(3\)"),
        (["parallel.tp=4"], 4, r"num_query_groups \(2\) must be a multiple of parallel.tp \(4\)"),
        (["parallel.pp=3"], 3, r"num_layers \(4\) must be a multiple of parallel.pp x parallel.vpp"),
        (["parallel.pp=2", "parallel.vpp=4"], 2, r"num_layers \(4\) must be a multiple of parallel.pp x parallel.vpp \(2 x 4 = 8\)"),
        (["parallel.vpp=2"], 1, r"parallel.vpp=2 needs parallel.pp >= 2"),
        (["parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=6", "train.micro_batch_size=2"], 2,
         r"number of micro-batches \(3 = global / \(micro x DP\)\) to be a multiple of parallel.pp \(2\)"),
        (["parallel.tp=2", "model.language.vocab_size=255"], 2, r"vocab_size \(255\) must be a multiple of parallel.tp \(2\)"),
        (["parallel.tp=2"], 3, r"world size 3 must equal parallel.tp x parallel.pp x parallel.cp x DP"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, r"train.global_batch_size \(6\) must be a multiple of train.micro_batch_size x DP"),
        (["train.global_batch_size=8", "train.micro_batch_size=2"], 3, r"must be a multiple of train.micro_batch_size x DP \(2 x 3\)"),
        (["parallel.cp=2"], 2, r"parallel.cp=2 with model.rope.kind=rope needs Transformer Engine"),
        (["parallel.sequence_parallel=true"], 1, r"sequence_parallel=true needs parallel.tp > 1"),
        (["parallel.ep=2"], 2, r"parallel.ep=2 needs a MoE model"),
        (["model.init=random"], 1, r"model.init: 'random' is not one of layout_invariant, megatron"),
        (["model.fp8.format=hybrid"], 1, r"model.fp8.format='hybrid': FP8 needs a CUDA GPU"),
        (["model.fp8.format=e4m3", "model.language.ffn_hidden_size=120"], 1,
         r"model.language.ffn_hidden_size / parallel.tp = 120 must be a multiple of 16 for FP8 GEMMs"),
        (["data.seq_length=8192"], 1, r"data.seq_length \(8192\) exceeds model.language.max_position_embeddings"),
        (["checkpoint.async_save=true"], 1, r"checkpoint.async_save=true needs checkpoint.save"),
    ],
)
def test_validation_rules(overrides, world, message):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)
    assert not dist.is_initialized()


def test_moe_rules():
    with pytest.raises(ConfigError, match=r"num_experts \(4\) must be a multiple of parallel.ep \(3\)"):
        validate(_cfg("parallel.ep=3", preset="qwen3-moe-tiny"), 3)
    with pytest.raises(ConfigError, match="needs parallel.sequence_parallel=true"):
        validate(_cfg("parallel.ep=2", "parallel.tp=2", preset="qwen3-moe-tiny"), 4)
    validate(_cfg("parallel.ep=2", preset="qwen3-moe-tiny"), 2)


def test_presets_have_published_shapes():
    q8 = presets.get("qwen3-8b").language
    assert (q8.num_layers, q8.hidden_size, q8.ffn_hidden_size, q8.num_attention_heads, q8.num_query_groups) == (36, 4096, 12288, 32, 8)
    moe = presets.get("qwen3-30b-a3b").language
    assert (moe.num_layers, moe.moe.num_experts, moe.moe.topk, moe.moe.ffn_hidden_size) == (48, 128, 8, 768)
    with pytest.raises(ValueError, match="unknown preset 'qwen9'"):
        presets.get("qwen9")


def test_bad_config_fails_in_cli_before_process_group(tmp_path):
    """The CLI validates before starting any process group: no torchrun needed to see it."""
    import subprocess, sys

    proc = subprocess.run(
        [sys.executable, "tools/pretrain_vlm.py", "--config", "examples/tiny/pretrain.yaml", "parallel.tp=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "num_attention_heads (4) must be a multiple of parallel.tp (3)" in proc.stderr


def test_every_example_recipe_loads():
    """Recipes stay in sync with the config schema (validation needs their GPU world)."""
    from pathlib import Path

    recipes = sorted(Path("examples").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        cfg = load_config(recipe)
        if "tools/pacore.py" in recipe.read_text():  # overrides on the loaded model's own config
            continue
        assert cfg.model.language is not None, recipe
