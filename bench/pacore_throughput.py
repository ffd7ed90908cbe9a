"""PaCoRe rollout throughput: problems batched together against one problem at a time.

One process, one tiny random Qwen3-VL (``qwen3vl-tiny``), the same synthetic counting problems
(each with its image) and the same schedule. ``parallel``: one ``run_pacore`` over every
problem, whose queue fills each engine call with up to ``--batch`` rollouts from any problem
and round; ``sequential``: ``run_pacore`` on each problem alone (its own rollouts still share
a call). Timing alternates the two for ``--repeats`` rounds; the printed
ratio is the best parallel rollouts/s over the best sequential one (a one-problem warm-up first).

Usage: ``python bench/pacore_throughput.py [--problems 8 --rounds 4 --new-tokens 16 --batch 64]``
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--rounds", type=int, nargs="+", default=[4], help="K (the final [1] is added)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="pacore.max_batch_size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if "MASTER_PORT" not in os.environ:  # one process: any free port (29500 may be taken)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])

    from megatron.core.utils import unwrap_model

    from megavlm.config import load_config, validate
    from megavlm.data.formats import read_samples
    from megavlm.models.build import build_model_chunks
    from megavlm.platform.distributed import initialize, shutdown
    from megavlm.rl.pacore import round_schedule, run_pacore
    from megavlm.rl.pacore_cli import pacore_setup, write_counting_problems

    cfg = load_config(None, [
        "model.preset=qwen3vl-tiny", "data.min_pixels=4096", "data.max_pixels=16384",
        "pacore.effort=custom", f"pacore.rounds={args.rounds}", f"pacore.max_new_tokens={args.new_tokens}",
        "pacore.context_budget=1024", f"pacore.max_batch_size={args.batch}",
    ])
    validate(cfg, 1)
    initialize(cfg.parallel, cfg.train.seed)
    try:
        (chunk,), _ = build_model_chunks(cfg)
        engine, builder, params = pacore_setup(cfg, [unwrap_model(chunk)])
        # No stop token: every rollout runs to --new-tokens (equal work in both modes).
        params.stop_token_ids = []
        schedule = round_schedule("custom", args.rounds)
        with tempfile.TemporaryDirectory() as tmp:
            write_counting_problems(Path(tmp) / "p.jsonl", args.problems, seed=99)
            samples = list(read_samples(Path(tmp) / "p.jsonl"))
            rollouts = args.problems * sum(schedule)

            def parallel():
                run_pacore(engine, builder, samples, schedule, params, max_batch_size=args.batch)

            def sequential():
                for s in samples:
                    run_pacore(engine, builder, [s], schedule, params, max_batch_size=args.batch)

            print(f"schedule {schedule}, {args.problems} problems, {rollouts} rollouts of {args.new_tokens} tokens, "
                  f"max_batch_size {args.batch}, {args.threads} threads", flush=True)
            run_pacore(engine, builder, samples[:1], schedule, params, max_batch_size=args.batch)  # warm-up
            best = {}
            for r in range(args.repeats):
                for name, fn in [("parallel", parallel), ("sequential", sequential)]:
                    start = time.perf_counter()
                    fn()
                    seconds = time.perf_counter() - start
                    print(f"  repeat {r} {name}: {seconds:.2f} s", flush=True)
                    best[name] = max(best.get(name, 0.0), rollouts / seconds)
        for name, rate in best.items():
            print(f"{name:>10}: {rate:7.2f} rollouts/s  {rate * args.new_tokens:8.1f} tokens/s")
        print(f"parallel / sequential: {best['parallel'] / best['sequential']:.2f}x")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
