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
        import os, sys
        args = sys.argv[1:]
        if args[:2] == ["show", "hostnames"] and len(args) == 3:
            if "[" in args[2]:  # megavlm's parser imports torch: only when needed
                from megavlm.platform.launch import expand_slurm_nodelist
                print("\\n".join(expand_slurm_nodelist(args[2])))
            else:
                print("\\n".join(args[2].split(",")))
        elif args[:1] == ["requeue"] and len(args) == 2:
            with open(os.environ.get("FAKE_REQUEUE_LOG", {str(bin_dir / "requeued")!r}), "a") as f:
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
    job = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2",
               SLURM_SUBMIT_DIR=str(REPO), HOST_PYTHON=sys.executable)
    env = _env(**{**job, **extra})
    # settings launch.sh passes with --container-env: only the test's own
    env = {k: v for k, v in env.items()
           if not k.startswith(("NCCL_", "UCX_", "NVTE_", "TORCH_NCCL_", "CUDA_DEVICE_MAX_CONNECTIONS"))
           or k in extra}
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

MOUNTS = "/lustre/data:/data:ro,/lustre/ckpt:/checkpoints"
OVERRIDES = "logging.interval=1 parallel.tp=2"  # the variable: split on spaces
ARGS = ["train.iters=10", "train.lr_phases=[{iters: 5, end_lr: 1e-5}]"]  # sbatch arguments: kept whole
TRAIN_ARGS = ["tools/pretrain_vlm.py", *TINY, "logging.interval=1", "parallel.tp=2", *ARGS]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("containers") / "megavlm+2501.sqsh"
    path.write_bytes(b"hsqs")
    return str(path)


