"""The cluster entry points, on CPU: slurm scripts, multi-node torchrun, preemption and resume.

No slurm here: `scontrol` and `srun` are small fakes on PATH (scontrol expands nodelists with
megavlm's own parser and records `requeue`; srun drops its options and runs the command), so
what is checked is our scripts' logic and the command lines they produce. The GPU side
(pyxis, NCCL, FP8) is documented in slurm/README.md and docker/README.md, not run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", "examples/tiny/pretrain.yaml"]
SMALL = ["train.global_batch_size=4", "train.micro_batch_size=2", "data.seq_length=32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """This environment without any launcher variables, so nothing leaks in from outside."""
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in launcher_vars}
    return {**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def spawn():
    """subprocess.Popen whose processes (and their children) do not outlive the test."""
    procs: list[subprocess.Popen] = []

    def start(*args, **kwargs) -> subprocess.Popen:
        procs.append(subprocess.Popen(*args, **kwargs))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def fake_slurm(tmp_path_factory) -> Path:
    """A bin directory with fake `scontrol` and `srun`; requeue requests go to bin/requeued."""
    bin_dir = tmp_path_factory.mktemp("fake_slurm")
    (bin_dir / "scontrol.py").write_text(textwrap.dedent(f"""
        import sys
        args = sys.argv[1:]
        if args[:2] == ["show", "hostnames"] and len(args) == 3:
            from megavlm.platform.launch import expand_slurm_nodelist
            print("\\n".join(expand_slurm_nodelist(args[2])))
        elif args[:1] == ["requeue"] and len(args) == 2:
            with open({str(bin_dir / "requeued")!r}, "a") as f:
                f.write(args[1] + "\\n")
        else:
            sys.exit(f"fake scontrol: unsupported arguments {{args}}")
    """))
    python = shlex.quote(sys.executable)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\nexec {python} "$(dirname "$0")/scontrol.py" "$@"\n')
    # srun: skip the options (all of the form --name=value or --flag), exec the command in place.
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _slurm_env(fake_slurm: Path, **extra: str) -> dict[str, str]:
    env = _env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2",
               SLURM_SUBMIT_DIR=str(REPO), **extra)
    env["PATH"] = f"{fake_slurm}{os.pathsep}{env['PATH']}"
    return env


# --- shell scripts ---------------------------------------------------------------------------

SCRIPTS = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob("slurm/*.sbatch"), *REPO.glob("docker/*.sh")])


def test_every_cluster_script_is_there():
    names = {p.name for p in SCRIPTS}
    assert {"launch.sh", "torchrun_node.sh", "pretrain.sbatch", "sft.sbatch", "ppo.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- DRY_RUN: the srun command line for 2 nodes x 8 GPUs ---------------------------------------

IMAGE = "/shared/containers/megavlm+2501.sqsh"
MOUNTS = "/lustre/data:/data:ro,/lustre/ckpt:/checkpoints"
OVERRIDES = "logging.interval=1 parallel.tp=2"  # the variable: split on spaces
ARGS = ["train.iters=10", "train.lr_phases=[{iters: 5, end_lr: 1e-5}]"]  # sbatch arguments: kept whole
TRAIN_ARGS = ["tools/pretrain_vlm.py", *TINY, "logging.interval=1", "parallel.tp=2", *ARGS]


@pytest.fixture(scope="module")
def rendered(fake_slurm) -> dict[str, list[str]]:
    """The srun command of pretrain.sbatch in both launch modes (rendered concurrently)."""
    procs = {
        mode: subprocess.Popen(
            ["bash", str(REPO / "slurm/pretrain.sbatch"), *ARGS],
            env=_slurm_env(fake_slurm, DRY_RUN="1", LAUNCH_MODE=mode, IMAGE=IMAGE, MOUNTS=MOUNTS,
                           OVERRIDES=OVERRIDES, SLURM_CPUS_ON_NODE="128", CONFIG="examples/tiny/pretrain.yaml"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for mode in ("srun", "torchrun")
    }
    commands = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        lines = [line for line in out.splitlines() if line.startswith("srun ")]
        assert len(lines) == 1, out
        commands[mode] = shlex.split(lines[0])
    return commands


def _split(cmd: list[str]) -> tuple[list[str], list[str]]:
    """srun's options, and the command it runs."""
    i = next(i for i, word in enumerate(cmd[1:], 1) if not word.startswith("--"))
    return cmd[1:i], cmd[i:]


