"""Every parallel layout equals the single-rank run (fp32, CPU, gloo).

Each world size is one torchrun launch running several layouts (see worker.py); the
tests below compare what they saved. Tolerances: losses and step-1 gradients 1e-5 (max
abs); parameters after 3 AdamW steps at lr 1e-2 within 1e-3, since Adam divides by
sqrt(v) and so magnifies float reassociation in near-zero gradient entries. The sqrt
scenarios (4 short samples a step) run Adam with eps 1e-4, measured in worker.py, for that reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Run as a module from the repository root, so the worker imports tests.parity like any test.
REPO = Path(__file__).parents[2]
WORKER_MODULE = "tests.parallel.worker"
LAUNCHES = {
    1: ["ref", "ref_moe", "ref_packed", "ref_moe_no_aux", "ref_sqrt_mb1", "ref_sqrt_mb2", "ref_sqrt_mb4",
        "ref_per_token_mb1", "ref_vlm_cp"],
    2: ["tp2", "pp2", "pp2_vpp2", "pp2_uneven", "dp2", "dp2_distopt", "ep2_moe", "ep2_moe_allgather", "tp2_packed", "resume_dp2", "resume_pp2", "resume_vlm_pp2",
        "resume_async_dp2", "reshard_tp2_to_pp2", "nan_skip", "dp2_sqrt", "vlm_logits_tp2", "vlm_logits_pp2", "vlm_logits_pp2_uneven",
        "vlm_moe_logits_ep2", "vlm_moe_logits_tp2", "vlm_moe_logits_pp2", "cp2_vlm"],
    4: ["tp2_pp2", "tp2_ep2_moe_no_aux", "cp2_tp2_vlm", "cp2_pp2_vlm"],
}
# the single-rank run each layout is compared with (default "ref")
REFERENCE_OF = {
    "ep2_moe": "ref_moe",
    "ep2_moe_allgather": "ref_moe",
    "tp2_packed": "ref_packed",
    "tp2_ep2_moe_no_aux": "ref_moe_no_aux",
    "ref_sqrt_mb2": "ref_sqrt_mb1",
    "ref_sqrt_mb4": "ref_sqrt_mb1",
    "dp2_sqrt": "ref_sqrt_mb1",
    "cp2_vlm": "ref_vlm_cp",
    "cp2_tp2_vlm": "ref_vlm_cp",
    "cp2_pp2_vlm": "ref_vlm_cp",
}
LOSS_TOL = GRAD_TOL = 1e-5
PARAM_TOL = 1e-3


def _start(nproc: int, out: Path, scenarios: list[str]) -> tuple[list[str], subprocess.Popen]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    # `python -c`, not `-m WORKER_MODULE`: a checkpoint save spawns a helper process (a
    # multiprocessing Manager in megatron's dist_checkpointing) that re-imports the main
    # module, i.e. torch + megatron-core again (~10 s of CPU per rank); `-c` has none to import.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--no-python", sys.executable, "-u", "-c",
           f"from {WORKER_MODULE} import main; main()", str(out), *scenarios]
    # output to files, not pipes: nobody reads them while the launches run; a session of its
    # own, so that a failure or an interrupt ends torchrun and its workers together
    with open(out / f"launch{nproc}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return cmd, proc


def _wait(out: Path, launches: list[tuple[int, list[str], subprocess.Popen]]) -> None:
    try:
        for _, _, proc in launches:
            proc.wait(timeout=900)
    finally:
        for _, _, proc in launches:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for nproc, cmd, proc in launches:
        if proc.returncode != 0:
            log = (out / f"launch{nproc}.log").read_text()
            raise AssertionError(f"{' '.join(cmd)} failed:\n{log[-12000:]}")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """The 1-rank launch runs beside the 2-rank one: it is mostly single-threaded startup
    (importing torch + megatron-core) and would leave the second core idle. The results do not
    depend on it (every rank runs with OMP_NUM_THREADS=1); the 4-rank launch fills both cores alone."""
    out = tmp_path_factory.mktemp("layouts")
    for group in ([1, 2], [4]):
        _wait(out, [(nproc, *_start(nproc, out, LAUNCHES[nproc])) for nproc in group])
    return out


def _load(results: Path, name: str) -> dict:
    return torch.load(results / f"{name}.pt", weights_only=False)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), f"key sets differ: {sorted(set(a) ^ set(b))}"
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize(
    "layout",
    ["tp2", "pp2", "pp2_vpp2", "pp2_uneven", "dp2", "dp2_distopt", "ep2_moe", "ep2_moe_allgather", "tp2_packed",
     "tp2_pp2", "tp2_ep2_moe_no_aux", "ref_sqrt_mb2", "ref_sqrt_mb4", "dp2_sqrt", "cp2_vlm", "cp2_tp2_vlm",
     "cp2_pp2_vlm"],
)
def test_layout_matches_single_rank(results, layout):
    """Losses of 3 steps, step-1 gradients and final parameters equal the 1-rank run."""
    ref = _load(results, REFERENCE_OF.get(layout, "ref"))
    got = _load(results, layout)
    loss_diff = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    assert loss_diff <= LOSS_TOL, (layout, got["losses"], ref["losses"])
    if got["grads"] is not None:  # the distributed optimizer keeps only gradient shards
        assert _max_diff(got["grads"], ref["grads"]) <= GRAD_TOL
    assert _max_diff(got["params"], ref["params"]) <= PARAM_TOL
    # the model learned something, so equal losses are not equal by accident
    assert ref["losses"][-1] != ref["losses"][0]


@pytest.mark.parametrize("name", ["resume_dp2", "resume_pp2", "resume_vlm_pp2"])
def test_resume_is_exact(results, name):
    """Stop after 3 of 6 steps, resume from the checkpoint: losses 4-6 are bit-identical."""
    r = _load(results, name)
    assert sorted(r["resumed"]) == [4, 5, 6]
    for it, loss in r["resumed"].items():
        assert loss == r["full"][it], (it, loss, r["full"][it])


def test_async_save_resume_is_exact(results):
    """checkpoint.async_save at DP=2: saving in the background leaves training unchanged, the
    marker appears only when the save is finalized, and resuming from it is bit-identical."""
    r = _load(results, "resume_async_dp2")
    assert r["saving"] == r["full"]
    assert not r["marked_while_pending"]
    assert r["complete"] == ["iter_0000003", "iter_0000006"]
    assert sorted(r["resumed"]) == [4, 5, 6]
    for it, loss in r["resumed"].items():
        assert loss == r["full"][it], (it, loss, r["full"][it])
    assert r["params_equal"]


def test_tp2_checkpoint_loads_into_pp2(results):
    """A TP=2 checkpoint (model + distributed optimizer) continues identically at PP=2."""
    r = _load(results, "reshard_tp2_to_pp2")
    for a, b in zip(r["tp2"], r["pp2_from_tp2"]):
        assert abs(a - b) <= LOSS_TOL, {k: r[k] for k in ("tp2", "pp2_from_tp2")}


def test_checkpoint_reads_in_one_process_without_its_layout(results):
    """``checkpointing.read_model_tensors`` (no process group, no TP=2 layout) reads every model
    tensor of the TP=2 checkpoint exactly as the live model had it when saving."""
    r = _load(results, "reshard_tp2_to_pp2")
    live, read_back = r["live"], r["read_back"]
    assert set(read_back) == set(live) == set(r["by_layer"])
    assert all(torch.equal(read_back[k].float(), live[k]) for k in live)
    assert all(torch.equal(r["by_layer"][k].float(), live[k]) for k in live)


def test_nan_step_is_skipped_on_every_rank(results):
    """A NaN on one DP rank skips the update everywhere, is counted, and training goes on."""
    r = _load(results, "nan_skip")
    assert r["skipped_steps"] == 1 and r["recovered_skipped"] == 1
    assert r["params_unchanged"]
    assert r["iteration"] == 3 and r["recovered_loss"] == r["recovered_loss"]  # finite, not NaN


@pytest.mark.parametrize(
    "name", ["vlm_logits_tp2", "vlm_logits_pp2", "vlm_logits_pp2_uneven", "vlm_moe_logits_ep2", "vlm_moe_logits_tp2", "vlm_moe_logits_pp2"]
)
def test_vlm_logits_match_hf_in_parallel_layouts(results, name):
    """HF Qwen3-VL and Qwen3-VL-MoE weights in TP=2+SP, PP=2 (DeepStack level 2 crosses the
    stage boundary) and EP=2: logits of every parity case equal HF's within 1e-4."""
    diffs = _load(results, name)
    assert len(diffs) == 6, diffs
    assert max(diffs.values()) <= 1e-4, diffs


def test_sqrt_normalization_weights_samples(results):
    """The sqrt mode really reweights (its loss differs from per-token on the same data)."""
    sqrt, per_token = _load(results, "ref_sqrt_mb1"), _load(results, "ref_per_token_mb1")
    assert abs(sqrt["losses"][0] - per_token["losses"][0]) > 1e-4
