"""Generate with a megavlm checkpoint or a Hugging Face Qwen3-VL directory (detected).

  python tools/generate.py --load DIR --prompt "Describe the image." --image cat.png
  python tools/generate.py --load DIR --inputs inputs.pt --dump-logits logits.pt
  python tools/generate.py --load DIR --inputs inputs.pt --dump-tokens out.pt --max-new-tokens 32
  torchrun --nproc_per_node 2 tools/generate.py --load DIR ... parallel.tp=2

``--inputs`` takes tensors as the HF Qwen3-VL processor returns them (``input_ids``,
``attention_mask``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``,
``pixel_values_videos``, ``video_grid_thw``) saved with ``torch.save(dict(inputs), ...)``:
``--dump-logits`` runs one forward pass, ``--dump-tokens`` generates for every row.
"""

import argparse

from megavlm.inference.cli import dump_logits, generate_from_inputs, generate_from_prompt
from megavlm.inference.loading import load_for_inference
from megavlm.platform.distributed import shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="megavlm checkpoint dir or HF model dir")
    parser.add_argument("--prompt", help="user message text")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inputs", help="processor outputs saved with torch.save (a batch)")
    parser.add_argument("--dump-logits", help="where --inputs writes the logits")
    parser.add_argument("--dump-tokens", help="where --inputs writes the generated tokens and log-probs")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[], help="with --dump-tokens (repeatable)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    args = parser.parse_args()
    dumps = bool(args.dump_logits) + bool(args.dump_tokens)
    if (args.inputs and dumps != 1) or (not args.inputs and dumps):
        parser.error("--inputs goes with one of --dump-logits (one forward pass) or --dump-tokens (generation)")
    if not args.inputs and not args.prompt:
        parser.error("give --prompt (generation) or --inputs with --dump-logits or --dump-tokens")
    try:
        cfg, model = load_for_inference(args.load, args.overrides)
        if args.dump_logits:
            dump_logits(cfg, model, args.inputs, args.dump_logits)
        elif args.dump_tokens:
            generate_from_inputs(cfg, model, args)
        else:
            generate_from_prompt(cfg, model, args)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
