"""Rewards behind one interface and a registry (REFERENCE 7).

A reward is a callable ``(response, targets, prompt, sample) -> float | None``: ``response``
the decoded completion, ``targets`` the sample's exact answers (the synthetic data's
``{"answer": ...}``, ``{"box": [x0, y0, x1, y1]}``, ``{"point": [x, y]}``, coordinates as
integers in 0..1000), ``prompt`` the prompt's text, ``sample`` the whole ``data.sample.Sample`` (media included,
for the generative judge). ``None`` means "does not apply
to this sample" (a box reward on a counting question), which the combination skips.

``rl.rewards`` lists terms ``{name, weight}``; the score of a completion is the weighted
sum of the terms that apply (behavioural terms such as language consistency are additive).
The generative reward model (``megavlm.rl.judge``) registers itself under ``judge``.

Parsing is hand-written because no library defines these answer formats (Qwen-style
integer boxes, ``\\boxed{}``); each parser takes the *last* candidate in the text, the
convention of math verifiers (the final answer follows the reasoning).
"""

from __future__ import annotations

import inspect
import math
import re
import unicodedata
from typing import Callable, Protocol

Targets = dict


class Reward(Protocol):
    def __call__(self, response: str, targets: Targets, prompt: str = "", sample=None) -> float | None: ...


REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    def wrap(factory):
        REGISTRY[name] = factory
        return factory
    return wrap


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}


def _normalize_number(text: str) -> float | None:
    text = text.replace(",", "").strip()
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def final_answer(text: str) -> str | None:
    """The last ``\\boxed{}`` content, else the last number, else the last word."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    words = re.findall(r"[^\W_]+", text)
    return words[-1] if words else None


def _same_answer(got: str, expected: str) -> bool:
    a, b = _normalize_number(got), _normalize_number(expected)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    norm = lambda s: re.sub(r"[\s\.\$]+", "", s.lower())  # noqa: E731
    return norm(got) == norm(expected)


@register("math")
def math_reward():
    """1 if the final answer (last boxed, else last number, normalized) equals ``answer``."""
    def score(response: str, targets: Targets, prompt: str = "", sample=None) -> float | None:
        if "answer" not in targets:
            return None
        got = final_answer(response)
        return float(got is not None and _same_answer(got, str(targets["answer"])))
    return score


def parse_count(text: str) -> int | None:
    """The last integer (digits or an English number word up to twelve) in the text."""
    found = re.findall(r"\d+|" + "|".join(_WORDS), text.lower())
    if not found:
        return None
    last = found[-1]
    return int(last) if last.isdigit() else _WORDS[last]


@register("counting")
def counting_reward():
    """1 if the last count in the response equals an integer ``answer``."""
    def score(response: str, targets: Targets, prompt: str = "", sample=None) -> float | None:
        answer = str(targets.get("answer", ""))
        if not answer.isdigit():
            return None
        return float(parse_count(response) == int(answer))
    return score


def parse_ints(text: str, n: int) -> list[int] | None:
    """The last ``n`` integers of the text (a box ``[x0, y0, x1, y1]`` or point ``[x, y]``)."""
    found = [int(x) for x in re.findall(r"-?\d+", text)]
    return found[-n:] if len(found) >= n else None


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


@register("iou")
def iou_reward():
    """IoU of the last 4 integers (0..1000 coordinates) with the target ``box``."""
    def score(response: str, targets: Targets, prompt: str = "", sample=None) -> float | None:
        if "box" not in targets:
            return None
        box = parse_ints(response, 4)
        return 0.0 if box is None else box_iou(box, targets["box"])
    return score


@register("point")
def point_reward(scale: float = 100.0):
    """``max(0, 1 - d / scale)`` with d the Euclidean distance (0..1000 coordinates) of the
    last 2 integers to the target ``point``: 1 on the spot, 0 at ``scale`` or farther."""
    def score(response: str, targets: Targets, prompt: str = "", sample=None) -> float | None:
        if "point" not in targets:
            return None
        point = parse_ints(response, 2)
        if point is None:
            return 0.0
        d = math.dist(point, targets["point"])
        return max(0.0, 1.0 - d / scale)
    return score


@register("format")
def format_reward():
    """1 if the response holds an answer of the target's kind (box: 4 integers, point: 2,
    integer answer: a number, other: any word), else 0: the answer is parseable."""
    def score(response: str, targets: Targets, prompt: str = "", sample=None) -> float | None:
        if "box" in targets:
            return float(parse_ints(response, 4) is not None)
        if "point" in targets:
            return float(parse_ints(response, 2) is not None)
        if "answer" in targets:
            if str(targets["answer"]).isdigit():
                return float(parse_count(response) is not None)
            return float(final_answer(response) is not None)
        return None
    return score


@register("verifiable")
def verifiable_reward(point_scale: float = 100.0):
    """The verifier the targets call for: IoU (box), point distance (point), counting
    (integer answer), exact answer (any other answer)."""
    iou, point, count, exact = iou_reward(), point_reward(point_scale), counting_reward(), math_reward()

    def score(response: str, targets: Targets, prompt: str = "", sample=None) -> float | None:
        for reward in (iou, point, count, exact):
            value = reward(response, targets, prompt, sample)
            if value is not None:
                return value
        return None
    return score


def script_of(char: str) -> str | None:
    """Unicode script family of a letter (first word of its Unicode name: LATIN, CJK, ...)."""
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    first = name.split(" ")[0]
    return "CJK" if first in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL") else first or None


@register("language")
def language_consistency_reward():
    """Fraction of the response's letters written in the prompt's dominant script (a
    behavioural term: answering a Chinese prompt in English costs reward)."""
    def score(response: str, targets: Targets, prompt: str = "", sample=None) -> float | None:
        prompt_scripts = [s for s in map(script_of, prompt) if s]
        response_scripts = [s for s in map(script_of, response) if s]
        if not prompt_scripts or not response_scripts:
            return None
        dominant = max(set(prompt_scripts), key=prompt_scripts.count)
        return sum(s == dominant for s in response_scripts) / len(response_scripts)
    return score


class CombinedReward:
    """Weighted sum of the terms that apply; ``terms``: ``[(name, weight, reward)]``."""

    def __init__(self, terms: list[tuple[str, float, Reward]]):
        self.terms = terms

    def __call__(self, response: str, targets: Targets, prompt: str = "", sample=None) -> tuple[float, dict[str, float]]:
        total, parts = 0.0, {}
        for name, weight, reward in self.terms:
            value = reward(response, targets, prompt, sample)
            if value is not None:
                parts[name] = value
                total += weight * value
        return total, parts


def build_reward(terms, **context) -> CombinedReward:
    """``terms``: items with ``name`` and ``weight`` (``rl.rewards``); each factory receives
    the ``context`` entries it names as parameters (``point_scale``; ``judge``, the
    generative reward model)."""
    built = []
    for term in terms:
        if term.name not in REGISTRY:
            raise ValueError(f"rl.rewards: unknown reward {term.name!r}; registered: {', '.join(sorted(REGISTRY))}")
        factory = REGISTRY[term.name]
        wanted = inspect.signature(factory).parameters
        built.append((term.name, term.weight, factory(**{k: v for k, v in context.items() if k in wanted})))
    return CombinedReward(built)
