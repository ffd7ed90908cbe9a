import math

import pytest
import torch

from megavlm.training.lr_schedule import LRPhase, LRSchedule


def test_warmup_endpoints():
    s = LRSchedule.single(1e-3, warmup_iters=10, decay_iters=100, min_lr=1e-5)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(5) == pytest.approx(5e-4)
    assert s.lr_at(10) == 1e-3


def test_warmup_init_lr():
    s = LRSchedule(lr=1e-3, warmup_iters=4, warmup_init_lr=1e-4, phases=[])
    assert s.lr_at(0) == 1e-4
    assert s.lr_at(2) == pytest.approx(5.5e-4)
    assert s.lr_at(4) == 1e-3
    assert s.lr_at(1000) == 1e-3  # no phases: hold the peak


def test_no_warmup_starts_at_peak():
    s = LRSchedule.single(1e-3, warmup_iters=0, decay_iters=10, min_lr=0.0)
    assert s.lr_at(0) == 1e-3


def test_cosine_midpoint_exact():
    s = LRSchedule.single(5e-5, warmup_iters=10, decay_iters=100, min_lr=1e-5)
    assert s.lr_at(10 + 50) == (5e-5 + 1e-5) / 2
    expected = 1e-5 + (5e-5 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert s.lr_at(10 + 25) == pytest.approx(expected, rel=1e-12)


def test_linear():
    s = LRSchedule.single(1.0, warmup_iters=0, decay_iters=4, min_lr=0.0, decay="linear")
    assert [s.lr_at(i) for i in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_constant_phase_is_a_step():
    s = LRSchedule(lr=1.0, warmup_iters=0, phases=[LRPhase(iters=3, end_lr=0.1, decay="constant")])
    assert [s.lr_at(i) for i in range(5)] == [1.0, 1.0, 1.0, 0.1, 0.1]


def test_two_phase_recipe():
    s = LRSchedule(
        lr=5e-5,
        warmup_iters=100,
        phases=[
            LRPhase(iters=1000, end_lr=1e-5, decay="cosine"),
            LRPhase(iters=500, end_lr=6e-6, decay="linear"),
        ],
    )
    assert s.lr_at(0) == 0.0
    assert s.lr_at(100) == 5e-5
    assert s.lr_at(100 + 500) == (5e-5 + 1e-5) / 2
    assert s.lr_at(1099) == pytest.approx(1e-5, rel=1e-4)
    assert s.lr_at(1100) == 1e-5  # phase 2 starts at phase 1's end
    assert s.lr_at(1100 + 250) == pytest.approx(8e-6)
    assert s.lr_at(1600) == 6e-6
    assert s.lr_at(10**7) == 6e-6
    assert s.min_lr == 6e-6


def test_explicit_min_lr_after_last_phase():
    s = LRSchedule(lr=1.0, warmup_iters=0, phases=[LRPhase(iters=2, end_lr=0.5)], min_lr=0.1)
    assert s.lr_at(1) == pytest.approx(0.75)
    assert s.lr_at(2) == 0.1


def test_monotone_non_increasing_after_warmup():
    s = LRSchedule(
        lr=5e-5,
        warmup_iters=10,
        phases=[LRPhase(iters=100, end_lr=1e-5), LRPhase(iters=50, end_lr=6e-6, decay="linear")],
    )
    lrs = [s.lr_at(i) for i in range(10, 200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(phases=[LRPhase(iters=1, end_lr=0.0), LRPhase(iters=1, end_lr=0, decay="cosin")]),
            "train.lr_phases[1].decay: 'cosin' is not one of cosine, linear, constant",
        ),
        (dict(phases=[LRPhase(iters=-1, end_lr=0.0)]), "train.lr_phases[0].iters: -1 must be >= 0"),
        (dict(phases=[LRPhase(iters=1, end_lr=-1e-5)]), "train.lr_phases[0].end_lr"),
        (dict(warmup_iters=-5), "train.warmup_iters: -5 must be >= 0"),
        (dict(warmup_iters=2.5), "train.warmup_iters: 2.5 is not an integer"),
        (dict(lr=-1.0), "train.lr: -1.0 must be"),
        (dict(lr="5e-5"), "train.lr: '5e-5' is not a number"),
        (dict(lr=float("nan")), "train.lr"),
        (dict(warmup_init_lr=-0.1), "train.warmup_init_lr"),
        (dict(min_lr=-0.1), "train.min_lr"),
    ],
)
def test_validation(kwargs, message):
    args = dict(lr=1e-4, warmup_iters=10, phases=[]) | kwargs
    with pytest.raises(ValueError) as excinfo:
        LRSchedule(**args)
    assert message in str(excinfo.value)


def test_validation_name_prefix_and_single():
    with pytest.raises(ValueError, match=r"^sft\.lr_phases\[0\]\.decay: 'step'"):
        LRSchedule.single(1e-4, 0, 10, 0.0, "step", name="sft")


def test_increasing_phase_allowed():
    s = LRSchedule(lr=1e-5, warmup_iters=0, phases=[LRPhase(iters=2, end_lr=3e-5, decay="linear")])
    assert s.lr_at(1) == pytest.approx(2e-5)


def test_negative_iteration_rejected():
    with pytest.raises(ValueError):
        LRSchedule.single(1e-4, 0, 10, 0.0).lr_at(-1)


def test_apply_sets_param_groups_with_lr_mult():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_mult": 0.1}], lr=123.0)
    s = LRSchedule.single(1e-3, warmup_iters=10, decay_iters=100, min_lr=1e-5)
    assert s.apply(opt, 5) == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-5)
    # Resume: the lr depends only on the iteration, not on call history.
    s.apply(opt, 60)
    fresh = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_mult": 0.1}], lr=123.0)
    s.apply(fresh, 60)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in fresh.param_groups]