@pytest.fixture(scope="module")
def site_env(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("site") / "site.env"
    path.write_text("NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-ib0}\nNCCL_IB_TIMEOUT=22\n")
    return path


@pytest.fixture(scope="module")
def rendered(fake_slurm, image, site_env) -> dict[str, list[str]]:
    """The srun command of pretrain.sbatch in both launch modes (rendered concurrently), on
    nodes with 4 GPUs, with a site env file and a user's NCCL setting."""
    procs = {
        mode: subprocess.Popen(
            ["bash", str(REPO / "slurm/pretrain.sbatch"), *ARGS],
            env=_slurm_env(fake_slurm, DRY_RUN="1", LAUNCH_MODE=mode, IMAGE=image, MOUNTS=MOUNTS,
                           OVERRIDES=OVERRIDES, SLURM_CPUS_ON_NODE="128", SLURM_GPUS_ON_NODE="4",
                           CONFIG="examples/tiny/pretrain.yaml", SITE_ENV=str(site_env), NCCL_DEBUG="WARN"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for mode in ("srun", "torchrun")
    }
    commands = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "warning" not in out, out  # the tiny recipe's relative paths are in the mounted checkout
        lines = [line for line in out.splitlines() if line.startswith("srun ")]
        assert len(lines) == 1, out
        commands[mode] = shlex.split(lines[0])
    return commands


def _split(cmd: list[str]) -> tuple[list[str], list[str]]:
    """srun's options, and the command it runs."""
    i = next(i for i, word in enumerate(cmd[1:], 1) if not word.startswith("--"))
    return cmd[1:i], cmd[i:]


def _step_flags_ok(options: list[str], image: str) -> None:
    assert f"--container-image={image}" in options
    assert f"--container-mounts={REPO}:/opt/megavlm,{MOUNTS}" in options
    assert "--container-workdir=/opt/megavlm" in options
    assert "--no-container-mount-home" in options
    # host values win over the image's ENV for these (pyxis), the site file's included
    assert ("--container-env=CUDA_DEVICE_MAX_CONNECTIONS,NCCL_DEBUG,NCCL_IB_TIMEOUT,NCCL_SOCKET_IFNAME,"
            "TORCH_NCCL_AVOID_RECORD_STREAMS") in options
    assert {"--kill-on-bad-exit=1", "--gpu-bind=none", "--distribution=block:block", "--label"} <= set(options)


def test_srun_mode_runs_one_python_per_gpu(rendered, image):
    options, command = _split(rendered["srun"])
    assert "--nodes=2" in options and "--ntasks-per-node=4" in options  # SLURM_GPUS_ON_NODE
    assert "--cpus-per-task=32" in options  # 128 CPUs / 4 tasks, not slurm's default of 1
    _step_flags_ok(options, image)
    assert command == ["python", *TRAIN_ARGS]


def test_torchrun_mode_runs_one_torchrun_per_node(rendered, image):
    options, command = _split(rendered["torchrun"])
    assert "--nodes=2" in options and "--ntasks-per-node=1" in options
    assert "--cpus-per-task=128" in options
    _step_flags_ok(options, image)
    assert command[:3] == ["bash", "slurm/torchrun_node.sh", "torchrun"]
    agent = command[3:command.index("tools/pretrain_vlm.py")]
    assert agent == ["--nnodes=2", "--nproc_per_node=4", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=gpu07:29500", "--rdzv-id=4242"]
    assert command[command.index("tools/pretrain_vlm.py"):] == TRAIN_ARGS


def test_missing_tool_fails_before_anything_starts(fake_slurm, tmp_path, image):
    """ppo.sbatch names tools/train_ppo.py; where CODE_DIR lacks it the job says so and stops."""
    proc = subprocess.run(["bash", str(REPO / "slurm/ppo.sbatch")], check=False, capture_output=True, text=True,
                          env=_slurm_env(fake_slurm, DRY_RUN="1", CODE_DIR=str(tmp_path), IMAGE=image))
    assert proc.returncode == 1
    assert "tools/train_ppo.py does not exist" in proc.stderr and "a megavlm checkout with PPO" in proc.stderr
    assert "srun" not in proc.stdout


def test_missing_config_fails_before_anything_starts(fake_slurm, image):
    proc = subprocess.run(["bash", str(REPO / "slurm/pretrain.sbatch")], check=False, capture_output=True, text=True,
                          env=_slurm_env(fake_slurm, DRY_RUN="1", CONFIG="examples/no_such_recipe.yaml", IMAGE=image))
    assert proc.returncode == 1 and "CONFIG=examples/no_such_recipe.yaml does not exist" in proc.stderr


def test_sft_needs_a_recipe_and_missing_image_fails(fake_slurm, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "slurm/sft.sbatch")], check=False, capture_output=True, text=True,
                          env=_slurm_env(fake_slurm, DRY_RUN="1"))
    assert proc.returncode == 1 and "CONFIG" in proc.stderr and "SFT recipe" in proc.stderr
    missing = tmp_path / "nope.sqsh"
    proc = subprocess.run(["bash", str(REPO / "slurm/pretrain.sbatch")], check=False, capture_output=True, text=True,
                          env=_slurm_env(fake_slurm, DRY_RUN="1", IMAGE=str(missing)))
    assert proc.returncode == 1 and f"IMAGE={missing} is not a readable file" in proc.stderr


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


# Stands in for the trainer of one requeue case: asks for slurm's B:USR1 itself (kill of the
# batch shell, its parent), gets it passed on, then "saves" and exits as the case says.
REQUEUE_TRAINER = """
import os, signal, sys, time
from pathlib import Path
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
os.kill(os.getppid(), signal.SIGUSR1)
deadline = time.time() + 30
while not stop and time.time() < deadline:
    time.sleep(0.01)
if os.environ["FAKE_SAVE"] != "none":
    iteration = Path(os.environ["FAKE_CKPT"]) / "iter_0000006"
    iteration.mkdir(parents=True)
    if os.environ["FAKE_SAVE"] == "complete":
        (iteration / "complete").write_text("6")
print("megavlm: stop signal received" if stop else "no signal", flush=True)
sys.exit(int(os.environ["FAKE_EXIT"]) if stop else 3)
"""


@pytest.mark.parametrize(
    ("exit_code", "save", "restarts", "job_rc", "requeued", "says"),
    [
        (0, "none", "0", 0, True, "it stopped cleanly after SIGUSR1; requeueing job 4242"),
        (1, "partial", "0", 1, False, "failed with exit 1 after SIGUSR1 and saved no newer complete checkpoint"),
        (1, "complete", "0", 0, True, "left a newer complete checkpoint (iteration 6, started from 4)"),
        (0, "none", "3", 1, False, "already requeued 3 times (MAX_RESTARTS=3); not requeueing"),
    ],
    ids=["clean-stop", "crash-while-saving", "crash-after-a-save", "restart-cap"],
)
def test_requeue_rule(fake_slurm, image, tmp_path, exit_code, save, restarts, job_rc, requeued, says):
    """SIGUSR1 to the batch shell reaches the trainer; the job is requeued after a clean stop
    or a newer complete checkpoint (found on the host through MOUNTS), never past the cap."""
    code = tmp_path / "code"
    (code / "tools").mkdir(parents=True)
    (code / "tools/fake_train.py").write_text(REQUEUE_TRAINER)
    (code / "recipe.yaml").write_text("checkpoint: {save: /ckpt/run, load: /ckpt/run}\nlogging: {dir: /scratch/logs}\n")
    for part in ("megavlm", "slurm"):  # what launch.sh reads the recipe's paths with
        (code / part).symlink_to(REPO / part)
    host_ckpt = tmp_path / "lustre_ckpt"
    (host_ckpt / "run/iter_0000004").mkdir(parents=True)
    (host_ckpt / "run/iter_0000004/complete").write_text("4")
    log = tmp_path / "requeued"
    proc = subprocess.run(
        ["bash", str(REPO / "slurm/pretrain.sbatch")], cwd=code, check=False, capture_output=True, text=True,
        timeout=300,
        env=_slurm_env(fake_slurm, CODE_DIR=str(code), TOOL="tools/fake_train.py", CONFIG="recipe.yaml",
                       PYTHON=sys.executable, NODES="1", GPUS_PER_NODE="1", SLURM_JOB_NODELIST="gpu07",
                       SLURM_JOB_NUM_NODES="1", IMAGE=image, MOUNTS=f"{host_ckpt}:/ckpt", MAX_RESTARTS="3",
                       SLURM_RESTART_COUNT=restarts, FAKE_REQUEUE_LOG=str(log), FAKE_CKPT=str(host_ckpt / "run"),
                       FAKE_SAVE=save, FAKE_EXIT=str(exit_code)),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == job_rc, out
    assert "megavlm: stop signal received" in out and says in out
    assert (log.read_text().split() if log.exists() else []) == (["4242"] if requeued else [])
    assert "logging.dir=/scratch/logs is not under any container mount" in out  # a path outside MOUNTS
    assert "checkpoint.save" not in out.split("warning")[-1].split("\n")[0]


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
    _wait_for(ready, proc, timeout=120)
    (agent,) = psutil.Process(proc.pid).children()
    agent.send_signal(signal.SIGUSR1)  # as when slurm signals every process of the step
    time.sleep(0.3)
    assert agent.is_running() and agent.status() != psutil.STATUS_ZOMBIE
    proc.send_signal(signal.SIGUSR1)  # as when srun forwards it to the task only
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stop signal received" in out


# --- real training: a job step signalled on every process, then resumed --------------------------
#
# Slurm signals every process of a step, megavlm's helpers included (megatron-core's cached
# writer Manager, loader workers, checkpoint writers). Each step below runs two tasks in one
# process group, saves interval checkpoints (the first save starts the Manager), then gets
# SIGUSR1 on the whole group, as from `scancel --signal=USR1` or `--signal=USR1@300`.

# A constant LR, so that a run's numbers do not depend on train.iters (the resumes stop early).
JOB = [*TINY, *SMALL, "train.iters=1000", "train.lr_decay=constant", "train.warmup_iters=0",
       "checkpoint.interval=2", "logging.interval=1", "logging.tensorboard=false"]
INTERVAL_SAVES = 2  # interval checkpoints (iterations 2 and 4) that exist before the signal


def _srun_task_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    """One task of `srun --ntasks=2` on one node, with what enroot's pyxis hook adds for NGC
    images (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; no LOCAL_WORLD_SIZE)."""
    return _env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242",
                RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), **extra)


def _run_step(commands: list[tuple[list[str], dict]], save: Path, logs: Path, signal_after: int) -> list[str]:
    """Start the tasks in one process group; once the interval checkpoints exist and
    ``signal_after`` iterations are logged, SIGUSR1 the group; return the tasks' output."""
    procs = []
    try:
        for cmd, env in commands:
            group = {"process_group": procs[0].pid if procs else 0}
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, **group))
        deadline = time.time() + 600
        last_interval = save / f"iter_{2 * INTERVAL_SAVES:07d}" / "complete"
        while not (last_interval.exists() and len(_metrics(logs)) >= signal_after):
            for p in procs:
                assert p.poll() is None, p.communicate()[0][-4000:]
            assert time.time() < deadline, "the step did not reach the signal point within 600 s"
            time.sleep(0.05)
        os.killpg(procs[0].pid, signal.SIGUSR1)
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(procs[0].pid, signal.SIGKILL)
                p.communicate()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _stopped_at(outs: list[str], save: Path) -> int:
    """The stop iteration, checked to be newer than the interval checkpoints and complete."""
    (line,) = [line for line in "".join(outs).splitlines() if "stopped at iteration" in line]
    stopped = int(line.split("stopped at iteration ")[1].split()[0])
    # iteration 4's stop check ran before its save, so the stop is at 5 or later
    assert stopped > 2 * INTERVAL_SAVES, line
    assert (save / f"iter_{stopped:07d}" / "complete").is_file()
    assert {p.name for p in save.glob("iter_*")} >= {"iter_0000002", "iter_0000004", f"iter_{stopped:07d}"}
    return stopped


