"""Rollout throughput of megavlm's KV-cache engine against HF ``generate`` on the same tiny Qwen3-VL.

One process, one HF Qwen3-VL directory (random weights, written to a temporary folder):
megavlm loads it the way ``tools/generate.py`` does (``load_for_inference``), HF loads it with
``from_pretrained``. Both get the same batch of prompts (text + one image each, different
lengths, so the batch is left-padded) and decode greedily ``--new-tokens`` tokens per prompt
(no stop token, so every row runs to the end). Each runs twice: eager, and compiled
(megavlm with ``inference.compile_decode``, its decoding step through ``torch.compile``; HF
with its own compiled decoding, a static cache and ``compile_config``). Compilation happens in
the warm-up run, whose time is printed. Timing is interleaved in rounds, the order
alternating, and the medians give the printed ratios (new tokens/s over HF eager's, and
compiled megavlm over compiled HF), by wall time and by process CPU time (the one to read on
a shared machine). The fraction of tokens equal to HF eager's is printed too (same weights,
greedy).

Usage: ``python bench/rollout_throughput.py [--batch 16 --new-tokens 64 --rounds 5 --profile out.txt]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import _default_threads, _free_port, _no_torch_function_modes  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3vl-tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--image-patches", type=int, default=8, help="image side in patches (tokens = side^2 / 4)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=_default_threads())
    p.add_argument("--profile", help="write a torch.profiler table of one megavlm+compile rollout here")
    return p.parse_args()


def make_prompts(cfg, a):
    """Prompts [text, image, text] with text of different lengths: megavlm Prompts and HF inputs."""
    from megavlm.inference.engine import Prompt

    ids = cfg.model.token_ids
    side = a.image_patches
    g = torch.Generator().manual_seed(0)
    specials = {ids.image_token_id, ids.video_token_id, ids.vision_start_token_id, ids.vision_end_token_id}
    vocab = torch.tensor([t for t in range(cfg.model.language.vocab_size) if t not in specials])
    v = cfg.model.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    prompts = []
    for i in range(a.batch):
        text = vocab[torch.randint(0, len(vocab), (8 + 3 * i,), generator=g)]
        tokens = torch.cat([text[:4], torch.tensor([ids.vision_start_token_id] + [ids.image_token_id] * (side * side // 4)
                                                    + [ids.vision_end_token_id]), text[4:]])
        prompts.append(Prompt(tokens=tokens, pixel_values=torch.randn(side * side, patch_dim, generator=g),
                              image_grid_thw=torch.tensor([[1, side, side]])))
    longest = max(p.tokens.numel() for p in prompts)
    input_ids = torch.zeros(a.batch, longest, dtype=torch.long)
    attention = torch.zeros(a.batch, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, longest - p.tokens.numel():] = p.tokens
        attention[i, longest - p.tokens.numel():] = 1
    hf = dict(input_ids=input_ids, attention_mask=attention, mm_token_type_ids=(input_ids == ids.image_token_id).long(),
              pixel_values=torch.cat([p.pixel_values for p in prompts]),
              image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]))
    return prompts, hf


def write_hf_model(cfg, path: Path) -> None:
    import transformers

    from megavlm.conversion.hf_config import hf_config_from_model

    config = hf_config_from_model(cfg.model)
    hf_cfg = transformers.Qwen3VLConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration(hf_cfg)
    with torch.no_grad():  # spread the logits so greedy decoding is not a run of ties
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)


def main() -> None:
    a = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import transformers

    from megavlm.config import load_config
    from megavlm.inference.engine import GenerationEngine, SamplingParams
    from megavlm.inference.loading import load_for_inference

    cfg = load_config(None, [f"model.preset={a.preset}"])
    prompts, hf_inputs = make_prompts(cfg, a)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_model(cfg, Path(tmp) / "hf")
        with contextlib.redirect_stdout(io.StringIO()):
            _, chunks = load_for_inference(Path(tmp) / "hf")
        hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa")
    dev = next(chunks[0].parameters()).device
    hf = hf.to(dev).eval()
    hf_inputs = {k: v.to(dev) for k, v in hf_inputs.items()}
    engine = GenerationEngine(chunks)
    compiled = GenerationEngine(chunks, compile_decode=True)
    params = SamplingParams(max_new_tokens=a.new_tokens)
    hf.generation_config.eos_token_id = None  # every row runs to the end, as megavlm's without stop tokens

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def megavlm_run(engine) -> torch.Tensor:
        out = engine.generate(prompts, params)
        sync()
        return torch.stack(out)

    def hf_run(**compiled) -> torch.Tensor:
        with _no_torch_function_modes(), torch.no_grad():
            out = hf.generate(**hf_inputs, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                              pad_token_id=0, **compiled)
        sync()
        return out[:, hf_inputs["input_ids"].shape[1]:].cpu()

    # HF's own compiled decoding: a static cache, whose forward ``generate`` compiles
    # (``_compile_all_devices``: HF compiles only on GPUs by default; a class attribute in
    # transformers, not an __init__ argument). "reduce-overhead" would be CUDA graphs.
    hf_compile = transformers.CompileConfig(mode="default")
    hf_compile._compile_all_devices = True
    runs = {
        "megavlm": lambda: megavlm_run(engine),
        "megavlm+compile": lambda: megavlm_run(compiled),
        "hf": hf_run,
        "hf+compile": lambda: hf_run(cache_implementation="static", compile_config=hf_compile),
    }
    outputs, warmup = {}, {}
    for name, run in runs.items():  # warm-up (compilation included), and the tokens compared
        start = time.perf_counter()
        outputs[name] = run()
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in runs}  # wall seconds
    cpu: dict[str, list[float]] = {name: [] for name in runs}  # process CPU seconds (robust to a shared machine)
    for r in range(a.rounds):
        for name in runs if r % 2 == 0 else reversed(runs):
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    lm = cfg.model.language
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | threads {torch.get_num_threads()} | "
          f"device {dev}")
    print(f"model {a.preset}: LLM {lm.num_layers}x{lm.hidden_size} vocab {lm.vocab_size} | batch {a.batch}, prompts "
          f"{min(p.tokens.numel() for p in prompts)}..{max(p.tokens.numel() for p in prompts)} tokens with one "
          f"{a.image_patches}x{a.image_patches}-patch image | greedy, {a.new_tokens} new tokens")
    new = a.batch * a.new_tokens
    header = "".join(f"{'round ' + str(i + 1):>9}" for i in range(a.rounds))
    print(f"\n{'new tokens/s':16}{header}{'median':>9}")
    rate = {}
    for name, ts in times.items():
        rate[name] = new / statistics.median(ts)
        print(f"{name:16}" + "".join(f"{new / t:9.0f}" for t in ts) + f"{rate[name]:9.0f}")
    print(f"\n{'per CPU-second':16}{header}{'median':>9}")
    cpu_rate = {}
    for name, ts in cpu.items():
        cpu_rate[name] = new / statistics.median(ts)
        print(f"{name:16}" + "".join(f"{new / t:9.0f}" for t in ts) + f"{cpu_rate[name]:9.0f}")
    print("first (warm-up) run, s: " + ", ".join(f"{name} {t:.1f}" for name, t in warmup.items()))
    for name in ("megavlm", "megavlm+compile", "hf+compile"):
        agree = (outputs[name] == outputs["hf"]).float().mean().item()
        print(f"{name}: tokens equal to HF's {agree:.1%}; ratio to hf {rate[name] / rate['hf']:.2f}x wall, "
              f"{cpu_rate[name] / cpu_rate['hf']:.2f}x CPU time")
    print(f"megavlm+compile / hf+compile: {rate['megavlm+compile'] / rate['hf+compile']:.2f}x wall, "
          f"{cpu_rate['megavlm+compile'] / cpu_rate['hf+compile']:.2f}x CPU time")

    if a.profile:
        with torch.profiler.profile() as prof:
            runs["megavlm+compile"]()
        Path(a.profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                                   + "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
        print(f"profile of one megavlm+compile rollout: {a.profile}")


if __name__ == "__main__":
    main()
