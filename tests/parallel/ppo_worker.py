"""One PPO update on fixed rollouts at several layouts inside one torchrun launch.

Usage (repository root): torchrun --nproc_per_node 2 -m tests.parallel.ppo_worker OUT_DIR SCENARIO [...]
Rank 0 writes ``OUT_DIR/<scenario>.pt``: the update's metrics and the full actor and
critic parameters after it; ``e2e_counting`` (tests.parallel.ppo_counting) writes the
end-to-end result, ``pacore`` (tests.parallel.ppo_pacore, after e2e_counting) PaCoRe training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megavlm.config import load_config
from megavlm.data.build import sample_encoder
from megavlm.data.synthetic import SyntheticMultimodalDataset
from megavlm.inference.engine import Prompt
from megavlm.models.full_tensors import gather_full_tensors
from megavlm.rl.experience import Experience
from megavlm.rl.trainer import PPOTrainer

# 4 prompts x 2 rollouts of a tiny VLM on synthetic counting images; lr and eps chosen so
# one Adam step moves weights visibly (lr 1e-3) yet float reassociation across layouts stays
# far under 1e-5 after the step (eps 1e-4 bounds Adam's amplification by lr / eps = 10).
BASE = [
    "model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal", "data.min_pixels=4096",
    "data.max_pixels=4096", "data.seq_length=256", "train.micro_batch_size=2", "train.global_batch_size=8",
    "rl.prompts_per_iter=4", "rl.rollouts_per_prompt=2", "rl.mini_batches=2", "train.lr=1e-3",
    "rl.critic_lr=1e-3", "train.adam_eps=1e-4", "train.seed=3", "checkpoint.save=null",
    "logging.tensorboard=false", "parallel.distributed_optimizer=false", "rl.temperature=0.7",
    # every term on: KL to the reference policy and the (vocabulary-parallel) entropy bonus
    "rl.kl_coef=0.1", "rl.entropy_coef=0.01",
]
LAYOUTS = {
    "ref_dp2": [],
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "cp2": ["parallel.cp=2"],
}
# rollouts only, with the decoding step compiled (inference.compile_decode): PP's stage
# exchange around a compiled step (the received hidden states a graph input). No critic or
# reference model: they take no part in rollouts. TP=2 (all-reduces inside the graph) gave
# the same rollouts when run once (`-m tests.parallel.ppo_worker OUT ref_dp2 tp2_compiled`);
# it is left out of the suite for its compile time (about a minute on 2 cores, cold).
COMPILED = {f"{name}_compiled": LAYOUTS[name] + ["inference.compile_decode=true", "rl.advantage=grpo",
                                                 "rl.kl_coef=0"] for name in ("tp2", "pp2")}


def fixed_experiences(cfg, *, prompts: int, k: int, seed: int = 0) -> list[Experience]:
    """The same rollouts on every rank: real prompts (images), random responses of different
    lengths, rollout log-probs near the policy's and 0/1 scores."""
    encoder = sample_encoder(cfg)
    data = SyntheticMultimodalDataset(seed=11, tasks=("count",), image_sides=(64,))
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(prompts):
        tokens, media = encoder.prompt(data[p])
        for j in range(k):
            n = int(torch.randint(3, 9, (1,), generator=g))
            response = torch.randint(20, cfg.model.language.vocab_size, (n,), generator=g)
            rollout_logp = -6.3 + 0.5 * torch.randn(n, generator=g)  # ~ log(1/512) with noise
            score = float(torch.randint(0, 2, (1,), generator=g))
            out.append(Experience(prompt=Prompt(tokens=tokens, **media), response=response,
                                  rollout_logp=rollout_logp, group=p, score=score, task="count"))
    return out


def run_update(name: str, out: Path) -> None:
    cfg = load_config(None, BASE + {**LAYOUTS, **COMPILED}[name] + [f"logging.dir={out / 'logs' / name}"])
    trainer = PPOTrainer(cfg)
    # rollouts from the initial weights (the same in every layout): images, prompts of
    # different lengths, sampled at T = 0.7 with one seed; then the update on fixed rollouts
    samples = SyntheticMultimodalDataset(seed=13, tasks=("count", "box"), image_sides=(64,))
    rollouts = trainer._generate([samples[i] for i in range(3)], k=2, temperature=0.7, seed=5)
    rollouts = [(e.response, e.rollout_logp, e.score) for e in rollouts]
    layout = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_context_parallel_world_size())
    if name in COMPILED:
        if dist.get_rank() == 0:
            torch.save({"rollouts": rollouts, "layout": layout}, out / f"{name}.pt")
        parallel_state.destroy_model_parallel()
        return
    # an iteration's rollouts, its prompts split over the rollout ranks (DP x CP)
    iteration = [(e.response, e.rollout_logp, e.group) for e in trainer.rollout()]
    metrics = trainer.update(fixed_experiences(cfg, prompts=4, k=2))
    actor = gather_full_tensors(trainer.actor.model)
    critic = gather_full_tensors(trainer.critic.model) if trainer.critic is not None else {}
    if dist.get_rank() == 0:
        torch.save({"metrics": metrics, "actor": actor, "critic": critic, "rollouts": rollouts, "layout": layout,
                    "iteration": iteration}, out / f"{name}.pt")
    parallel_state.destroy_model_parallel()


def main() -> None:
    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        if name.startswith("e2e_counting"):  # e2e_counting[:SFT_STEPS:ITERS[:EVAL_PROMPTS]]
            from tests.parallel.ppo_counting import run

            args = [int(x) for x in name.split(":")[1:]] or [10, 6]
            result = run(out / "e2e", *args)
            if dist.get_rank() == 0:
                torch.save(result, out / "e2e_counting.pt")
                print(result, flush=True)
        elif name == "pacore":  # after e2e_counting: trains on from its actor
            from tests.parallel.ppo_pacore import run as run_pacore

            result = run_pacore(out / "pacore", out / "e2e" / "ckpt" / "actor")
            if dist.get_rank() == 0:
                torch.save(result, out / "pacore.pt")
        else:
            run_update(name, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
