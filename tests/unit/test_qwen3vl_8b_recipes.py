"""The Qwen3-VL-8B stage recipes (examples/qwen3vl_8b/): they load, follow the staged schedule
(stage 0 trains the mergers only; 8K, 8K, 32K, 256K tokens), and each recipe's parallel layout is
one megavlm accepts on the 64 GPUs it is written for (megavlm.planning.layout.check_layout, which
validates with CP folded away, so the check does not depend on Transformer Engine being here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megavlm.config import load_config, validate
from megavlm.planning.layout import Layout, check_layout
from megavlm.planning.models import get_model

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "qwen3vl_8b"
GPUS = 64  # 8 nodes x 8 H100-80GB
STAGES = {  # recipe -> tokens per sequence (Qwen3-VL's staged pretraining)
    "stage0_mergers_8k.yaml": 8192,
    "stage1_full_8k.yaml": 8192,
    "stage2_32k.yaml": 32768,
    "stage3_256k.yaml": 262144,
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_recipe_loads_with_its_sequence_length_and_a_valid_layout(name):
    cfg = load_config(RECIPES / name)
    assert cfg.data.seq_length == STAGES[name]
    assert cfg.data.seq_length <= cfg.model.language.max_position_embeddings
    assert cfg.data.dataset == "shards" and cfg.data.pack
    recompute = cfg.train.recompute.granularity or "none"
    layout = Layout.from_config(cfg, recompute=recompute)
    errors = check_layout(
        get_model("qwen3vl-8b"), layout, gpus=GPUS, seq_length=cfg.data.seq_length,
        global_batch_size=cfg.train.global_batch_size,
    )
    assert errors == [], f"{name}: {errors}"
    # check_layout validates with CP folded away and without the uneven pipeline split
    # (parallel.first_stage_layers); the full config on 64 ranks covers those keys too. Without
    # TE, megavlm's ring attention takes these CP layouts (MRoPE, p2p), so nothing is skipped here.
    validate(cfg, GPUS)
    assert layout.dp(GPUS) * layout.tp * layout.pp * layout.cp == GPUS


def test_stage0_trains_only_the_mergers_and_later_stages_start_from_the_previous_one():
    names = list(STAGES)
    cfgs = [load_config(RECIPES / n) for n in names]
    assert sorted(cfgs[0].model.freeze) == ["language", "vision"]
    assert cfgs[0].checkpoint.pretrained == "/models/Qwen3-VL-8B-Instruct"
    for prev, cfg in zip(cfgs, cfgs[1:]):
        assert cfg.model.freeze == []
        assert cfg.checkpoint.pretrained == prev.checkpoint.save
