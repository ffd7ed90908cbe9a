"""SIGKILL campaign: kill a random rank of a tiny training run at a random moment (some
trials in the middle of a checkpoint save), restart, resume to the end, and compare the
final weights with an uninterrupted run bit for bit.

  python bench/fault_injection.py --trials 20 --nproc 2 --out runs/faults

Prints one line per trial and a JSON summary (also written to ``<out>/summary.json``):
trials, kills that landed mid-save, resumes that picked an incomplete or damaged
checkpoint (must be 0), bit-equal final weights (must be every trial). ``--damage`` adds
a trial that damages the newest checkpoint's shard: the resume must fail naming the file,
and ``checkpoint.fallback=true`` must resume from the previous one, still bit-equal.

How: this process imports torch and megavlm once, then forks each rank of each run
(a torchrun per restart would pay the imports every time), like torchrun kills the
surviving ranks when one dies, and reads the checkpoints itself afterwards. Mid-save
kills are placed inside the save, on a random rank, by wrapping one of its stages in
the child (after the shards are written, or before the marker's checksums); the other
kills come from this process at a random time within a step or a save.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

# Heavy imports live in functions: dist_checkpointing spawns a helper that re-imports this file.
BASE = str(Path(__file__).resolve().parents[1] / "examples" / "tiny" / "pretrain.yaml")
_PARENT_MODULES: set = set()


def _overrides(run: Path, iters: int, nproc: int, extra: list[str]) -> list[str]:
    return [
        f"train.iters={iters}", "data.seq_length=16", "train.global_batch_size=4",
        f"train.micro_batch_size={4 // nproc}", "train.warmup_iters=1", "logging.interval=1",
        "logging.tensorboard=false", f"logging.dir={run / 'log'}", f"checkpoint.save={run / 'ckpt'}",
        f"checkpoint.load={run / 'ckpt'}", "checkpoint.interval=2", "checkpoint.keep_last=2", *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, overrides: list[str], inside_kill: tuple | None,
               progress, log: Path) -> None:
    """One rank of one life of a run (a forked child); never returns."""
    code = 0
    os.setpgid(0, 0)  # its own group: the writer and manager processes it starts die with it
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from megavlm.platform.distributed import shutdown
        from megavlm.training import checkpoint as ckpt
        from megavlm.training.config import training_config
        from megavlm.training.loop import Trainer

        if inside_kill is not None and inside_kill[0] == rank:
            _arm_inside_kill(ckpt, stage=inside_kill[1], iteration=inside_kill[2])
        trainer = Trainer(training_config(BASE, overrides))
        progress[0] = trainer.state.iteration  # where this life resumed
        step = trainer.step

        def step_and_report():
            metrics = step()
            progress[1] = trainer.state.iteration
            return metrics

        trainer.step = step_and_report
        trainer.run()
        shutdown()
        if os.environ.get("FAULT_LIST_IMPORTS"):
            print("NEW_MODULES", sorted(set(sys.modules) - _PARENT_MODULES))
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _arm_inside_kill(ckpt, *, stage: str, iteration: int) -> None:
    """SIGKILL this rank inside the save of ``iteration``: after the sharded state is written
    ("shards"), or after every file but before the marker ("marker")."""
    from types import SimpleNamespace

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if stage == "shards":
        real = ckpt.dist_checkpointing

        def save(state_dict, path, **kw):
            out = real.save(state_dict, path, **kw)
            if Path(path).name == f"iter_{iteration:07d}":
                die()
            return out

        ckpt.dist_checkpointing = SimpleNamespace(save=save, load=real.load)
    else:
        complete = ckpt._complete

        def _complete(path, it, keep_last):
            if it == iteration:
                die()
            complete(path, it, keep_last)

        ckpt._complete = _complete


def _life(run: Path, nproc: int, overrides: list[str], *, inside_kill=None, outside_kill=None) -> dict:
    """Run every rank; with ``outside_kill=(rank, iteration, delay_s)`` SIGKILL that rank once
    it has finished that iteration plus the delay. When one rank dies the others are killed
    (as torchrun does). Returns exit codes, the resumed iteration and the wall time."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    progress = ctx.Array("i", [-1, 0], lock=False)  # [resumed at, last finished iteration]
    port = _free_port()
    run.mkdir(parents=True, exist_ok=True)
    log = run / "ranks.log"
    start, cpu_start = time.perf_counter(), _children_cpu()
    procs = [ctx.Process(target=_rank_main, args=(r, nproc, port, overrides, inside_kill, progress, log))
             for r in range(nproc)]
    for p in procs:
        p.start()
    killed_at = None
    while any(p.is_alive() for p in procs):
        if outside_kill and killed_at is None and progress[1] >= outside_kill[1]:
            time.sleep(outside_kill[2])
            if procs[outside_kill[0]].is_alive():
                os.killpg(procs[outside_kill[0]].pid, signal.SIGKILL)  # the node dies
                killed_at = progress[1]
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.002)
    for p in procs:
        p.join()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"exitcodes": [p.exitcode for p in procs], "resumed_at": progress[0], "reached": progress[1],
            "seconds": time.perf_counter() - start, "killed_after_iteration": killed_at,
            "cpu_seconds": _children_cpu() - cpu_start}


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _final_weights(run: Path, iters: int) -> dict:
    from megavlm.checkpointing import checkpoint_dir, read_model_tensors

    return read_model_tensors(checkpoint_dir(run / "ckpt", iters))


