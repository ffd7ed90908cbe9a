"""Only complete checkpoints are ever loaded."""

from megavlm.training.checkpoint import COMPLETE_MARKER, checkpoint_dir, latest_complete


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
