"""Plan a parallel layout: memory per GPU, step time and MFU of megavlm layouts on GPUs.

  python tools/plan_parallelism.py --model qwen3vl-8b --gpus 64 --gpu h100-80gb --seq-length 32768
  python tools/plan_parallelism.py --model qwen3-8b --gpus 64 --gpu h100-80gb --seq-length 8192 --tp 4 --pp 2

With --tp and --pp both given, prints the breakdown of that one layout (other degrees
default to 1). Otherwise enumerates the layouts megavlm accepts (degrees given on the
command line are held fixed), keeps those that fit in memory and prints the fastest.
Everything is an estimate from formulas (megavlm/planning); the assumptions are printed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from megavlm.planning import (
    Efficiency,
    Layout,
    LayoutError,
    VisionSpec,
    assumptions,
    estimate,
    format_breakdown,
    format_table,
    get_gpu,
    get_model,
    gpu_names,
    language_config,
    model_names,
    rank_layouts,
)
from megavlm.planning.flops import (
    DEFAULT_ATTENTION_EFFICIENCY,
    DEFAULT_COMM_EFFICIENCY,
    DEFAULT_COMPUTE_EFFICIENCY,
)
from megavlm.planning.models import with_patches
from megavlm.planning.planner import DEFAULT_MEMORY_MARGIN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of: {', '.join(model_names())}")
    p.add_argument("--gpus", type=int, required=True, help="total number of GPUs")
    p.add_argument("--gpu", default="h100-80gb", help=f"one of: {', '.join(gpu_names())}")
    p.add_argument("--seq-length", type=int, required=True)
    for name in ("tp", "pp", "vpp", "cp", "ep", "etp"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=None, help="sequences per step (default: ~4M tokens)")
    p.add_argument(
        "--recompute",
        choices=("none", "selective", "full"),
        default=None,
        help="activation recomputation, as megavlm's train.recompute.granularity (full: method=uniform, "
        "num_layers=1; megavlm refuses full with DeepStack, e.g. Qwen3-VL; default: rank all three)",
    )
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="training dtype (params, activations)")
    p.add_argument("--fp8", action="store_true", help="decoder GEMMs at the FP8 peak (Transformer Engine FP8)")
    p.add_argument(
        "--backend",
        choices=("te", "local"),
        default="te",
        help="kernels the activation formula assumes: te (GPU) or local (megavlm's CPU layers)",
    )
    p.add_argument(
        "--language",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model.language key, e.g. max_position_embeddings=262144 (repeatable)",
    )
    p.add_argument(
        "--vision-tower",
        type=int,
        nargs=4,
        metavar=("LAYERS", "HIDDEN", "FFN", "HEADS"),
        default=None,
        help="add (or replace) a Qwen3-VL style ViT on the first stage (planner-only estimate)",
    )
    p.add_argument("--vision-patches", type=int, default=None, help="ViT patches per sample (VLM models)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--memory-margin", type=float, default=DEFAULT_MEMORY_MARGIN)
    p.add_argument("--compute-efficiency", type=float, default=DEFAULT_COMPUTE_EFFICIENCY)
    p.add_argument("--attention-efficiency", type=float, default=DEFAULT_ATTENTION_EFFICIENCY)
    p.add_argument("--comm-efficiency", type=float, default=DEFAULT_COMM_EFFICIENCY)
    p.add_argument(
        "--vocab-divisible-by",
        type=int,
        default=1,
        help="pad the vocabulary to a multiple of this x tp (megavlm: 1; Megatron-LM: 128)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        vision = None
        if args.vision_tower:
            layers, hidden, ffn, heads = args.vision_tower
            lm_hidden = language_config(get_model(args.model)).hidden_size
            vision = VisionSpec(
                num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_heads=heads, out_hidden_size=lm_hidden
            )
        model = with_patches(get_model(args.model, vision=vision), args.vision_patches)
        if args.language:
            model = replace(model, language_overrides=(*model.language_overrides, *args.language))
            language_config(model)  # bad keys fail here, with megavlm's message
        gpu = get_gpu(args.gpu)
    except ValueError as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    eff = Efficiency(compute=args.compute_efficiency, attention=args.attention_efficiency, comm=args.comm_efficiency)
    common = dict(
        gpus=args.gpus,
        gpu=gpu,
        seq_length=args.seq_length,
        global_batch_size=args.global_batch_size,
        dtype=args.dtype,
        backend=args.backend,
        fp8=args.fp8,
        memory_margin=args.memory_margin,
        efficiency=eff,
        vocab_divisible_by=args.vocab_divisible_by,
    )
    given = {
        "tp": args.tp,
        "pp": args.pp,
        "vpp": args.vpp,
        "cp": args.cp,
        "ep": args.ep,
        "etp": args.etp,
        "micro_batch_size": args.micro_batch_size,
        "recompute": args.recompute,
    }
    fixed = {k: v for k, v in given.items() if v is not None}
    fixed["distributed_optimizer"] = not args.no_distributed_optimizer
    if args.no_sequence_parallel:
        fixed["sequence_parallel"] = False
    if model.note:
        print(f"note: {model.note}\n")

    if args.tp is not None and args.pp is not None:
        layout = Layout(**{"vpp": 1, "cp": 1, "ep": 1, "micro_batch_size": 1, "recompute": "none", **fixed})
        try:
            plan = estimate(model, layout, **common)
        except LayoutError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_breakdown(plan))
        lines = assumptions(plan, gbs_given=args.global_batch_size is not None)
    else:
        ranking = rank_layouts(model, fixed=fixed, top=args.top, **common)
        print(format_table(ranking, gpus=args.gpus, gpu=gpu, seq_length=args.seq_length, model=model, dtype=args.dtype))
        lines = assumptions(
            model, efficiency=eff, backend=args.backend, memory_margin=args.memory_margin, seq_length=args.seq_length
        )
        if args.global_batch_size is None:
            lines.append(
                f"global batch {ranking.global_batch_size} sequences (~4M tokens per step; set --global-batch-size)"
            )
        if not ranking.plans:
            print("\nassumptions:\n" + "\n".join(f"  - {a}" for a in lines))
            return 1
    print("\nassumptions:\n" + "\n".join(f"  - {a}" for a in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