def _bit_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _state_after_kill(ckpt_root: Path) -> dict:
    """Which checkpoint a restart will pick, whether it is intact, and the interrupted saves."""
    from megavlm.checkpointing import is_complete, latest_complete
    from megavlm.checkpointing.integrity import verify

    pick = latest_complete(ckpt_root)
    partial = sorted(d.name for d in ckpt_root.glob("iter_*") if not is_complete(d)) if ckpt_root.is_dir() else []
    return {"pick": pick.name if pick else None,
            "pick_ok": pick is None or (is_complete(pick) and not verify(pick)),
            "partial": partial}


def trial(i: int, out: Path, rng: random.Random, nproc: int, iters: int, reference: dict, mid_save: bool) -> dict:
    run = out / f"trial_{i:03d}"
    overrides = _overrides(run, iters, nproc, [])
    victim = rng.randrange(nproc)
    if mid_save:
        save_iter = rng.choice(range(2, iters, 2))  # an interval save, not the last
        plan = {"kind": "inside", "rank": victim, "stage": rng.choice(["shards", "marker"]), "save": save_iter}
        first = _life(run, nproc, overrides, inside_kill=(victim, plan["stage"], save_iter))
    else:
        plan = {"kind": "outside", "rank": victim, "after_iteration": rng.randrange(1, iters),
                "delay_s": round(rng.uniform(0.0, 0.4), 3)}
        first = _life(run, nproc, overrides, outside_kill=(victim, plan["after_iteration"], plan["delay_s"]))
    killed = any(c not in (0, None) for c in first["exitcodes"])
    after = _state_after_kill(run / "ckpt")
    second = _life(run, nproc, overrides)
    expected_resume = int(after["pick"].split("_")[1]) if after["pick"] else 0
    ok_run = all(c == 0 for c in second["exitcodes"])
    equal = ok_run and _bit_equal(_final_weights(run, iters), reference)
    return {
        "trial": i, **plan, "killed": killed, "mid_save": bool(after["partial"]) and killed,
        "interrupted_saves": after["partial"], "picked": after["pick"],
        "picked_bad": (not after["pick_ok"]) or second["resumed_at"] != expected_resume,
        "resumed_at": second["resumed_at"], "bit_equal": equal,
        "seconds": round(first["seconds"] + second["seconds"], 1),
    }


def chained(out: Path, rng: random.Random, nproc: int, iters: int, reference: dict) -> list[dict]:
    """Three kills in one run (cheap enough for the test suite): inside the save of
    iteration 4 after its shards, from outside at a random time after iteration 5, inside
    the final save before its marker; each restart must pick a complete, intact checkpoint,
    and the final weights must equal the uninterrupted run's."""
    run = out / "chain"
    # evaluating (not done by the reference run) must not change the training run either
    overrides = _overrides(run, iters, nproc, ["eval.interval=3", "eval.iters=1"])
    kills = [dict(inside_kill=(rng.randrange(nproc), "shards", 4)),
             dict(outside_kill=(rng.randrange(nproc), 5, round(rng.uniform(0.0, 0.3), 3))),
             dict(inside_kill=(rng.randrange(nproc), "marker", iters))]
    results = []
    for i, kill in enumerate(kills):
        life = _life(run, nproc, overrides, **kill)
        after = _state_after_kill(run / "ckpt")
        results.append({"trial": f"chain{i}", **{k: list(v) for k, v in kill.items()}, "resumed_at": life["resumed_at"],
                        "killed": any(c not in (0, None) for c in life["exitcodes"]),
                        "mid_save": bool(after["partial"]), "interrupted_saves": after["partial"],
                        "picked": after["pick"], "picked_bad": not after["pick_ok"]})
    final = _life(run, nproc, overrides)
    expected = [0] + [int(r["picked"].split("_")[1]) if r["picked"] else 0 for r in results]
    for r, start in zip(results, expected[1:]):
        r["next_life_resumed_at"] = start
    equal = all(c == 0 for c in final["exitcodes"]) and _bit_equal(_final_weights(run, iters), reference)
    results.append({"trial": "chain_end", "resumed_at": final["resumed_at"], "expected_resume": expected[-1],
                    "bit_equal": equal})
    return results


