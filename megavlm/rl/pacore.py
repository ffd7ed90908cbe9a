"""PaCoRe test-time scaling: parallel rollouts, compacted, synthesized over rounds (REFERENCE 8).

A schedule ``K + [1]`` (low ``[4]``, medium ``[16]``, high ``[32, 4]``) says how many
rollouts each round samples. Round 0 answers the original messages ``k_1`` times. Every
later round replaces the last user message with the synthesis prompt, filled with the
original prompt's text and the *compacted* responses of the previous round (the text after
the last ``</think>``), sorted by length and shuffled with a fixed seed; the images and
videos of that message stay attached (before the synthesis text, in their order), and the
earlier messages are kept as they are. The final round (one rollout) is the answer.

Batching: every rollout is one item of a FIFO queue; an engine call takes up to
``max_batch_size`` items, whatever problem or round they belong to, and a problem's next
round is queued the moment its current round is complete. Problems therefore overlap:
one problem's synthesis round runs in the same batch as another's first round.

Context budget (the stated truncation rule): a prompt plus ``max_new_tokens`` must fit
``context_budget`` tokens. When a synthesis prompt does not, every reference is cut to its
*last* ``c`` tokens (a response's conclusion sits at its end), with ``c`` the largest value
for which the prompt fits; references shorter than ``c`` stay whole. If even empty
references do not fit, the problem itself is too long and an error names it.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jinja2
import torch

from megavlm.data.encode import SampleEncoder
from megavlm.data.sample import Message, Sample
from megavlm.inference.engine import Completion, Prompt, SamplingParams

EFFORTS = {"low": [4], "medium": [16], "high": [32, 4]}

# REFERENCE 8, character for character (jinja2 defaults: no block trimming, so each
# reference is framed by the newlines around the for/endfor tags).
SYNTHESIS_TEMPLATE = """You are given a problem and a list of reference responses. Your job is to analyze these references and provide your own response.

Original Problem:
{{ original_prompt }}

Reference Responses:
{% for response in ref_responses %}
Reference {{ loop.index }}:
{{ response }}
{% endfor %}

Now, based on the original problem and reference responses above, please provide your own comprehensive solution."""

# autoescape off: the prompt is plain text, "<" and "&" in a response must stay as they are
_TEMPLATE = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False).from_string(SYNTHESIS_TEMPLATE)
_REFERS = re.compile(r"\breferences?\b", re.IGNORECASE)
_INTEGER = re.compile(r"-?\d+")


class ContextBudgetError(ValueError):
    pass


# --- the pieces of REFERENCE 8 ----------------------------------------------------------------
def round_schedule(effort: str, rounds: Sequence[int] = ()) -> list[int]:
    """Rollouts per round, the final single answer included: ``K + [1]``."""
    if effort == "custom":
        if not rounds:
            raise ValueError("pacore.effort=custom needs pacore.rounds, e.g. [8, 2]")
        return [*rounds, 1]
    if effort not in EFFORTS:
        raise ValueError(f"pacore.effort: {effort!r} is not one of {', '.join([*EFFORTS, 'custom'])}")
    return [*EFFORTS[effort], 1]


def compact(text: str) -> str:
    """The text after the last ``</think>`` (all of it when there is none), without the
    surrounding whitespace (a reasoning model puts a blank line after ``</think>``)."""
    return text.rsplit("</think>", 1)[-1].strip()


def order_references(texts: Sequence[str], seed: int) -> list[str]:
    """Sorted by length (ties by text, so the order never depends on which rollout finished
    first), then shuffled with ``random.Random(seed)``."""
    ordered = sorted(texts, key=lambda t: (len(t), t))
    random.Random(seed).shuffle(ordered)
    return ordered


def render_synthesis_prompt(original_prompt: str, ref_responses: Sequence[str]) -> str:
    return _TEMPLATE.render(original_prompt=original_prompt, ref_responses=list(ref_responses))


def problem_messages(sample: Sample) -> list[Message]:
    """The messages a model answers from: those before the last assistant turn."""
    assistant = [i for i, m in enumerate(sample.messages) if m.role == "assistant"]
    return sample.messages[: assistant[-1]] if assistant else list(sample.messages)


def synthesis_sample(sample: Sample, references: Sequence[str]) -> Sample:
    """``sample``'s problem with its last user message replaced by the synthesis prompt: the
    message's media parts first (in order), then the prompt filled with the message's text
    (text parts joined by newlines) and ``references``."""
    messages = problem_messages(sample)
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise ValueError(f"sample {sample.id}: no user message to answer")
    last = messages[users[-1]]
    original = "\n".join(p["text"] for p in last.content if p["type"] == "text")
    parts = [p for p in last.content if p["type"] != "text"]
    parts.append({"type": "text", "text": render_synthesis_prompt(original, references)})
    messages = [*messages[: users[-1]], Message("user", parts), *messages[users[-1] + 1:]]
    return Sample(id=sample.id, messages=messages, media=sample.media, targets=sample.targets)


# --- verification ---------------------------------------------------------------------------
def extract_answer(text: str) -> str:
    """What a response answers: its last integer, else its compacted text (lower case,
    without a final period). Used for voting and for exact-answer checks."""
    final = compact(text)
    numbers = _INTEGER.findall(final)
    if numbers:
        return str(int(numbers[-1]))
    return final.lower().rstrip(".").strip()


def answer_reward(text: str, targets: dict | None) -> float | None:
    """Terminal reward in [0, 1] for the synthetic tasks with an exact answer (``count``,
    ``ocr``, ``motion``, ``text``, ...): 1 when the extracted answer equals the target.
    None when the sample has no ``answer`` target. The signature is that of the PPO reward
    registry's rewards (``response, targets``): any of them can stand in as ``reward_fn``."""
    if not targets or "answer" not in targets:
        return None
    return float(extract_answer(text) == extract_answer(str(targets["answer"])))


