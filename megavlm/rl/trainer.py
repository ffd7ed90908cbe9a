"""PPO for VLMs (REFERENCE 7): actor and critic in one layout, rollouts, GAE, truncated IS.

One iteration (``PPOTrainer.step``):
1. rollouts: each DP rank samples K completions for each of its P / DP prompts with the
   KV-cache engine on the actor's live weights (colocated, no copy), scores them, and the
   rollouts are gathered over DP, so every rank holds the iteration's global list;
2. difficulty filter: keep the prompts whose pass rate over K is strictly between 0 and 1;
3. forward-only passes through megatron's schedules: the trainer's old log-probs (and the
   reference's), the critic's values;
4. advantages: GAE on the terminal reward (or GRPO's group normalization);
5. ``rl.mini_batches`` optimizer steps of the actor (clipped surrogate, dual clip, truncated
   IS weights) and of the critic (clipped value loss), each over one slice of the rollouts,
   split over DP ranks; losses are summed per token and megatron's per-token mode divides
   by the global token count (token-level aggregation over the global mini-batch).

``rl.prompt_source=pacore`` (REFERENCE 8): the prompts of step 1 are PaCoRe synthesis
prompts (``megavlm.rl.pacore_train.PaCoRePromptSource``: message pools from the live actor,
the two filtrations), scored by the terminal reward of the compacted answer; validation
requires ``rl.mini_batches=1``, so the one optimizer step of an iteration is taken on
rollouts of exactly the weights it updates (strict on-policy: the ratio is 1 at that step;
``abs_log_ratio`` reports it).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megavlm.checkpointing import assets_of, latest_complete
from megavlm.config import dump_yaml
from megavlm.config.schema import Config
from megavlm.config.validate import validate_rl
from megavlm.models.vlm import pipeline_seq_multiplier
from megavlm.parallel.context import gather_from_cp, shard_for_cp
from megavlm.parallel.partition import CPPartition, split_for_cp
from megavlm.platform import device
from megavlm.platform.distributed import initialize
from megavlm.platform.launch import detect_dist_env
from megavlm.rl.experience import Experience, MicroBatch, from_label_frame, make_micro_batch, sequence_length
from megavlm.rl.losses import (
    explained_variance, gae, grpo_advantages, kl_penalty, masked_whiten, policy_loss, terminal_rewards,
    tis_weights, value_loss,
)
from megavlm.rl.models import TrainedModel, build_actor, build_critic, build_reference, token_logprobs
from megavlm.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from megavlm.training.data_parallel import parameters_in_sync
from megavlm.training.metrics import MetricsLogger


def _is_reporter() -> bool:
    """The rank whose micro-batch outputs are reported: last pipeline stage, TP rank 0."""
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def _gather_dicts(local: dict) -> dict:
    """Union over all ranks of ``{key: value}`` (small objects)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for d in gathered for k, v in d.items()}


@dataclass
class UpdateStats:
    sums: dict  # name -> [sum, count]

    def mean(self, name: str) -> float:
        s, n = self.sums.get(name, (0.0, 0.0))
        return s / n if n else float("nan")


