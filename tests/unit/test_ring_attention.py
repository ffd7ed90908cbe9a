"""Context-parallel split and ring attention (megavlm.parallel), fp32, CPU, gloo.

* The regular split equals megatron's ``get_batch_on_this_cp_rank`` (CP rank emulated by
  patching parallel_state, no process group); the packed split covers every padded token
  exactly once across ranks, each sample as 2·CP zigzag chunks.
* Ring attention: one torchrun launch of 4 ranks runs every case at CP=4 (world) and CP=2
  (subgroups [0, 1] and [2, 3]); see ring_worker.py. Output and q/k/v gradients equal full
  attention computed in one process with ``F.scaled_dot_product_attention`` within 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavlm.parallel import cp_partition, pad_cu_seqlens, pad_packed, split_for_cp
from tests.unit.ring_worker import CASES

REPO = Path(__file__).parents[2]
TOL = 1e-5
CP_SIZES = (2, 4)


# ------------------------------------------------------------------ partition
def test_regular_split_equals_megatron(monkeypatch):
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    b, s = 2, 24
    for cp in (1, 2, 3, 4):
        for rank in range(cp):
            monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: cp)
            monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: rank)
            batch = {
                "tokens": torch.arange(b * s).view(b, s),
                "position_ids": torch.randn(b, s, 3),
                "attention_mask": torch.rand(b, 1, s, s) > 0.5,
            }
            want = get_batch_on_this_cp_rank(dict(batch))
            part = cp_partition(cp, rank, seq_len=s)
            assert torch.equal(split_for_cp(batch["tokens"], part, dim=1), want["tokens"])
            assert torch.equal(split_for_cp(batch["position_ids"], part, dim=1), want["position_ids"])
            assert torch.equal(split_for_cp(batch["attention_mask"], part, dim=2), want["attention_mask"])


def test_regular_split_examples_and_errors():
    # REFERENCE 10: CP=2 on 8 tokens
    assert cp_partition(2, 0, seq_len=8).indices.tolist() == [0, 1, 6, 7]
    assert cp_partition(2, 1, seq_len=8).indices.tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="multiple"):
        cp_partition(2, 0, seq_len=10)
    with pytest.raises(ValueError, match="exactly one"):
        cp_partition(2, 0, seq_len=8, cu_seqlens=torch.tensor([0, 8]))


@pytest.mark.parametrize("cu", [[0, 5, 18, 19, 35], [0, 1], [0, 8, 8, 24], [0, 3, 4, 5, 100]])
def test_packed_split_covers_every_token_once(cu):
    cu = torch.tensor(cu)
    for cp in (1, 2, 3, 4):
        parts = [cp_partition(cp, r, cu_seqlens=cu) for r in range(cp)]
        pad = parts[0].cu_seqlens_padded
        assert torch.equal(pad, pad_cu_seqlens(cu, 2 * cp))
        assert bool(((pad[1:] - pad[:-1]) % (2 * cp) == 0).all())
        assert bool((pad[1:] - pad[:-1] >= cu[1:] - cu[:-1]).all())
        allidx = torch.cat([p.indices for p in parts])
        assert torch.equal(allidx.sort().values, torch.arange(int(pad[-1])))  # each token once
        for r, p in enumerate(parts):
            assert p.indices.numel() == int(pad[-1]) // cp
            # per sample: chunk r then chunk 2cp-1-r of that sample (TE's zigzag per sample)
            expect = []
            for a, e in zip(pad[:-1].tolist(), pad[1:].tolist()):
                c = (e - a) // (2 * cp)
                expect += list(range(a + r * c, a + (r + 1) * c))
                expect += list(range(a + (2 * cp - 1 - r) * c, a + (2 * cp - r) * c))
            assert p.indices.tolist() == expect
            assert torch.equal(p.local_cu_seqlens_padded, pad // cp)


def test_pad_packed_places_real_tokens():
    cu = torch.tensor([0, 3, 4])
    pad = pad_cu_seqlens(cu, 4)
    assert pad.tolist() == [0, 4, 8]
    x = torch.tensor([1, 2, 3, 4])
    assert pad_packed(x, cu, pad, value=-1).tolist() == [1, 2, 3, -1, 4, -1, -1, -1]


# ------------------------------------------------------------------ ring attention
@pytest.fixture(scope="module")
def ring_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ring") / "errors.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
           "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "tests.unit.ring_worker", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("cp", CP_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_ring_attention_matches_full_attention(ring_results, case, cp):
    """Output and dq/dk/dv (max abs over all ranks and tokens) within 1e-5 of full attention."""
    errors = ring_results[f"{case}_cp{cp}"]
    for key in ("out", "dq", "dk", "dv"):
        assert errors[key] <= TOL, (case, cp, errors)


@pytest.mark.parametrize("case", ["vision_split", "one_rank_all_masked"])
def test_vlm_under_cp_equals_one_rank(ring_results, case):
    """The tiny VLM (packed images + video, DeepStack) at CP=2 through ``forward_step``: the
    loss summed over the CP ranks and the CP-summed gradients equal CP=1 (cp_model_worker.py),
    also when every supervised token sits on one rank (the other's loss is a finite zero)."""
    r = ring_results[f"model_{case}"]
    assert r["nonfinite_ranks"] == 0, r
    assert r["loss_rel"] <= TOL and r["grad_rel"] <= TOL, r
