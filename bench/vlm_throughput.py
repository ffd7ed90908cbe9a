"""Training throughput of megavlm's VLMModel against HF ``Qwen3VLForConditionalGeneration`` on CPU.

Same tiny Qwen3-VL shapes (ViT + DeepStack mergers + Qwen3 decoder with interleaved MRoPE),
same weights (megavlm's initial weights exported to HF), same micro-batch of image+text
samples, same intra-op thread count, in one process; fp32. Each framework runs full
training steps: forward, backward, gradient clipping at 1.0 and AdamW.

* megavlm: ``Trainer.step()`` (megatron-core schedule, DDP buffers, distributed optimizer);
* HF: ``labels`` with -100 off the supervised text, ``torch.optim.AdamW``, ``clip_grad_norm_``.

Timing is interleaved in rounds (see bench/train_throughput.py, whose harness this reuses);
the printed ratio is megavlm's median-step tokens/s over HF's. A "kernel floor" contender runs
only megavlm's GEMMs and attention kernels (``vlm_kernel_floor_step``): its rate over HF's is
the ceiling of any framework running those kernels, and megavlm's rate over it what is left. The first-step losses are
printed too: equal weights and inputs must give equal losses.

Usage: ``python bench/vlm_throughput.py [--threads 2 --mbs 4 --seq 256]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import (  # noqa: E402
    FLOOR, _default_threads, _free_port, _no_torch_function_modes, add_common_args, compile_hf, kernel_floor, phase,
    run_bench,
)

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--image-patches", type=int, default=16, help="image side in patches (tokens = side^2 / 4)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=_default_threads())
    add_common_args(p)
    return p.parse_args()


OVERRIDES = [
    "model.preset=qwen3vl-tiny",
    "model.vision.num_layers=4", "model.vision.hidden_size=128", "model.vision.ffn_hidden_size=512",
    "model.vision.num_attention_heads=4", "model.vision.deepstack_layers=[1,2,3]",
    "model.language.num_layers=4", "model.language.hidden_size=256", "model.language.ffn_hidden_size=768",
    "model.language.num_attention_heads=8", "model.language.num_query_groups=4", "model.language.head_dim=32",
    "model.language.vocab_size=4096", "model.rope.mrope_section=[6,5,5]",
    "checkpoint.save=null", "logging.interval=1000000", "parallel.distributed_optimizer=true",
    "data.dataset=synthetic_text", "train.lr_decay=constant", "train.lr=3e-4",
]


def make_batch(cfg, a):
    """One micro-batch of [text, image, text] samples, as megavlm's Batch and as HF inputs."""
    from megavlm.data.batch import Batch
    from megavlm.positions import batched_mrope_position_ids

    ids = cfg.model.token_ids
    side = a.image_patches
    n_img = side * side // 4
    g = torch.Generator().manual_seed(0)
    specials = {ids.image_token_id, ids.video_token_id, ids.vision_start_token_id, ids.vision_end_token_id}
    vocab = torch.tensor([t for t in range(cfg.model.language.vocab_size) if t not in specials])
    head = (a.seq - n_img - 2) // 3
    rows = []
    for _ in range(a.mbs):
        text = vocab[torch.randint(0, len(vocab), (a.seq + 1 - n_img - 2,), generator=g)]
        rows.append(torch.cat([text[:head], torch.tensor([ids.vision_start_token_id] + [ids.image_token_id] * n_img
                                                         + [ids.vision_end_token_id]), text[head:]]))
    seq = torch.stack(rows)  # [b, s + 1]
    tokens, labels = seq[:, :-1], seq[:, 1:]
    is_text = ~torch.isin(labels, torch.tensor(sorted(specials)))
    grid = torch.tensor([[1, side, side]] * a.mbs)
    v = cfg.model.vision
    pixels = torch.randn(a.mbs * side * side, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=g)
    positions, _ = batched_mrope_position_ids(tokens, grid, None, token_ids=ids)
    batch = Batch(tokens=tokens, labels=labels, loss_mask=is_text.float(), position_ids=positions,
                  pixel_values=pixels, image_grid_thw=grid)
    hf_labels = torch.full_like(tokens, -100)
    hf_labels[:, 1:] = torch.where(is_text[:, :-1], labels[:, :-1], -100)
    types = (tokens == ids.image_token_id).long()
    hf = dict(input_ids=tokens, mm_token_type_ids=types, pixel_values=pixels, image_grid_thw=grid, labels=hf_labels)
    return batch, hf