def _container_flags_ok(options: list[str]) -> None:
    assert f"--container-image={IMAGE}" in options
    assert f"--container-mounts={REPO}:/opt/megavlm,{MOUNTS}" in options
    assert "--container-workdir=/opt/megavlm" in options
    assert "--no-container-mount-home" in options


def test_srun_mode_runs_one_python_per_gpu(rendered):
    options, command = _split(rendered["srun"])
    assert "--nodes=2" in options and "--ntasks-per-node=8" in options
    assert "--cpus-per-task=16" in options  # 128 CPUs / 8 tasks, not slurm's default of 1
    assert "--kill-on-bad-exit=1" in options
    _container_flags_ok(options)
    assert command == ["python", *TRAIN_ARGS]


def test_torchrun_mode_runs_one_torchrun_per_node(rendered):
    options, command = _split(rendered["torchrun"])
    assert "--nodes=2" in options and "--ntasks-per-node=1" in options
    assert "--cpus-per-task=128" in options
    _container_flags_ok(options)
    assert command[:3] == ["bash", "slurm/torchrun_node.sh", "torchrun"]
    agent = command[3:command.index("tools/pretrain_vlm.py")]
    assert agent == ["--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=gpu07:29500", "--rdzv-id=4242"]
    assert command[command.index("tools/pretrain_vlm.py"):] == TRAIN_ARGS


def test_missing_tool_fails_before_anything_starts(fake_slurm, tmp_path):
    """ppo.sbatch names tools/train_ppo.py; where it is absent the job says so and stops."""
    proc = subprocess.run(["bash", str(REPO / "slurm/ppo.sbatch")], check=False, capture_output=True, text=True,
                          env=_slurm_env(fake_slurm, DRY_RUN="1", CODE_DIR=str(tmp_path)))
    assert proc.returncode == 1
    assert "tools/train_ppo.py does not exist" in proc.stderr and "not written yet" in proc.stderr
    assert "srun" not in proc.stdout


def test_missing_config_fails_before_anything_starts(fake_slurm):
    proc = subprocess.run(["bash", str(REPO / "slurm/pretrain.sbatch")], check=False, capture_output=True, text=True,
                          env=_slurm_env(fake_slurm, DRY_RUN="1", CONFIG="examples/no_such_recipe.yaml"))
    assert proc.returncode == 1 and "CONFIG=examples/no_such_recipe.yaml does not exist" in proc.stderr


# --- signals: batch script -> srun step -> trainer, and torchrun_node.sh -> workers ---------------