def majority_answer(texts: Sequence[str]) -> str:
    """The most frequent extracted answer (ties: the one seen first)."""
    return Counter(extract_answer(t) for t in texts).most_common(1)[0][0]


def refers_to_references(text: str) -> bool:
    return bool(_REFERS.search(text))


# --- prompts ----------------------------------------------------------------------------------
class PromptBuilder:
    """Token prompts (with media) for original and synthesis messages, within the budget.

    A problem's media are decoded once; its synthesis prompts reuse them."""

    def __init__(self, encoder: SampleEncoder, *, context_budget: int, max_new_tokens: int):
        if context_budget <= max_new_tokens:
            raise ContextBudgetError(
                f"pacore.context_budget ({context_budget}) leaves no room for a prompt next to "
                f"pacore.max_new_tokens ({max_new_tokens})"
            )
        self.encoder = encoder
        self.tokenizer = encoder.template.tok
        self.max_prompt = context_budget - max_new_tokens
        # keyed by the media list, which a synthesis sample shares with its problem (ids in a
        # JSONL need not be unique); the list is kept so its id is never reused
        self._media: dict[int, tuple[list, dict, list]] = {}

    def _media_of(self, sample: Sample):
        key = id(sample.media)
        if key not in self._media:
            # SampleEncoder.prompt() would decode the media again for every synthesis prompt
            self._media[key] = (sample.media, *self.encoder.media(sample))
        return self._media[key][1:]

    def _tokens(self, sample: Sample) -> torch.Tensor:
        _, layouts = self._media_of(sample)
        context = Sample(id=sample.id, messages=problem_messages(sample), media=sample.media)
        rendered = self.encoder.template.render(context, layouts, add_generation_prompt=True)
        return torch.tensor(rendered.tokens, dtype=torch.long)

    def _prompt(self, sample: Sample, tokens: torch.Tensor) -> Prompt:
        media, _ = self._media_of(sample)
        return Prompt(tokens=tokens, **media)

    def original(self, sample: Sample) -> Prompt:
        tokens = self._tokens(sample)
        if tokens.numel() > self.max_prompt:
            raise ContextBudgetError(
                f"sample {sample.id}: its prompt has {tokens.numel()} tokens, over the budget's "
                f"{self.max_prompt} (pacore.context_budget - pacore.max_new_tokens)"
            )
        return self._prompt(sample, tokens)

    def synthesis(self, sample: Sample, references: Sequence[str]) -> tuple[Prompt, int | None]:
        """The prompt and the reference cap ``c`` in tokens (None: nothing was cut)."""
        tokens = self._tokens(synthesis_sample(sample, references))
        if tokens.numel() <= self.max_prompt:
            return self._prompt(sample, tokens), None
        ids = [self.tokenizer.encode(r) for r in references]

        def cut(c: int) -> list[str]:
            return [r if len(t) <= c else (self.tokenizer.decode(t[len(t) - c:]) if c else "")
                    for r, t in zip(references, ids)]

        def length(c: int) -> int:
            return self._tokens(synthesis_sample(sample, cut(c))).numel()

        if length(0) > self.max_prompt:
            raise ContextBudgetError(
                f"sample {sample.id}: the synthesis prompt with empty references has {length(0)} tokens, "
                f"over the budget's {self.max_prompt}; raise pacore.context_budget or lower max_new_tokens"
            )
        lo, hi = 0, max(len(t) for t in ids) - 1  # length(lo) fits; length(hi + 1) does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if length(mid) <= self.max_prompt else (lo, mid - 1)
        tokens = self._tokens(synthesis_sample(sample, cut(lo)))
        return self._prompt(sample, tokens), lo


# --- the rounds -------------------------------------------------------------------------------
@dataclass
class RoundTrace:
    k: int
    prompt_tokens: int
    reference_cap: int | None  # tokens each reference kept in this round's prompt (None: uncut)
    responses: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # False: stopped by max_new_tokens
    compacted: list[str] = field(default_factory=list)
    rewards: list[float | None] = field(default_factory=list)


@dataclass
class ProblemTrace:
    id: str
    rounds: list[RoundTrace]
    targets: dict | None = None

    @property
    def answer(self) -> str:
        return self.rounds[-1].compacted[0]

    @property
    def reward(self) -> float | None:
        return self.rounds[-1].rewards[0]

    def to_json(self) -> dict:
        return {"id": self.id, "answer": self.answer, "reward": self.reward, "targets": self.targets,
                "rounds": [dataclasses.asdict(r) for r in self.rounds]}


