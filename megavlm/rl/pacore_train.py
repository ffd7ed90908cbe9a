"""PaCoRe training data (REFERENCE 8): message pools, the two filtrations, synthesis prompts.

1. ``build_message_pools``: the actor answers each problem ``pool_size`` (24) times; the
   responses and their rewards are cached (``save_pools`` / ``load_pools``, JSONL).
2. ``stage1_filter``: keep problems with 0 < message accuracy < 9/24 (hard, not hopeless).
3. ``PaCoReTrainingData.draw``: a synthesis prompt of ``|M| ~ U(min_messages, max_messages)``
   pool responses drawn without replacement (compacted, sorted by length, shuffled with the
   fixed seed), with the problem's media, within the context budget.
4. ``synthesis_accuracy`` + ``stage2_filter``: with the stage-1 checkpoint as the engine, keep
   problems with 0 < synthesis accuracy < 1.
5. The PPO trainer (``rl.prompt_source=pacore``: strict on-policy, GAE 1/1) consumes
   ``PaCoRePromptSource``, which runs 1-4 on the live actor: ``draw(step, n)`` gives ``n``
   prompts for that step, ``reward(prompt, text)`` the terminal reward in [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from megavlm.config.schema import PaCoReConfig
from megavlm.data.sample import Sample
from megavlm.inference.engine import Prompt, SamplingParams
from megavlm.rl.pacore import PromptBuilder, answer_reward, compact, order_references, sample_texts


@dataclass
class MessagePool:
    sample: Sample
    responses: list[str]  # the actor's full responses to the original problem
    rewards: list[float]

    @property
    def accuracy(self) -> float:
        return sum(self.rewards) / len(self.rewards)


def _reward(fn, sample: Sample, text: str) -> float:
    r = fn(text, sample.targets or {})
    if r is None:
        raise ValueError(f"sample {sample.id}: no verifiable target (targets={sample.targets}); "
                         "PaCoRe training needs one per problem")
    return r


def build_message_pools(engine, builder: PromptBuilder, samples: Sequence[Sample], params: SamplingParams, *,
                        pool_size: int, max_batch_size: int,
                        reward_fn: Callable = answer_reward) -> list[MessagePool]:
    prompts = [builder.original(s) for s in samples for _ in range(pool_size)]
    texts = sample_texts(engine, builder.tokenizer, prompts, params, max_batch_size=max_batch_size)
    pools = []
    for i, sample in enumerate(samples):
        responses = [t for t, _ in texts[i * pool_size:(i + 1) * pool_size]]
        pools.append(MessagePool(sample, responses, [_reward(reward_fn, sample, t) for t in responses]))
    return pools


def save_pools(pools: Sequence[MessagePool], path: str | Path) -> None:
    with open(path, "w") as f:
        for p in pools:
            f.write(json.dumps({"id": p.sample.id, "responses": p.responses, "rewards": p.rewards}) + "\n")


def load_pools(path: str | Path, samples: Sequence[Sample]) -> list[MessagePool]:
    """The cached pools of ``samples`` (matched by id; a sample with no pool is an error)."""
    by_id = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        by_id[record["id"]] = record
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise KeyError(f"{path}: no message pool for {len(missing)} problem(s), e.g. {missing[0]}")
    return [MessagePool(s, by_id[s.id]["responses"], by_id[s.id]["rewards"]) for s in samples]


def stage1_filter(pools: Sequence[MessagePool], max_accuracy: float = 9 / 24) -> list[MessagePool]:
    """Problems with 0 < message accuracy < ``max_accuracy``."""
    return [p for p in pools if 0 < p.accuracy < max_accuracy]


@dataclass
class SynthesisPrompt:
    """One training prompt: what the engine answers and what the reward checks against."""

    pool: MessagePool
    messages: list[int]  # indices of the pool responses shown as references
    prompt: Prompt
    reference_cap: int | None  # context-budget cut of each reference, in tokens (None: uncut)


class PaCoReTrainingData:
    def __init__(self, pools: Sequence[MessagePool], builder: PromptBuilder, *, min_messages: int, max_messages: int,
                 shuffle_seed: int = 0, seed: int = 0, reward_fn: Callable = answer_reward):
        if not pools:
            raise ValueError("no problems left to train on (are the filtrations too strict?)")
        short = [p.sample.id for p in pools if len(p.responses) < max_messages]
        if short:
            raise ValueError(f"pool of {short[0]} has fewer than max_messages={max_messages} responses")
        self.pools, self.builder = list(pools), builder
        self.min_messages, self.max_messages = min_messages, max_messages
        self.shuffle_seed, self.seed, self.reward_fn = shuffle_seed, seed, reward_fn

    def draw_for(self, pool: MessagePool, rng: random.Random) -> SynthesisPrompt:
        m = rng.randint(self.min_messages, self.max_messages)  # |M| ~ U(min, max), both included
        chosen = rng.sample(range(len(pool.responses)), m)
        references = order_references([compact(pool.responses[j]) for j in chosen], self.shuffle_seed)
        prompt, cap = self.builder.synthesis(pool.sample, references)
        return SynthesisPrompt(pool, chosen, prompt, cap)

    def draw(self, step: int, n: int) -> list[SynthesisPrompt]:
        """``n`` prompts for training step ``step``: problems in a per-epoch permutation, a
        fresh message subset each time; a pure function of ``(seed, step, n)``."""
        out = []
        for j in range(step * n, (step + 1) * n):
            epoch, index = divmod(j, len(self.pools))
            order = list(range(len(self.pools)))
            random.Random(f"{self.seed}-epoch-{epoch}").shuffle(order)
            out.append(self.draw_for(self.pools[order[index]], random.Random(f"{self.seed}-draw-{j}")))
        return out

    def reward(self, prompt: SynthesisPrompt, text: str) -> float:
        """Terminal reward in [0, 1] of a completion of ``prompt``."""
        return _reward(self.reward_fn, prompt.pool.sample, text)


def synthesis_accuracy(engine, data: PaCoReTrainingData, params: SamplingParams, *, rollouts: int,
                       max_batch_size: int, seed: int = 0, indices: Sequence[int] | None = None) -> list[float]:
    """Per pool (those at ``indices`` of ``data.pools``, default all): mean reward of
    ``rollouts`` answers, each to its own freshly drawn synthesis prompt (drawn by the pool's
    index, so a split over ranks draws alike); run with the stage-1 checkpoint as ``engine``
    for stage 2."""
    indices = range(len(data.pools)) if indices is None else indices
    prompts = [data.draw_for(data.pools[i], random.Random(f"{seed}-stage2-{i}-{k}"))
               for i in indices for k in range(rollouts)]
    texts = sample_texts(engine, data.builder.tokenizer, [p.prompt for p in prompts], params,
                         max_batch_size=max_batch_size)
    rewards = [data.reward(p, t) for p, (t, _) in zip(prompts, texts)]
    return [sum(rewards[j * rollouts:(j + 1) * rollouts]) / rollouts for j in range(len(indices))]


def stage2_filter(pools: Sequence[MessagePool], accuracy: Sequence[float]) -> list[MessagePool]:
    """Problems with 0 < synthesis accuracy < 1."""
    return [p for p, a in zip(pools, accuracy) if 0 < a < 1]


def stage1_training_data(cfg: PaCoReConfig, engine, builder: PromptBuilder, samples: Sequence[Sample],
                         params: SamplingParams, *, reward_fn: Callable = answer_reward,
                         ) -> tuple[PaCoReTrainingData, list[MessagePool]]:
    """``pacore.*`` end to end for stage 1: the actor's pools (``pool_size``), the stage-1
    filtration (``stage1_max_accuracy``) and the synthesis-prompt source (``min_messages``,
    ``max_messages``, ``shuffle_seed``, ``seed``). Returns the data and every pool (to cache)."""
    pools = build_message_pools(engine, builder, samples, params, pool_size=cfg.pool_size,
                                max_batch_size=cfg.max_batch_size, reward_fn=reward_fn)
    data = PaCoReTrainingData(stage1_filter(pools, cfg.stage1_max_accuracy), builder, min_messages=cfg.min_messages,
                              max_messages=cfg.max_messages, shuffle_seed=cfg.shuffle_seed, seed=cfg.seed,
                              reward_fn=reward_fn)
    return data, pools


def terminal_reward(reward) -> Callable[[str, dict], float | None]:
    """``rl.rewards`` (a ``megavlm.rl.rewards.CombinedReward``) as PaCoRe's terminal reward:
    scored on the compacted response (the text after the last ``</think>``); None when no
    term applies to the targets."""
    def score(text: str, targets: dict) -> float | None:
        value, parts = reward(compact(text), targets)
        return value if parts else None
    return score


class PaCoRePromptSource:
    """``rl.prompt_source=pacore``: the prompts of PPO (REFERENCE 8's training recipe).

    ``prepare``: every DP rank has the live actor answer its share of ``problems``
    ``pacore.pool_size`` times (the message pools; gathered, so every rank holds all of
    them), stage 1 keeps 0 < message accuracy < ``pacore.stage1_max_accuracy``.
    ``stage2`` (at iteration ``pacore.stage1_iters``, the actor then being the stage-1
    checkpoint): each stage-1 problem's synthesis accuracy over ``pacore.stage2_rollouts``
    fresh synthesis prompts, 0 < accuracy < 1 stay. ``draw(iteration, n)``: the iteration's
    synthesis prompts, the same on every rank. Pools and the stage-2 accuracies are written
    to ``<checkpoint.save>/pacore/`` and read back from ``<checkpoint.load>/pacore/`` on
    resume (the actor that built them is gone by then)."""

    def __init__(self, cfg, *, builder: PromptBuilder, problems: Sequence[Sample], engine, reward_fn: Callable,
                 params: SamplingParams, dp_rank: int, dp_size: int, gather: Callable[[list], list],
                 writer: bool, log: Callable[[str], None] = print):
        self.cfg, self.p = cfg, cfg.pacore
        self.builder, self.problems, self.engine, self.reward_fn = builder, list(problems), engine, reward_fn
        self.params, self.dp_rank, self.dp_size, self.gather = params, dp_rank, dp_size, gather
        self.writer, self.log = writer, log
        self.stage = 1
        self.pools: list[MessagePool] = []
        self.stage1: list[MessagePool] = []
        self.stage2_accuracy: dict[str, float] = {}
        self.data: PaCoReTrainingData | None = None

    def _training_data(self, pools: Sequence[MessagePool]) -> PaCoReTrainingData:
        p = self.p
        return PaCoReTrainingData(pools, self.builder, min_messages=p.min_messages, max_messages=p.max_messages,
                                  shuffle_seed=p.shuffle_seed, seed=p.seed, reward_fn=self.reward_fn)

    @staticmethod
    def _cache(root: str | None, name: str) -> Path | None:
        return Path(root) / "pacore" / name if root else None

    def _write(self, name: str, write: Callable[[Path], None]) -> None:
        path = self._cache(self.cfg.checkpoint.save, name)
        if path is not None and self.writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)

    def prepare(self, iteration: int) -> None:
        p = self.p
        cached = self._cache(self.cfg.checkpoint.load, "pools.jsonl")
        if cached is not None and cached.is_file():
            self.pools = load_pools(cached, self.problems)
            self.log(f"megavlm: PaCoRe message pools read from {cached}")
        else:
            mine = list(range(self.dp_rank, len(self.problems), self.dp_size))
            params = dataclasses.replace(self.params, seed=self.params.seed + 7919 * self.dp_rank)
            local = build_message_pools(self.engine, self.builder, [self.problems[i] for i in mine], params,
                                        pool_size=p.pool_size, max_batch_size=p.max_batch_size,
                                        reward_fn=self.reward_fn)
            gathered = sorted(self.gather([(i, m.responses, m.rewards) for i, m in zip(mine, local)]))
            self.pools = [MessagePool(self.problems[i], responses, rewards) for i, responses, rewards in gathered]
        self._write("pools.jsonl", lambda path: save_pools(self.pools, path))
        self.stage1 = stage1_filter(self.pools, p.stage1_max_accuracy)
        self.log(f"megavlm: PaCoRe stage 1: {len(self.stage1)} of {len(self.pools)} problems with "
                 f"0 < message accuracy < {p.stage1_max_accuracy:.4g}")
        self.data = self._training_data(self.stage1)
        if p.stage1_iters is not None and iteration > p.stage1_iters:  # resumed inside stage 2
            cached = self._cache(self.cfg.checkpoint.load, "stage2.json")
            if cached is None or not cached.is_file():
                raise FileNotFoundError(f"resuming PaCoRe stage 2 at iteration {iteration} needs {cached}")
            self._stage2(json.loads(cached.read_text()))

    def _stage2(self, accuracy: dict[str, float]) -> None:
        self.stage, self.stage2_accuracy = 2, accuracy
        kept = stage2_filter(self.stage1, [accuracy[m.sample.id] for m in self.stage1])
        self.log(f"megavlm: PaCoRe stage 2: {len(kept)} of {len(self.stage1)} problems with 0 < synthesis "
                 "accuracy < 1")
        self.data = self._training_data(kept)

    def stage2(self, iteration: int) -> None:
        """At iteration ``pacore.stage1_iters``: measure with the live actor, filter."""
        p = self.p
        if p.stage1_iters is None or iteration != p.stage1_iters or self.stage == 2:
            return
        mine = list(range(self.dp_rank, len(self.stage1), self.dp_size))
        params = dataclasses.replace(self.params, seed=self.params.seed + 1_000_003 + 7919 * self.dp_rank)
        accuracy = synthesis_accuracy(self.engine, self.data, params, rollouts=p.stage2_rollouts,
                                      max_batch_size=p.max_batch_size, seed=p.seed, indices=mine) if mine else []
        gathered = dict(self.gather([(self.stage1[i].sample.id, a) for i, a in zip(mine, accuracy)]))
        self._write("stage2.json", lambda path: path.write_text(json.dumps(gathered)))
        self._stage2(gathered)

    def draw(self, iteration: int, n: int) -> list[SynthesisPrompt]:
        return self.data.draw(iteration, n)
