"""Clusters: ranks come from torchrun, submitit (Hydra's submitit launchers, SLURM tasks) or srun alike,
each rank makes its own share of the shards, temporary files are per process, and a 2-job sweep runs
through Hydra's submitit_local launcher with 2 tasks per job."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from diffsampler.eval import generate
from diffsampler.eval.generate import Launch, launch_env

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
               "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID",
               "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_STEP_ID")
RUN = ["model=gmm", "nfe=5", "num_samples=64", "shard_size=16", "batch_size=16", "progress=false"]


@pytest.fixture
def clean_env(monkeypatch):
    for k in LAUNCH_VARS + tuple(k for k in os.environ if k.startswith("SUBMITIT_")):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _submitit_local(k: int, n: int, job: str = "4242") -> dict:
    """The variables submitit's local executor gives task k of n (submitit/local/local.py)."""
    return {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": str(n), "SUBMITIT_LOCAL_GLOBALID": str(k),
            "SUBMITIT_LOCAL_LOCALID": str(k), "SUBMITIT_LOCAL_JOB_ID": job, "SUBMITIT_LOCAL_NODEID": "0",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}


@pytest.mark.parametrize("env,expected", [
    ({}, Launch(0, 1, 0, "single")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Launch(3, 4, 1, "torchrun")),
    (_submitit_local(1, 2), Launch(1, 2, 1, "submitit")),
    ({"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
      "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_NUM_NODES": "2"}, Launch(5, 8, 1, "submitit")),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2"},
     Launch(1, 2, 1, "srun")),
    # a plain `python` in an sbatch script of a 4-task allocation is one process, not rank 0 of 4
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77"}, Launch(0, 1, 0, "single")),
])
def test_launch_env_reads_every_launcher(clean_env, env, expected):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert launch_env() == expected


def test_rendezvous_of_submitit_and_srun(clean_env):
    for k, v in _submitit_local(0, 2, job="9001").items():
        clean_env.setenv(k, v)
    addr, port = generate._rendezvous(launch_env())
    assert addr == socket.gethostname() and 20000 <= int(port) <= 60000
    assert generate._rendezvous(launch_env()) == (addr, port)  # the same on every task of the job
    clean_env.setenv("MASTER_PORT", "12345")
    assert generate._rendezvous(launch_env()) == (addr, "12345")  # the environment wins
    for k in _submitit_local(0, 2):
        clean_env.delenv(k)
    clean_env.delenv("MASTER_PORT")
    for k, v in {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "gpu[07-09,12],cpu1",
                 "SLURM_JOB_ID": "5"}.items():
        clean_env.setenv(k, v)
    addr, port = generate._rendezvous(launch_env())
    assert addr == "gpu07" and 20000 <= int(port) < 60000


