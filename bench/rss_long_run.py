"""Long run: train the tiny VLM for many iterations sampling this process's RSS after
every step, and report the slope of a least-squares line through the samples after a
warm-up (allocator and caches filling). A leak shows as a positive slope that does not
shrink with more iterations.

  python bench/rss_long_run.py --iters 2000 --out runs/rss

Prints and writes ``<out>/rss.json``: iterations, RSS at the start/end of the fitted
window (MiB), slope in MiB per 1,000 iterations, and the samples. Checkpoints every
``--save-interval`` iterations so saving is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200, help="iterations left out of the fit")
    parser.add_argument("--save-interval", type=int, default=500)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    from megavlm.platform.distributed import shutdown
    from megavlm.training.config import training_config
    from megavlm.training.loop import Trainer

    recipe = Path(__file__).resolve().parents[1] / "examples" / "tiny" / "pretrain_vlm.yaml"
    cfg = training_config(recipe, [
        f"train.iters={args.iters}", "data.seq_length=128", "train.global_batch_size=2", "logging.interval=100",
        f"logging.dir={out / 'log'}", "logging.tensorboard=true", f"checkpoint.save={out / 'ckpt'}",
        f"checkpoint.interval={args.save_interval}", "checkpoint.keep_last=1", *args.overrides])
    trainer = Trainer(cfg)
    samples: list[tuple[int, float]] = []
    step = trainer.step

    def step_and_sample():
        metrics = step()
        samples.append((trainer.state.iteration, _rss_mib()))
        if trainer.state.iteration % 100 == 0:
            _report(samples, args.warmup, out, final=False)  # a partial report survives a cut-short run
        return metrics

    trainer.step = step_and_sample
    trainer.run()
    shutdown()
    print(json.dumps(_report(samples, args.warmup, out, final=True)), flush=True)


def _report(samples: list[tuple[int, float]], warmup: int, out: Path, *, final: bool) -> dict:
    fit = [(i, r) for i, r in samples if i > warmup]
    result = {"iterations": len(samples), "warmup": warmup, "final": final}
    if len(fit) >= 2:
        result.update(rss_mib_first=fit[0][1], rss_mib_last=fit[-1][1], rss_mib_max=max(r for _, r in fit),
                      slope_mib_per_1000_iters=round(_slope([i for i, _ in fit], [r for _, r in fit]) * 1000, 3))
    out.mkdir(parents=True, exist_ok=True)
    (out / "rss.json").write_text(json.dumps({**result, "samples": samples}))
    return result


if __name__ == "__main__":
    main()
