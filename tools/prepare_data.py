"""Convert HF-chat / LLaVA JSONL (or the built-in synthetic set) into megavlm shards.

  python tools/prepare_data.py --input data.jsonl --output shards/   # HF chat or LLaVA, detected per line
  python tools/prepare_data.py --synthetic 1000 --output shards/
Then train with data.dataset=shards data.path=shards/ (and data.tokenizer=... for real data).
"""

import argparse
import sys

from megavlm.data.shards import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", default=[], help="JSONL file (repeatable)")
    parser.add_argument("--format", default="auto", choices=["auto", "hf", "llava"])
    parser.add_argument("--synthetic", type=int, default=0, help="add N built-in synthetic samples")
    parser.add_argument("--output", required=True)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (and synthetic seed)")
    args = parser.parse_args()
    if not args.input and not args.synthetic:
        parser.error("give --input FILE.jsonl and/or --synthetic N")
    written, bad = prepare(args.output, inputs=args.input, fmt=args.format, synthetic=args.synthetic,
                           seed=args.seed, shard_size=args.shard_size)
    print(f"wrote {written} samples to {args.output}")
    for reason, where in sorted(bad.items()):
        print(f"skipped {len(where)} {reason}: e.g. {where[0]}", file=sys.stderr)


if __name__ == "__main__":
    main()
