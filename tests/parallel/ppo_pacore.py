"""PaCoRe training through PPOTrainer (rl.prompt_source=pacore), DP=2, on the actor that the
``e2e_counting`` scenario left in ``OUT/e2e/ckpt`` (a tiny Qwen3-VL that counts a little).

Two iterations: iteration 0 on the stage-1 problems (message pools of 8 built by the live
actor), then the stage-2 filtration with that actor (the stage-1 checkpoint), iteration 1
on the stage-2 problems. Rank 0 writes what the trainer consumed: every experience's prompt
and response tokens and score, the problems drawn, the metrics, one weight before and after.
"""

from __future__ import annotations

import time
from pathlib import Path

from megatron.core import parallel_state

from megavlm.models.full_tensors import gather_full_tensors
from megavlm.rl.trainer import PPOTrainer
from megavlm.training.config import training_config
from tests.parallel.ppo_counting import OVERRIDES

PACORE = [
    "rl.prompt_source=pacore", "rl.mini_batches=1", "rl.prompts_per_iter=4", "rl.rollouts_per_prompt=4",
    "train.global_batch_size=16", "train.micro_batch_size=8", "train.iters=2", "rl.difficulty_filter=false",
    "pacore.problems=8", "pacore.pool_size=8", "pacore.min_messages=3", "pacore.max_messages=5",
    "pacore.stage1_max_accuracy=0.75", "pacore.stage1_iters=1", "pacore.stage2_rollouts=4",
    "pacore.max_batch_size=64", "pacore.shuffle_seed=3", "pacore.seed=4",
    "rl.rewards=[{name: verifiable}]", "logging.tensorboard=false",
]


def run(out: Path, pretrained: Path) -> dict:
    start = time.perf_counter()
    paths = [f"checkpoint.pretrained={pretrained}", f"checkpoint.save={out / 'ckpt'}", f"logging.dir={out / 'logs'}"]
    cfg = training_config(None, OVERRIDES + PACORE + paths)
    trainer = PPOTrainer(cfg)
    consumed, drawn = [], []
    update = trainer.update

    def recording_update(experiences):
        consumed.append([(e.prompt.tokens.clone(), e.response.clone(), e.score, e.group) for e in experiences])
        return update(experiences)

    trainer.update = recording_update
    name = "language.output_layer.weight"
    before = gather_full_tensors(trainer.actor.model)[name]
    metrics = []
    for it in range(cfg.train.iters):
        metrics.append(trainer.step())
        # the trainer's prompts of this iteration: this rank's slice of the same draw on every rank
        drawn.append([(d.pool.sample.id, d.messages) for d in trainer._pacore.draw(it, cfg.rl.prompts_per_iter)])
        per = cfg.rl.prompts_per_iter // parallel_state.get_data_parallel_world_size()
        first = parallel_state.get_data_parallel_rank() * per
        assert [d.pool.sample.id for d in trainer.pacore_drawn] == [i for i, _ in drawn[-1][first:first + per]]
    after = gather_full_tensors(trainer.actor.model)[name]
    source = trainer._pacore
    questions = {m.sample.id: next(p["text"] for p in m.sample.messages[0].content if p["type"] == "text")
                 for m in source.pools}
    parallel_state.destroy_model_parallel()
    return {"consumed": consumed, "drawn": drawn, "metrics": metrics,
            "weight_change": (after - before).abs().max().item(),
            "pools_file": str(out / "ckpt" / "pacore" / "pools.jsonl"),
            "stage2_file": str(out / "ckpt" / "pacore" / "stage2.json"), "questions": questions,
            "targets": {m.sample.id: m.sample.targets for m in source.pools},
            "seconds": round(time.perf_counter() - start, 1),
            "settings": {"min_messages": 3, "max_messages": 5, "stage1_max_accuracy": 0.75, "shuffle_seed": 3}}