class PPOTrainer:
    """Owns actor, critic (GAE), reference (KL), optimizers and state of one PPO run."""

    def __init__(self, cfg: Config, *, load_weights=None):
        env = detect_dist_env()
        validate_rl(cfg, env.world_size)
        initialize(cfg.parallel, cfg.train.seed, env)
        self.cfg = cfg
        self._log(f"megavlm: PPO, world size {env.world_size} ({env.launcher}), resolved config:\n{dump_yaml(cfg)}")
        resume = self._resume_dirs()
        self.assets = None

        def initial_weights(chunks):
            if load_weights is not None:
                load_weights(chunks)
            elif resume is None and cfg.checkpoint.pretrained:
                from megavlm.conversion.pretrained import load_pretrained_weights

                self.assets = load_pretrained_weights(chunks, cfg)

        self.actor: TrainedModel = build_actor(cfg, initial_weights)
        self.critic: TrainedModel | None = (
            build_critic(cfg, self.actor.model) if cfg.rl.advantage == "gae" else None
        )
        self.reference = build_reference(cfg, self.actor.model) if cfg.rl.kl_coef > 0 else None
        self.state = TrainState()
        if resume is not None:
            self.state = load_checkpoint(resume[0], cfg, self.actor.model, self.actor.optimizer)
            if self.critic is not None:
                critic_state = load_checkpoint(resume[1], cfg, self.critic.model, self.critic.optimizer)
                assert critic_state.iteration == self.state.iteration
            self.assets = assets_of(resume[0])
            self._log(f"megavlm: resumed PPO from {resume[0].parent.parent} at iteration {self.state.iteration}")
        self.forward_backward = get_forward_backward_func()
        self._engine = None
        self._data = None
        self._pacore = None

    # --- setup ----------------------------------------------------------------------------
    def _resume_dirs(self) -> tuple[Path, Path | None] | None:
        load = self.cfg.checkpoint.load
        if not load:
            return None
        actor = latest_complete(Path(load) / "actor")
        if actor is None:
            if load != self.cfg.checkpoint.save:
                raise FileNotFoundError(f"checkpoint.load={load!r}: no complete PPO checkpoint in {load}/actor")
            return None
        critic = None
        if self.cfg.rl.advantage == "gae":
            critic = Path(load) / "critic" / actor.name
            if not (critic / "complete").is_file():
                raise FileNotFoundError(f"{actor} has no complete critic checkpoint at {critic}")
        return actor, critic

    @staticmethod
    def _log(message: str) -> None:
        if dist.get_rank() == 0:
            print(message, flush=True)

    # --- schedules ------------------------------------------------------------------------
    def _micro_batches(self, experiences: list[Experience], order: list[int]) -> list[MicroBatch]:
        """This DP rank's contiguous share of ``order``, in micro-batches of
        ``train.micro_batch_size`` rows; every rank gets the same count (padding rows)."""
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mbs = self.cfg.train.micro_batch_size
        per_rank = math.ceil(len(order) / dp)
        count = max(1, math.ceil(per_rank / mbs))
        mine = order[rank * per_rank:(rank + 1) * per_rank]
        seq = self._seq_length
        return [make_micro_batch(experiences, mine[k * mbs:(k + 1) * mbs], rows=mbs, seq_length=seq,
                                 model=self.cfg.model, pad_token_id=0) for k in range(count)]

    def _run(self, model: list, step_fn, batches: list[MicroBatch], *, forward_only: bool):
        iterator = iter(batches)
        return self.forward_backward(
            forward_step_func=step_fn,
            data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iterator,
            model=model, num_microbatches=len(batches),
            seq_length=self._seq_length * pipeline_seq_multiplier(self.cfg.model, self.cfg.parallel),
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    @staticmethod
    def _cp_share(batch: MicroBatch) -> tuple[MicroBatch, CPPartition | None]:
        """This CP rank's share of a micro-batch (``megavlm.parallel.context``): every per-token
        tensor split by the zigzag partition; token ids and the media mask stay whole (the first
        stage embeds whole rows, then splits)."""
        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            return batch, None
        shard = shard_for_cp(
            tokens=batch.tokens, labels=batch.labels, loss_mask=batch.mask, loss_weights=None,
            position_ids=batch.position_ids, cu_seqlens=None, sample_ids=None, cp_size=cp,
            cp_rank=parallel_state.get_context_parallel_rank(), pad_token_id=0,
        )
        return dataclasses.replace(
            batch, position_ids=shard.position_ids, labels=shard.labels, mask=shard.loss_mask,
            per_token={k: split_for_cp(v, shard.partition) for k, v in batch.per_token.items()},
        ), shard.partition

    @staticmethod
    def _forward(model, batch: MicroBatch, partition: CPPartition | None = None):
        cp = {} if partition is None else {"cp_partition": partition}
        return model(batch.tokens, batch.position_ids, media_mask=batch.media_mask, **batch.media, **cp)

    def _per_token(self, model: list, experiences: list[Experience], what: str) -> dict[int, tuple]:
        """Forward-only pass over every experience: ``{index: (values [n], entropy [n] | None)}``
        with values the log-probs (``what="logp"``) or the critic's values (``"value"``)."""
        r = self.cfg.rl
        vocab = self.cfg.model.language.vocab_size
        batches = self._micro_batches(experiences, list(range(len(experiences))))

        def step(data_iterator, model_chunk):
            batch, partition = self._cp_share(next(data_iterator).to(device.device()))
            output = self._forward(model_chunk, batch, partition)

            def whole(x):  # every CP rank of the last stage calls collect for the same micro-batch
                return x if partition is None else gather_from_cp(
                    x, partition, parallel_state.get_context_parallel_group())

            def collect(out, non_loss_data=False):
                if what == "value":
                    return whole(out[..., 0].float()), None
                logp, ent = token_logprobs(out, batch.labels, temperature=r.temperature, vocab_size=vocab,
                                           entropy=True)
                return whole(logp), whole(ent)
            return output, collect

        for chunk in model:
            chunk.eval()
        with torch.no_grad():
            outputs = self._run(model, step, batches, forward_only=True)
        for chunk in model:
            chunk.train()
        local = {}
        if _is_reporter():
            for batch, (values, ent) in zip(batches, outputs):
                vals = from_label_frame(batch, values, experiences)
                ents = from_label_frame(batch, ent, experiences) if ent is not None else {}
                for i in vals:
                    local[i] = (vals[i], ents.get(i))
        return _gather_dicts(local)

    # --- losses ---------------------------------------------------------------------------
    def _actor_loss(self, batch: MicroBatch, output):
        r = self.cfg.rl
        pt, mask = batch.per_token, batch.mask
        logp, ent = token_logprobs(output, batch.labels, temperature=r.temperature,
                                   vocab_size=self.cfg.model.language.vocab_size, entropy=r.entropy_coef > 0)
        weights, _ = tis_weights(pt["old_logp"], pt["rollout_logp"], mask, cap=r.tis_cap)
        pg, clipped = policy_loss(logp, pt["old_logp"], pt["advantages"], mask, clip_eps=r.clip_eps,
                                  clip_eps_high=r.clip_eps_high, dual_clip=r.dual_clip, is_weights=weights)
        loss = pg
        n = mask.sum()
        report = {"pg_loss": torch.stack([pg.sum(), n]), "clip_fraction": torch.stack([clipped.sum(), n]),
                  "approx_kl": torch.stack([(0.5 * (logp - pt["old_logp"]) ** 2 * mask).sum(), n]),
                  # |log ratio|: 0 in a strict on-policy step (the weights that scored old_logp)
                  "abs_log_ratio": torch.stack([((logp - pt["old_logp"]).abs() * mask).sum(), n])}
        if r.kl_coef > 0:
            kl = kl_penalty(logp, pt["ref_logp"], mask)
            loss = loss + r.kl_coef * kl
            report["kl_ref"] = torch.stack([kl.sum(), n])
        if r.entropy_coef > 0:
            loss = loss - r.entropy_coef * ent * mask
        return loss.sum(), n.to(torch.int), {k: v.detach() for k, v in report.items()}

    def _critic_loss(self, batch: MicroBatch, output):
        pt, mask = batch.per_token, batch.mask
        values = output[..., 0].float()
        loss = value_loss(values, pt["values"], pt["returns"], mask, clip_eps=self.cfg.rl.value_clip_eps)
        n = mask.sum()
        return loss.sum(), n.to(torch.int), {"value_loss": torch.stack([loss.sum().detach(), n])}

    def _train_step(self, trained: TrainedModel, loss_fn, batches: list[MicroBatch]) -> tuple[dict, float]:
        for chunk in trained.model:
            chunk.zero_grad_buffer()
        trained.optimizer.zero_grad()

        def step(data_iterator, model_chunk):
            batch, partition = self._cp_share(next(data_iterator).to(device.device()))
            return self._forward(model_chunk, batch, partition), partial(loss_fn, batch)

        reports = self._run(trained.model, step, batches, forward_only=False)
        _, grad_norm, _ = trained.optimizer.step()
        sums: dict[str, list[float]] = {}
        if _is_reporter():
            for report in reports:
                for k, v in report.items():
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0] += float(v[0])
                    acc[1] += float(v[1])
        return sums, float("nan") if grad_norm is None else float(grad_norm)

    # --- one update on given rollouts -----------------------------------------------------
    def update(self, experiences: list[Experience]) -> dict[str, float]:
        """Old log-probs, values, advantages, then ``rl.mini_batches`` steps of actor and critic
        on ``experiences`` (the iteration's global list, the same on every rank)."""
        r = self.cfg.rl
        p = self.cfg.parallel
        # SP splits the sequence over TP ranks, CP into 2 x CP zigzag chunks (then SP each share)
        multiple = (p.tp if p.sequence_parallel else 1) * (2 * p.cp if p.cp > 1 else 1)
        self._seq_length = math.ceil(sequence_length(experiences) / multiple) * multiple
        start = time.perf_counter()
        old = self._per_token(self.actor.model, experiences, "logp")
        for i, e in enumerate(experiences):
            e.old_logp, e.entropy = old[i]
        if self.reference is not None:
            ref = self._per_token(self.reference, experiences, "logp")
            for i, e in enumerate(experiences):
                e.ref_logp = ref[i][0]
        if self.critic is not None:
            values = self._per_token(self.critic.model, experiences, "value")
            for i, e in enumerate(experiences):
                e.values = values[i][0]
        metrics = {"time/old_logprobs": time.perf_counter() - start}
        self._advantages(experiences)

        start = time.perf_counter()
        n_mini = min(r.mini_batches, len(experiences))
        bounds = [round(k * len(experiences) / n_mini) for k in range(n_mini + 1)]
        totals: dict[str, list[float]] = {}
        norms = {"actor": [], "critic": []}
        for k in range(n_mini):
            order = list(range(bounds[k], bounds[k + 1]))
            batches = self._micro_batches(experiences, order)
            sums, norm = self._train_step(self.actor, self._actor_loss, batches)
            norms["actor"].append(norm)
            if self.critic is not None:
                critic_sums, norm = self._train_step(self.critic, self._critic_loss, batches)
                sums.update(critic_sums)
                norms["critic"].append(norm)
            for key, (s, n) in sums.items():
                acc = totals.setdefault(key, [0.0, 0.0])
                acc[0] += s
                acc[1] += n
        totals = self._sum_over_ranks(totals)
        metrics["time/update"] = time.perf_counter() - start
        for key, (s, n) in totals.items():
            metrics[key] = s / n if n else float("nan")
        metrics["grad_norm/actor"] = sum(norms["actor"]) / len(norms["actor"])
        if norms["critic"]:
            metrics["grad_norm/critic"] = sum(norms["critic"]) / len(norms["critic"])
        metrics.update(self._rollout_stats(experiences))
        return metrics

    def _sum_over_ranks(self, totals: dict) -> dict:
        keys = sorted(_gather_dicts({k: None for k in totals}))
        flat = torch.tensor([v for k in keys for v in totals.get(k, [0.0, 0.0])], dtype=torch.float64)
        dist.all_reduce(flat)
        return {k: flat[2 * i: 2 * i + 2].tolist() for i, k in enumerate(keys)}

    def _advantages(self, experiences: list[Experience]) -> None:
        r = self.cfg.rl
        n = max(e.response.numel() for e in experiences)
        mask = torch.zeros(len(experiences), n)
        for i, e in enumerate(experiences):
            mask[i, : e.response.numel()] = 1
        scores = torch.tensor([e.score for e in experiences], dtype=torch.float32)
        pad = lambda name: torch.stack([torch.nn.functional.pad(getattr(e, name), (0, n - e.response.numel()))  # noqa: E731
                                        for e in experiences])
        if r.advantage == "grpo":
            groups = torch.tensor([e.group for e in experiences])
            adv = grpo_advantages(scores, groups, mask)
            returns = torch.zeros_like(adv)
        else:
            rewards = terminal_rewards(scores, mask)
            adv, returns = gae(rewards, pad("values"), mask, gamma=r.gamma, lam=r.lam)
        if r.whiten_advantages:
            adv = masked_whiten(adv, mask)
        for i, e in enumerate(experiences):
            k = e.response.numel()
            e.advantages, e.returns = adv[i, :k].clone(), returns[i, :k].clone()

    def _rollout_stats(self, experiences: list[Experience]) -> dict[str, float]:
        mask = torch.cat([torch.ones(e.response.numel()) for e in experiences])
        old = torch.cat([e.old_logp for e in experiences])
        rollout = torch.cat([e.rollout_logp for e in experiences])
        _, oob = tis_weights(old, rollout, mask, cap=self.cfg.rl.tis_cap)
        out = {"tis/out_of_bound_fraction": float(oob),
               # engine vs trainer log-probs at the same weights: ~0 unless they disagree
               "tis/mean_abs_logp_diff": float((old - rollout).abs().mean()),
               "tis/max_abs_logp_diff": float((old - rollout).abs().max())}
        if self.critic is not None:
            values = torch.cat([e.values for e in experiences])
            returns = torch.cat([e.returns for e in experiences])
            out["explained_variance"] = explained_variance(values, returns, mask)
        return out

    # --- rollouts -------------------------------------------------------------------------
    def _setup_data(self):
        """Prompt source, encoder, reward and engine, built on first use (the layout test
        drives ``update`` alone and needs none of them)."""
        if self._data is not None:
            return self._data
        from megavlm.data.build import sample_encoder
        from megavlm.inference.engine import GenerationEngine
        from megavlm.rl.judge import GenerativeJudge
        from megavlm.rl.prompt_data import prompt_sources
        from megavlm.rl.rewards import build_reward

        cfg, r = self.cfg, self.cfg.rl
        encoder = sample_encoder(cfg)
        train, held_out = prompt_sources(cfg)
        judge = GenerativeJudge(cfg, encoder, mode=r.judge_mode) if r.judge else None
        reward = build_reward(r.rewards, point_scale=r.point_scale, judge=judge)
        engine = GenerationEngine(self.actor.model, pad_token_id=0, compile_decode=cfg.inference.compile_decode)
        tokenizer = encoder.template.tok
        self._data = (encoder, train, held_out, reward, engine, tokenizer)
        if r.prompt_source == "pacore":
            self._pacore = self._pacore_source(encoder, train, reward, engine)
        return self._data

    def _pacore_source(self, encoder, train, reward, engine):
        """rl.prompt_source=pacore: message pools of the first pacore.problems problems from
        the live actor, stage-1 filtered (megavlm.rl.pacore_train.PaCoRePromptSource)."""
        from megavlm.inference.engine import SamplingParams
        from megavlm.rl.pacore import PromptBuilder
        from megavlm.rl.pacore_train import PaCoRePromptSource, terminal_reward

        cfg, r, p = self.cfg, self.cfg.rl, self.cfg.pacore
        if p.problems > len(train):
            raise ValueError(f"pacore.problems ({p.problems}) exceeds the {len(train)} problems of data.dataset")
        budget = p.context_budget or cfg.model.language.max_position_embeddings
        builder = PromptBuilder(encoder, context_budget=budget, max_new_tokens=r.max_new_tokens)
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                stop_token_ids=[encoder.template.tok.token_id("<|im_end|>")],
                                seed=cfg.train.seed * 1_000_003 + 17)
        source = PaCoRePromptSource(
            cfg, builder=builder, problems=[train[i] for i in range(p.problems)], engine=engine,
            reward_fn=terminal_reward(reward), params=params, dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(), gather=self._gather_dp,
            writer=dist.get_rank() == 0, log=self._log)
        source.prepare(self.state.iteration)
        return source

    def _generate(self, samples: list, *, k: int, temperature: float, seed: int) -> list[Experience]:
        """K completions of each sample's prompt with the actor's live weights, scored."""
        from megavlm.inference.engine import Prompt

        encoder, _, _, reward, _, _ = self._setup_data()
        prompts = []
        for sample in samples:
            tokens, media = encoder.prompt(sample)
            prompts.append(Prompt(tokens=tokens, **media))

        def score(i: int, text: str):
            sample = samples[i]
            question = " ".join(p["text"] for m in sample.messages if m.role == "user" for p in m.content
                                if p["type"] == "text")
            return reward(text, sample.targets, question, sample)
        return self._sample(prompts, score, [s.id.rsplit("-", 1)[-1] for s in samples], k=k,
                            temperature=temperature, seed=seed)

    def _sample(self, prompts: list, score, tasks: list[str], *, k: int, temperature: float,
                seed: int) -> list[Experience]:
        """K completions of each prompt with the actor's live weights; ``score(i, text)`` gives
        prompt i's completion its ``(score, reward parts)``."""
        from megavlm.inference.engine import SamplingParams

        _, _, _, _, engine, tokenizer = self._setup_data()
        r = self.cfg.rl
        stop = tokenizer.token_id("<|im_end|>")
        batch = [p for p in prompts for _ in range(k)]
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=temperature, top_p=r.top_p,
                                stop_token_ids=[stop], seed=seed)
        completions = engine.rollout(batch, params)
        out = []
        for j, c in enumerate(completions):
            text = tokenizer.decode([t for t in c.tokens.tolist() if t != stop])
            value, parts = score(j // k, text)
            out.append(Experience(prompt=batch[j], response=c.tokens, rollout_logp=c.logprobs.float().cpu(),
                                  group=j // k, score=value, task=tasks[j // k],
                                  finish_reason=c.finish_reason, reward_parts=parts))
        return out

    def _pacore_rollout(self, first: int, per: int, seed: int) -> list[Experience]:
        """Strict on-policy PaCoRe (REFERENCE 8): K completions of this DP rank's share of
        the iteration's synthesis prompts, each scored by its terminal reward (``rl.rewards``
        on the compacted answer, in [0, 1]). The stage-2 filtration runs first when this is
        iteration ``pacore.stage1_iters``."""
        self._setup_data()
        source, it = self._pacore, self.state.iteration
        source.stage2(it)
        drawn = source.draw(it, self.cfg.rl.prompts_per_iter)[first:first + per]
        self.pacore_drawn = drawn  # this rank's prompts of the iteration (inspected by tests)

        def score(i: int, text: str):
            value = source.data.reward(drawn[i], text)
            return value, {"terminal": value}
        return self._sample([d.prompt for d in drawn], score, ["synthesis"] * len(drawn),
                            k=self.cfg.rl.rollouts_per_prompt, temperature=self.cfg.rl.temperature, seed=seed)

    @staticmethod
    def _rollout_share() -> tuple[int, int]:
        """(rollout ranks, this one): the data-parallel ranks times the context-parallel ones.
        CP ranks decode whole rows (``engine.context_parallel_off``), so each takes its own
        prompts, as a DP rank does; with CP = 1 this is the DP rank."""
        return (parallel_state.get_data_parallel_world_size(with_context_parallel=True),
                parallel_state.get_data_parallel_rank(with_context_parallel=True))

    def _gather_dp(self, local: list) -> list:
        """Every rollout rank's list (``_rollout_share``), concatenated in rank order (the same on all ranks)."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        return [x for part in gathered for x in part]

    def rollout(self) -> list[Experience]:
        """This iteration's P x K scored rollouts (global list, prompt groups renumbered)."""
        _, train, _, _, _, _ = self._setup_data()
        r = self.cfg.rl
        dp, rank = self._rollout_share()
        per = r.prompts_per_iter // dp
        # the seed is a function of (run seed, iteration, rollout rank): a resumed run samples alike
        seed = (self.cfg.train.seed * 1_000_003 + self.state.iteration * 1_009 + rank) % (2**63)
        if r.prompt_source == "pacore":
            local = self._pacore_rollout(rank * per, per, seed)
        else:
            first = self.state.consumed_samples + rank * per
            samples = [train[(first + j) % len(train)] for j in range(per)]
            local = self._generate(samples, k=r.rollouts_per_prompt, temperature=r.temperature, seed=seed)
        for e in local:
            e.group += rank * per
        return self._gather_dp(local)

    def held_out_reward(self, prompts: int, *, k: int = 1, temperature: float = 0.0, seed: int = 0) -> tuple[float, float]:
        """Mean reward and response length of ``k`` completions of each of ``prompts`` held-out
        prompts (split over the rollout ranks, DP x CP); greedy by default."""
        _, _, held_out, _, _, _ = self._setup_data()
        dp, rank = self._rollout_share()
        if prompts > len(held_out):
            raise ValueError(f"{prompts} held-out prompts asked for, {len(held_out)} held out (rl.eval_prompts)")
        mine = [held_out[i] for i in range(rank, prompts, dp)]
        local = self._generate(mine, k=k, temperature=temperature, seed=seed + rank) if mine else []
        done = self._gather_dp([(e.score, e.response.numel()) for e in local])
        return sum(s for s, _ in done) / len(done), sum(n for _, n in done) / len(done)

    def evaluate(self) -> dict[str, float]:
        """Greedy reward on the first ``rl.eval_prompts`` held-out prompts."""
        reward, length = self.held_out_reward(self.cfg.rl.eval_prompts)
        return {"eval/reward": reward, "eval/response_length": length}

    @staticmethod
    def difficulty_filter(experiences: list[Experience], threshold: float) -> list[Experience]:
        """The rollouts of prompts whose pass rate (score > threshold) is strictly in (0, 1)."""
        passed: dict[int, list[bool]] = {}
        for e in experiences:
            passed.setdefault(e.group, []).append(e.score > threshold)
        keep = {g for g, p in passed.items() if 0 < sum(p) < len(p)}
        return [e for e in experiences if e.group in keep]

    def step(self) -> dict[str, float]:
        """One PPO iteration: rollouts, filter, update; returns its metrics (same on all ranks)."""
        r, it = self.cfg.rl, self.state.iteration
        start = time.perf_counter()
        experiences = self.rollout()
        metrics = {"time/rollout": time.perf_counter() - start}
        if r.prompt_source == "pacore":
            metrics.update({"pacore/stage": self._pacore.stage, "pacore/problems": len(self._pacore.data.pools)})
        metrics.update(self._reward_stats(experiences))
        kept = self.difficulty_filter(experiences, r.pass_threshold) if r.difficulty_filter else experiences
        metrics["filter/kept_fraction"] = len(kept) / len(experiences)
        metrics["lr/actor"] = self.actor.schedule.apply(self.actor.optimizer, it + 1)
        if self.critic is not None:
            metrics["lr/critic"] = self.critic.schedule.apply(self.critic.optimizer, it + 1)
        if kept:
            metrics.update(self.update(kept))
        self.state.iteration += 1
        self.state.consumed_samples += r.prompts_per_iter
        metrics["time/iteration"] = time.perf_counter() - start
        return metrics

    @staticmethod
    def _reward_stats(experiences: list[Experience]) -> dict[str, float]:
        out = {"reward": sum(e.score for e in experiences) / len(experiences),
               "response_length": sum(e.response.numel() for e in experiences) / len(experiences),
               "truncated_fraction": sum(e.finish_reason == "length" for e in experiences) / len(experiences)}
        groups: dict[int, list[float]] = {}
        for e in experiences:
            groups.setdefault(e.group, []).append(e.score)
        for task in sorted({e.task for e in experiences}):
            mine = [e for e in experiences if e.task == task]
            out[f"reward/{task}"] = sum(e.score for e in mine) / len(mine)
            out[f"response_length/{task}"] = sum(e.response.numel() for e in mine) / len(mine)
            # mean negative rollout log-prob per token: a sampled estimate of the policy's entropy
            tokens = sum(e.response.numel() for e in mine)
            out[f"entropy/{task}"] = -sum(float(e.rollout_logp.sum()) for e in mine) / max(tokens, 1)
        parts = sorted({k for e in experiences for k in e.reward_parts})
        for name in parts:
            values = [e.reward_parts[name] for e in experiences if name in e.reward_parts]
            out[f"reward_terms/{name}"] = sum(values) / len(values)
        return out

    # --- checkpoints and the run ----------------------------------------------------------
    def save(self) -> Path:
        """Actor to ``<save>/actor/iter_N`` (a plain megavlm checkpoint: generate.py and
        checkpoint.pretrained read it), critic to ``<save>/critic/iter_N``; each with its
        optimizer, the train state and RNG states."""
        root = Path(self.cfg.checkpoint.save)
        if self.critic is not None:  # the actor's marker last: a resumable pair is complete
            with parameters_in_sync(self.critic.model):  # overlap_param_gather leaves them stale
                save_checkpoint(root / "critic", self.cfg, self.state, self.critic.model, self.critic.optimizer,
                                assets=self.assets)
        with parameters_in_sync(self.actor.model):
            path = save_checkpoint(root / "actor", self.cfg, self.state, self.actor.model, self.actor.optimizer,
                                   assets=self.assets)
        self._log(f"megavlm: saved PPO checkpoint {path}")
        return path

    def run(self, *, keep_history: bool = False) -> list[dict[str, float]]:
        """PPO to ``train.iters``: log every ``logging.interval`` (with the held-out reward),
        checkpoint on ``checkpoint.interval`` and at the end. With ``keep_history``, returns
        every iteration's metrics (else nothing is kept: they are in ``metrics.jsonl``)."""
        cfg = self.cfg
        logger = MetricsLogger(cfg.logging.dir, total_iters=cfg.train.iters, enabled=dist.get_rank() == 0,
                               tensorboard=cfg.logging.tensorboard)
        history = []
        while self.state.iteration < cfg.train.iters:
            metrics = self.step()
            it = self.state.iteration
            if cfg.rl.eval_prompts and (it % cfg.logging.interval == 0 or it == cfg.train.iters):
                metrics.update(self.evaluate())
            if keep_history:
                history.append(metrics)
            if it % cfg.logging.interval == 0 or it == cfg.train.iters:
                logger.log(it, metrics)
            if cfg.checkpoint.save and ((cfg.checkpoint.interval and it % cfg.checkpoint.interval == 0)
                                        or it == cfg.train.iters):
                self.save()
        logger.close()
        return history
