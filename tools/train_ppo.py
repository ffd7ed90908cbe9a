"""PPO (actor + critic, or GRPO) for a megavlm VLM: `torchrun [--nproc_per_node N]
tools/train_ppo.py --config FILE [section.key=value ...]`, usually with
checkpoint.pretrained=<SFT checkpoint>. Under slurm, `srun python tools/train_ppo.py ...`."""

import argparse

from megavlm.platform.distributed import shutdown
from megavlm.rl.trainer import PPOTrainer
from megavlm.training.config import training_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. examples/tiny/ppo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.advantage=grpo train.iters=20")
    args = parser.parse_args()
    cfg = training_config(args.config, args.overrides)
    try:
        PPOTrainer(cfg).run()
    finally:
        shutdown()


if __name__ == "__main__":  # dist_checkpointing spawns a helper process that re-imports us
    main()
