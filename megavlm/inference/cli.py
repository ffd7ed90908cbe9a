"""What tools/generate.py does once the model is loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from megavlm.config import Config
from megavlm.inference.hf_inputs import forward_logits, prompts_from_hf_inputs, read_hf_inputs


def dump_logits(cfg: Config, model, inputs_path: str, out_path: str) -> None:
    inputs = read_hf_inputs(inputs_path, cfg.model)
    logits = forward_logits(model, inputs, cfg.model)
    if dist.get_rank() == 0:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(logits.cpu(), out_path)
        print(f"megavlm: logits {list(logits.shape)} written to {out_path}", flush=True)


def generate_from_inputs(cfg: Config, model, args) -> None:
    """Generate for every row of saved processor inputs (a left-padded batch) through the KV
    engine; writes ``{"tokens": [...], "logprobs": [...], "finish_reason": [...]}``, one entry per row."""
    from megavlm.inference.engine import GenerationEngine, SamplingParams

    prompts = prompts_from_hf_inputs(read_hf_inputs(args.inputs, cfg.model), cfg.model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_token_ids=args.stop_token_id)
    completions = GenerationEngine(model, compile_decode=cfg.inference.compile_decode).rollout(prompts, params)
    if dist.get_rank() == 0:
        Path(args.dump_tokens).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"tokens": [c.tokens for c in completions], "logprobs": [c.logprobs for c in completions],
                    "finish_reason": [c.finish_reason for c in completions]}, args.dump_tokens)
        print(f"megavlm: {len(completions)} completions written to {args.dump_tokens}", flush=True)


def generate_from_prompt(cfg: Config, model, args) -> None:
    """Answer ``--prompt`` (with ``--image`` files) through the chat template and the KV engine."""
    from megavlm.data.build import sample_encoder
    from megavlm.data.sample import Media, Message, Sample
    from megavlm.inference.engine import GenerationEngine, Prompt, SamplingParams

    # The model's own tokenizer, chat template and image rules (Qwen3-VL dynamic resolution or
    # STEP3-VL multi-crop), with prompts up to the model's context.
    data = dataclasses.replace(cfg.data, seq_length=cfg.model.language.max_position_embeddings)
    encoder = sample_encoder(dataclasses.replace(cfg, data=data))
    tokenizer = encoder.template.tok
    media = [Media("image", path=path) for path in args.image]
    parts = [{"type": "image", "index": i} for i in range(len(media))] + [{"type": "text", "text": args.prompt}]
    tokens, pixels = encoder.prompt(Sample(id="prompt", messages=[Message("user", parts)], media=media))
    stop = tokenizer.token_id("<|im_end|>")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_token_ids=[stop])
    (answer,) = GenerationEngine(model, compile_decode=cfg.inference.compile_decode).generate([Prompt(tokens=tokens, **pixels)], params)
    if dist.get_rank() == 0:
        print(tokenizer.decode([t for t in answer.tolist() if t != stop]), flush=True)
