"""What tools/pacore.py does: JSONL problems in, answers + per-round traces out, metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch.distributed as dist
import yaml
from PIL import Image

from megavlm.config import Config
from megavlm.data.formats import BadRecord, read_samples
from megavlm.data.synthetic import SyntheticMultimodalDataset
from megavlm.inference.engine import GenerationEngine, SamplingParams
from megavlm.rl.pacore import PromptBuilder, pacore_metrics, round_schedule, run_pacore, vote_metrics


def recipe_overrides(path: str | Path) -> list[str]:
    """A recipe YAML as dotted overrides (applied on top of the loaded model's config)."""
    def flat(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    return list(flat(yaml.safe_load(Path(path).read_text()) or {}, ""))


def write_counting_problems(path: str | Path, n: int, seed: int, image_sides: tuple[int, ...] = (64, 96, 128)) -> None:
    """``n`` synthetic counting problems ("How many red shapes?") as HF-chat JSONL with the
    exact answer in ``targets``; images as PNG files in ``<stem>_images/`` beside it.
    ``image_sides``: the sides drawn from (64 alone puts each of the scene's 4 x 4 cells on
    one 16-pixel patch)."""
    path = Path(path)
    images = path.parent / f"{path.stem}_images"
    images.mkdir(parents=True, exist_ok=True)
    dataset = SyntheticMultimodalDataset(seed=seed, tasks=("count",), image_sides=tuple(image_sides))
    with open(path, "w") as f:
        for i in range(n):
            sample = dataset[i]
            name = f"{i:06d}.png"
            Image.fromarray(np.asarray(sample.media[0].array)).save(images / name)
            question = next(p["text"] for p in sample.messages[0].content if p["type"] == "text")
            answer = sample.messages[1].content[0]["text"]
            f.write(json.dumps({"id": sample.id, "targets": sample.targets, "messages": [
                {"role": "user", "content": [{"type": "image", "image": f"{images.name}/{name}"},
                                             {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]}) + "\n")


def pacore_setup(cfg: Config, model):
    """Engine, prompt builder and sampling parameters from ``cfg.pacore``."""
    from megavlm.data.build import sample_encoder

    p = cfg.pacore
    budget = p.context_budget or cfg.model.language.max_position_embeddings
    data = dataclasses.replace(cfg.data, seq_length=budget)
    encoder = sample_encoder(dataclasses.replace(cfg, data=data))
    builder = PromptBuilder(encoder, context_budget=budget, max_new_tokens=p.max_new_tokens)
    params = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                            stop_token_ids=[encoder.template.tok.token_id("<|im_end|>")])
    return GenerationEngine(model, compile_decode=cfg.inference.compile_decode), builder, params


def run_file(cfg: Config, model, input_path: str, output_path: str, *, compare: bool = False) -> dict:
    """PaCoRe on every problem of ``input_path``; traces to ``output_path`` (JSONL), metrics
    (and, with ``compare``, single pass and majority vote over as many rollouts) returned."""
    samples, bad = [], []
    for s in read_samples(input_path):
        (bad if isinstance(s, BadRecord) else samples).append(s)
    if bad:
        raise ValueError(f"{len(bad)} bad record(s), e.g. {bad[0].where}: {bad[0].reason} {bad[0].detail}")
    engine, builder, params = pacore_setup(cfg, model)
    schedule = round_schedule(cfg.pacore.effort, cfg.pacore.rounds)
    kw = dict(max_batch_size=cfg.pacore.max_batch_size, shuffle_seed=cfg.pacore.shuffle_seed)
    traces = run_pacore(engine, builder, samples, schedule, params, **kw)
    metrics = {"schedule": schedule, **pacore_metrics(traces)}
    if compare:
        votes = run_pacore(engine, builder, samples, [sum(schedule)],
                           dataclasses.replace(params, seed=params.seed + 1_000_000), **kw)
        metrics["baselines"] = vote_metrics(votes)
    if dist.get_rank() == 0:
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        with open(output_path, "w") as f:
            for t in traces:
                f.write(json.dumps(t.to_json()) + "\n")
    return metrics
