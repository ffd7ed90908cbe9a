"""The multi-rank launches of tests/parallel, shared by its test files.

Each world size is one torchrun launch of ``worker.py`` running many scenarios in a row
(megatron's parallel state is rebuilt between them), because starting a process and
importing torch + megatron-core (~12 s of CPU per process) dominates the cost of a tiny
scenario. The planner's memory measurements (``planner_worker.py``) ride in the 4-rank launch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Run as a module from the repository root, so the worker imports tests.parity like any test.
REPO = Path(__file__).parents[2]
WORKER_MODULE = "tests.parallel.worker"
LAUNCHES = {
    1: ["ref", "ref_moe", "ref_packed", "ref_moe_no_aux", "ref_sqrt_mb1", "ref_sqrt_mb2", "ref_sqrt_mb4",
        "ref_per_token_mb1", "ref_vlm_cp"],
    2: ["tp2", "pp2", "pp2_vpp2", "pp2_uneven", "dp2", "dp2_distopt", "ep2_moe", "ep2_moe_allgather", "tp2_packed", "resume_dp2", "resume_pp2", "resume_vlm_pp2",
        "resume_async_dp2", "reshard_tp2_to_pp2", "nan_skip", "dp2_sqrt", "vlm_logits_tp2", "vlm_logits_pp2", "vlm_logits_pp2_uneven",
        "vlm_moe_logits_ep2", "vlm_moe_logits_tp2", "vlm_moe_logits_pp2", "cp2_vlm"],
    4: ["tp2_pp2", "tp2_ep2_moe_no_aux", "cp2_tp2_vlm", "cp2_pp2_vlm", "planner_memory"],
}


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


def run_launches(out: Path) -> Path:
    """Runs every launch, saving into ``out``. The 1-rank launch runs beside the 2-rank one: it is mostly single-threaded startup
    (importing torch + megatron-core) and would leave the second core idle. The results do not
    depend on it (every rank runs with OMP_NUM_THREADS=1); the 4-rank launch fills both cores alone."""
    for group in ([1, 2], [4]):
        _wait(out, [(nproc, *_start(nproc, out, LAUNCHES[nproc])) for nproc in group])
    return out
