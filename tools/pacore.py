"""PaCoRe test-time scaling with a megavlm checkpoint or a Hugging Face directory (detected).

  python tools/pacore.py --load DIR --input problems.jsonl --output answers.jsonl pacore.effort=low
  python tools/pacore.py --load DIR --config examples/step3vl_10b/pacore_high.yaml --input ... --output ...
  python tools/pacore.py --counting-problems 64 --output counting.jsonl   # synthetic counting problems

``--input``: HF-chat JSONL (images/videos attached, optional ``targets`` for scoring). Output:
one line per problem with the answer and every round's responses; metrics on stdout
(``--compare`` adds single pass and majority vote over the same number of rollouts).
"""

import argparse
import json

import torch.distributed as dist

from megavlm.inference.loading import load_for_inference
from megavlm.platform.distributed import shutdown
from megavlm.rl.pacore_cli import recipe_overrides, run_file, write_counting_problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", help="megavlm checkpoint dir or HF model dir")
    parser.add_argument("--config", help="recipe YAML (its keys are applied as overrides)")
    parser.add_argument("--input", help="problems, HF-chat JSONL")
    parser.add_argument("--output", required=True, help="answers and traces (JSONL)")
    parser.add_argument("--compare", action="store_true", help="also single pass and majority vote")
    parser.add_argument("--counting-problems", type=int, default=0, help="write N synthetic counting problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of --counting-problems")
    parser.add_argument("--image-sides", type=int, nargs="+", default=[64, 96, 128],
                        help="image sides of --counting-problems")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pacore.effort=high parallel.tp=2")
    args = parser.parse_args()
    if args.counting_problems:
        write_counting_problems(args.output, args.counting_problems, args.seed, tuple(args.image_sides))
        return
    if not (args.load and args.input):
        parser.error("give --load and --input (or --counting-problems N)")
    overrides = [*(recipe_overrides(args.config) if args.config else []), *args.overrides]
    try:
        cfg, model = load_for_inference(args.load, overrides)
        metrics = run_file(cfg, model, args.input, args.output, compare=args.compare)
        if dist.get_rank() == 0:
            print(json.dumps(metrics), flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
