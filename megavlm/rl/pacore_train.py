"""PaCoRe training data (REFERENCE 8): message pools, the two filtrations, synthesis prompts.

1. ``build_message_pools``: the actor answers each problem ``pool_size`` (24) times; the
   responses and their rewards are cached (``save_pools`` / ``load_pools``, JSONL).
2. ``stage1_filter``: keep problems with 0 < message accuracy < 9/24 (hard, not hopeless).
3. ``PaCoReTrainingData.draw``: a synthesis prompt of ``|M| ~ U(min_messages, max_messages)``
   pool responses drawn without replacement (compacted, sorted by length, shuffled with the
   fixed seed), with the problem's media, within the context budget.
4. ``synthesis_accuracy`` + ``stage2_filter``: with the stage-1 checkpoint as the engine, keep
   problems with 0 < synthesis accuracy < 1.
5. The PPO trainer (strict on-policy, GAE 1/1) consumes ``PaCoReTrainingData``: ``draw(step,
   n)`` gives ``n`` prompts for that step, ``reward(prompt, text)`` the terminal reward in [0, 1].
"""

from __future__ import annotations

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
                       max_batch_size: int, seed: int = 0) -> list[float]:
    """Per pool: mean reward of ``rollouts`` answers, each to its own freshly drawn synthesis
    prompt (run with the stage-1 checkpoint as ``engine`` for stage 2)."""
    prompts = [data.draw_for(pool, random.Random(f"{seed}-stage2-{i}-{k}"))
               for i, pool in enumerate(data.pools) for k in range(rollouts)]
    texts = sample_texts(engine, data.builder.tokenizer, [p.prompt for p in prompts], params,
                         max_batch_size=max_batch_size)
    rewards = [data.reward(p, t) for p, (t, _) in zip(prompts, texts)]
    return [sum(rewards[i * rollouts:(i + 1) * rollouts]) / rollouts for i in range(len(data.pools))]


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
