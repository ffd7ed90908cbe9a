import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megavlm.training.metrics import MetricsLogger


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_contents(tmp_path):
    with MetricsLogger(tmp_path, total_iters=100, tensorboard=False) as m:
        m.log(10, {"loss": 4.5, "lr": 1e-4})
        m.log(20, {"loss": 4.0, "lr": 2e-4, "grad_norm": 1})
        # Flushed per line: readable before close.
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [
        {"iteration": 10, "loss": 4.5, "lr": 1e-4},
        {"iteration": 20, "loss": 4.0, "lr": 2e-4, "grad_norm": 1.0},
    ]
    assert isinstance(records[1]["grad_norm"], float)


def test_resume_truncates_and_appends(tmp_path):
    with MetricsLogger(tmp_path, total_iters=100, tensorboard=False) as m:
        for it in (10, 20, 30, 40):
            m.log(it, {"loss": float(it)})
    # A killed run can leave a cut-off last line.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 50, "lo')

    with MetricsLogger(tmp_path, total_iters=100, tensorboard=False) as m:  # resumed from ckpt 20
        m.log(30, {"loss": -30.0})
        m.log(40, {"loss": -40.0})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["iteration"], r["loss"]) for r in records] == [
        (10, 10.0),
        (20, 20.0),
        (30, -30.0),
        (40, -40.0),
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_console_line_format_and_eta(tmp_path, capsys):
    clock = FakeClock()
    m = MetricsLogger(tmp_path, total_iters=100, tensorboard=False, clock=clock)
    clock.now += 5.0  # startup before the first log call: in elapsed, not in the ETA rate
    first = m.log(10, {"loss": 5.0})
    assert first == "iter     10/100 | loss 5.0000 | elapsed 0:00:05 | eta -:--:--"

    clock.now += 20.5  # 10 iterations in 20.5 s -> 2.05 s/iter, 80 iterations left
    line = m.log(
        20,
        {"tokens_per_sec": 12345.4, "grad_norm": 1.2341, "mfu": 0.41237, "lr": 3e-4, "loss": 4.12341},
    )
    m.close()
    assert line == (
        "iter     20/100 | loss 4.1234 | lr 3.00e-04 | grad_norm 1.234 | tokens/s 12,345"
        " | mfu 0.4124 | elapsed 0:00:26 | eta 0:02:44"
    )
    assert capsys.readouterr().out.splitlines() == [first, line]


def test_tensorboard_scalars(tmp_path):
    with MetricsLogger(tmp_path, total_iters=100) as m:
        m.log(10, {"loss": 4.5})
        m.log(20, {"loss": 4.25, "lr": 1e-4})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 4.5), (20, 4.25)]


def test_disabled_writes_nothing(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    with MetricsLogger(log_dir, total_iters=100, enabled=False) as m:
        assert m.log(10, {"loss": 1.0}) == ""
    assert not log_dir.exists()
    assert capsys.readouterr().out == ""


def test_tensorboard_resume_purges_relogged_steps(tmp_path):
    with MetricsLogger(tmp_path, total_iters=100) as m:
        for it in (10, 20, 30):
            m.log(it, {"loss": float(it)})
    with MetricsLogger(tmp_path, total_iters=100) as m:  # resumed from ckpt 10
        for it in (20, 30):
            m.log(it, {"loss": -float(it)})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (10, 10.0),
        (20, -20.0),
        (30, -30.0),
    ]
