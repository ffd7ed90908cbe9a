"""The completion marker's checksums: a damaged file is named, fallback skips it, rotation."""

import pytest

from megavlm.checkpointing import (COMPLETE_MARKER, CheckpointCorruptError, checkpoint_dir, latest_complete,
                                   mark_complete, rotate, verify_checkpoint)
from megavlm.training.checkpoint import resume_checkpoint


def _fake(root, it, complete=True):
    d = checkpoint_dir(root, it)
    (d / "sub").mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    (d / "sub" / "rank_00000.pt").write_bytes(b"rng")
    if complete:
        mark_complete(d, it)
    return d


def test_marker_lists_every_file_and_names_the_damaged_one(tmp_path):
    d = _fake(tmp_path, 10)
    verify_checkpoint(d)  # intact
    data = bytearray((d / "__0_0.distcp").read_bytes())
    data[100] ^= 1  # same size, one bit
    (d / "__0_0.distcp").write_bytes(bytes(data))
    (d / "sub" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointCorruptError) as err:
        verify_checkpoint(d)
    assert err.value.damaged == {"__0_0.distcp": "sha256 differs from the marker", "sub/rank_00000.pt": "missing"}
    assert f"checkpoint {d} is damaged: __0_0.distcp: sha256 differs" in str(err.value)
    assert "checkpoint.fallback=true" in str(err.value)


def test_truncated_file_and_old_marker(tmp_path):
    d = _fake(tmp_path, 10)
    (d / "__0_0.distcp").write_bytes(b"short")
    with pytest.raises(CheckpointCorruptError, match="size 5 bytes, expected 1024"):
        verify_checkpoint(d)
    old = _fake(tmp_path, 20, complete=False)
    (old / COMPLETE_MARKER).write_text("20\n")  # a marker written before checksums existed
    verify_checkpoint(old)


def test_resume_falls_back_only_when_asked(tmp_path):
    _fake(tmp_path, 10)
    newest = _fake(tmp_path, 20)
    _fake(tmp_path, 30, complete=False)  # an interrupted save: never a candidate
    (newest / "__0_0.distcp").write_bytes(b"x" * 1024)
    with pytest.raises(CheckpointCorruptError, match="__0_0.distcp"):
        resume_checkpoint(tmp_path, fallback=False)
    assert resume_checkpoint(tmp_path, fallback=True) == checkpoint_dir(tmp_path, 10)


def test_keep_last_deletes_older_checkpoints_and_interrupted_saves(tmp_path):
    for it in (10, 20, 40):
        _fake(tmp_path, it)
    _fake(tmp_path, 15, complete=False)
    _fake(tmp_path, 50, complete=False)  # a save in progress, newer than the kept ones: left alone
    deleted = rotate(tmp_path, keep_last=2)
    assert deleted == [checkpoint_dir(tmp_path, it) for it in (10, 15)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000020", "iter_0000040", "iter_0000050"]
    assert latest_complete(tmp_path) == checkpoint_dir(tmp_path, 40)
    assert rotate(tmp_path, keep_last=5) == []