@pytest.fixture(scope="module")
def signalled_steps(tmp_path_factory) -> dict[str, dict]:
    """The srun step (pyxis hook variables present), then the
    torchrun-per-node step (2 agents under slurm/torchrun_node.sh), signalled one iteration
    after the srun step stopped so that its losses run past that point uninterrupted."""
    tmp = tmp_path_factory.mktemp("signalled")
    steps: dict[str, dict] = {}

    save, logs, port = tmp / "srun_ckpt", tmp / "srun_logs", _free_port()
    cmd = [sys.executable, "tools/pretrain_vlm.py", *JOB, f"checkpoint.save={save}", f"logging.dir={logs}"]
    outs = _run_step([(cmd, _srun_task_env(rank, port)) for rank in range(2)], save, logs, signal_after=4)
    steps["srun"] = dict(save=save, stopped=_stopped_at(outs, save), losses=_losses(logs), out="".join(outs))

    save, logs, port = tmp / "torchrun_ckpt", tmp / "torchrun_logs", _free_port()
    agents = [
        (["bash", "slurm/torchrun_node.sh", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
          "--nproc_per_node=1", f"--node_rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
          "--rdzv-id=4242", "tools/pretrain_vlm.py", *JOB, f"checkpoint.save={save}", f"logging.dir={logs}"],
         _env(SLURM_PROCID=str(node), SLURM_NTASKS="2", SLURM_JOB_ID="4242"))
        for node in range(2)
    ]
    outs = _run_step(agents, save, logs, signal_after=steps["srun"]["stopped"] + 1)
    steps["torchrun"] = dict(save=save, stopped=_stopped_at(outs, save), losses=_losses(logs), out="".join(outs))
    return steps


