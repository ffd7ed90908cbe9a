"""Convert checkpoints between Hugging Face and megavlm.

  torchrun --nproc_per_node 4 tools/convert_checkpoint.py import --hf /models/Qwen3-VL-8B-Instruct \
      --out ckpts/qwen3vl-8b parallel.tp=2 parallel.pp=2
  python tools/convert_checkpoint.py export --load runs/sft/checkpoints --out hf/qwen3vl-8b-sft --dtype bf16

Import writes a megavlm checkpoint (weights, config.yaml, tokenizer and processor files) in
the layout asked for; any other layout loads it. Export reads a checkpoint saved at any
layout in one process and writes sharded safetensors with an index, config.json,
generation_config.json and the tokenizer files.
"""

import argparse
import os


def main() -> None:
    # Imported here, not at the top: an import saves a checkpoint, which starts a helper
    # process (a spawned multiprocessing Manager in megatron's dist_checkpointing) that
    # re-imports this file, and torch + megatron-core would cost it ~10 s of CPU for nothing.
    from megavlm.conversion.convert import DTYPES, export_hf, import_hf
    from megavlm.conversion.hf_checkpoint import DEFAULT_MAX_SHARD_BYTES
    from megavlm.platform.distributed import shutdown

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> megavlm checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    imp.add_argument("--out", required=True, help="new megavlm checkpoint directory")
    imp.add_argument("overrides", nargs="*", help="layout: parallel.tp=2 parallel.pp=2 parallel.ep=2 ...")
    exp = sub.add_parser("export", help="megavlm checkpoint -> Hugging Face directory")
    exp.add_argument("--load", required=True, help="megavlm checkpoint (an iter_* folder or its parent)")
    exp.add_argument("--out", required=True, help="new HF model directory")
    exp.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: as saved)")
    exp.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    args = parser.parse_args()
    if args.command == "import":
        try:
            path = import_hf(args.hf, args.out, args.overrides)
        finally:
            shutdown()
        if os.environ.get("RANK", "0") == "0":
            print(f"megavlm: imported {args.hf} -> {path}", flush=True)
    else:
        path = export_hf(args.load, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_bytes)
        print(f"megavlm: exported {args.load} -> {path}", flush=True)


if __name__ == "__main__":  # dist_checkpointing spawns a helper process that re-imports us
    main()
