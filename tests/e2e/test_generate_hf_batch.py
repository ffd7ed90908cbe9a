"""tools/generate.py --dump-tokens on a Hugging Face Qwen3-VL directory: greedy generation for a
left-padded batch equals transformers' ``generate`` token for token."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.conftest import free_port
from tests.parity.qwen3vl_case import hf_model, processor_inputs, tiny_config

NEW_TOKENS = 12


def test_greedy_batch_of_two_equals_hf_generate(tmp_path):
    """Two image + text prompts of different lengths (13 tokens of padding on the short one)."""
    cfg = tiny_config()
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    rows = [[("text", 3), ("image", 4, 4), ("text", 4)], [("text", 9), ("image", 4, 8), ("text", 8)]]
    inputs = processor_inputs(cfg, rows, seed=5)
    assert (inputs["attention_mask"] == 0).any()  # the batch really is padded
    torch.save(inputs, tmp_path / "inputs.pt")
    cmd = [sys.executable, "tools/generate.py", "--load", str(tmp_path / "hf"), "--inputs", str(tmp_path / "inputs.pt"),
           "--dump-tokens", str(tmp_path / "out.pt"), "--max-new-tokens", str(NEW_TOKENS)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = torch.load(tmp_path / "out.pt")

    with torch.no_grad():
        want = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, inputs["input_ids"].shape[1]:]
    assert [t.tolist() for t in ours["tokens"]] == want.tolist()
    assert ours["finish_reason"] == ["length", "length"]
    assert ours["tokens"][0].tolist() != ours["tokens"][1].tolist()