def _metrics(log_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (the trainer may be writing the next one)."""
    path = log_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines]


def _losses(log_dir: Path) -> dict[int, float]:
    return {m["iteration"]: m["loss"] for m in _metrics(log_dir)}


def test_srun_step_signalled_everywhere_saves_and_exits_0(signalled_steps):
    """After interval saves, SIGUSR1 on every process of the step (megatron's writer Manager
    included): both tasks exit 0 with a complete stop checkpoint (checked in the fixture),
    under the pyxis hook's variables, which megavlm reads as an srun launch."""
    assert "world size 2 (slurm)" in signalled_steps["srun"]["out"]
    assert "Traceback" not in signalled_steps["srun"]["out"]


def test_torchrun_per_node_step_signalled_everywhere_saves_and_exits_0(signalled_steps):
    """The same with one torchrun per "node": the agents survive the signal, the workers save."""
    step = signalled_steps["torchrun"]
    assert "world size 2 (torchrun)" in step["out"]
    assert step["stopped"] > signalled_steps["srun"]["stopped"]
    # the two launch modes compute the same run
    common = range(1, signalled_steps["srun"]["stopped"] + 1)
    assert [step["losses"][i] for i in common] == [signalled_steps["srun"]["losses"][i] for i in common]


def test_stop_checkpoints_resume_exactly(signalled_steps, tmp_path):
    """Resuming from a stop checkpoint gives the losses of the uninterrupted run: the srun
    step's against the torchrun step, which ran on past it; the torchrun step's against
    that resumed run, which ran past it in turn."""
    srun, torchrun = signalled_steps["srun"], signalled_steps["torchrun"]
    end = torchrun["stopped"] + 1
    resumed = {}
    for name, step in (("srun", srun), ("torchrun", torchrun)):
        logs, port = tmp_path / f"resume_{name}", _free_port()
        cmd = [sys.executable, "tools/pretrain_vlm.py", *JOB, f"checkpoint.load={step['save']}",
               "checkpoint.save=null", f"train.iters={end}", f"logging.dir={logs}"]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=_srun_task_env(rank, port), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-4000:]
        stop_checkpoint = step["save"] / f"iter_{step['stopped']:07d}"
        assert f"resumed from {stop_checkpoint} at iteration {step['stopped']}" in outs[0]
        resumed[name] = _losses(logs)
        assert sorted(resumed[name]) == list(range(step["stopped"] + 1, end + 1))
    after_srun_stop = range(srun["stopped"] + 1, torchrun["stopped"] + 1)
    assert [resumed["srun"][i] for i in after_srun_stop] == [torchrun["losses"][i] for i in after_srun_stop]
    assert resumed["torchrun"][end] == resumed["srun"][end]


