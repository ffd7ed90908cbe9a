"""Runs parallel layouts inside one torchrun launch and saves what the tests compare.

Usage (from the repository root): torchrun --nproc_per_node N -m tests.parallel.worker OUT_DIR SCENARIO [SCENARIO ...]
(test_layouts.py runs ``main`` through ``python -c``, which spares the helper process of each
checkpoint save a re-import of this module.)

Several layouts share one launch (megatron's parallel state is torn down and rebuilt
between them) because starting processes and importing megatron-core dominate the cost.
Rank 0 writes ``OUT_DIR/<scenario>.pt`` with losses, grad norms, full step-1 gradients
and full parameters after the last step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megavlm.checkpointing import COMPLETE_MARKER, read_model_tensors
from megavlm.config import load_config
from megavlm.models.full_tensors import gather_full_tensors
from megavlm.training.loop import Trainer

STEPS = 3
BASE = [
    "model.preset=qwen3-tiny",
    "data.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.lr=1e-2",
    "train.warmup_iters=0",
    f"train.iters={STEPS}",
    "train.seed=7",
    "checkpoint.save=null",
    "logging.interval=1000",
    "logging.tensorboard=false",
    "parallel.distributed_optimizer=false",
]
MOE = ["model.preset=qwen3-moe-tiny"]
# megatron-core computes the load-balancing loss per sequence-parallel shard, so with TP+SP
# its gradient (router only) differs from the unsharded run; compare the rest without it.
MOE_NO_AUX = MOE + ["model.language.moe.aux_loss_coeff=0.0"]
PACKED = ["data.pack=true", "data.min_sample_length=6", "train.micro_batch_size=1"]
VLM = ["model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal", "data.seq_length=128", "data.pack=true",
       "train.micro_batch_size=1", "data.min_pixels=4096", "data.max_pixels=16384", "train.loss_normalization=sqrt"]
# CP pads every packed sample to a multiple of 2 x CP; pack_align=8 packs the 1-rank reference
# identically. adam_eps as in the sqrt scenarios below (why: see there).
VLM_CP = VLM + ["data.pack_align=8", "train.global_batch_size=2", "train.adam_eps=1e-4"]

# Square-root loss normalization over samples of different lengths (padded rows): the same
# global batch as 1, 2 or 4 micro-batches, or over DP=2, must give one loss and one gradient.
#
# train.adam_eps=1e-4 keeps this 3-step comparison well-conditioned. With the default 1e-8 at
# lr 1e-2, Adam's step lr * m / (sqrt(v) + eps) moves by up to ~lr / eps = 1e6 times a change
# in a gradient entry near 0 (a few per tensor, by cancellation), and an entry first trained
# in step 2 moves ~lr in the direction of its first gradient, however tiny. Measured here:
# - the weighting is exact: in float64, DP=2 and 1/2/4 micro-batches agree on all 3 losses
#   within 2e-15 and on step-3 gradients within 2e-15;
# - fp32, eps 1e-8: DP=2 step-1 gradients differ from 1 rank by 1.3e-8 (4.6e-7 of a tensor's
#   max: summation order), parameters after step 1 by 4e-5 (fc1 entries whose gradient is
#   ~1.5e-9, under eps);
# - 30 reruns of the 1-rank reference with each token weight scaled by (1 + 1.2e-7 * randn),
#   which moves step-1 gradients by the same 1.1e-8..1.9e-8: step-3 loss differences up to
#   1.25e-4 (a 2-core machine's `make test` failed with 1.2e-4; one more seed at 9.9e-6),
#   parameters up to 2.7e-3 (an embedding entry first trained in step 2 got gradient
#   -2.6e-7 in one run, +1.7e-8 in the other);
# - eps 1e-4, same 30 reruns: step-3 loss differences at most 6.6e-7 (the fp32 resolution of
#   the loss), parameters 6e-7; DP=2 as is and with 10 such seeds: 1.0e-6 and 4.6e-7. Adam's
#   step then moves by at most ~lr / eps = 100 times a gradient change, whatever the
#   summation order.
SQRT = ["train.loss_normalization=sqrt", "data.min_sample_length=6", "train.global_batch_size=4",
        "train.adam_eps=1e-4"]

# scenario -> overrides (on top of BASE)
LAYOUTS = {
    "ref": [],
    "ref_moe": MOE,
    "ref_packed": PACKED,
    "ref_moe_no_aux": MOE_NO_AUX,
    "ref_sqrt_mb1": SQRT + ["train.micro_batch_size=4"],
    "ref_sqrt_mb2": SQRT + ["train.micro_batch_size=2"],
    "ref_sqrt_mb4": SQRT + ["train.micro_batch_size=1"],
    "ref_per_token_mb1": SQRT[1:] + ["train.micro_batch_size=4"],
    "dp2_sqrt": SQRT + ["train.micro_batch_size=1"],
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "pp2_uneven": ["parallel.pp=2", "parallel.first_stage_layers=1"],  # 1 + 3 decoder layers
    "dp2": [],
    "dp2_distopt": ["parallel.distributed_optimizer=true"],
    "ep2_moe": MOE + ["parallel.ep=2"],
    "ep2_moe_allgather": MOE + ["parallel.ep=2", "model.language.moe.dispatcher=allgather"],
    "tp2_packed": PACKED + ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "tp2_ep2_moe_no_aux": MOE_NO_AUX + ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"],
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"],
    # Context parallelism on the VLM (packed images + video, DeepStack, sqrt loss weights), the
    # whole Trainer path of tools/pretrain_vlm.py; the reference packs with the same alignment.
    "ref_vlm_cp": VLM_CP,
    "cp2_vlm": VLM_CP + ["parallel.cp=2"],
    "cp2_tp2_vlm": VLM_CP + ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "cp2_pp2_vlm": VLM_CP + ["parallel.cp=2", "parallel.pp=2"],
}


def _teardown() -> None:
    parallel_state.destroy_model_parallel()


def run_layout(name: str, out: Path, log_dir: Path) -> None:
    cfg = load_config(None, BASE + LAYOUTS[name] + [f"logging.dir={log_dir / name}"])
    trainer = Trainer(cfg)
    losses, grads = [], None
    for step in range(STEPS):
        metrics = trainer.step()
        losses.append(metrics["loss"])
        if step == 0 and not cfg.parallel.distributed_optimizer:
            grads = gather_full_tensors(trainer.model, grads=True)
    params = gather_full_tensors(trainer.model)
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "grads": grads, "params": params}, out / f"{name}.pt")
    _teardown()


def run_resume(name: str, out: Path, log_dir: Path) -> None:
    """Uninterrupted 6 steps vs 3 steps, checkpoint, a fresh Trainer resuming to 6."""
    layout = {"resume_dp2": ["parallel.distributed_optimizer=true"],
              "resume_pp2": ["parallel.pp=2"],
              # the VLM on packed synthetic images/videos; DeepStack crosses the stage boundary
              "resume_vlm_pp2": VLM + ["parallel.pp=2", "train.global_batch_size=4"]}[name]
    ckpt = log_dir / f"{name}_ckpt"
    common = BASE + layout + ["train.iters=6", "train.lr_phases=[{iters: 6, end_lr: 1e-3}]"]
    full = Trainer(load_config(None, common + [f"logging.dir={log_dir / name}_a"])).run(keep_losses=True)
    _teardown()
    first = Trainer(load_config(None, common + [f"logging.dir={log_dir / name}_b", f"checkpoint.save={ckpt}", "checkpoint.interval=3"]))
    while first.state.iteration < 3:
        first.step()
    first.save()
    _teardown()
    resumed = Trainer(load_config(None, common + [f"logging.dir={log_dir / name}_b", f"checkpoint.load={ckpt}"])).run(keep_losses=True)
    _teardown()
    if dist.get_rank() == 0:
        torch.save({"full": full, "resumed": resumed}, out / f"{name}.pt")


def run_resume_async(name: str, out: Path, log_dir: Path) -> None:
    """checkpoint.async_save at DP=2 (distributed optimizer): a run saving in the background
    at steps 3 and 6 trains exactly like one that never saves; a save is not marked complete
    before it is finalized; resuming from the step-3 checkpoint gives the same losses 4-6
    and the same final parameters."""
    ckpt = log_dir / f"{name}_ckpt"
    common = BASE + ["parallel.distributed_optimizer=true", "train.iters=6", "train.lr_phases=[{iters: 6, end_lr: 1e-3}]"]
    uninterrupted = Trainer(load_config(None, common + [f"logging.dir={log_dir / name}_a"]))
    full = uninterrupted.run(keep_losses=True)
    full_params = gather_full_tensors(uninterrupted.model)
    _teardown()
    saving = Trainer(load_config(None, common + [f"logging.dir={log_dir / name}_b", f"checkpoint.save={ckpt}",
                                                 "checkpoint.interval=3", "checkpoint.async_save=true"]))
    losses = {}
    while saving.state.iteration < 3:
        loss = saving.step()["loss"]
        losses[saving.state.iteration] = loss
    path = saving.save()  # scheduled, not yet finalized: the writer may still be running
    marked_while_pending = (path / COMPLETE_MARKER).exists()
    losses.update(saving.run(keep_losses=True))  # finalizes it, saves again at step 6 and waits for that
    complete = sorted(p.name for p in ckpt.iterdir() if (p / COMPLETE_MARKER).is_file())
    _teardown()
    resuming = Trainer(load_config(None, common + [f"logging.dir={log_dir / name}_c",
                                                   f"checkpoint.load={ckpt / 'iter_0000003'}"]))
    resumed = resuming.run(keep_losses=True)
    params_equal = all(torch.equal(a, full_params[k]) for k, a in gather_full_tensors(resuming.model).items())
    _teardown()
    if dist.get_rank() == 0:
        torch.save({"full": full, "saving": losses, "resumed": resumed, "params_equal": params_equal,
                    "marked_while_pending": marked_while_pending, "complete": complete}, out / f"{name}.pt")


def run_reshard(name: str, out: Path, log_dir: Path) -> None:
    """Save at TP=2 after 2 steps; continue at TP=2 and, from the checkpoint, at PP=2."""
    ckpt = log_dir / "reshard_ckpt"
    common = BASE + ["train.iters=4", "parallel.distributed_optimizer=true"]
    tp2 = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    trainer = Trainer(load_config(None, common + tp2 + [f"logging.dir={log_dir}/r1", f"checkpoint.save={ckpt}"]))
    trainer.step(), trainer.step()
    saved_dir = trainer.save()
    live = gather_full_tensors(trainer.model)
    # the checkpoint read back in one process, without the TP=2 layout (conversion's reader)
    read_back = read_model_tensors(saved_dir) if dist.get_rank() == 0 else {}
    # the exporter's reader: one layer at a time (each layer crosses the saved TP chunks)
    by_layer = {}
    if dist.get_rank() == 0:
        from megavlm.checkpointing import model_tensor_shapes, read_model_layer

        for key, (size, _) in model_tensor_shapes(saved_dir).items():
            stacked = ".layers." in key
            parts = [read_model_layer(saved_dir, key, i) for i in range(size[0])] if stacked else None
            by_layer[key] = torch.stack(parts) if stacked else read_model_layer(saved_dir, key, None)
    continued = [trainer.step()["loss"] for _ in range(2)]
    _teardown()
    pp2 = Trainer(load_config(None, common + ["parallel.pp=2", f"logging.dir={log_dir}/r2", f"checkpoint.load={ckpt}"]))
    assert pp2.state.iteration == 2
    loaded = [pp2.step()["loss"] for _ in range(2)]
    _teardown()
    if dist.get_rank() == 0:
        torch.save({"tp2": continued, "pp2_from_tp2": loaded, "live": live, "read_back": read_back,
                    "by_layer": by_layer}, out / f"{name}.pt")


def run_nan_skip(name: str, out: Path, log_dir: Path) -> None:
    """DP=2, rank 0 alone sees a NaN loss in step 2: both ranks skip that update."""
    import megavlm.training.loop as loop

    trainer = Trainer(load_config(None, BASE + [f"logging.dir={log_dir / name}"]))
    trainer.step()
    before = gather_full_tensors(trainer.model)
    clean_forward = loop.forward_step

    def poisoned_forward(data_iterator, model, **kwargs):
        output, loss_func = clean_forward(data_iterator, model, **kwargs)
        return output * float("nan") if dist.get_rank() == 0 else output, loss_func

    loop.forward_step = poisoned_forward
    skipped = trainer.step()
    loop.forward_step = clean_forward
    after_skip = gather_full_tensors(trainer.model)
    recovered = trainer.step()
    if dist.get_rank() == 0:
        torch.save({
            "skipped_steps": skipped["skipped_steps"],
            "params_unchanged": all(torch.equal(before[k], after_skip[k]) for k in before),
            "recovered_loss": recovered["loss"],
            "recovered_skipped": recovered["skipped_steps"],
            "iteration": trainer.state.iteration,
        }, out / f"{name}.pt")
    _teardown()


def run_vlm_logits(name: str, out: Path, log_dir: Path) -> None:
    """HF Qwen3-VL weights loaded into a TP=2 or PP=2 layout: logits of every parity case."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.parity.qwen3vl_case import CASES, hf_logits, hf_model, processor_inputs, tiny_config

    from megavlm.conversion.engine import hf_to_megavlm
    from megavlm.conversion.qwen3vl import qwen3vl_rules
    from megavlm.inference.hf_inputs import forward_logits
    from megavlm.models.full_tensors import load_full_tensors
    from megavlm.positions import batched_mrope_position_ids
    from megavlm.models.vlm import pipeline_seq_multiplier
    from megavlm.platform.distributed import initialize
    from megavlm.models.build import build_model_chunks

    preset, layout = {
        "vlm_logits_tp2": ("qwen3vl-tiny", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
        "vlm_logits_pp2": ("qwen3vl-tiny", ["parallel.pp=2"]),
        # 1 + 3 decoder layers: DeepStack levels 2 and 3 cross the stage boundary
        "vlm_logits_pp2_uneven": ("qwen3vl-tiny", ["parallel.pp=2", "parallel.first_stage_layers=1"]),
        "vlm_moe_logits_ep2": ("qwen3vl-moe-tiny", ["parallel.ep=2"]),
        "vlm_moe_logits_tp2": ("qwen3vl-moe-tiny", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
        "vlm_moe_logits_pp2": ("qwen3vl-moe-tiny", ["parallel.pp=2"]),
    }[name]
    cfg = tiny_config(preset, layout)
    initialize(cfg.parallel, 0)
    hf = hf_model(cfg)
    chunks, _ = build_model_chunks(cfg)
    load_full_tensors(chunks, hf_to_megavlm(hf.state_dict(), qwen3vl_rules(cfg.model), num_layers=cfg.model.language.num_layers))
    diffs = {}
    for case, rows in CASES.items():
        inputs = processor_inputs(cfg, rows)
        keep = inputs["attention_mask"].bool()
        ref = hf_logits(hf, inputs)
        if cfg.parallel.pp == 1:
            ours = forward_logits(chunks, inputs, cfg.model)
        else:
            ours = _pipeline_logits(chunks, inputs, cfg, get_forward_backward_func(), batched_mrope_position_ids,
                                    pipeline_seq_multiplier(cfg.model, cfg.parallel))
        if ours is not None:
            diffs[case] = (ours[keep] - ref[keep]).abs().max().item()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, diffs)
    if dist.get_rank() == 0:
        merged = {k: v for d in gathered for k, v in d.items()}
        torch.save(merged, out / f"{name}.pt")
    _teardown()


def _pipeline_logits(chunks, inputs, cfg, forward_backward, positions_fn, multiplier):
    """Forward-only pipeline run returning the last stage's logits (None on other stages)."""
    from megavlm.inference.engine import padding_mask

    tokens = inputs["input_ids"]
    attention = inputs["attention_mask"].bool()
    positions, _ = positions_fn(tokens, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                attention_mask=attention, token_ids=cfg.model.token_ids)
    s = tokens.shape[1]
    mask = padding_mask(~attention, 0, s)
    media = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in inputs}

    def step(data_iterator, model):
        next(data_iterator)
        output = model(tokens, positions, attention_mask=mask, runtime_gather_output=True, **media)
        return output, lambda out, non_loss_data=False: out

    stored = forward_backward(
        forward_step_func=step, data_iterator=iter([None]), model=chunks, num_microbatches=1,
        seq_length=s * multiplier, micro_batch_size=tokens.shape[0], forward_only=True, collect_non_loss_data=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return stored[0][..., : cfg.model.language.vocab_size].float()


def main() -> None:
    import time

    out = Path(sys.argv[1])
    log_dir = out / "logs"
    for name in sys.argv[2:]:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        _run_scenario(name, out, log_dir)
        # the launch log says where a slow suite spends its time (CPU time is robust to load)
        print(f"[rank {dist.get_rank()}] {name}: {time.perf_counter() - start_wall:.1f} s wall, "
              f"{time.process_time() - start_cpu:.1f} s CPU", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _run_scenario(name: str, out: Path, log_dir: Path) -> None:
    if name in LAYOUTS:
        run_layout(name, out, log_dir)
    elif name == "resume_async_dp2":
        run_resume_async(name, out, log_dir)
    elif name.startswith("resume_"):
        run_resume(name, out, log_dir)
    elif name == "nan_skip":
        run_nan_skip(name, out, log_dir)
    elif name == "reshard_tp2_to_pp2":
        run_reshard(name, out, log_dir)
    elif name.startswith("vlm_") and "_logits_" in name:
        run_vlm_logits(name, out, log_dir)
    elif name == "planner_memory":  # test_planner_memory.py's measurements (4 ranks)
        import json

        from tests.parallel.planner_worker import LAYOUTS as PLANNER_LAYOUTS, run_layout as measure_layout

        results = {layout: measure_layout(layout, log_dir) for layout in PLANNER_LAYOUTS}
        if dist.get_rank() == 0:
            (out / "planner_memory.json").write_text(json.dumps(results, indent=1))
    else:
        raise SystemExit(f"unknown scenario {name!r}")


if __name__ == "__main__":  # dist_checkpointing spawns a process that re-imports this file
    main()
