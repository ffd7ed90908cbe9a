"""Training throughput of megavlm (TP=1) against Hugging Face ``Qwen3ForCausalLM`` on CPU.

What is measured: tokens/s of full training steps (forward, backward, gradient clipping at
1.0, AdamW update) of the same Qwen3 decoder shapes, fp32, same micro-batch ``[mbs, seq]``
and the same intra-op thread count, in one process:

* megavlm: ``Trainer.step()`` as ``megavlm.training.loop`` runs it (megatron-core GPTModel
  with the local/SDPA spec, DDP grad buffers, distributed optimizer, one 1-rank gloo group);
* HF: ``transformers.Qwen3ForCausalLM`` with ``attn_implementation="sdpa"``, ``labels=input_ids``
  (HF shifts internally), ``torch.optim.AdamW`` and ``clip_grad_norm_(1.0)`` — a plain
  PyTorch training loop, the baseline megavlm has to beat.

Why interleaved: on a small shared CPU box other processes move throughput by tens of
percent from one second to the next. Each round times a block of megavlm steps and a block
of HF steps (alternating which goes first); every step is timed on its own, and tokens/s is
that of the median step over all rounds (per-round medians and the fastest step are printed
too, to show the spread). The ratio is megavlm's median tokens/s over HF's.

The "kernel floor" contender runs only the step's GEMMs and attention kernels on tensors of
the same shapes (``kernel_floor_step``); its rate over HF's is the ceiling of any framework
that runs the same kernels, printed as such.

HF runs with torch-function modes popped: megavlm's CPU adapter installs a process-wide
``TorchFunctionMode`` (``megavlm.platform.cpu_adapter``) that HF would otherwise pay for.

Usage: ``python bench/train_throughput.py [--layers 4 --hidden 256 ... --threads 2]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import statistics
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _default_threads() -> int:
    return min(len(os.sched_getaffinity(0)), 16)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="measured steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework")
    p.add_argument("--rounds", type=int, default=4, help="interleaved megavlm/HF block pairs")
    p.add_argument("--threads", type=int, default=_default_threads())
    add_common_args(p)
    return p.parse_args()


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="megavlm with train.compile=true, and HF both eager and with torch.compile on its "
                        "decoder and vision layers (the same layer-wise granularity)")
    p.add_argument("--profile-top", type=int, default=0, help="also print the top operators of each profile")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_megavlm(a: argparse.Namespace, iters: int, extra: tuple[str, ...] = ()):
    """A megavlm Trainer (``extra``: more config overrides); returns it, its parameter count and config."""
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    from megavlm.config import load_config
    from megavlm.training.loop import Trainer

    lm = "model.language."
    cfg = load_config(
        REPO / "examples/tiny/pretrain.yaml",
        [
            "checkpoint.save=null",
            "logging.interval=1000000",
            "parallel.distributed_optimizer=true",
            f"train.iters={iters}",
            f"data.seq_length={a.seq}",
            f"train.micro_batch_size={a.mbs}",
            f"train.global_batch_size={a.mbs}",
            "model.preset=qwen3-tiny",
            f"{lm}num_layers={a.layers}",
            f"{lm}hidden_size={a.hidden}",
            f"{lm}ffn_hidden_size={a.ffn}",
            f"{lm}num_attention_heads={a.heads}",
            f"{lm}num_query_groups={a.kv_heads}",
            f"{lm}head_dim={a.head_dim}",
            f"{lm}vocab_size={a.vocab}",
            f"{lm}max_position_embeddings={max(a.seq, 4096)}",
            *extra,
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its resolved config
        trainer = Trainer(cfg)
    num_params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    return trainer, num_params, cfg


@contextlib.contextmanager
def _no_torch_function_modes():
    """Pop every active TorchFunctionMode (megavlm's CPU adapter) for the duration."""
    with contextlib.ExitStack() as stack:
        for _ in torch.overrides._get_current_function_mode_stack():
            stack.enter_context(torch.overrides._pop_mode_temporarily())
        yield


def build_hf(a: argparse.Namespace, cfg):
    """HF Qwen3ForCausalLM with megavlm's shapes and optimizer settings; returns its step
    function (-> loss), parameter count and the model (``compile_hf`` compiles it)."""
    import transformers

    from megavlm.data.sampler import micro_batches
    from megavlm.data.synthetic_text import SyntheticTextDataset

    lm, t = cfg.model.language, cfg.train
    config = transformers.Qwen3Config(
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        vocab_size=a.vocab,
        rope_theta=lm.rope_theta,
        max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(t.seed)
    model = transformers.Qwen3ForCausalLM(config).to(torch.float32).train()
    # Two groups like megatron's: no weight decay on norm weights (the 1-D parameters).
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay,
    )
    # The same synthetic sequences megavlm trains on.
    data = micro_batches(
        SyntheticTextDataset(vocab_size=a.vocab, seq_length=a.seq, seed=cfg.data.seed),
        consumed_samples=0, micro_batch_size=a.mbs, dp_rank=0, dp_size=1,
    )

    def step() -> float:
        with phase("data"):
            input_ids = next(data).tokens
        with _no_torch_function_modes():
            with phase("optimizer"):
                optimizer.zero_grad(set_to_none=True)
            with phase("forward"):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            with phase("backward"):
                loss.backward()
            with phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
        return loss.item()

    return step, sum(p.numel() for p in params), model


PHASES = ("data", "forward", "backward", "optimizer")
FLOOR = "kernel floor"
_profiling = False


def phase(name: str):
    """A named profiler range while ``phase_profile`` runs, else nothing (no cost in the timing)."""
    return torch.profiler.record_function(name) if _profiling else contextlib.nullcontext()


@contextlib.contextmanager
def megavlm_phases(trainer):
    """Name megavlm's phases for the profiler without touching the library: the step's
    micro-batches (data), megatron's forward and backward steps (the forward includes the
    loss function), and the optimizer step (gradient clipping included, as for HF)."""
    from megatron.core.pipeline_parallel import schedules

    def named(name, fn):
        def wrapper(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return wrapper

    saved = schedules.forward_step, schedules.backward_step
    schedules.forward_step, schedules.backward_step = named("forward", saved[0]), named("backward", saved[1])
    trainer._step_data = named("data", trainer._step_data)
    trainer.optimizer.step = named("optimizer", trainer.optimizer.step)
    try:
        yield
    finally:
        schedules.forward_step, schedules.backward_step = saved
        del trainer._step_data, trainer.optimizer.step  # back to the class's methods


def phase_profile(step, *, top: int = 0) -> dict[str, float]:
    """Milliseconds of each phase of one ``step`` under torch.profiler (CPU), ``other`` the
    rest of the step (zeroing gradient buffers, loss and finiteness reductions, Python).
    With ``top``, also prints the ``top`` operators by self CPU time."""
    global _profiling
    _profiling = True
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            total = (time.perf_counter() - start) * 1e3
    finally:
        _profiling = False
    averages = prof.key_averages()
    ms = {name: 0.0 for name in PHASES}
    for event in averages:
        if event.key in ms:
            ms[event.key] += event.cpu_time_total / 1e3
    ms["other"] = max(total - sum(ms.values()), 0.0)
    ms["total"] = total
    if top:
        print(averages.table(sort_by="self_cpu_time_total", row_limit=top))
    return ms


def print_phase_profiles(profiles: dict[str, dict[str, float]]) -> None:
    columns = (*PHASES, "other", "total")
    print("\nprofile of one step (ms, torch.profiler; the profiler adds overhead)")
    print(f"{'':14}" + "".join(f"{c:>10}" for c in columns))
    for name, ms in profiles.items():
        print(f"{name:14}" + "".join(f"{ms[c]:10.1f}" for c in columns))


def compile_hf(model: torch.nn.Module) -> None:
    """torch.compile every decoder (and vision) layer of an HF model in place, the same
    granularity a layer-wise compile of megavlm would use."""
    for module in model.modules():
        layers = getattr(module, "layers", None) or getattr(module, "blocks", None)
        if isinstance(layers, torch.nn.ModuleList):
            for layer in layers:
                layer.compile()


def kernel_floor_step(a: argparse.Namespace):
    """A "step" that runs only the step's GEMMs and attention kernels, on random tensors of
    the model's shapes, and nothing else: the time no framework running these kernels can
    beat. Each linear layer (as megatron fuses them: QKV, output projection, gate+up, down,
    then the vocabulary projection) is one forward GEMM and two backward GEMMs (input and
    weight gradients) over the ``mbs * seq`` tokens; each layer's attention is one causal
    SDPA forward and backward with the model's heads. Elementwise work (norms, RoPE,
    activations, residuals, loss, optimizer) is left out on purpose: that is what
    frameworks can fuse or remove, the kernels are not."""
    tokens, h, hd = a.mbs * a.seq, a.hidden, a.head_dim
    linears = [(h, (a.heads + 2 * a.kv_heads) * hd), (a.heads * hd, h), (h, 2 * a.ffn), (a.ffn, h)] * a.layers
    linears.append((h, a.vocab))
    attention = [(a.mbs, a.heads, a.kv_heads, a.seq, hd, True)] * a.layers
    return kernel_floor([(tokens, i, o, True) for i, o in linears], attention)


def kernel_floor(linears: list[tuple[int, int, int, bool]], attention: list[tuple[int, int, int, int, int, bool]]):
    """The kernel-floor step of the given shapes: per linear ``(rows, in, out, input_grad)``
    its forward GEMM, its weight-gradient GEMM and (``input_grad``) its input-gradient GEMM;
    per attention ``(batch, heads, kv_heads, seq, head_dim, causal)`` one SDPA forward and
    backward."""
    g = torch.Generator().manual_seed(0)
    gemms = [(torch.randn(rows, i, generator=g), torch.randn(o, i, generator=g), torch.randn(rows, o, generator=g),
              input_grad) for rows, i, o, input_grad in linears]
    attn = []
    for b, heads, kv_heads, seq, hd, causal in attention:
        q = torch.randn(b, heads, seq, hd, generator=g, requires_grad=True)
        k = torch.randn(b, kv_heads, seq, hd, generator=g, requires_grad=True)
        v = torch.randn(b, kv_heads, seq, hd, generator=g, requires_grad=True)
        attn.append((q, k, v, torch.randn(b, heads, seq, hd, generator=g), causal))

    def step() -> float:
        for x, w, dy, input_grad in gemms:
            torch.mm(x, w.t()), torch.mm(dy.t(), x)  # forward, wgrad
            if input_grad:
                torch.mm(dy, w)  # dgrad
        for q, k, v, grad_out, causal in attn:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
            torch.autograd.grad(out, (q, k, v), grad_out)
        return float("nan")

    return step


def step_times(step, n: int) -> tuple[list[float], list[float], float]:
    """Wall seconds and process CPU seconds of each of ``n`` steps (CPU work is
    synchronous), and the last loss."""
    wall, cpu = [], []
    for _ in range(n):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu, loss


def compare(steps: dict, *, tokens: int, warmup: int, rounds: int, steps_per_block: int) -> dict[str, float]:
    """Interleaved timing of ``steps`` ({"megavlm": fn, "hf": fn, ...}); prints the table and
    returns megavlm's ratio over every other contender: the median over rounds of the
    per-round ratio of median-step tokens/s (a round runs every contender back to back, so
    load from other processes hits both sides of each ratio alike)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    cpu_times: dict[str, list[list[float]]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for r in range(rounds):
        for name in steps if r % 2 == 0 else reversed(steps):
            block, cpu_block, losses[name] = step_times(steps[name], steps_per_block)
            times[name].append(block)
            cpu_times[name].append(cpu_block)

    def rate(ts: list[float]) -> float:  # tokens/s of the median step
        return tokens / statistics.median(ts)

    header = "".join(f"{f'round {i + 1}':>9}" for i in range(rounds))
    print(f"\ntokens/s      {header}{'median':>9}{'best':>9}{'last loss':>11}")
    for name, per_round in times.items():
        flat = [t for ts in per_round for t in ts]
        print(f"{name:14}" + "".join(f"{rate(ts):9.0f}" for ts in per_round)
              + f"{rate(flat):9.0f}{tokens / min(flat):9.0f}{losses[name]:11.3f}")
    if FLOOR in times and "hf" in times:
        ceiling = [rate(f) / rate(h) for f, h in zip(times[FLOOR], times["hf"])]
        print(f"ceiling at these shapes: {FLOOR}/hf {statistics.median(ceiling):.2f}x (median of rounds "
              + " ".join(f"{x:.2f}" for x in ceiling) + "): the most any framework running these "
              "GEMMs and attention kernels can gain over HF eager")
    ratios = {}
    for name in steps:
        if name == "megavlm":
            continue
        per_round = [rate(m) / rate(o) for m, o in zip(times["megavlm"], times[name])]
        ratios[name] = statistics.median(per_round)
        print(f"ratio megavlm/{name}: {ratios[name]:.2f}x (median of rounds "
              + " ".join(f"{x:.2f}" for x in per_round) + ")")
        # Process CPU time (all threads) per step: less sensitive to other processes on a
        # shared machine than wall time, though not to their effect on caches.
        cpu = [rate(m) / rate(o) for m, o in zip(cpu_times["megavlm"], cpu_times[name])]
        print(f"  by process CPU time per step: {statistics.median(cpu):.2f}x (median of rounds "
              + " ".join(f"{x:.2f}" for x in cpu) + ")")
    return ratios


def main() -> None:
    a = parse_args()
    warnings.filterwarnings("ignore")  # one-off library notices (TE/apex absent, deprecations)
    torch.set_num_threads(a.threads)
    import transformers
    from megatron.core import __version__ as mcore_version

    from megavlm.platform import device

    print(
        f"torch {torch.__version__} | transformers {transformers.__version__} | "
        f"megatron-core {mcore_version} | threads {torch.get_num_threads()} "
        f"(cpus {os.cpu_count()}) | cuda {device.has_cuda()}"
    )
    print(
        f"model: layers {a.layers} hidden {a.hidden} ffn {a.ffn} heads {a.heads}/{a.kv_heads} "
        f"head_dim {a.head_dim} vocab {a.vocab} | batch {a.mbs}x{a.seq} fp32 | "
        f"{a.rounds} rounds x {a.steps} steps after {a.warmup} warmup"
    )
    trainer, mega_params, cfg = build_megavlm(a, iters=a.warmup + a.rounds * a.steps + 1,
                                              extra=("train.compile=true",) if a.compile else ())
    hf_step, hf_params, _ = build_hf(a, cfg)
    print(f"parameters: megavlm {mega_params:,} | hf {hf_params:,}")
    steps = {"megavlm": lambda: trainer.step()["loss"], "hf": hf_step}
    if a.compile:
        steps["hf+compile"], _, hf_model = build_hf(a, cfg)
        compile_hf(hf_model)
    steps[FLOOR] = kernel_floor_step(a)
    run_bench(a, steps, trainer, tokens=a.mbs * a.seq)


def run_bench(a: argparse.Namespace, steps: dict, trainer, *, tokens: int) -> None:
    """Interleaved timing, then the per-phase profile of one more (warm) step of each."""
    if a.compile:
        print("megavlm runs with train.compile=true (compiled decoder and vision layers)")
    compare(steps, tokens=tokens, warmup=a.warmup, rounds=a.rounds, steps_per_block=a.steps)
    profiles = {}
    for name, step in steps.items():
        if name == FLOOR:
            continue
        with megavlm_phases(trainer) if name == "megavlm" else contextlib.nullcontext():
            if a.profile_top:
                print(f"\n{name}: top operators by self CPU time")
            profiles[name] = phase_profile(step, top=a.profile_top)
    print_phase_profiles(profiles)


if __name__ == "__main__":
    main()