# --- docker/check_image.py's requirements ---------------------------------------------------------


def _check_image():
    spec = importlib.util.spec_from_file_location("check_image", REPO / "docker/check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NGC_LIKE = {"python": "3.12.3", "torch": "2.9.0a0+145a3a7bda.nv25.11", "transformer_engine": "2.9.0+70f53666",
            "megatron-core": "0.16.1", "nvidia-dali-cuda130": "1.52.0", "nvidia-dali-cuda120": None,
            "megavlm": "0.1.0", "cuda": "13.0", "fused_weight_gradient_mlp_cuda": "present", "amp_C": "present"}


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({}, None),
        ({"torch": "2.6.0a0+ecf3bae40a"}, None),  # NGC prerelease of 2.6 counts as 2.6
        ({"cuda": "12.9", "nvidia-dali-cuda130": None, "nvidia-dali-cuda120": "1.50.0"}, None),  # NGC 25.06
        ({"transformer_engine": "1.14.0+abc"}, "Transformer Engine 1.14.0+abc"),  # NGC 25.01
        ({"python": "3.10.12"}, "Python 3.10.12"),  # NGC 24.xx
        ({"torch": "2.5.0a0+e000cf0ad9"}, "torch 2.5.0a0"),
        ({"cuda": "11.8"}, "torch CUDA 11.8"),
        ({"nvidia-dali-cuda130": None}, "DALI (nvidia-dali-cuda130, the build for torch's CUDA 13.0) is not installed"),
        ({"nvidia-dali-cuda120": "1.50.0"}, "nvidia-dali-cuda120 (CUDA 12) is installed but torch has CUDA 13.0"),
        ({"fused_weight_gradient_mlp_cuda": None}, "apex kernel fused_weight_gradient_mlp_cuda is missing"),
        ({"megatron-core": "0.15.0"}, "megatron-core 0.15.0"),
    ],
)
def test_image_requirements(changes, complaint):
    found = _check_image().problems({**NGC_LIKE, **changes})
    if complaint is None:
        assert found == []
    else:
        assert len(found) == 1 and complaint in found[0], found
