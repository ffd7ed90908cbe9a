"""Context-parallel ring attention without Transformer Engine (CPU fused kernel, any backend).

Why this exists: megatron-core's only context-parallel attention is TE's
``TEDotProductAttention`` (its local ``DotProductAttention`` asserts ``cp == 1``), and
torch's ``context_parallel()`` has no CPU sharding rule for the fused kernel (REFERENCE 10).
So the CPU / gloo path and its tests need their own.

The algorithm (TE ``AttnFuncWithCPAndKVP2P``, ring-flash-attention):

**Split.** Each of the ``cp`` ranks holds ``1 / cp`` of the queries, keys and values of the
sequence, split by :func:`megavlm.parallel.partition.cp_partition`: the zigzag layout, two
chunks per rank (chunks ``r`` and ``2cp-1-r`` of ``2cp``), per sample for packed input.

**Forward ring.** At step ``i`` (``0 <= i < cp``) rank ``r`` holds the K/V of rank
``src = (r - i) mod cp``; it posts the send of that K/V to ``r + 1`` and the receive of the
next one from ``r - 1`` *before* computing, so communication overlaps compute, and it never
holds more than two ranks' K/V (the current block and the one arriving): no rank ever holds
the full K/V. Each block is one call of the CPU fused flash kernel
``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the block output and its
log-sum-exp (LSE, fp32) per query row. Softmax over the union of key blocks is recovered
exactly from the per-block results by the online-softmax merge, done in fp32::

    lse' = logaddexp(lse, lse_b)
    out' = out * exp(lse - lse') + out_b * exp(lse_b - lse')

**Zigzag causal load balancing (regular layout).** The local queries are ``[chunk r, chunk
2cp-1-r]`` and the K/V received at step ``i`` are ``[chunk src, chunk 2cp-1-src]``:

* step 0 (``src == r``): plain causal attention over the local pair (top-left aligned: the
  first chunk sees itself causally, the second sees the whole first chunk and itself causally);
* ``i <= r`` (``src < r``): chunk ``src`` precedes both local chunks and chunk ``2cp-1-src``
  follows both, so *all* local queries attend the *first half* of the received K/V, no mask;
* ``i > r`` (``src > r``): both received chunks follow local chunk ``r`` and precede local
  chunk ``2cp-1-r``, so the *second half* of the local queries attends *all* received K/V.

Every rank thus does the same work at every step (one half-size block after step 0), and no
mask is materialized. Non-causal attention is all queries against all received K/V.

**Packed samples (THD).** Tokens must never attend across samples, and padding tokens (each
sample is padded to a multiple of ``2cp``) are neither attended nor attend. Every rank can
compute every rank's token positions from the global ``cu_seqlens_padded``, so each block
gets a float additive mask (0 / -inf, the query dtype: the kernel rejects bool masks) built
from the global positions, sample ids and real lengths of its rows and columns; no mask
travels the ring. The zigzag halves apply per sample (the first / second chunk of every
sample), which keeps the causal work balanced per sample. A query row with no visible key in
a block comes back from the kernel as out 0, lse 0; its lse is reset to -inf before merging,
and the merge never forms ``-inf - -inf``. Blocks with no visible key at all are skipped.

**Backward.** The ring again, recomputing nothing from forward but the masks: per block the
kernel's own backward ``..._for_cpu_backward`` is called with the *global* out and LSE of the
local queries (softmax probabilities of a block under the global normalizer are exactly
``exp(s - lse_global)``, and the ``rowsum(dout * out)`` term needs the global out), so the
block gradients sum to the full-attention gradients exactly. dQ accumulates locally (fp32).
dK/dV are accumulated (fp32) into a buffer that travels the ring together with its K/V, each
rank adding its contribution; after the last step one extra hop brings every rank's dK/dV
home. Rows that attend nothing anywhere (padding) get lse 0 in backward, so their
probabilities are ``exp(-inf - 0) = 0`` instead of NaN.

**Communication.** Plain ``isend``/``irecv`` (not ``batch_isend_irecv``: DEVELOPERS.md
records gloo mismatching batched p2p when the previous and next rank are the same, which
is every ring at cp = 2), one K/V buffer (K and V flattened together) and, in backward, one
dK/dV buffer per step, distinct tags; at most one exchange of each kind is in flight.

Not supported: dropout (the CPU fused kernel rejects dropout > 0), sliding windows,
cross-attention with different packing of queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .partition import cp_partition, pad_cu_seqlens

__all__ = ["ring_attention"]

_fwd_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

_KV_TAG, _DKV_TAG = 11, 12
_NEG_INF = float("-inf")

Select = Union[None, slice, Tensor]  # rows along the sequence dim: all, a range, or indices


# ----------------------------------------------------------------------------- helpers
def _take(x: Tensor, sel: Select, dim: int = 2) -> Tensor:
    if sel is None:
        return x
    if isinstance(sel, slice):
        return x[(slice(None),) * dim + (sel,)]
    return x.index_select(dim, sel)


def _add(dst: Tensor, sel: Select, val: Tensor, dim: int = 2) -> None:
    if sel is None:
        dst += val
    elif isinstance(sel, slice):
        dst[(slice(None),) * dim + (sel,)] += val
    else:
        dst.index_add_(dim, sel, val)


def _put(dst: Tensor, sel: Select, val: Tensor, dim: int = 2) -> None:
    if sel is None:
        dst.copy_(val)
    elif isinstance(sel, slice):
        dst[(slice(None),) * dim + (sel,)] = val
    else:
        dst.index_copy_(dim, sel, val)


def _merge(out: Tensor, lse: Tensor, sel: Select, out_b: Tensor, lse_b: Tensor) -> None:
    """Online-softmax merge of a block result into the fp32 accumulators (in place)."""
    o, l = _take(out, sel), _take(lse, sel)  # [b, h, n, d], [b, h, n]
    new = torch.logaddexp(l, lse_b)
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # no -inf - -inf
    merged = o * torch.exp(l - ref).unsqueeze(-1) + out_b.float() * torch.exp(lse_b - ref).unsqueeze(-1)
    _put(out, sel, merged)
    _put(lse, sel, new)


def _cpu(sel: Select) -> Select:
    return sel.cpu() if isinstance(sel, Tensor) else sel


@dataclass
class _Block:
    rows: Select  # local query rows
    cols: Select  # rows of the received K/V
    is_causal: bool
    mask: Optional[Tensor]  # additive [n_rows, n_cols] in the query dtype, or None
    empty_rows: Optional[Tensor]  # bool [n_rows]: no visible key in this block


class _Plan:
    """Which block rank ``rank`` computes at each ring step (see the module docstring)."""

    def __init__(self, cp: int, rank: int, s_local: int, causal: bool,
                 cu_seqlens: Optional[Tensor], cu_seqlens_padded: Optional[Tensor], device):
        self.cp, self.rank, self.causal, self.device = cp, rank, causal, device
        self.packed = cu_seqlens_padded is not None
        if not self.packed:
            if causal and s_local % 2:
                raise ValueError(f"zigzag causal ring needs an even local length, got {s_local}")
            half = s_local // 2
            self.first, self.second = slice(0, half), slice(half, s_local)
            return
        pad = cu_seqlens_padded.to(torch.long).cpu()
        real = cu_seqlens.to(torch.long).cpu()
        if int(pad[-1]) != s_local * cp:
            raise ValueError(
                f"local length {s_local} x cp {cp} != padded packed length {int(pad[-1])}"
            )
        self.pad, self.lengths = pad, real[1:] - real[:-1]
        local_cu = pad // cp
        firsts, seconds = [], []
        for a, e in zip(local_cu[:-1].tolist(), local_cu[1:].tolist()):
            m = (a + e) // 2
            firsts.append(torch.arange(a, m))
            seconds.append(torch.arange(m, e))
        self.first = torch.cat(firsts).to(device)
        self.second = torch.cat(seconds).to(device)
        self._pos: dict[int, Tensor] = {}

    def _positions(self, r: int) -> Tensor:
        if r not in self._pos:
            self._pos[r] = cp_partition(self.cp, r, cu_seqlens_padded=self.pad).indices
        return self._pos[r]

    def _sample_info(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        sid = torch.bucketize(pos, self.pad[1:], right=True)
        valid = (pos - self.pad[sid]) < self.lengths[sid]
        return sid, valid

    def block(self, step: int, dtype: torch.dtype) -> Optional[_Block]:
        src = (self.rank - step) % self.cp
        if not self.causal:
            rows, cols, is_causal = None, None, False
        elif step == 0:
            rows, cols, is_causal = None, None, not self.packed
        elif step <= self.rank:
            rows, cols, is_causal = None, self.first, False
        else:
            rows, cols, is_causal = self.second, None, False
        if not self.packed:
            return _Block(rows, cols, is_causal, None, None)

        qpos = _take(self._positions(self.rank), _cpu(rows), dim=0)  # global padded positions
        kpos = _take(self._positions(src), _cpu(cols), dim=0)
        qsid, qvalid = self._sample_info(qpos)
        ksid, kvalid = self._sample_info(kpos)
        keep = (qsid[:, None] == ksid[None, :]) & qvalid[:, None] & kvalid[None, :]
        if self.causal:
            keep &= kpos[None, :] <= qpos[:, None]
        if not bool(keep.any()):
            return None  # nothing visible: skip the kernel call (it also crashes on empty input)
        mask = None
        if not bool(keep.all()):
            mask = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, _NEG_INF).to(self.device)
        empty = ~keep.any(dim=1)
        return _Block(rows, cols, False, mask, empty.to(self.device) if bool(empty.any()) else None)


class _Ring:
    """Point-to-point exchange with the ring neighbours of a process group."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = (self.rank + 1) % self.size
        self.prev = (self.rank - 1) % self.size

    def start(self, send: Tensor, tag: int) -> tuple[Tensor, list]:
        recv = torch.empty_like(send)
        works = [
            dist.isend(send, group=self.group, group_dst=self.next, tag=tag),
            dist.irecv(recv, group=self.group, group_src=self.prev, tag=tag),
        ]
        return recv, works

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()