def exit_trial(out: Path, nproc: int, iters: int) -> dict:
    """train.exit_interval=3: the run saves at iteration 3 and exits cleanly."""
    from megavlm.checkpointing import latest_complete

    run = out / "exit"
    life = _life(run, nproc, _overrides(run, iters, nproc, ["train.exit_interval=3"]))
    newest = latest_complete(run / "ckpt")
    log = (run / "ranks.log").read_text()
    return {"exitcodes": life["exitcodes"], "reached": life["reached"], "newest": newest.name if newest else None,
            "message": "train.exit_interval=3 reached at iteration 3, stopped at iteration 3" in log}


def damage_trial(out: Path, nproc: int, iters: int, reference: dict, reuse: Path | None = None) -> dict:
    """Damage the newest checkpoint's shard: the resume names it; fallback resumes from the
    previous checkpoint and still ends bit-equal. ``reuse``: a finished run to damage."""
    from megavlm.checkpointing import latest_complete

    run = reuse or out / "damage"
    overrides = _overrides(run, iters, nproc, ["eval.interval=3", "eval.iters=1"] if reuse else [])
    if reuse is None:
        _life(run, nproc, overrides, outside_kill=(0, iters - 1, 0.0))  # past the save at iters - 2
    newest = latest_complete(run / "ckpt")
    shard = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (run / "ranks.log").write_text("")
    refused = _life(run, nproc, overrides)
    log = (run / "ranks.log").read_text()
    named = f"{newest} is damaged: {shard.name}: sha256 differs" in log
    fell_back = _life(run, nproc, overrides + ["checkpoint.fallback=true"])
    equal = all(c == 0 for c in fell_back["exitcodes"]) and _bit_equal(_final_weights(run, iters), reference)
    return {"damaged": f"{newest.name}/{shard.name}", "refused": any(refused["exitcodes"]), "error_names_file": named,
            "fallback_resumed_at": fell_back["resumed_at"], "bit_equal": equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--mid-save-every", type=int, default=3, help="every Nth trial kills inside a save")
    parser.add_argument("--nproc", type=int, default=2, choices=(1, 2))
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--damage", action="store_true", help="add the damaged-shard / fallback trial")
    parser.add_argument("--chain", action="store_true",
                        help="instead of --trials: three kills in one run (the test suite's cheap version)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # noqa: F401  (imported once here; every forked rank reuses it)

    import megavlm.training.loop  # noqa: F401
    # what every rank's first save imports: once here instead of in each forked rank
    import megatron.core.dist_checkpointing.strategies.filesystem_async  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import psutil  # noqa: F401
    import megavlm.training.config  # noqa: F401

    global _PARENT_MODULES
    _PARENT_MODULES = set(sys.modules)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    ref_run = out / "reference"
    ref = _life(ref_run, args.nproc, _overrides(ref_run, args.iters, args.nproc, []))
    if any(ref["exitcodes"]):
        sys.exit(f"reference run failed, see {ref_run / 'ranks.log'}")
    reference = _final_weights(ref_run, args.iters)
    print(f"reference: {args.iters} iterations in {ref['seconds']:.1f}s ({ref['cpu_seconds']:.1f}s CPU)", flush=True)
    if args.chain:
        results = chained(out, rng, args.nproc, args.iters, reference)
        for r in results:
            print(json.dumps(r), flush=True)
        summary = {"chain": results, "exit": exit_trial(out, args.nproc, args.iters)}
        if args.damage:
            summary["damage"] = damage_trial(out, args.nproc, args.iters, reference, reuse=out / "chain")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary.get("damage")), flush=True)
        return
    results = []
    for i in range(args.trials):
        r = trial(i, out, rng, args.nproc, args.iters, reference, mid_save=i % args.mid_save_every == 0)
        results.append(r)
        print(json.dumps(r), flush=True)
    summary = {
        "trials": len(results), "nproc": args.nproc,
        "killed": sum(r["killed"] for r in results),
        "mid_save_hits": sum(r["mid_save"] for r in results),
        "incomplete_or_damaged_picked": sum(r["picked_bad"] for r in results),
        "bit_equal": sum(r["bit_equal"] for r in results),
    }
    if args.damage:
        summary["damage"] = damage_trial(out, args.nproc, args.iters, reference)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "trials": results}, indent=1))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
