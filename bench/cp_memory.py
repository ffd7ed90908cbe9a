"""Context parallelism: activation memory per rank and step time at CP = 1, 2, 4 (CPU, gloo).

Usage (repository root; 4 processes, one run measures every cell):
    torchrun --nproc_per_node 4 bench/cp_memory.py [--lengths 4096 8192 16384 32768] [--layers 2]

For each sequence length and CP size, one CP group (the ranks of data-parallel rank 0; the
other ranks wait) runs one forward and backward of the tiny Qwen3-VL decoder (qwen3vl-tiny
preset, text tokens, MRoPE ids) through ``forward_step``, the training path.

Activation memory = the bytes autograd saves for backward during the forward (counted with
``torch.autograd.graph.saved_tensors_hooks``, each storage once), the quantity context
parallelism divides; the maximum over the CP ranks is printed. On CPU there is no allocator
peak to read per process, and the saved tensors are what dominates a long-context step
(the parameters of this tiny model are a few MB). ``ideal`` = CP=1's figure / cp.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megavlm.config import load_config
from megavlm.data.batch import Batch
from megavlm.models.build import build_model_chunks
from megavlm.platform import cpu_adapter
from megavlm.platform.distributed import megatron_parallel_sizes, seed_everything
from megavlm.positions import sample_position_ids
from megavlm.training.step import forward_step


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (each storage counted once)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        self.storages.setdefault(s.data_ptr(), s.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(cfg, seq_len: int) -> tuple[int, float]:
    seed_everything(cfg.train.seed)
    model = build_model_chunks(cfg)[0][0]
    vocab = cfg.model.language.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, vocab, (1, seq_len), generator=g)  # ids >= 10: no media placeholders
    pos = sample_position_ids(tokens[0], None, None, cfg.model)
    batch = Batch(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(1, seq_len),
                  position_ids=pos[:, None, :] if pos.dim() == 2 else pos[None])
    saved = SavedBytes()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        output, loss_fn = forward_step(iter([batch]), model)
        loss, _, _ = loss_fn(output)
    loss.backward()
    return saved.total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    cpu_adapter.install()
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for seq_len in args.lengths:
        for cp in args.cp:
            if world % cp:
                continue
            cfg = load_config(None, [
                "model.preset=qwen3vl-tiny", f"model.language.num_layers={args.layers}",
                f"model.language.max_position_embeddings={max(args.lengths)}",
                f"parallel.cp={cp}", f"data.seq_length={seq_len}", "train.seed=1",
            ])
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(**megatron_parallel_sizes(cfg.parallel))
            result = torch.zeros(2, dtype=torch.float64)
            if parallel_state.get_data_parallel_rank() == 0:
                nbytes, seconds = measure(cfg, seq_len)
                result = torch.tensor([nbytes, seconds], dtype=torch.float64)
            dist.all_reduce(result, op=dist.ReduceOp.MAX)
            rows.append((seq_len, cp, *result.tolist()))
            if rank == 0:
                base = next(r[2] for r in rows if r[0] == seq_len and r[1] == 1) if any(
                    r[0] == seq_len and r[1] == 1 for r in rows) else None
                ideal = f"{base / cp / 2**20:8.1f}" if base else "      -"
                print(f"seq {seq_len:6d} | cp {cp} | activations/rank {result[0] / 2**20:8.1f} MiB | "
                      f"ideal {ideal} MiB | fwd+bwd {result[1]:7.2f} s", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