@pytest.mark.parametrize("nodes,first", [("node1", "node1"), ("gpu[03-05,09],cpu1", "gpu03"), ("a[1,4]", "a1"),
                                         ("x-y-2,x-y-3", "x-y-2")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert generate._first_host(nodes) == first


def test_temporary_names_are_per_process_and_never_shard_names(tmp_path):
    target = tmp_path / "shard_00000000_00000007.pt"
    tmp = generate.tmp_path(target)
    assert tmp.parent == tmp_path and str(os.getpid()) in tmp.name and socket.gethostname() in tmp.name
    assert not generate._SHARD_RE.match(tmp.name)
    read, write = os.pipe()
    if os.fork() == 0:  # another process (same host): another name
        os.write(write, str(generate.tmp_path(target)).encode())
        os._exit(0)
    os.close(write)
    other = os.read(read, 4096).decode()
    os.wait()
    assert other != str(tmp)
    generate._save_atomic({"x": torch.ones(2)}, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left


def test_generation_removes_temporary_files_of_killed_processes_only(tmp_path):
    """Before making a shard, a rank deletes its temporary files left by dead processes of this host;
    a live process's file and another host's are left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shard = tmp_path / generate.shard_name([0, 1])
    stale = shard.with_name(f".{shard.name}.{socket.gethostname()}.{dead.pid}.tmp")
    legacy = shard.with_name(shard.name + ".tmp")
    live = shard.with_name(f".{shard.name}.{socket.gethostname()}.{os.getppid()}.tmp")  # a live writer
    remote = shard.with_name(f".{shard.name}.elsewhere.{dead.pid}.tmp")
    for f in (stale, legacy, live, remote):
        f.write_bytes(b"partial")
    generate.generate_shards(lambda seeds: torch.zeros(len(seeds), 2), [0, 1, 2, 3], tmp_path, shard_size=2,
                             rank=0, world_size=1, progress=False)
    assert not stale.exists() and not legacy.exists() and live.exists() and remote.exists()
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_00000000_00000001.pt",
                                                                 "shard_00000002_00000003.pt"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows_alone(tmp_path, solvers) -> dict:
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs
    from diffsampler.tools.runner import run

    _register_solver_configs()
    out = {}
    with initialize_config_module("diffsampler.configs", version_base=None):
        for solver in solvers:
            cfg = compose("config", overrides=[f"solver={solver}", *RUN])
            out[solver] = run(cfg, tmp_path / f"alone_{solver}", tmp_path / f"alone_{solver}" / "results.csv")
    return out


def _shares(log: str, world: int) -> dict[int, set[str]]:
    """rank -> shard files it saved, from cli.log."""
    saved: dict[int, set[str]] = {r: set() for r in range(world)}
    for line in log.splitlines():
        if " saved shard_" in line:
            rank = int(line.split(": rank ")[1].split()[0])
            saved[rank].add(line.split(" saved ")[1].split()[0])
    return saved


def test_two_tasks_in_a_submitit_environment_split_the_work(tmp_path, clean_env):
    """Two processes given submitit's task variables (as `tasks_per_node=2` does) are ranks 0 and 1
    of one run: each makes every other shard, together the samples of a one-process run."""
    run_dir = tmp_path / "run"
    port = str(_free_port())
    procs = []
    for k in range(2):
        env = {**os.environ, **_submitit_local(k, 2, job=str(os.getpid())), "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "diffsampler", "solver=dpmpp_2m", *RUN,
                                       f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    alone = _rows_alone(tmp_path, ["dpmpp_2m"])["dpmpp_2m"]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rows = pd.read_csv(run_dir / "results.csv")
    assert len(rows) == 1 and rows.world_size[0] == 2  # one row, written by rank 0
    assert rows.rmse[0] == pytest.approx(alone["rmse"], abs=1e-12) and rows.fd[0] == pytest.approx(alone["fd"], abs=1e-12)
    log = (run_dir / "cli.log").read_text()
    assert "rank 0 of 2 makes 2 of 4 shards" in log and "rank 1 of 2 makes 2 of 4 shards" in log
    shares = _shares(log, 2)
    assert shares[0] == {"shard_00000000_00000015.pt", "shard_00000032_00000047.pt"}
    assert shares[1] == {"shard_00000016_00000031.pt", "shard_00000048_00000063.pt"}
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == sorted(shares[0] | shares[1])


def test_two_job_sweep_through_submitit_local_with_two_tasks_each(tmp_path):
    """Hydra's submitit_local launcher (the local twin of +launcher=slurm): 2 jobs, 2 tasks per job;
    each job's tasks split its shards, both rows land in the sweep's table with the one-process values,
    and every job's cli.log records config, generation, scoring and result paths."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "diffsampler", "-m", "hydra/launcher=submitit_local",
                        "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=4", "solver=ddim,dpmpp_2m", *RUN,
                        f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = pd.read_csv(sweep / "results.csv").set_index("solver")
    assert sorted(rows.index) == ["ddim", "dpmpp_2m"] and (rows.world_size == 2).all()
    alone = _rows_alone(tmp_path, ["ddim", "dpmpp_2m"])
    for solver, row in alone.items():
        assert rows.rmse[solver] == pytest.approx(row["rmse"], abs=1e-12), solver
    for solver in ("ddim", "dpmpp_2m"):
        job = Path(rows.run_dir[solver])
        log = (job / "cli.log").read_text()
        shares = _shares(log, 2)
        assert len(shares[0]) == len(shares[1]) == 2 and not shares[0] & shares[1], log
        for needle in ("(submitit, rank 0 of 2)", "(submitit, rank 1 of 2)", f"solver={solver}", "config:",
                       "model=gmm ready", "scoring 64 samples", "metrics: {\"rmse\"", f"row appended to {sweep}"):
            assert needle in log, needle
        assert not [p for p in job.rglob("*.tmp")]
    assert "accelerate" not in r.stderr


def test_slurm_launcher_gives_each_task_a_gpu():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from diffsampler.cli import _register_solver_configs

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        cfg = compose("config", overrides=["+launcher=slurm", "hydra.launcher.tasks_per_node=4"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert "SlurmLauncher" in launcher["_target_"]
    assert launcher["tasks_per_node"] == 4 and launcher["gpus_per_node"] == 4 and launcher["nodes"] == 1
