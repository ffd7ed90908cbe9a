"""PPO end to end on a tiny VLM: supervised warm-up on synthetic counting, then PPO.

Run by tests.parallel.ppo_worker (scenario ``e2e_counting``, DP=2 in the layouts' launch)
or alone for a longer curve: torchrun --nproc_per_node 2 -m tests.parallel.ppo_worker OUT
e2e_counting:SFT_STEPS:ITERS.

The held-out reward is the mean counting reward of 8 sampled answers (T = 1, fixed seed)
on each of 32 prompts never trained on: the expected reward PPO maximizes.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megavlm.config import load_config
from megavlm.data.synthetic import SyntheticMultimodalDataset
from megavlm.inference.engine import Prompt
from megavlm.models.full_tensors import gather_full_tensors
from megavlm.rl.experience import Experience
from megavlm.rl.models import token_logprobs
from megavlm.rl.trainer import PPOTrainer

OVERRIDES = [
    "model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal", "data.min_pixels=4096",
    "data.max_pixels=4096", "data.seq_length=128", "train.micro_batch_size=16", "train.global_batch_size=32",
    "train.lr=3e-3", "train.min_lr=3e-3", "train.lr_decay=constant", "train.adam_eps=1e-6", "train.weight_decay=0.0",
    "rl.critic_lr=3e-3", "rl.prompts_per_iter=8", "rl.rollouts_per_prompt=4", "rl.mini_batches=2",
    "rl.max_new_tokens=4", "rl.temperature=1.0", "rl.tasks=[count]",
    "parallel.distributed_optimizer=false", "train.seed=5", "data.seed=5",
]


def supervised_warmup(trainer: PPOTrainer, steps: int) -> None:
    """Cross entropy on the gold answers of counting prompts (seed 100, not the PPO or
    held-out prompts), through the same actor, optimizer and schedule machinery."""
    encoder, _, _, _, _, tokenizer = trainer._setup_data()
    stop = tokenizer.token_id("<|im_end|>")
    data = SyntheticMultimodalDataset(seed=100, tasks=("count",))
    cfg = trainer.cfg

    def ce_loss(batch, output):
        logp, _ = token_logprobs(output, batch.labels, temperature=1.0, vocab_size=cfg.model.language.vocab_size)
        n = batch.mask.sum()
        return -(logp * batch.mask).sum(), n.to(torch.int), {"ce": torch.stack([-(logp * batch.mask).sum().detach(), n])}

    for step in range(steps):
        experiences = []
        for i in range(cfg.train.global_batch_size):
            sample = data[step * cfg.train.global_batch_size + i]
            tokens, media = encoder.prompt(sample)
            answer = torch.tensor(tokenizer.encode(sample.targets["answer"]) + [stop])
            experiences.append(Experience(prompt=Prompt(tokens=tokens, **media), response=answer,
                                          rollout_logp=torch.zeros(answer.numel()), group=i))
        trainer._seq_length = max(e.prompt.tokens.numel() + e.response.numel() for e in experiences)
        trainer._train_step(trainer.actor, ce_loss, trainer._micro_batches(experiences, list(range(len(experiences)))))


def held_out_reward(trainer: PPOTrainer) -> float:
    return trainer.held_out_reward(32, k=8, temperature=1.0, seed=1234)[0]


def run(out: Path, sft_steps: int, iters: int, eval_prompts: int = 0) -> dict:
    """Warm-up, held-out reward, PPO ``run()`` (checkpoints at iters - 1 and iters), held-out
    reward; then the iters - 1 checkpoint is resumed in a fresh trainer, which must reach
    bit-identical actor and critic weights after its one iteration (exact resume)."""
    ckpt = out / "ckpt"
    common = OVERRIDES + [f"train.iters={iters}", "logging.interval=1", f"checkpoint.save={ckpt}",
                          f"rl.eval_prompts={eval_prompts}"]
    trainer = PPOTrainer(load_config(None, common + [f"logging.dir={out / 'logs'}",
                                                     f"checkpoint.interval={iters - 1}"]))
    start = time.perf_counter()
    supervised_warmup(trainer, sft_steps)
    sft_time = time.perf_counter() - start
    before = held_out_reward(trainer)
    start = time.perf_counter()
    history = trainer.run(keep_history=True)
    ppo_time = time.perf_counter() - start
    after = held_out_reward(trainer)
    final = {**gather_full_tensors(trainer.actor.model), **{"critic." + k: v for k, v in
                                                          gather_full_tensors(trainer.critic.model).items()}}
    parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        for part in ("actor", "critic"):  # keep the iters - 1 checkpoints only
            shutil.rmtree(ckpt / part / f"iter_{iters:07d}")
    dist.barrier()
    resumed = PPOTrainer(load_config(None, common + [f"logging.dir={out / 'logs_resumed'}", f"checkpoint.load={ckpt}"]))
    resumed_from = resumed.state.iteration
    resumed.run()
    judge = judge_check(resumed, ckpt / "actor")  # the checkpoint resumed.run() saved last
    again = {**gather_full_tensors(resumed.actor.model), **{"critic." + k: v for k, v in
                                                          gather_full_tensors(resumed.critic.model).items()}}
    exact = set(final) == set(again) and all(torch.equal(final[k], again[k]) for k in final)
    parallel_state.destroy_model_parallel()
    return {"before": before, "after": after, "train_reward": [round(m["reward"], 4) for m in history],
            "eval_reward": [round(m["eval/reward"], 4) for m in history if "eval/reward" in m],
            "resumed_from": resumed_from, "resume_exact": exact, "sft_s": round(sft_time, 1),
            "ppo_s": round(ppo_time, 1), "metrics_file": str(out / "logs" / "metrics.jsonl"), "judge": judge}


def judge_check(trainer: PPOTrainer, actor_checkpoints: Path) -> dict:
    """The generative reward model built from a PPO actor checkpoint (``rl.judge``), as a
    run would: its weights must be those of the actor that saved the checkpoint, and its
    pointwise and pairwise scores must parse into [0, 1]."""
    actor = gather_full_tensors(trainer.actor.model)
    from megavlm.rl.judge import GenerativeJudge

    cfg = dataclasses.replace(trainer.cfg, rl=dataclasses.replace(trainer.cfg.rl, judge=str(actor_checkpoints)))
    encoder = trainer._setup_data()[0]
    sample = SyntheticMultimodalDataset(seed=7, tasks=("count",))[0]
    scores = {}
    for mode in ("pointwise", "pairwise"):
        judge = GenerativeJudge(cfg, encoder, mode=mode)
        weights = gather_full_tensors(judge.chunks)
        scores[mode] = judge.score("There are 3.", sample.targets, sample)
    same = set(weights) == set(actor) and all(torch.equal(weights[k], actor[k]) for k in actor)
    return {"weights_equal_actor": same, **scores}