def sample_texts(engine, tokenizer, prompts: Sequence[Prompt], params: SamplingParams, *,
                 max_batch_size: int) -> list[tuple[str, bool]]:
    """``(text, finished)`` of one rollout per prompt, in engine calls of ``max_batch_size``
    (call ``n`` seeded ``params.seed + n``); ``finished``: ended with a stop token."""
    out = []
    for n, start in enumerate(range(0, len(prompts), max_batch_size)):
        chunk = list(prompts[start:start + max_batch_size])
        out += [_decode(tokenizer, c) for c in engine.rollout(chunk, dataclasses.replace(params, seed=params.seed + n))]
    return out


def _decode(tokenizer, completion: Completion) -> tuple[str, bool]:
    """The text without the stop token, and whether a stop token ended it."""
    ids = completion.tokens.tolist()
    finished = completion.finish_reason == "stop"
    return tokenizer.decode(ids[:-1] if finished else ids), finished


@dataclass
class _Item:
    problem: int
    round: int
    prompt: Prompt


def run_pacore(
    engine, builder: PromptBuilder, samples: Sequence[Sample], schedule: Sequence[int], params: SamplingParams, *,
    max_batch_size: int, shuffle_seed: int = 0,
    reward_fn: Callable[[str, dict], float | None] = answer_reward,
) -> list[ProblemTrace]:
    """Run the schedule on every sample; ``engine.rollout(prompts, params)`` returns each
    prompt's ``Completion`` (``GenerationEngine``). Engine call ``n`` samples
    with seed ``params.seed + n``. ``params.stop_token_ids`` must hold the turn's end token."""
    tokenizer = builder.tokenizer
    traces = [ProblemTrace(s.id, [], s.targets) for s in samples]
    queue: deque[_Item] = deque()

    def open_round(i: int, r: int, prompt: Prompt, cap: int | None) -> None:
        traces[i].rounds.append(RoundTrace(k=schedule[r], prompt_tokens=prompt.tokens.numel(), reference_cap=cap))
        queue.extend(_Item(i, r, prompt) for _ in range(schedule[r]))

    for i, sample in enumerate(samples):
        open_round(i, 0, builder.original(sample), None)
    calls = 0
    while queue:
        batch = [queue.popleft() for _ in range(min(max_batch_size, len(queue)))]
        outputs = engine.rollout([item.prompt for item in batch], dataclasses.replace(params, seed=params.seed + calls))
        calls += 1
        for item, completion in zip(batch, outputs):
            text, finished = _decode(tokenizer, completion)
            trace = traces[item.problem].rounds[item.round]
            trace.responses.append(text)
            trace.finished.append(finished)
            trace.compacted.append(compact(text))
            trace.rewards.append(reward_fn(text, samples[item.problem].targets or {}))
            if len(trace.responses) == trace.k and item.round + 1 < len(schedule):
                references = order_references(trace.compacted, shuffle_seed)
                prompt, cap = builder.synthesis(samples[item.problem], references)
                open_round(item.problem, item.round + 1, prompt, cap)
    return traces


# --- metrics ----------------------------------------------------------------------------------
def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def pacore_metrics(traces: Sequence[ProblemTrace]) -> dict:
    """Accuracy per round (mean reward of its rollouts), final accuracy, emergent correctness
    (synthesis rollouts right although every reference was wrong) and the rate at which
    synthesis answers mention the references."""
    n_rounds = len(traces[0].rounds)
    per_round = [_mean(r for t in traces for r in t.rounds[k].rewards) for k in range(n_rounds)]
    emergent_cases = emergent_right = 0
    refer = synth = 0
    for t in traces:
        for prev, cur in zip(t.rounds, t.rounds[1:]):
            synth += len(cur.responses)
            refer += sum(refers_to_references(x) for x in cur.responses)
            if prev.rewards and all(r == 0.0 for r in prev.rewards):
                emergent_cases += len(cur.rewards)
                emergent_right += sum(r == 1.0 for r in cur.rewards)
    return {
        "problems": len(traces),
        "accuracy_per_round": per_round,
        "accuracy": _mean(t.reward for t in traces),
        "emergent_correct": emergent_right,
        "emergent_cases": emergent_cases,  # synthesis rollouts whose references were all wrong
        "emergent_rate": emergent_right / emergent_cases if emergent_cases else None,
        "reference_mention_rate": refer / synth if synth else None,
    }


def vote_metrics(traces: Sequence[ProblemTrace], reward_fn: Callable[[str, dict], float | None] = answer_reward) -> dict:
    """Single pass (mean reward of the first round's rollouts) and majority vote over them,
    for traces run with a one-round schedule ``[n]``."""
    single = _mean(r for t in traces for r in t.rounds[0].rewards)
    majority = _mean(reward_fn(majority_answer(t.rounds[0].responses), t.targets or {}) for t in traces)
    return {"rollouts": traces[0].rounds[0].k, "single_pass": single, "majority_vote": majority}
