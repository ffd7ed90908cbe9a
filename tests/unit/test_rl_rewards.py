"""Verifiable rewards: parsing and scoring on hand-made responses."""

from __future__ import annotations

import pytest

from megavlm.config.schema import RewardTerm
from megavlm.rl.rewards import REGISTRY, box_iou, build_reward, final_answer


def test_math_exact_answer():
    r = REGISTRY["math"]()
    assert r("so the answer is \\boxed{\\frac{1}{2}} hmm \\boxed{42}", {"answer": "42"}) == 1.0
    assert r("x = 3, y = 1,000", {"answer": "1000"}) == 1.0
    assert r("I think 7/2", {"answer": "3.5"}) == 1.0
    assert r("41", {"answer": "42"}) == 0.0
    assert r("left", {"answer": "Left."}) == 1.0
    assert r("anything", {"box": [0, 0, 1, 1]}) is None
    assert final_answer("\\boxed{a{b}c} 5") == "a{b}c"


def test_counting():
    r = REGISTRY["counting"]()
    assert r("There are 3 shapes", {"answer": "3"}) == 1.0
    assert r("two", {"answer": "2"}) == 1.0
    assert r("1 or 2", {"answer": "1"}) == 0.0  # the last count counts
    assert r("none", {"answer": "0"}) == 0.0
    assert r("3", {"answer": "left"}) is None


def test_iou_and_point():
    iou = REGISTRY["iou"]()
    assert iou("[100, 100, 300, 300]", {"box": [100, 100, 300, 300]}) == 1.0
    # half overlap: inter 100*200, union 2*200*200 - 100*200
    assert iou("box: [200, 100, 400, 300]", {"box": [100, 100, 300, 300]}) == pytest.approx(20000 / 60000)
    assert iou("no box", {"box": [0, 0, 10, 10]}) == 0.0
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    point = REGISTRY["point"](scale=100.0)
    assert point("[500, 500]", {"point": [500, 500]}) == 1.0
    assert point("(530, 540)", {"point": [500, 500]}) == pytest.approx(0.5)  # distance 50
    assert point("[0, 0]", {"point": [500, 500]}) == 0.0


def test_format_language_and_combination():
    fmt = REGISTRY["format"]()
    assert fmt("[1, 2, 3, 4]", {"box": [0, 0, 1, 1]}) == 1.0
    assert fmt("[1, 2]", {"box": [0, 0, 1, 1]}) == 0.0
    lang = REGISTRY["language"]()
    assert lang("three", {}, prompt="How many?") == 1.0
    assert lang("三个", {}, prompt="How many?") == 0.0
    assert lang("3 个 ok", {}, prompt="有几个?") == pytest.approx(1 / 3)
    combined = build_reward([RewardTerm(name="verifiable"), RewardTerm(name="format", weight=0.1),
                             RewardTerm(name="language", weight=0.5)], point_scale=100.0)
    total, parts = combined("2", {"answer": "2"}, prompt="How many red shapes?")
    assert parts == {"verifiable": 1.0, "format": 1.0}  # no letters in "2": language does not apply
    assert total == pytest.approx(1.1)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward([RewardTerm(name="nope")])
