"""MFU from the planner's formulas (checked against a hand count), exit rules, timeouts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megavlm.config import ConfigError, validate
from megavlm.config.loader import load_config
from megavlm.config.schema import Config, LanguageModelConfig, ModelConfig
from megavlm.training.metrics import ThroughputMeter, _tag, gpu_peak_flops, model_flops_per_step
from megavlm.training.run_control import ExitRule


def _tiny_cfg() -> Config:
    cfg = Config(model=ModelConfig(language=LanguageModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        head_dim=16, vocab_size=100)))
    cfg.data.seq_length, cfg.train.global_batch_size = 32, 4
    return cfg


def test_mfu_matches_a_hand_count():
    """Per layer, s=32, h=64, f=128, 4 query heads, 2 KV groups, head dim 16:
    QKV 2*32*64*(4+2*2)*16 = 524,288; out proj 2*32*4*16*64 = 262,144;
    SwiGLU 6*32*64*128 = 1,572,864; causal attention 2*32*32*4*16 = 131,072
    -> 2,490,368 per layer, 4,980,736 for 2 layers; logits 2*32*64*100 = 409,600;
    forward 5,390,336; training x3 = 16,171,008 per sequence; x4 sequences = 64,684,032."""
    cfg = _tiny_cfg()
    assert model_flops_per_step(cfg) == 64_684_032
    meter = ThroughputMeter(cfg, world_size=2, dp_size=2, device_name="NVIDIA H100 80GB HBM3")
    m = meter.metrics(step_seconds=0.5)
    assert m["tflops_per_gpu"] == pytest.approx(64_684_032 / 0.5 / 2 / 1e12, rel=1e-12)
    assert m["mfu"] == pytest.approx(64_684_032 / 0.5 / 2 / 989e12, rel=1e-12)
    assert m["tokens_per_sec_per_gpu"] == 4 * 32 / 0.5 / 2
    assert "mfu" not in ThroughputMeter(cfg, world_size=1, dp_size=1).metrics(1.0)  # CPU: no peak


def test_gpu_peaks_come_from_the_planner_table():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090") is None
    assert (_tag("eval_loss"), _tag("loss")) == ("eval/loss", "train/loss")


def test_exit_rules():
    now = [0.0]
    rule = ExitRule(exit_interval=0, exit_duration_mins=2.0, clock=lambda: now[0])
    assert rule.reason(1) is None
    now[0] = 120.0
    assert "train.exit_duration_mins=2.0 reached at iteration 7" == rule.reason(7)
    every = ExitRule(exit_interval=5, exit_duration_mins=0)
    assert [it for it in range(1, 12) if every.reason(it)] == [5, 10]


def test_new_keys_are_validated():
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "train.exit_interval=-1", "checkpoint.keep_last=-2",
                             "parallel.timeout_minutes=0", "eval.interval=2", "data.dataset=shards",
                             "data.path=x"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    for key in ("train.exit_interval", "checkpoint.keep_last", "parallel.timeout_minutes", "eval.data.path"):
        assert key in str(err.value)


_TIMEOUT_SCRIPT = r"""
import os, sys, time, datetime
import torch, torch.distributed as dist
from megavlm.training.run_control import collective_phase, CollectiveTimeoutError
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=120))  # a loaded machine may be slow to rendezvous
group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
dist.barrier(group=group)
if rank == 1:
    time.sleep(600)  # hung: never joins the all-reduce (the test kills it)
try:
    with collective_phase("the training step", 2 / 60):
        dist.all_reduce(torch.ones(1), group=group)
except CollectiveTimeoutError as err:
    print(err)
    os._exit(0)
os._exit(1)
"""


def test_a_hung_collective_names_the_rank_and_phase():
    from tests.conftest import free_port

    port = str(free_port())
    repo = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", _TIMEOUT_SCRIPT, str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=repo, env=dict(os.environ)) for r in (0, 1)]
    out, err = procs[0].communicate(timeout=120)
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == 0, err[-2000:]
    assert "rank 0 of 2: a collective in the training step did not complete within parallel.timeout_minutes" in out
