"""Pretrain or fine-tune with megavlm: `torchrun [--nproc_per_node N] tools/pretrain_vlm.py
--config FILE [section.key=value ...]`. Under slurm, `srun python tools/pretrain_vlm.py ...`."""

import argparse


def main() -> None:
    # Imported here, not at the top: a checkpoint save starts a helper process (a spawned
    # multiprocessing Manager in megatron's dist_checkpointing) that re-imports this file,
    # and torch + megatron-core would cost it ~10 s of CPU for nothing.
    from megavlm.platform.distributed import shutdown
    from megavlm.training.config import training_config
    from megavlm.training.loop import Trainer
    from megavlm.training.samples import print_samples

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. examples/tiny/pretrain.yaml")
    parser.add_argument("--sample", action="store_true", help="generate a sample after training")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.iters=20")
    args = parser.parse_args()
    cfg = training_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg)
        trainer.run()
        if args.sample:
            print_samples(trainer)
    finally:
        shutdown()


if __name__ == "__main__":  # dist_checkpointing spawns a helper process that re-imports us
    main()
