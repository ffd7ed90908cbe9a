"""Held-out loss during training: ``eval.iters`` global batches every ``eval.interval`` steps.

The data: the folder at ``eval.data.path`` (shards written by tools/prepare_data.py, or
webdataset tars), or the ``val`` split of an Energon-prepared training folder, or else, for
the synthetic datasets, the same generator with ``eval.seed`` (different samples from the
training ones). The same global batches are evaluated every time, so the curve
compares like with like. The model runs forward only, in eval mode, and the RNG states are
put back afterwards: evaluating does not change the training run (its weights, data order
or dropout masks).
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megavlm.config.schema import Config
from megavlm.data.build import training_rows
from megavlm.data.shards import INDEX
from megavlm.data.sampler import micro_batches
from megavlm.platform import device
from megavlm.training.checkpoint import _rng_state, _set_rng_state
from megavlm.training.step import forward_step


def eval_config(cfg: Config) -> Config:
    """The data config of the held-out set (the training config with the eval data):
    ``eval.data.path`` (megavlm shards when it has their ``index.json``, else webdataset tars
    or an Energon folder), else the ``val`` split of an Energon-prepared ``data.path``, else
    the synthetic generator with ``eval.seed``."""
    held_out = copy.deepcopy(cfg)
    if cfg.eval.data.path:
        megavlm_shards = (Path(cfg.eval.data.path) / INDEX).is_file()
        held_out.data.dataset = "shards" if megavlm_shards else "webdataset"
        held_out.data.path, held_out.data.split = cfg.eval.data.path, "train"
    elif cfg.data.dataset == "webdataset":  # validated: an Energon folder with a val split
        held_out.data.split = "val"
    else:
        held_out.data.seed = cfg.eval.seed
    held_out.data.num_workers = 0
    return held_out


class Evaluator:
    def __init__(self, cfg: Config, num_microbatches: int, seq_length: int):
        self.cfg, self.num_microbatches, self.seq_length = cfg, num_microbatches, seq_length
        self.rows = training_rows(eval_config(cfg))
        self._steps: list[list] | None = None  # this rank's eval micro-batches, read once

    def _eval_steps(self) -> list[list]:
        """The same ``eval.iters`` global batches every time: read and encoded on the first
        evaluation, kept (the held-out set the user sized with ``eval.iters``)."""
        if self._steps is None:
            batches = micro_batches(
                self.rows, consumed_samples=0, micro_batch_size=self.cfg.train.micro_batch_size,
                dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
            )
            self._steps = [[next(batches) for _ in range(self.num_microbatches)] for _ in range(self.cfg.eval.iters)]
        return self._steps

    def due(self, iteration: int) -> bool:
        return bool(self.cfg.eval.interval) and iteration % self.cfg.eval.interval == 0

    @torch.no_grad()
    def loss(self, model) -> float:
        """Mean per-token loss over ``eval.iters`` global batches (collective; same on all ranks)."""
        rng = _rng_state()
        for chunk in model:
            chunk.eval()
        totals = torch.zeros(2, device=device.device())  # [loss sum, tokens]
        forward_backward = get_forward_backward_func()
        for step in self._eval_steps():
            reports = forward_backward(
                forward_step_func=partial(forward_step, supervised_logits_only=self.cfg.train.supervised_logits_only),
                data_iterator=[iter(step) for _ in model] if len(model) > 1 else iter(step),
                model=model, num_microbatches=self.num_microbatches, seq_length=self.seq_length,
                micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True,
            )
            if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
                for report in reports:
                    totals += report["lm loss"].to(totals.device)
        dist.all_reduce(totals)
        for chunk in model:
            chunk.train()
        _set_rng_state(rng)
        return float(totals[0] / totals[1].clamp(min=1.0))
