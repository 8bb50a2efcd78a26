"""Sharded, resumable, distributed generation (diffsampler.eval.generate)."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.generate import (MissingSeedsError, generate_shards, iter_shards, load_shards,
                                       save_image_grid, shard_name)
from diffsampler.eval.gmm import gmm_denoiser

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist_generate_script.py"


def seeded_fn(calls=None, fail_after=None):
    """sample_fn whose sample k is a function of seed k only; counts calls; optionally interrupts."""

    def fn(seeds):
        if calls is not None:
            if fail_after is not None and len(calls) >= fail_after:
                raise KeyboardInterrupt
            calls.append(list(seeds))
        return torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in seeds])

    return fn


def test_shards_written_ordered_and_loaded(tmp_path):
    seeds = list(range(10, 33))
    paths = generate_shards(seeded_fn(), seeds, tmp_path, shard_size=5, rank=0, world_size=1, progress=False)
    assert [p.name for p in paths] == [shard_name(seeds[i:i + 5]) for i in range(0, 23, 5)]
    assert paths[0].name == "shard_00000010_00000014.pt" and paths[-1].name == "shard_00000030_00000032.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp files left
    d = torch.load(paths[1], weights_only=True)
    assert d["seeds"].dtype == torch.long and d["seeds"].tolist() == list(range(15, 20))
    assert d["samples"].dtype == torch.float32 and d["samples"].shape == (5, 3)

    got_seeds, x = load_shards(tmp_path)
    assert got_seeds.tolist() == seeds
    assert torch.equal(x, seeded_fn()(seeds))
    sub, xs = load_shards(tmp_path, seeds=[31, 12, 20])
    assert sub.tolist() == [31, 12, 20] and torch.equal(xs, seeded_fn()([31, 12, 20]))
    assert sum(len(s) for s, _ in iter_shards(tmp_path)) == 23
    with pytest.raises(MissingSeedsError, match=r"2 of 4 requested seeds.*\[5, 40\]"):
        load_shards(tmp_path, seeds=[5, 12, 13, 40])


def test_rank_split(tmp_path):
    calls0, calls1 = [], []
    p0 = generate_shards(seeded_fn(calls0), range(20), tmp_path, shard_size=4, rank=0, world_size=2, progress=False)
    p1 = generate_shards(seeded_fn(calls1), range(20), tmp_path, shard_size=4, rank=1, world_size=2, progress=False)
    assert [c[0] for c in calls0] == [0, 8, 16] and [c[0] for c in calls1] == [4, 12]
    assert p0 == p1 and len(p0) == 5
    assert load_shards(tmp_path)[0].tolist() == list(range(20))


def test_resume_after_interrupt(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        generate_shards(seeded_fn(calls, fail_after=2), range(50), tmp_path / "run", shard_size=8, progress=False)
    assert len(calls) == 2 and len(list((tmp_path / "run").glob("shard_*.pt"))) == 2
    # a temp file left by a run killed while saving is ignored and overwritten
    (tmp_path / "run" / (shard_name(range(16, 24)) + ".tmp")).write_bytes(b"truncated")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("shard_*.pt")}
    calls2 = []
    generate_shards(seeded_fn(calls2), range(50), tmp_path / "run", shard_size=8, progress=False)
    assert [c[0] for c in calls2] == [16, 24, 32, 40, 48]  # only the missing shards
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("shard_*.pt")
            if p.name in mtimes} == mtimes
    calls3 = []
    generate_shards(seeded_fn(calls3), range(50), tmp_path / "run", shard_size=8, progress=False)
    assert calls3 == []  # everything done: nothing regenerated
    assert not list((tmp_path / "run").glob("*.tmp"))

    generate_shards(seeded_fn(), range(50), tmp_path / "ref", shard_size=8, progress=False)
    a, b = load_shards(tmp_path / "run"), load_shards(tmp_path / "ref")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_existing_shard_with_other_seeds_is_an_error(tmp_path):
    generate_shards(seeded_fn(), [0, 1, 2, 3], tmp_path, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="holds other seeds"):
        generate_shards(seeded_fn(), [0, 2, 3], tmp_path, shard_size=4, progress=False)


def test_sample_fn_checks(tmp_path):
    with pytest.raises(ValueError, match="returned 2 samples for 4 seeds"):
        generate_shards(lambda s: torch.zeros(2, 3), range(4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        generate_shards(seeded_fn(), range(4), tmp_path, shard_size=0, progress=False)


def test_shard_size_does_not_change_samples(tmp_path, gmm8):
    """Per-seed determinism through diffsampler.sample with a stochastic solver."""
    den = gmm_denoiser(gmm8, ds.LinearVP(), "epsilon")

    def fn(seeds):
        return ds.sample(den, solver="dpmpp_2m_sde", nfe=8, shape=(len(seeds), 8), seeds=seeds)

    generate_shards(fn, range(70), tmp_path / "a", shard_size=7, progress=False)
    generate_shards(fn, range(70), tmp_path / "b", shard_size=64, progress=False)
    a, b = load_shards(tmp_path / "a"), load_shards(tmp_path / "b")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the noise matters: other seeds give other samples
    assert not torch.allclose(a[1][:10], fn(list(range(100, 110))))


def test_progress_bar_on(tmp_path, capsys):
    generate_shards(seeded_fn(), range(6), tmp_path, shard_size=3, progress=True, desc="gen-test")
    assert "gen-test" in capsys.readouterr().err


def test_save_image_grid(tmp_path):
    from PIL import Image

    x = torch.rand(5, 3, 8, 6)
    p = save_image_grid(x, tmp_path / "g" / "grid.png", nrow=3)
    im = Image.open(p)
    assert im.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2) and im.mode == "RGB"
    import numpy as np

    arr = np.asarray(im)
    assert np.array_equal(arr[2:10, 2:8], (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    g = Image.open(save_image_grid(torch.rand(4, 1, 4, 4), tmp_path / "grey.png"))
    assert g.mode == "L" and g.size == (2 * 6 + 2, 2 * 6 + 2)


# ---------------------------------------------------------------------------------------------
# processes: plain python vs torchrun (gloo), and killing a run
# ---------------------------------------------------------------------------------------------

N, SHARD = 64, 8


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_module():
    spec = importlib.util.spec_from_file_location("dist_generate_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(cmd, timeout=120):
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """A 1-process run killed after its first shards, then restarted to completion."""
    out = tmp_path_factory.mktemp("killed")
    log = out.parent / (out.name + ".log")
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--n", str(N), "--shard-size", str(SHARD),
           "--log-file", str(log)]
    proc = subprocess.Popen(cmd + ["--sleep", "0.5"], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(list(out.glob("shard_*.pt"))) < 2:
            assert proc.poll() is None, "the slow run ended before it could be killed"
            assert time.time() < deadline, "no shards appeared"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.pt")}
    first_log = log.read_text().split("\n")
    _run(cmd)
    return out, done, first_log, log.read_text().split("\n")


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    _run(launcher + ["--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT),
                     "--out", str(out), "--num-seeds", str(N), "--shard-size", str(SHARD)], timeout=180)
    return out


def test_killed_run_resumes_without_regenerating(killed_then_resumed):
    out, done, first_log, full_log = killed_then_resumed
    assert 2 <= len(done) < N // SHARD
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.pt")}
    assert len(after) == N // SHARD
    assert {k: after[k] for k in done} == done  # finished shards untouched
    restarted = [ln for ln in full_log[len(first_log) - 1:] if ln]
    started_first = {int(ln.split()[1]) for ln in first_log if ln}
    finished_first = {int(name.split("_")[1]) for name in done}
    regenerated = {int(ln.split()[1]) for ln in restarted}
    assert not regenerated & finished_first
    assert regenerated | finished_first == set(range(0, N, SHARD))
    assert started_first >= finished_first
    # the resumed result equals an uninterrupted generation (computed in-process)
    seeds, x = load_shards(out)
    assert seeds.tolist() == list(range(N))
    assert torch.equal(x, _script_module().make_sample_fn()(list(range(N))))


def test_torchrun_matches_single_process(killed_then_resumed, torchrun_run):
    single = killed_then_resumed[0]
    a, b = load_shards(single), load_shards(torchrun_run)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ra = json.loads((single / "result.json").read_text())
    rb = json.loads((torchrun_run / "result.json").read_text())
    assert ra["world_size"] == 1 and rb["world_size"] == 2
    assert ra["n_fake"] == rb["n_fake"] == N and rb["n_shards"] == N // SHARD
    assert rb["fid_per_rank"][0] == rb["fid_per_rank"][1]  # identical on every rank
    assert ra["n_scored_per_rank"] == [N] and rb["n_scored_per_rank"] == [N // 2, N // 2]  # each scores its half
    assert ra["fid"] > 0 and abs(ra["fid"] - rb["fid"]) <= 1e-9 * abs(ra["fid"])
    for r in (ra, rb):  # rank 0 scoring alone (sync=False) agrees; FID against own cached stats ~ 0
        assert abs(r["fid_rank0_alone"] - r["fid"]) <= 1e-9 * r["fid"] and abs(r["self_fid"]) < 1e-9
