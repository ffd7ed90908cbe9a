"""The training loop: one readable function on megatron-core's pipeline schedules."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megavlm.config import Config, data_parallel_size, dump_yaml, validate
from megavlm.data.sampler import micro_batches
from megavlm.data.build import training_rows
from megavlm.data.vlm_dataset import BAD_REASONS, COUNT_NAMES
from megavlm.platform import device
from megavlm.platform.distributed import initialize
from megavlm.platform.host_memory import release_freed_memory
from megavlm.platform.launch import detect_dist_env
from megavlm.platform.signals import StopRequest, children_shielded
from megavlm.platform.storage import check_shared_directory
from megavlm.models.vlm import pipeline_seq_multiplier
from megavlm.checkpointing import assets_of
from megavlm.conversion.pretrained import load_pretrained_weights
from megavlm.training.checkpoint import (TrainState, load_checkpoint, resume_checkpoint, save_checkpoint,
                                         save_checkpoint_async)
from megavlm.training.losses import weight_micro_batches
from megavlm.training.evaluation import Evaluator
from megavlm.training.metrics import MetricsLogger, ThroughputMeter
from megavlm.training.run_control import ExitRule, collective_phase
from megavlm.models.build import build_model_chunks
from megavlm.models.transformer_config import use_graph_safe_rng
from megavlm.training.compile import compile_layers
from megavlm.training.data_parallel import parameters_in_sync, wrap_data_parallel
from megavlm.training.optimizer import build_lr_schedule, build_optimizer
from megavlm.training.step import forward_step


def _step_stats(losses_reduced: list[dict], model, data_counts: list[float]) -> tuple[float, float, bool, list[float]]:
    """(loss sum, token count, all gradients finite, data counts) over the global batch, on
    every rank.

    One all-reduce: the loss from the last pipeline stage (one TP rank per replica), a
    check for non-finite values (one sum over each of DDP's contiguous gradient buffers),
    and this rank's samples seen / skipped by reason, which every rank of a DP replica
    counts alike (hence the division).
    """
    n = len(data_counts)
    stats = torch.zeros(3 + n, device=device.device())  # [loss sum, tokens, non-finite grads, data...]
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        for report in losses_reduced:
            stats[:2] += report["lm loss"].to(stats.device)
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            # one reduction: a NaN or Inf anywhere makes the sum non-finite
            stats[2] += (~torch.isfinite(buffer.grad_data.sum())).float()
    if n:
        stats[3:] = torch.tensor(data_counts, device=stats.device)
    dist.all_reduce(stats)
    replica = dist.get_world_size() // parallel_state.get_data_parallel_world_size()
    loss_sum, num_tokens, nonfinite, *data = stats.tolist()
    return loss_sum, num_tokens, nonfinite == 0, [c / replica for c in data]


class DataQualityError(RuntimeError):
    pass


def _check_bad_samples(cfg: Config, counts: list[float], examples: list[str]) -> dict[str, float]:
    """Metrics of the samples skipped so far (``counts`` = [seen, per reason]); stops the
    run, naming examples, when too many are bad."""
    seen, *bad = counts[: 1 + len(BAD_REASONS)]
    total = sum(bad)
    metrics = {"bad_samples": total, **{f"bad/{r}": c for r, c in zip(BAD_REASONS, bad) if c}}
    # how media were decoded (DALI, or Pillow / PyAV fallbacks): data.encode.DECODE_COUNTS
    metrics.update({f"decode/{n}": c for n, c in zip(COUNT_NAMES[1 + len(BAD_REASONS):], counts[1 + len(BAD_REASONS):]) if c})
    if seen >= 100 and total / seen > cfg.data.max_bad_fraction:
        raise DataQualityError(
            f"{total:.0f} of {seen:.0f} samples were bad ({total / seen:.1%} > data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction}); by reason: "
            f"{ {r: int(c) for r, c in zip(BAD_REASONS, bad) if c} }; examples on this rank: {examples[:5]}"
        )
    return metrics


class Trainer:
    """Owns the model, optimizer, data and state of one run; ``step()`` is one iteration."""

    def __init__(self, cfg: Config):
        self.stop = StopRequest()  # before the slow build, so an early preemption is kept
        self.exit_rule = ExitRule(cfg.train.exit_interval, cfg.train.exit_duration_mins)
        env = detect_dist_env()
        validate(cfg, env.world_size)
        initialize(cfg.parallel, cfg.train.seed, env)
        if cfg.train.cuda_graph:
            use_graph_safe_rng()
        if cfg.checkpoint.save:  # fail now, not at the first save, if nodes see different directories
            check_shared_directory(cfg.checkpoint.save, "checkpoint.save")
        self.cfg = cfg
        if dist.get_rank() == 0:
            print(f"megavlm: world size {env.world_size} ({env.launcher}), resolved config:\n{dump_yaml(cfg)}", flush=True)

        chunks, tconfig = build_model_chunks(cfg)
        # checkpoint.load (resume) wins when it holds a complete checkpoint; otherwise
        # checkpoint.pretrained gives the weights only (fine-tuning: fresh optimizer, iteration 0).
        resume = resume_checkpoint(cfg.checkpoint.load, fallback=cfg.checkpoint.fallback) if cfg.checkpoint.load else None
        self.assets = None  # tokenizer/processor files every save carries
        if resume is None and cfg.checkpoint.pretrained:
            self.assets = load_pretrained_weights(chunks, cfg)
            if dist.get_rank() == 0:
                print(f"megavlm: weights from checkpoint.pretrained={cfg.checkpoint.pretrained}; "
                      "fresh optimizer, iteration 0", flush=True)
        if cfg.train.compile:
            compile_layers(chunks)
        self.model = wrap_data_parallel(chunks, tconfig, cfg.parallel)
        tconfig.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        tconfig.finalize_model_grads_func = finalize_model_grads
        self.optimizer = build_optimizer(cfg, self.model)
        self.schedule = build_lr_schedule(cfg)

        self.state = TrainState()
        if resume is not None:
            self.state = load_checkpoint(resume, cfg, self.model, self.optimizer)
            self.assets = assets_of(resume)
            if dist.get_rank() == 0:
                print(f"megavlm: resumed from {resume} at iteration {self.state.iteration}", flush=True)
        elif cfg.checkpoint.load and cfg.checkpoint.load != cfg.checkpoint.save:
            raise FileNotFoundError(f"checkpoint.load={cfg.checkpoint.load!r}: no complete checkpoint found there")
        elif cfg.checkpoint.load and dist.get_rank() == 0:
            # load == save is the requeue pattern: the first submission starts from scratch
            print(f"megavlm: no checkpoint in {cfg.checkpoint.load} yet, starting from scratch", flush=True)

        t = cfg.train
        dp = data_parallel_size(cfg, env.world_size)
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        self.perf = ThroughputMeter(cfg, env.world_size, dp, torch.cuda.get_device_name() if device.has_cuda() else None)
        self.data = self.perf.timed(micro_batches(
            training_rows(cfg), consumed_samples=self.state.consumed_samples, micro_batch_size=t.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
            num_workers=cfg.data.num_workers,
        ))
        self.step_counts = torch.zeros(len(COUNT_NAMES))  # samples seen / skipped / decoded this step
        self.bad_examples: list[str] = self.state.bad_examples
        self.forward_backward = get_forward_backward_func()
        self.pipeline_seq_length = cfg.data.seq_length * pipeline_seq_multiplier(cfg.model, cfg.parallel)
        self.evaluator = Evaluator(cfg, self.num_microbatches, self.pipeline_seq_length) if cfg.eval.interval else None
        # megatron's default caller (as in Megatron-LM): a process forked per save, which
        # snapshots the tensors; see save_checkpoint_async and DEVELOPERS.md.
        self.async_saves = AsyncCallsQueue(persistent=False) if cfg.checkpoint.async_save else None
        self._pending_paths: dict[int, Path] = {}  # async call index -> checkpoint directory

    def _step_data(self):
        """This step's micro-batches with loss weights; one iterator per model chunk."""
        batches = [next(self.data) for _ in range(self.num_microbatches)]
        for b in batches:
            if b.sample_counts is not None:
                self.step_counts = self.step_counts + b.sample_counts
                self.bad_examples += (b.notes or [])[: max(0, 20 - len(self.bad_examples))]  # the first 20
        batches = weight_micro_batches(
            batches, self.cfg.train.loss_normalization, parallel_state.get_data_parallel_group()
        )
        # Each virtual pipeline chunk consumes the micro-batches independently.
        return [iter(batches) for _ in self.model] if len(self.model) > 1 else iter(batches)

    def step(self) -> dict[str, float]:
        """One optimizer step over a global batch; returns its metrics (same on all ranks)."""
        t = self.cfg.train
        start = time.perf_counter()
        lr = self.schedule.apply(self.optimizer, self.state.iteration + 1)  # 1-based: no step at lr 0
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses_reduced = self.forward_backward(
            forward_step_func=partial(forward_step, supervised_logits_only=t.supervised_logits_only),
            data_iterator=self._step_data(),
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.pipeline_seq_length,
            micro_batch_size=t.micro_batch_size,
        )
        counts = self.step_counts.tolist() if self.cfg.data.dataset != "synthetic_text" else []
        self.step_counts = torch.zeros(len(COUNT_NAMES))
        loss_sum, num_tokens, grads_finite, counts = _step_stats(losses_reduced, self.model, counts)
        if counts:
            old = self.state.data_counts + [0.0] * (len(counts) - len(self.state.data_counts))  # older checkpoints
            self.state.data_counts = [a + b for a, b in zip(old, counts)]
        if grads_finite:
            _, grad_norm, _ = self.optimizer.step()
        else:
            grad_norm = float("nan")
            self.state.skipped_steps += 1
        self.state.iteration += 1
        self.state.consumed_samples += t.global_batch_size
        data_metrics = _check_bad_samples(self.cfg, self.state.data_counts, self.bad_examples) if counts else {}
        return {
            **data_metrics,
            "loss": loss_sum / max(num_tokens, 1.0),
            "lr": lr,
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            **self.perf.metrics(time.perf_counter() - start),
            "loss_scale": float(self.optimizer.get_loss_scale()),
            "skipped_steps": self.state.skipped_steps,
        }

    @children_shielded()  # writers and megatron's cached Manager must not die of slurm's signals
    def save(self) -> Path:
        """Checkpoint the current state (collective). With ``checkpoint.async_save`` this only
        schedules the write: the directory is complete once ``finalize_saves`` reports it."""
        if self.async_saves is None:
            with parameters_in_sync(self.model):
                path = save_checkpoint(self.cfg.checkpoint.save, self.cfg, self.state, self.model, self.optimizer,
                                       assets=self.assets)
            self._log(f"megavlm: saved checkpoint {path}")
            return path
        self.finalize_saves(blocking=True)  # one save in flight at a time
        start = time.perf_counter()
        with parameters_in_sync(self.model):
            path, request = save_checkpoint_async(self.cfg.checkpoint.save, self.cfg, self.state, self.model,
                                                  self.optimizer, assets=self.assets)
        index = self.async_saves.schedule_async_request(request)
        self._pending_paths[index] = path
        self._log(f"megavlm: scheduled async save of {path} ({time.perf_counter() - start:.2f}s blocking)")
        return path

    def finalize_saves(self, blocking: bool) -> list[Path]:
        """Finalize async saves that finished on every rank (all of them if ``blocking``);
        returns their now complete directories. Collective while a save is pending; a no-op
        without ``checkpoint.async_save``."""
        if self.async_saves is None or not self.async_saves.get_num_unfinalized_calls():
            return []
        done = [self._pending_paths.pop(i) for i in self.async_saves.maybe_finalize_async_calls(blocking=blocking)]
        for path in done:
            self._log(f"megavlm: saved checkpoint {path}")
        return done

    @staticmethod
    def _log(message: str) -> None:
        if dist.get_rank() == 0:
            print(message, flush=True)

    def run(self, *, keep_losses: bool = False) -> dict[int, float]:
        """Train to ``train.iters``: log, checkpoint on interval, at the end and on signals.

        Async saves are finalized without waiting at each step, and waited for before the
        next save and before returning (also after a stop signal).

        With ``keep_losses``, returns the loss of every iteration run (the same on all ranks),
        for tests and scripts that compare runs; else nothing is kept (a long run would hold
        one entry per iteration) and the losses are in ``metrics.jsonl``."""
        cfg = self.cfg
        is_logger = dist.get_rank() == dist.get_world_size() - 1
        logger = MetricsLogger(cfg.logging.dir, total_iters=cfg.train.iters, enabled=is_logger,
                               tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project)
        losses: dict[int, float] = {}
        while self.state.iteration < cfg.train.iters:
            self.finalize_saves(blocking=False)
            with collective_phase("the training step", cfg.parallel.timeout_minutes):
                metrics = self.step()
            it = self.state.iteration
            if keep_losses:
                losses[it] = metrics["loss"]
            if it % cfg.logging.interval == 0 or it == cfg.train.iters:
                logger.log(it, metrics)
                release_freed_memory()  # RSS shows live memory, not glibc's kept holes
            if self.evaluator is not None and self.evaluator.due(it):
                with collective_phase("evaluation", cfg.parallel.timeout_minutes):
                    logger.log(it, {"eval_loss": self.evaluator.loss(self.model)})
            exit_reason = self.exit_rule.reason(it)
            stopping = self.stop.agreed() or exit_reason is not None
            interval_hit = cfg.checkpoint.interval and it % cfg.checkpoint.interval == 0
            if cfg.checkpoint.save and (interval_hit or stopping or it == cfg.train.iters):
                with collective_phase("a checkpoint save", cfg.parallel.timeout_minutes):
                    self.save()
            if stopping:
                self.finalize_saves(blocking=True)  # never exit with a save in flight
                self._log(f"megavlm: {exit_reason or 'stop signal received'}, stopped at iteration {it}")
                break
        self.finalize_saves(blocking=True)
        logger.close()
        return losses