def vlm_kernel_floor_step(cfg, a, supervised_rows: int):
    """The VLM step's GEMMs and attention kernels alone (``train_throughput.kernel_floor``),
    in the shapes megavlm runs: the patch embedding (no input gradient: pixels need none), each
    ViT layer's QKV, projection and MLP, each merger's two linears (the final one and one per
    DeepStack level) over the 2x2-merged rows, each decoder layer's fused QKV, output, gate+up
    and down projections, and the vocabulary projection over the supervised rows only (as
    ``train.supervised_logits_only`` does; HF projects every token). Attention: per ViT layer
    one non-causal SDPA with the images in the batch dimension, per decoder layer one causal
    GQA SDPA."""
    v, lm = cfg.model.vision, cfg.model.language
    patches = a.mbs * a.image_patches ** 2
    merged = patches // cfg.model.projector.spatial_merge_size ** 2
    merger_width = v.hidden_size * cfg.model.projector.spatial_merge_size ** 2
    tokens, hd = a.mbs * a.seq, lm.head_dim
    linears = [(patches, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, v.hidden_size, False)]
    linears += [(patches, i, o, True) for i, o in ((v.hidden_size, 3 * v.hidden_size), (v.hidden_size, v.hidden_size),
                                                   (v.hidden_size, v.ffn_hidden_size), (v.ffn_hidden_size, v.hidden_size))
                ] * v.num_layers
    linears += [(merged, merger_width, merger_width, True), (merged, merger_width, lm.hidden_size, True)] * (
        1 + len(v.deepstack_layers))
    heads, groups = lm.num_attention_heads, lm.num_query_groups
    linears += [(tokens, i, o, True) for i, o in ((lm.hidden_size, (heads + 2 * groups) * hd), (heads * hd, lm.hidden_size),
                                                  (lm.hidden_size, 2 * lm.ffn_hidden_size), (lm.ffn_hidden_size, lm.hidden_size))
                ] * lm.num_layers
    linears.append((supervised_rows, lm.hidden_size, lm.vocab_size, True))
    vit_heads = v.num_attention_heads
    attention = [(a.mbs, vit_heads, vit_heads, a.image_patches ** 2, v.hidden_size // vit_heads, False)] * v.num_layers
    attention += [(a.mbs, heads, groups, a.seq, hd, True)] * lm.num_layers
    return kernel_floor(linears, attention)


def main() -> None:
    a = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import transformers

    from megavlm.config import load_config
    from megavlm.conversion.engine import megavlm_to_hf
    from megavlm.conversion.hf_config import hf_config_from_model
    from megavlm.conversion.qwen3vl import qwen3vl_rules
    from megavlm.models.full_tensors import gather_full_tensors
    from megavlm.training.loop import Trainer

    iters = a.warmup + a.rounds * a.steps + 2
    cfg = load_config(None, OVERRIDES + [f"train.iters={iters}", f"data.seq_length={a.seq}",
                                         f"train.micro_batch_size={a.mbs}", f"train.global_batch_size={a.mbs}",
                                         f"train.compile={str(a.compile).lower()}"])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg)
    batch, hf_inputs = make_batch(cfg, a)
    trainer.data = itertools.repeat(batch)  # the same micro-batch every step, as for HF
    full = gather_full_tensors(trainer.model)
    t = cfg.train

    def build_hf():
        hf_cfg = hf_config_from_model(cfg.model)
        config = transformers.Qwen3VLConfig(**{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")})
        config._attn_implementation = "sdpa"
        hf = transformers.Qwen3VLForConditionalGeneration(config).train()
        hf.load_state_dict(megavlm_to_hf(full, qwen3vl_rules(cfg.model), num_layers=cfg.model.language.num_layers),
                           strict=not cfg.model.language.tie_embeddings)
        params = list(hf.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim > 1]},
             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay,
        )

        def hf_step() -> float:
            with _no_torch_function_modes():
                with phase("optimizer"):
                    optimizer.zero_grad(set_to_none=True)
                with phase("forward"):
                    loss = hf(**hf_inputs).loss
                with phase("backward"):
                    loss.backward()
                with phase("optimizer"):
                    torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
                    optimizer.step()
            return loss.item()

        return hf_step, hf

    hf_step, _ = build_hf()

    def megavlm_step() -> float:
        return trainer.step()["loss"]

    print(f"torch {torch.__version__} | transformers {transformers.__version__} | threads {torch.get_num_threads()}")
    v, lm = cfg.model.vision, cfg.model.language
    print(f"model: ViT {v.num_layers}x{v.hidden_size} (DeepStack {v.deepstack_layers}) -> LLM {lm.num_layers}x"
          f"{lm.hidden_size} vocab {lm.vocab_size} | batch {a.mbs}x{a.seq} with one {a.image_patches}x"
          f"{a.image_patches}-patch image each | fp32")
    print(f"first-step loss: megavlm {megavlm_step():.6f} | hf {hf_step():.6f} (same weights and inputs)")
    steps = {"megavlm": megavlm_step, "hf": hf_step}
    if a.compile:
        steps["hf+compile"], hf_compiled = build_hf()
        compile_hf(hf_compiled)
    steps[FLOOR] = vlm_kernel_floor_step(cfg, a, supervised_rows=int(batch.loss_mask.count_nonzero()))
    a.warmup = max(a.warmup - 1, 0)  # the first step above was one
    run_bench(a, steps, trainer, tokens=a.mbs * a.seq)


if __name__ == "__main__":
    main()
