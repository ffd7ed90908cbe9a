"""Peak memory and time of HF <-> megavlm conversion on a random ~2 GB model (CPU).

    python bench/convert_memory.py [--hidden 2048 --layers 12 --dtype bf16] [--workdir DIR]

Writes a random Qwen3-VL model (bf16, sharded safetensors) without instantiating it, then runs
``tools/convert_checkpoint.py import`` (one rank) and ``export`` as subprocesses and reports
each one's peak RSS (``ru_maxrss`` of the child) and wall time, next to the size of the model
and of its largest tensor. The baseline for the memory figures is a bare process that imports
megavlm and torch (same interpreter), measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).parents[1]


def random_hf_model(path: Path, *, hidden: int, layers: int, ffn: int, vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """A Qwen3-VL directory of random weights; returns (total bytes, largest tensor bytes)."""
    import transformers

    from megavlm.config import load_config
    from megavlm.conversion.hf_config import hf_config_from_model

    cfg = load_config(None, [
        "model.preset=qwen3vl-tiny", f"model.language.hidden_size={hidden}", f"model.language.num_layers={layers}",
        f"model.language.ffn_hidden_size={ffn}", f"model.language.vocab_size={vocab}",
        f"model.language.num_attention_heads={hidden // 128}", "model.language.num_query_groups=4",
        "model.language.head_dim=128", "model.rope.mrope_section=[24,20,20]",
    ])
    config = hf_config_from_model(cfg.model)
    hf_cfg = transformers.Qwen3VLConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.Qwen3VLForConditionalGeneration(hf_cfg).state_dict().items()}
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shard, shard_bytes, files, total, largest = {}, 0, 0, 0, 0
    for key, shape in shapes.items():
        tensor = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        size = tensor.numel() * tensor.element_size()
        total, largest = total + size, max(largest, size)
        shard[key] = tensor
        shard_bytes += size
        if shard_bytes > 1 << 29:
            save_file(shard, str(path / f"part-{files:03d}.safetensors"))
            shard, shard_bytes, files = {}, 0, files + 1
    if shard:
        save_file(shard, str(path / f"part-{files:03d}.safetensors"))
    (path / "config.json").write_text(json.dumps({**config, "transformers_version": transformers.__version__}))
    return total, largest


def measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a child process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    env.pop("MASTER_PORT", None)
    # time each child by itself: ru_maxrss of RUSAGE_CHILDREN is the max over all children so far,
    # so every measurement runs through a fresh wrapper process
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:]); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    seconds, kib = proc.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(kib) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=6144)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        total, largest = random_hf_model(work / "hf", hidden=args.hidden, layers=args.layers, ffn=args.ffn,
                                         vocab=args.vocab, dtype=torch.bfloat16)
        gib = 2**30
        print(f"model: {total / gib:.2f} GiB bf16 in {len(list((work / 'hf').glob('*.safetensors')))} files; "
              f"largest tensor {largest / gib:.3f} GiB")
        _, base = measured([sys.executable, "-c", "import megavlm.conversion.convert, torch"])
        import_s, import_rss = measured([sys.executable, "tools/convert_checkpoint.py", "import", "--hf", str(work / "hf"),
                                         "--out", str(work / "ckpt"), "train.precision=bf16"])
        export_s, export_rss = measured([sys.executable, "tools/convert_checkpoint.py", "export", "--load",
                                         str(work / "ckpt"), "--out", str(work / "back"), "--max-shard-bytes",
                                         str(1 << 29)])
        print(f"baseline process (imports only): peak RSS {base:.2f} GiB")
        print(f"import (1 rank, bf16): {import_s:6.1f} s, peak RSS {import_rss:.2f} GiB = baseline + "
              f"{(import_rss - base) * gib / total:.2f} x model (one rank holds its whole shard: the model)")
        print(f"export (512 MiB shards): {export_s:6.1f} s, peak RSS {export_rss:.2f} GiB = baseline + "
              f"{(export_rss - base) * gib / largest:.2f} x largest tensor")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
