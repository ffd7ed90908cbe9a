"""Launcher detection (torchrun / slurm / single) and a real 2-process gloo rendezvous."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest
from pathlib import Path

from megavlm.platform.launch import DistEnv, detect_dist_env, expand_slurm_nodelist

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("nodelist", "expected"),
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu-a[1-2],gpu-b[10-11]", ["gpu-a1", "gpu-a2", "gpu-b10", "gpu-b11"]),
        ("rack1-node[001-002]", ["rack1-node001", "rack1-node002"]),
        ("n[1-2]-r[3-4]", ["n1-r3", "n1-r4", "n2-r3", "n2-r4"]),
        ("a,b[1,3],c", ["a", "b1", "b3", "c"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[5]", ["n5"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, expected):
    assert expand_slurm_nodelist(nodelist) == expected


@pytest.mark.parametrize(
    "nodelist", ["node[01-03", "node01-03]", "n[[1-2]]", "node[03-01]", "node[]", "node[a-b]", "", "a,,b"]
)
def test_expand_slurm_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ValueError, match="malformed slurm nodelist") as err:
        expand_slurm_nodelist(nodelist)
    assert repr(nodelist) in str(err.value)


def test_torchrun_env():
    """torchrun inside an srun task (one per node): its ranks win over SLURM_PROCID (the node)."""
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "42",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "SLURM_PROCID": "0"}
    assert detect_dist_env(env) == DistEnv(5, 1, 8, 4, "10.0.0.1", 29400, "torchrun")
    # outside slurm, LOCAL_WORLD_SIZE alone marks a torchrun-style launch
    del env["TORCHELASTIC_RUN_ID"], env["SLURM_PROCID"]
    assert detect_dist_env(env).launcher == "torchrun"


def _slurm_env(**overrides: str) -> dict[str, str]:
    env = {"SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_NODEID": "1",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    env.update(overrides)
    return env


def test_slurm_two_nodes_of_eight():
    assert detect_dist_env(_slurm_env()) == DistEnv(11, 3, 16, 8, "gpu07", 23456, "slurm")


def test_slurm_under_the_pyxis_hook():
    """enroot's 50-slurm-pytorch hook adds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* (no
    LOCAL_WORLD_SIZE) to every srun task: still an srun launch, on the hook's address."""
    env = _slurm_env(RANK="11", WORLD_SIZE="16", LOCAL_RANK="3", MASTER_ADDR="gpu07", MASTER_PORT="6000")
    assert detect_dist_env(env) == DistEnv(11, 3, 16, 8, "gpu07", 6000, "slurm")


@pytest.mark.parametrize(
    ("stale", "message"),
    [
        ({"RANK": "0"}, "RANK=0 but SLURM_PROCID=11"),
        ({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "WORLD_SIZE=1 but SLURM_NTASKS=16; LOCAL_RANK=0 but SLURM_LOCALID=3"),
        ({"LOCAL_WORLD_SIZE": "1"}, "LOCAL_WORLD_SIZE=1 but slurm runs 8 task"),
        ({"MASTER_ADDR": "localhost", "SLURM_JOB_NUM_NODES": "2"}, "MASTER_ADDR=localhost but the job has"),
    ],
)
def test_stale_variables_under_srun_are_named(stale, message):
    with pytest.raises(ValueError, match="launcher variables disagree under srun") as err:
        detect_dist_env(_slurm_env(**stale))
    assert message in str(err.value) and "unset them" in str(err.value)


def test_stale_rank_without_a_launcher_is_named():
    with pytest.raises(ValueError, match=r"RANK=3, WORLD_SIZE=4 set, but no launcher.*unset RANK WORLD_SIZE"):
        detect_dist_env({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "localhost"})


def test_slurm_prefers_explicit_master_and_falls_back_to_slurm_nodelist():
    env = _slurm_env(MASTER_ADDR="head", MASTER_PORT="31000")
    assert (detect_dist_env(env).master_addr, detect_dist_env(env).master_port) == ("head", 31000)
    env = _slurm_env(SLURM_NODELIST="other[3-4]")
    del env["SLURM_JOB_NODELIST"], env["SLURM_JOB_ID"]
    assert (detect_dist_env(env).master_addr, detect_dist_env(env).master_port) == ("other3", 20000)


@pytest.mark.parametrize(
    ("tasks_per_node", "node_id", "expected"),
    [("8(x2)", "1", 8), ("4,4", "0", 4), ("2(x3),1", "3", 1), ("6,2", None, 6)],
)
def test_slurm_tasks_per_node_forms(tasks_per_node, node_id, expected):
    env = _slurm_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="", SLURM_TASKS_PER_NODE=tasks_per_node)
    if node_id is None:
        del env["SLURM_NODEID"]
    else:
        env["SLURM_NODEID"] = node_id
    assert detect_dist_env(env).local_world_size == expected