# Stands in for the trainer: stops cleanly on SIGUSR1 as megavlm.training.loop does.
FAKE_TRAINER = """
import signal, sys, time
from pathlib import Path
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
Path(sys.argv[-1]).write_text("ready")  # the last argument: a file to create when ready
deadline = time.time() + 30
while not stop and time.time() < deadline:
    time.sleep(0.02)
print("megavlm: stop signal received" if stop else "no signal", flush=True)
sys.exit(0 if stop else 3)
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_batch_script_forwards_usr1_and_requeues(fake_slurm, tmp_path, spawn):
    """SIGUSR1 to the batch shell (--signal=B:USR1) reaches the trainer, then the job is requeued."""
    code = tmp_path / "code"
    (code / "tools").mkdir(parents=True)
    (code / "tools/fake_train.py").write_text(FAKE_TRAINER)
    (code / "recipe.yaml").write_text("{}\n")
    ready = tmp_path / "ready"
    proc = spawn(
        ["bash", str(REPO / "slurm/pretrain.sbatch"), str(ready)], cwd=code,
        env=_slurm_env(fake_slurm, CODE_DIR=str(code), TOOL="tools/fake_train.py", CONFIG="recipe.yaml",
                       PYTHON=sys.executable, NODES="1", GPUS_PER_NODE="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    _wait_for(ready, proc, timeout=20)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "stop signal received" in out and "requeueing job 4242" in out
    assert (fake_slurm / "requeued").read_text().split() == ["4242"]


def test_torchrun_node_keeps_torchrun_alive_and_relays_usr1(tmp_path, spawn):
    """torchrun survives SIGUSR1 (torch < 2.9 would die of it) and its workers get the signal."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
    ready = tmp_path / "ready"
    proc = spawn(
        ["bash", str(REPO / "slurm/torchrun_node.sh"), sys.executable, "-m", "torch.distributed.run",
         "--nproc_per_node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
         str(tmp_path / "fake_train.py"), str(ready)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    _wait_for(ready, proc, timeout=30)
    (agent,) = psutil.Process(proc.pid).children()
    agent.send_signal(signal.SIGUSR1)  # as when slurm signals every process of the step
    time.sleep(0.3)
    assert agent.is_running() and agent.status() != psutil.STATUS_ZOMBIE
    proc.send_signal(signal.SIGUSR1)  # as when srun forwards it to the task only
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "stop signal received" in out


# --- real training: 2 "nodes" with torchrun, preemption and resume ------------------------------


def _metrics(log_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (the trainer may be writing the next one)."""
    path = log_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines]


def test_two_node_torchrun_job(tmp_path, spawn):
    """Two torchrun agents (one per "node") rendezvous over c10d and train 3 steps at DP=2."""
    save, logs, port = tmp_path / "ckpt", tmp_path / "logs", _free_port()
    procs = [
        spawn(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             f"--node_rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test",
             "tools/pretrain_vlm.py", *TINY, "train.iters=3", *SMALL, f"checkpoint.save={save}",
             f"logging.dir={logs}", "logging.interval=1"],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "world size 2 (torchrun)" in "".join(outs)
    assert [m["iteration"] for m in _metrics(logs)] == [1, 2, 3]
    assert (save / "iter_0000003" / "complete").is_file()


def test_sigusr1_checkpoints_and_the_job_resumes_there(tmp_path, spawn):
    """Slurm's warning signal: the trainer checkpoints the step it is in and exits 0; a new run
    with checkpoint.load continues from that iteration, and metrics.jsonl has no duplicates."""
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    base = [sys.executable, "tools/pretrain_vlm.py", *TINY, *SMALL, "checkpoint.interval=0",
            f"logging.dir={logs}", "logging.interval=1"]
    proc = spawn([*base, f"checkpoint.save={save}", "train.iters=1000"], cwd=REPO, env=_env(),
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while len(_metrics(logs)) < 2:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "training did not log 2 iterations within 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-4000:]
    assert "stop signal received" in out
    stopped = int(out.split("stopped at iteration ")[1].split()[0])
    assert 2 <= stopped < 1000
    assert (save / f"iter_{stopped:07d}" / "complete").is_file()

    # checkpoint.save=null: a process's first save starts dist_checkpointing's spawn-context
    # writer Manager, which re-imports torch and megatron (~8 s of this file's time budget).
    resumed = subprocess.run([*base, f"checkpoint.load={save}", "checkpoint.save=null", f"train.iters={stopped + 2}"],
                             cwd=REPO,
                             env=_env(), check=False, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"resumed from {save / f'iter_{stopped:07d}'} at iteration {stopped}" in resumed.stdout
    assert [m["iteration"] for m in _metrics(logs)] == list(range(1, stopped + 3))


# --- docker/check_image.py's requirements ---------------------------------------------------------


def _check_image():
    spec = importlib.util.spec_from_file_location("check_image", REPO / "docker/check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NGC_LIKE = {"python": "3.12.3", "torch": "2.8.0a0+5228986c39.nv25.6", "transformer_engine": "2.4.0+3cd6870c",
            "megatron-core": "0.16.1", "nvidia-dali-cuda120": "2.4.0", "megavlm": "0.1.0", "cuda": "12.9"}


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({}, None),
        ({"torch": "2.6.0a0+ecf3bae40a"}, None),  # NGC prerelease of 2.6 counts as 2.6
        ({"transformer_engine": "1.14.0+abc"}, "Transformer Engine 1.14.0+abc"),  # NGC 25.01
        ({"python": "3.10.12"}, "Python 3.10.12"),  # NGC 24.xx
        ({"torch": "2.5.0a0+e000cf0ad9"}, "torch 2.5.0a0"),
        ({"cuda": "13.0"}, "CUDA 13.0"),
        ({"nvidia-dali-cuda120": None}, "DALI"),
        ({"megatron-core": "0.15.0"}, "megatron-core 0.15.0"),
    ],
)
def test_image_requirements(changes, complaint):
    found = _check_image().problems({**NGC_LIKE, **changes})
    if complaint is None:
        assert found == []
    else:
        assert len(found) == 1 and complaint in found[0], found
