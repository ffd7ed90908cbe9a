"""tools/generate.py on a Hugging Face Qwen3-VL directory: --dump-logits equals transformers."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.parity.qwen3vl_case import CASES, hf_logits, hf_model, processor_inputs, tiny_config

# a fresh process picks its own rendezvous port (not the one of this pytest process)
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}, "PYTHONWARNINGS": "ignore"}


def test_dump_logits_of_a_hf_directory_matches_transformers(tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    inputs = processor_inputs(cfg, CASES["batch"])
    torch.save(inputs, tmp_path / "inputs.pt")
    bad = {**inputs, "pixel_values": inputs["pixel_values"][:-4]}  # a truncated image
    torch.save(bad, tmp_path / "bad.pt")
    cmd = [sys.executable, "tools/generate.py", "--load", str(tmp_path / "hf"), "--inputs", str(tmp_path / "inputs.pt"),
           "--dump-logits", str(tmp_path / "logits.pt")]
    # both runs at once: each is one process that mostly imports torch + megatron-core on one core
    good_run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    bad_run = subprocess.Popen(cmd[:5] + [str(tmp_path / "bad.pt"), "--dump-logits", str(tmp_path / "x.pt")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _, good_err = good_run.communicate(timeout=900)
        _, bad_err = bad_run.communicate(timeout=900)
    finally:
        for proc in (good_run, bad_run):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert good_run.returncode == 0, good_err[-3000:]
    ours = torch.load(tmp_path / "logits.pt")
    keep = inputs["attention_mask"].bool()
    assert (ours[keep] - hf_logits(hf, inputs)[keep]).abs().max().item() <= 1e-4

    assert bad_run.returncode != 0
    assert "image_grid_thw implies 16 patches but pixel_values has 12" in bad_err