def test_single_process_default():
    assert detect_dist_env({}) == DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single")  # any free port
    assert detect_dist_env({"MASTER_PORT": "12345"}).master_port == 12345


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
          "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "WORLD_SIZE='two' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
         "LOCAL_RANK is not set"),
        ({"TORCHELASTIC_RUN_ID": "1", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE is not set"),
        ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
          "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 4 is not below world size 4"),
        (_slurm_env(SLURM_NTASKS="-1"), "SLURM_NTASKS='-1' must not be negative"),
        (_slurm_env(SLURM_JOB_ID="abc"), "SLURM_JOB_ID='abc' is not an integer"),
        (_slurm_env(MASTER_PORT="70000"), "MASTER_PORT='70000' is not a TCP port"),
        (_slurm_env(SLURM_NTASKS_PER_NODE="8(x2)", SLURM_TASKS_PER_NODE="8x2"), "SLURM_TASKS_PER_NODE='8x2'"),
        (_slurm_env(SLURM_NTASKS_PER_NODE="", SLURM_TASKS_PER_NODE="8", SLURM_NODEID="1"),
         "SLURM_NODEID=1 has no entry"),
        ({k: v for k, v in _slurm_env().items() if k != "SLURM_NTASKS_PER_NODE"}, "SLURM_TASKS_PER_NODE is set"),
        ({k: v for k, v in _slurm_env().items() if k != "SLURM_JOB_NODELIST"}, "export MASTER_ADDR"),
        (_slurm_env(SLURM_JOB_NODELIST="gpu[07-08"), "malformed slurm nodelist 'gpu\\[07-08'"),
        ({"MASTER_PORT": "port"}, "MASTER_PORT='port' is not an integer"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        detect_dist_env(env)


_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from megavlm.platform.launch import detect_dist_env, init_process_group
    from megavlm.platform.storage import StorageNotSharedError, check_shared_directory
    env = detect_dist_env()
    assert env.launcher == "slurm", env
    init_process_group(env, "gloo", timeout_minutes=1)
    t = torch.tensor([env.rank + 1.0])
    dist.all_reduce(t)
    print(t.item(), flush=True)
    check_shared_directory(sys.argv[1], "checkpoint.save", wait_s=0.5)  # the same directory for both
    try:  # relative: each rank's own working directory, as with a path not mounted on every node
        check_shared_directory("ckpt", "checkpoint.save", wait_s=0.5)
    except StorageNotSharedError as e:
        print(e, flush=True)
    dist.destroy_process_group()
    """
)


def test_two_process_gloo_job_from_slurm_env(tmp_path):
    """A slurm-style rendezvous, then the storage probe: passes on a shared directory, names
    the rank, the path and the mount when the ranks see different directories."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in torchrun_vars}
    base.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_ID=str(random.randrange(1, 10**6)), MASTER_PORT=str(port),
                PYTHONPATH=os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")]))
    shared = tmp_path / "shared"
    cwds = [tmp_path / f"node{i}" for i in range(2)]
    procs = []
    for i, cwd in enumerate(cwds):
        cwd.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(shared)], cwd=cwd,
                                      env={**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        lines = out.strip().splitlines()
        assert lines[0] == "3.0", (out, err)
        assert lines[1].startswith("checkpoint.save=ckpt is not shared: rank 1 on "), out
        assert "do not see the probe file rank 0 wrote there" in lines[1] and "path on mount" in lines[1]
    assert list(shared.iterdir()) == []  # the probe is removed
    assert (cwds[0] / "ckpt").is_dir() and not (cwds[1] / "ckpt").exists()
