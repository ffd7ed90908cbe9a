"""Time and peak memory of ``model.init=layout_invariant`` for one TP=8 rank of qwen3-8b, on CPU.

What is measured: the per-shard initialization of the parameters one rank of a TP=8, PP=1
layout holds (hidden 4096, 36 layers, 32 heads / 8 KV groups, head_dim 128, ffn 12288,
vocabulary 151936, untied output layer), with ``Shard`` objects built here with the global
shapes and offsets megatron-core's ``sharded_state_dict`` gives that rank (layers stacked on
a prepended axis, swiglu fc1 as two halves, vocabulary split by rows), local tensors of the
TP=8 slice size (bf16 by default, as training holds them). No megatron model, no process
group: 8 ranks would be needed for that.

* AFTER: ``megavlm.models.full_tensors.initialize_shard`` (the library: per layer, per tile).
* BEFORE: the previous algorithm, kept below as ``old_initialize_shard`` (BASELINE, not the
  library): every shard draws the full global tensor, ``[num_layers, ...]`` for a decoder
  key, and keeps its slice.

Each measurement runs in its own subprocess; peak RSS is that child's VmHWM
(``/proc/self/status``), and "transient" is VmHWM minus the RSS with the local parameters
already allocated and touched, i.e. what the initialization itself added. Both run
single-threaded (``torch.set_num_threads(1)``); the table's time is the child's CPU time of
the initialization (``time.process_time``), which other load on a shared box moves much less
than the wall time (printed per child as it runs).

The BEFORE algorithm at full size does not fit this machine (the fc1 stack alone is
``[36, 24576, 4096]`` fp32 = 14.5 GB, times three for zeros, randn and the scaled copy) and
its time grows with L^2, so it is measured on a truncated stack (``--old-layers``, the first
L layers with global shape ``[L, ...]``) and, separately, on the two vocabulary matrices at
full size, and EXTRAPOLATED to 36 layers: time x (36/L)^2 (each of L layers draws an L-layer
stack), transient memory x 36/L (one stack at a time). Extrapolated cells are marked ``~``.

Usage: ``python bench/init_memory.py [--old-layers 1 2] [--rank 0] [--dtype bf16]``
(about 3 minutes on a busy 2-core machine, most of it BEFORE; ``--old-layers 2 4`` adds about
4 minutes and shows the L^2 growth over a larger range; ``--skip-old`` for AFTER alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's megavlm, not another editable install

# qwen3-8b (megavlm.config.presets "qwen3-8b") and the layout
LAYERS, HIDDEN, FFN, HEADS, GROUPS, HEAD_DIM, VOCAB = 36, 4096, 12288, 32, 8, 128, 151936
TP = 8
SEED, STD = 1234, 0.02


def qwen3_8b_tp8_shards(rank: int, *, layers: int, part: str, dtype):
    """The ``Shard`` list of TP rank ``rank`` (PP=1): decoder stacked to ``layers``, and/or
    the vocabulary matrices (``part``: "layers", "vocab" or "all")."""
    import torch

    from megavlm.models.full_tensors import Shard

    def shard(key, global_shape, offset, local_shape, p):
        data = torch.empty(local_shape, dtype=dtype)
        data.fill_(1.0)  # touch: resident before the measurement starts
        return Shard(key=key, data=data, global_shape=tuple(global_shape), global_offset=tuple(offset),
                     prepend_axis_num=p)

    d = "language.decoder.layers."
    qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM  # grouped q, k, v rows; TP splits by group
    out = []
    if part in ("layers", "all"):
        for l in range(layers):
            for key, n in [("self_attention.linear_qkv.layer_norm_weight", HIDDEN), ("mlp.linear_fc1.layer_norm_weight", HIDDEN),
                           ("self_attention.q_layernorm.weight", HEAD_DIM), ("self_attention.k_layernorm.weight", HEAD_DIM)]:
                out.append(shard(d + key, (layers, n), (l, 0), (n,), 1))
            rows = qkv_rows // TP
            out.append(shard(d + "self_attention.linear_qkv.weight", (layers, qkv_rows, HIDDEN), (l, rank * rows, 0),
                             (rows, HIDDEN), 1))
            cols = HEADS * HEAD_DIM // TP
            out.append(shard(d + "self_attention.linear_proj.weight", (layers, HIDDEN, HEADS * HEAD_DIM),
                             (l, 0, rank * cols), (HIDDEN, cols), 1))
            f = FFN // TP  # swiglu: megatron's factory gives the gate and up halves separately
            for half in (0, FFN):
                out.append(shard(d + "mlp.linear_fc1.weight", (layers, 2 * FFN, HIDDEN), (l, half + rank * f, 0),
                                 (f, HIDDEN), 1))
            out.append(shard(d + "mlp.linear_fc2.weight", (layers, HIDDEN, FFN), (l, 0, rank * f), (HIDDEN, f), 1))
        out.append(shard("language.decoder.final_layernorm.weight", (HIDDEN,), (0,), (HIDDEN,), 0))
    if part in ("vocab", "all"):
        padded = -(-VOCAB // TP) * TP  # megavlm pads the vocabulary to a multiple of TP
        rows = padded // TP
        for key in ("language.embedding.word_embeddings.weight", "language.output_layer.weight"):
            out.append(shard(key, (padded, HIDDEN), (rank * rows, 0), (rows, HIDDEN), 0))
    return out


# ---------------------------------------------------------------------------------------
# BASELINE: the algorithm before this change (megavlm/models/full_tensors.py at e560a82),
# inlined so the comparison survives the library change. Not used by the library.
_VOCAB_KEYS = ("word_embeddings.weight", "output_layer.weight")
_SCALED_INIT_KEYS = ("linear_proj.weight", "linear_fc2.weight")


def _old_key_generator(seed: int, key: str):
    import torch

    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def old_initialize_shard(shard, *, seed: int, std: float, num_layers: int, vocab_size: int) -> None:
    import torch

    with torch.no_grad():
        if len(shard.global_shape) - shard.prepend_axis_num < 2:
            if shard.key.endswith("bias"):
                shard.data.zero_()
            return
        shape = list(shard.global_shape)
        if shard.key.endswith(_VOCAB_KEYS):
            shape[shard.prepend_axis_num] = vocab_size
        scale = std / math.sqrt(2.0 * num_layers) if shard.key.endswith(_SCALED_INIT_KEYS) else std
        full = torch.zeros(shard.global_shape, dtype=torch.float32)
        full[tuple(slice(0, n) for n in shape)] = torch.randn(shape, generator=_old_key_generator(seed, shard.key)) * scale
        shard.data.copy_(full[shard.slices()].reshape(shard.data.shape))
# ---------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(args) -> None:
    import torch

    from megavlm.models.full_tensors import initialize_shard

    torch.set_num_threads(1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shards = qwen3_8b_tp8_shards(args.rank, layers=args.layers, part=args.part, dtype=dtype)
    params_bytes = sum(s.data.numel() * s.data.element_size() for s in shards)
    rss_before = _status_kib("VmRSS")
    kw = dict(seed=SEED, std=STD, num_layers=LAYERS, vocab_size=VOCAB)
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.child == "old":
        for s in shards:
            old_initialize_shard(s, **kw)
    else:
        generators = {}
        for s in shards:
            initialize_shard(s, generators=generators, **kw)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_kib("VmHWM")
    print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu_seconds, peak_gib=peak / 2**20, before_gib=rss_before / 2**20,
                          transient_gib=(peak - rss_before) / 2**20, params_gib=params_bytes / 2**30)))


def run_child(kind: str, part: str, layers: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--part", part, "--layers", str(layers),
           "--rank", str(args.rank), "--dtype", args.dtype]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind:3s} {part:6s} L={layers:2d}: {result['seconds']:8.1f} s wall, {result['cpu_seconds']:8.1f} s CPU, peak RSS {result['peak_gib']:6.2f} GiB "
          f"(transient {result['transient_gib']:6.2f} GiB)", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-layers", type=int, nargs="+", default=[1, 2],
                   help="truncated stacks the BEFORE algorithm is measured on (the largest is extrapolated)")
    p.add_argument("--rank", type=int, default=0, help="TP rank whose shards are initialized")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="parameter dtype")
    p.add_argument("--skip-old", action="store_true")
    p.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--part", choices=["layers", "vocab", "all"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=LAYERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    print(f"qwen3-8b, TP={TP} rank {args.rank}, PP=1, {args.dtype} parameters, 1 thread; one subprocess per row")
    rows = []  # (label, before, after, extrapolated)
    after_full = run_child("new", "all", LAYERS, args)
    if not args.skip_old:
        for L in args.old_layers:
            rows.append((f"decoder, first {L} layers (stack [{L}, ...])", run_child("old", "layers", L, args),
                         run_child("new", "layers", L, args), False))
        rows.append(("embedding + output layer", run_child("old", "vocab", LAYERS, args),
                     run_child("new", "vocab", LAYERS, args), False))
        L = max(args.old_layers)
        layers_old = next(b for label, b, _, _ in rows if label.startswith(f"decoder, first {L} "))
        vocab_old = rows[-1][1]
        # one layer stack drawn at a time: the transient scales with the stack (L), the time with L^2
        seconds = layers_old["seconds"] * (LAYERS / L) ** 2 + vocab_old["seconds"]
        cpu_seconds = layers_old["cpu_seconds"] * (LAYERS / L) ** 2 + vocab_old["cpu_seconds"]
        transient = max(layers_old["transient_gib"] * LAYERS / L, vocab_old["transient_gib"])
        before = dict(seconds=seconds, cpu_seconds=cpu_seconds, transient_gib=transient, peak_gib=after_full["before_gib"] + transient)
        rows.append((f"full rank, 36 layers + vocabulary (BEFORE extrapolated from L={L})", before, after_full, True))
    else:
        rows.append(("full rank, 36 layers + vocabulary", None, after_full, False))

    print()
    cols = ["what", "before CPU s", "after CPU s", "time x", "before peak GiB", "after peak GiB", "peak x",
            "before transient GiB", "after transient GiB"]
    widths = [68] + [max(len(c), 8) for c in cols[1:]]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for label, b, a, extrapolated in rows:
        m = "~" if extrapolated else ""
        if b is None:
            print(line([label, "-", f"{a['cpu_seconds']:.1f}", "-", "-", f"{a['peak_gib']:.2f}", "-", "-",
                        f"{a['transient_gib']:.3f}"]))
            continue
        print(line([label, f"{m}{b['cpu_seconds']:.1f}", f"{a['cpu_seconds']:.1f}",
                    f"{m}{b['cpu_seconds'] / a['cpu_seconds']:.0f}",
                    f"{m}{b['peak_gib']:.2f}", f"{a['peak_gib']:.2f}", f"{m}{b['peak_gib'] / a['peak_gib']:.1f}",
                    f"{m}{b['transient_gib']:.3f}", f"{a['transient_gib']:.3f}"]))
    print("\ntime = CPU seconds of the initialization in the subprocess (wall time, above, swings with other load);"
          "\npeak = VmHWM of the subprocess (python + torch + the rank's parameters + what init allocates);"
          "\ntransient = VmHWM - VmRSS just before init (parameters already resident). ~ = extrapolated, see --help.")


if __name__ == "__main__":
    main()
