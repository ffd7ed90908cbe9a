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
    common = [sys.executable, "tools/pretrain_vlm.py", "--config", "examples/tiny/pretrain.yaml",
              "train.iters=1", "data.seq_length=16", "train.global_batch_size=4", "logging.interval=1",
              f"logging.dir={tmp_path / 'log'}", "logging.tensorboard=false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    empty = tmp_path / "empty"
    bad = subprocess.run(common + [f"checkpoint.load={empty}", "checkpoint.save=null"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "no complete checkpoint found there" in bad.stderr
    fresh = subprocess.run(common + [f"checkpoint.load={empty}", "checkpoint.save=" + str(empty)], capture_output=True, text=True, env=env, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "starting from scratch" in fresh.stdout
