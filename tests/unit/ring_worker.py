"""Worker of tests/unit/test_ring_attention.py: ring attention vs full attention, per case.

Launched once with 4 ranks (``python -m torch.distributed.run --nproc_per_node 4 -m
tests.unit.ring_worker OUT.json``): every case runs at CP=4 over the world and at CP=2 over
the subgroups [0, 1] and [2, 3] (group ranks differ from global ranks there, and at CP=2 the
previous and next ring neighbours are the same rank). Every rank builds the same global
tensors from a seed, computes full attention in-process with plain
``F.scaled_dot_product_attention`` (block-diagonal bool mask for packed samples), runs the
ring on its own tokens, and compares its output and its q/k/v gradients with its slice of
the reference. Rank 0 writes the max abs errors (max over ranks) per case to OUT.json.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megavlm.parallel import cp_partition, ring_attention

# name: (causal, packed cu_seqlens or None, query heads, kv heads)
CASES = {
    "causal": (True, None, 4, 4),
    "noncausal": (False, None, 4, 4),
    "gqa_causal": (True, None, 4, 2),
    "gqa_noncausal": (False, None, 4, 1),
    "packed_causal": (True, [0, 5, 18, 19, 35], 4, 4),
    "packed_noncausal": (False, [0, 5, 5, 18, 19, 35], 4, 4),
    "packed_gqa_causal": (True, [0, 13, 14, 30, 37], 4, 2),
}
BATCH, HEAD_DIM = 2, 16


def _reference(q, k, v, g, causal, cu_real, cu_pad):
    """Full attention on one process. q, k, v, g: global [b, h, S, d] (padded layout)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    mask, is_causal = None, causal
    if cu_pad is not None:
        S = q.shape[2]
        pos = torch.arange(S)
        sid = torch.bucketize(pos, cu_pad[1:], right=True)
        lengths = cu_real[1:] - cu_real[:-1]
        valid = (pos - cu_pad[sid]) < lengths[sid]
        mask = (sid[:, None] == sid[None, :]) & valid[:, None] & valid[None, :]
        if causal:
            mask &= torch.ones(S, S, dtype=torch.bool).tril()
        is_causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=k.shape[1] != q.shape[1])
    (out * g).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def run_case(name: str, group, cp: int, cp_rank: int) -> dict[str, float]:
    causal, cu, hq, hk = CASES[name]
    gen = torch.Generator().manual_seed(1234 + len(name))
    if cu is None:
        cu_real = cu_pad = None
        S, b = 2 * cp * 5, BATCH
        part = cp_partition(cp, cp_rank, seq_len=S)
    else:
        cu_real = torch.tensor(cu)
        part = cp_partition(cp, cp_rank, cu_seqlens=cu_real)
        cu_pad = part.cu_seqlens_padded
        S, b = int(cu_pad[-1]), 1
    q = torch.randn(b, hq, S, HEAD_DIM, generator=gen)
    k = torch.randn(b, hk, S, HEAD_DIM, generator=gen)
    v = torch.randn(b, hk, S, HEAD_DIM, generator=gen)
    g = torch.randn(b, hq, S, HEAD_DIM, generator=gen)
    ref = _reference(q, k, v, g, causal, cu_real, cu_pad)

    idx = part.indices
    local = [x.index_select(2, idx) for x in (q, k, v, g)]  # [b, h, s_local, d]
    if cu is None:  # megatron layout [s, b, h, d]
        ql, kl, vl = (x.permute(2, 0, 1, 3).contiguous().requires_grad_() for x in local[:3])
        out = ring_attention(ql, kl, vl, group, causal=causal, layout="sbhd").permute(1, 2, 0, 3)
        grads = lambda x: x.grad.permute(1, 2, 0, 3)  # noqa: E731
    else:  # packed [t, h, d]
        ql, kl, vl = (x[0].transpose(0, 1).contiguous().requires_grad_() for x in local[:3])
        out = ring_attention(ql, kl, vl, group, causal=causal, cu_seqlens=cu_real,
                             layout="thd").transpose(0, 1).unsqueeze(0)
        grads = lambda x: x.grad.transpose(0, 1).unsqueeze(0)  # noqa: E731
    (out * local[3]).sum().backward()
    got = (out.detach(), grads(ql), grads(kl), grads(vl))
    errors = {}
    for key, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        errors[key] = (a - r.index_select(2, idx)).abs().max().item()
        if not torch.isfinite(a).all():
            errors[key] = float("inf")
    return errors


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {world: (dist.group.WORLD, rank)}
    if world == 4:
        pair = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
        groups[2] = (pair, rank % 2)
    results = {}
    for cp, (group, cp_rank) in groups.items():
        for name in CASES:
            t0 = time.perf_counter()
            errors = run_case(name, group, cp, cp_rank)
            vals = torch.tensor([errors[k] for k in ("out", "dq", "dk", "dv")], dtype=torch.float64)
            dist.all_reduce(vals, op=dist.ReduceOp.MAX)
            results[f"{name}_cp{cp}"] = {
                **dict(zip(("out", "dq", "dk", "dv"), vals.tolist())),
                "seconds": round(time.perf_counter() - t0, 3),
            }
    if world == 4:
        from tests.unit import cp_model_worker

        cp_model_worker.run(results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
