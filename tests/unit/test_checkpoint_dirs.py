"""Only complete checkpoints are ever loaded."""

import os
import subprocess
import sys

from tests.conftest import free_port
from megavlm.checkpointing import COMPLETE_MARKER, checkpoint_dir, latest_complete


def test_latest_complete_skips_partial(tmp_path):
    for it, complete in [(10, True), (20, True), (30, False)]:
        d = checkpoint_dir(tmp_path, it)
        d.mkdir(parents=True)
        (d / "shard").write_text("x")
        if complete:
            (d / COMPLETE_MARKER).write_text(str(it))
    assert latest_complete(tmp_path) == checkpoint_dir(tmp_path, 20)
    assert latest_complete(checkpoint_dir(tmp_path, 10)) == checkpoint_dir(tmp_path, 10)
    assert latest_complete(tmp_path / "missing") is None
    assert latest_complete(checkpoint_dir(tmp_path, 30)) is None


def test_missing_checkpoint_rules(tmp_path):
    """load == save with nothing saved yet starts fresh (requeue); another empty load fails."""
    def command(name: str, save: str) -> subprocess.Popen:
        # the two runs are independent (own folders and port), so they start together: each is
        # one process that mostly imports torch + megatron-core on one core
        empty = str(tmp_path / name / "empty")
        cmd = [sys.executable, "tools/pretrain_vlm.py", "--config", "examples/tiny/pretrain.yaml",
               "train.iters=1", "data.seq_length=16", "train.global_batch_size=4", "logging.interval=1",
               f"logging.dir={tmp_path / name / 'log'}", "logging.tensorboard=false", f"checkpoint.load={empty}",
               f"checkpoint.save={empty if save == 'load' else save}"]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(ports.pop())}
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    ports = set()
    while len(ports) < 2:
        ports.add(free_port())
    procs = {"bad": command("bad", "null"), "fresh": command("fresh", "load")}
    out = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            out[name] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    returncode, _, stderr = out["bad"]
    assert returncode != 0 and "no complete checkpoint found there" in stderr
    returncode, stdout, stderr = out["fresh"]
    assert returncode == 0, stderr[-3000:]
    assert "starting from scratch" in stdout
