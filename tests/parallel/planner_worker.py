"""Builds real megavlm models in several layouts and records what the planner predicts.

Usage: torchrun --nproc_per_node 4 tests/parallel/planner_worker.py OUT.json

For each layout (one torchrun launch; megatron's parallel state is rebuilt between
layouts) every rank builds ``Trainer(cfg)``, runs one ``trainer.step()`` and reports:
parameter elements, DDP gradient-buffer bytes, Adam state bytes, and the activation
memory autograd keeps for backward -- counted by a ``saved_tensors_hooks`` pair that
tracks every saved tensor's storage (deduplicated, parameters excluded) from the moment
it is saved until autograd frees it: the bytes one micro-batch's forward leaves saved on
this rank (first ``forward_step`` call) and the peak over the whole step (all micro-batches
in flight in the pipeline schedule). Rank 0 writes all ranks' reports as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import megavlm.training.loop as loop
from megavlm.config import load_config
from megavlm.training.loop import Trainer

BASE = [
    "data.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.iters=1",
    "train.seed=3",
    "checkpoint.save=null",
    "logging.interval=1000",
    "logging.tensorboard=false",
]
TINY = ["model.preset=qwen3-tiny"]
MOE = ["model.preset=qwen3-moe-tiny"]
# name -> overrides on top of BASE (4 ranks each)
LAYOUTS = {
    "tp2_pp2": TINY
    + ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true", "parallel.distributed_optimizer=false"],
    # qwen3-tiny has 2 query groups; tp=4 needs 4
    "tp4": TINY + ["model.language.num_query_groups=4", "parallel.tp=4", "parallel.sequence_parallel=true"],
    "pp2_tied": TINY + ["model.language.tie_embeddings=true", "parallel.pp=2"],
    "pp2_vpp2": TINY + ["parallel.pp=2", "parallel.vpp=2", "parallel.distributed_optimizer=false"],
    "dp4_distopt": TINY + ["parallel.distributed_optimizer=true"],
    "ep2_moe": MOE + ["parallel.ep=2"],
    "ep4_moe": MOE + ["parallel.ep=4", "parallel.distributed_optimizer=false"],
    # etp=1: with etp=tp=2 the alltoall dispatcher all-gathers uneven token counts over
    # the TP group, which gloo rejects (GPU-only combination today)
    "tp2_ep2_etp1_moe": MOE + ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sequence_parallel=true"],
}


class SavedTensorTracker:
    """Bytes of distinct storages autograd currently keeps for backward (params excluded)."""

    def __init__(self, exclude_storages: set[int]):
        self.exclude = exclude_storages
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [holders alive, bytes]
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or storage.nbytes() == 0:
            return tensor
        return _Holder(tensor, self, ptr, storage.nbytes())

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Holder) else packed

    def add(self, ptr: int, nbytes: int) -> None:
        ref = self.refs.setdefault(ptr, [0, nbytes])
        if ref[0] == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        ref[0] += 1

    def release(self, ptr: int) -> None:
        ref = self.refs[ptr]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self.refs[ptr]


class _Holder:
    """What autograd stores instead of the tensor; freed when autograd frees it."""

    __slots__ = ("tensor", "tracker", "ptr")

    def __init__(self, tensor, tracker, ptr, nbytes):
        self.tensor, self.tracker, self.ptr = tensor, tracker, ptr
        tracker.add(ptr, nbytes)

    def __del__(self):
        self.tracker.release(self.ptr)


def _optimizer_state_bytes(optimizer) -> tuple[int, list[str]]:
    total, keys = 0, set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            for key, value in state.items():
                keys.add(key)
                if key in ("exp_avg", "exp_avg_sq"):
                    total += value.numel() * value.element_size()
    return total, sorted(keys)


def run_layout(name: str, log_dir: Path) -> dict:
    overrides = BASE + LAYOUTS[name]
    cfg = load_config(None, overrides + [f"logging.dir={log_dir / name}"])
    trainer = Trainer(cfg)
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    tracker = SavedTensorTracker({p.untyped_storage().data_ptr() for p in params})
    first_forward: list[int] = []
    clean_forward = loop.forward_step

    def measured_forward(data_iterator, model, **kwargs):
        before = tracker.live
        out = clean_forward(data_iterator, model, **kwargs)
        first_forward.append(tracker.live - before)
        return out

    loop.forward_step = measured_forward
    try:
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            trainer.step()
    finally:
        loop.forward_step = clean_forward
    opt_bytes, opt_keys = _optimizer_state_bytes(trainer.optimizer)
    buffers = {
        kind: [
            b.grad_data.numel() * b.grad_data.element_size() for chunk in trainer.model for b in getattr(chunk, kind)
        ]
        for kind in ("buffers", "expert_parallel_buffers")
    }
    report = {
        "rank": dist.get_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(with_context_parallel=True),
        "expert_dp_rank": parallel_state.get_expert_data_parallel_rank(),
        "params": sum(p.numel() for p in params),
        "param_dtype": str(params[0].dtype),
        "grad_buffer_bytes": sum(buffers["buffers"]) + sum(buffers["expert_parallel_buffers"]),
        "grad_buffers": buffers,
        "optimizer_state_bytes": opt_bytes,
        "optimizer_state_keys": opt_keys,
        "activation_first_microbatch": first_forward[0],
        "activation_peak": tracker.peak,
        "leftover_saved_bytes": tracker.live,
    }
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    parallel_state.destroy_model_parallel()
    return {"overrides": overrides, "world_size": dist.get_world_size(), "ranks": reports}


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(LAYOUTS)
    results = {name: run_layout(name, out.parent / "logs") for name in names}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
