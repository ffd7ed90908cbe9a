"""The tiny VLM under context parallelism against the same model without it (run by ring_worker).

In a 4-rank world, every rank first computes its own single-rank reference: megatron's
parallel state at CP=1 (DP=4), the model built with layout-invariant init, the whole packed
micro-batch (images, video, DeepStack) through ``forward_step``, the per-token loss sum
divided by the supervised-token count, and the gradient of every parameter. Then CP=2
(DP=2): the same model, the same micro-batch through the same ``forward_step`` (which now
shards it), each CP rank's loss sum divided by the *global* count, gradients summed over the
CP group (what DDP's DP x CP reduction does). Loss and gradients must agree.

Cases: ``parallel.vision_cp_split`` (each rank encodes half the media, the
gather's backward sums over ranks); and a micro-batch whose supervised tokens all sit on
CP rank 0, so rank 1's loss is a sum over nothing (finite loss, correct gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megavlm.config import load_config
from megavlm.data.build import training_rows
from megavlm.models.build import build_model_chunks
from megavlm.parallel.context import shard_for_cp
from megavlm.platform import cpu_adapter
from megavlm.platform.distributed import megatron_parallel_sizes, seed_everything
from megavlm.training.step import forward_step

BASE = [
    "model.preset=qwen3vl-tiny", "data.dataset=synthetic_multimodal", "data.seq_length=128", "data.pack=true",
    "data.pack_align=8", "train.micro_batch_size=1", "data.min_pixels=4096", "data.max_pixels=16384",
    "train.seed=3",
]
# (the plain split is compared through the Trainer in tests/parallel/test_layouts.py: cp2_vlm)
CASES = {"vision_split": ["parallel.vision_cp_split=true"], "one_rank_all_masked": []}


def _batch(cfg, case: str):
    rows = training_rows(cfg)
    batch = rows[1]
    # supervise every token of the packed samples (the synthetic answers are a few tokens at the
    # end of a sample, which would all sit on one CP rank): both ranks then carry loss
    batch.loss_mask = (batch.sample_ids >= 0).float()
    if case == "one_rank_all_masked":
        # supervise only tokens that CP rank 0 holds (in the padded layout) -> rank 1 has none
        keep = torch.zeros(batch.tokens.shape[1], dtype=torch.bool)
        # map padded-layout indices of rank 1 back to the original positions by marking tokens
        marker = torch.arange(batch.tokens.shape[1]).unsqueeze(0).float()
        moved = shard_for_cp(
            tokens=batch.tokens, labels=batch.labels, loss_mask=marker + 1, loss_weights=None,
            position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, sample_ids=batch.sample_ids,
            cp_size=2, cp_rank=1, pad_token_id=0,
        ).loss_mask  # original index + 1 of each of rank 1's tokens, 0 for padding
        keep[(moved[moved > 0] - 1).long()] = True
        mask = batch.loss_mask.clone()
        mask[:, keep] = 0  # rank 1 supervises nothing
        assert 0 < mask.sum() < batch.loss_mask.sum(), "the case needs supervised tokens on both ranks first"
        batch.loss_mask = mask
    return batch


def _loss_and_grads(cfg, batch, total_tokens: float):
    seed_everything(cfg.train.seed)
    chunks, _ = build_model_chunks(cfg)
    model = chunks[0]
    output, loss_fn = forward_step(iter([batch]), model)
    loss_sum, _, _ = loss_fn(output)
    (loss_sum / total_tokens).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return loss_sum.detach(), grads


def _reinit(cfg) -> None:
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**megatron_parallel_sizes(cfg.parallel))


def run(results: dict) -> None:
    cpu_adapter.install()
    for case, extra in CASES.items():
        ref_cfg = load_config(None, BASE)
        cp_cfg = load_config(None, BASE + ["parallel.cp=2", *extra])
        batch = _batch(ref_cfg, case)
        total = float(batch.loss_mask.sum())

        _reinit(ref_cfg)
        ref_loss, ref_grads = _loss_and_grads(ref_cfg, batch, total)

        _reinit(cp_cfg)
        cp_group = parallel_state.get_context_parallel_group()
        loss, grads = _loss_and_grads(cp_cfg, batch, total)
        local = torch.stack([loss, torch.tensor(float(torch.isfinite(loss)))])
        dist.all_reduce(local, group=cp_group)
        for g in grads.values():
            dist.all_reduce(g, group=cp_group)
        scale = max(g.abs().max().item() for g in ref_grads.values())
        grad_err = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads) / scale
        errors = torch.tensor([abs(local[0].item() - ref_loss.item()) / abs(ref_loss.item()), grad_err,
                               2.0 - local[1].item()], dtype=torch.float64)
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        results[f"model_{case}"] = {"loss_rel": errors[0].item(), "grad_rel": errors[1].item(),
                                    "nonfinite_ranks": errors[2].item()}
    parallel_state.destroy_model_parallel()