def _pack(*xs: Tensor) -> Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _unpack(buf: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    n = like.numel()
    return buf[:n].view(like.shape), buf[n:].view(like.shape)


# ----------------------------------------------------------------------------- autograd
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: _Ring, plan: _Plan, scale: Optional[float]):
        # q: [b, hq, s, d]; k, v: [b, hk, s, d] (local tokens)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], _NEG_INF, dtype=torch.float32, device=q.device)
        k_c, v_c = k.contiguous(), v.contiguous()
        kv = _pack(k_c, v_c)
        for step in range(ring.size):
            works = []
            if step + 1 < ring.size:
                nxt, works = ring.start(kv, _KV_TAG)  # prefetch the next block's K/V
            k_i, v_i = _unpack(kv, k_c)
            blk = plan.block(step, q.dtype)
            if blk is not None:
                o_b, l_b = _fwd_kernel(
                    _take(q, blk.rows), _take(k_i, blk.cols), _take(v_i, blk.cols),
                    0.0, blk.is_causal, attn_mask=blk.mask, scale=scale,
                )
                if blk.empty_rows is not None:  # the kernel reports lse 0 there
                    l_b = l_b.masked_fill(blk.empty_rows, _NEG_INF)
                _merge(out, lse, blk.rows, o_b, l_b)
            if works:
                ring.wait(works)
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k_c, v_c, out, lse)
        ctx.ring, ctx.plan, ctx.scale = ring, plan, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring, plan, scale = ctx.ring, ctx.plan, ctx.scale
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # rows that see nothing
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = _pack(k, v)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for step in range(ring.size):
            kv_works = []
            if step + 1 < ring.size:
                kv_next, kv_works = ring.start(kv, _KV_TAG)
            k_i, v_i = _unpack(kv, k)
            dk_i, dv_i = _unpack(dkv, k)
            blk = plan.block(step, q.dtype)
            if blk is not None:
                dq_b, dk_b, dv_b = _bwd_kernel(
                    _take(dout, blk.rows), _take(q, blk.rows), _take(k_i, blk.cols), _take(v_i, blk.cols),
                    _take(out, blk.rows), _take(lse, blk.rows), 0.0, blk.is_causal,
                    attn_mask=blk.mask, scale=scale,
                )
                _add(dq, blk.rows, dq_b.float())
                _add(dk_i, blk.cols, dk_b.float())
                _add(dv_i, blk.cols, dv_b.float())
            if ring.size > 1:
                # dK/dV follow their K/V; at the last step this is the extra hop home
                dkv_next, dkv_works = ring.start(dkv, _DKV_TAG)
                ring.wait(kv_works + dkv_works)
                dkv = dkv_next
                if kv_works:
                    kv = kv_next
        dk, dv = _unpack(dkv, k)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ----------------------------------------------------------------------------- public API
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    cu_seqlens_padded: Optional[Tensor] = None,
    layout: str = "sbhd",
) -> Tensor:
    """Attention of this CP rank's queries over the keys/values of the whole CP group.

    Args:
        q, k, v: this rank's tokens, split by :func:`~megavlm.parallel.partition.cp_partition`.
            ``layout`` is ``"sbhd"`` (megatron: ``[s, b, h, d]``), ``"bhsd"`` (the kernel's
            ``[b, h, s, d]``) or ``"thd"`` (packed: ``[t, h, d]``). K/V may have fewer heads
            than Q (GQA; the query heads must be a multiple).
        group: the CP process group (default: the world).
        causal: causal (top-left, over global positions) or full attention.
        scale: softmax scale, default ``1 / sqrt(d)``.
        cu_seqlens: packed input: ``[n + 1]`` *global* real cumulative sample lengths (the
            same on every rank); tokens attend only within their sample, padding nothing.
        cu_seqlens_padded: packed input: global padded cumulative lengths (every sample a
            multiple of ``2 * cp``); computed from ``cu_seqlens`` when omitted. With only
            this given, every token is real.

    Returns:
        The attention output for the local queries, in ``layout`` and the query dtype
        (``[s, b, hq, d]`` for ``"sbhd"``).
    """
    if layout == "sbhd":
        qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    elif layout == "bhsd":
        qb, kb, vb = q, k, v
    elif layout == "thd":
        qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    else:
        raise ValueError(f"layout must be 'sbhd', 'bhsd' or 'thd', got {layout!r}")
    if qb.dim() != 4 or kb.shape != vb.shape or qb.shape[0] != kb.shape[0] or qb.shape[2] != kb.shape[2]:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} ({layout})")
    if qb.shape[1] % kb.shape[1]:
        raise ValueError(f"query heads ({qb.shape[1]}) must be a multiple of key/value heads ({kb.shape[1]})")
    if qb.shape[2] == 0:
        raise ValueError("empty local sequence")

    ring = _Ring(group)
    if cu_seqlens is not None or cu_seqlens_padded is not None:
        if cu_seqlens_padded is None:
            cu_seqlens_padded = pad_cu_seqlens(cu_seqlens, 2 * ring.size)
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_padded
        if cu_seqlens.shape != cu_seqlens_padded.shape:
            raise ValueError("cu_seqlens and cu_seqlens_padded describe different sample counts")
    plan = _Plan(ring.size, ring.rank, qb.shape[2], causal, cu_seqlens, cu_seqlens_padded, qb.device)
    out = _RingAttention.apply(qb, kb, vb, ring, plan, scale)  # [b, hq, s, d]
    if layout == "sbhd":
        return out.permute(2, 0, 1, 3)
    if layout == "thd":
        return out.squeeze(0).transpose(0, 1)
    return out
