"""Runs and shards refuse what they cannot honour, before any work: a shard directory made under
another configuration, a value range the samples do not have, an unwritable results table, a
negative seed."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsampler.tools import runner
from diffsampler.eval.fid import FIDEvaluator, fid_from_shards, stats_from_features
from diffsampler.eval.generate import ShardMismatchError, generate_shards, shard_name, shard_record
from diffsampler.tools.runner import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from diffsampler.cli import _register_solver_configs

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        return hydra_compose("config", overrides=["model=gmm", "num_samples=32", "shard_size=16", "progress=false",
                                                  *overrides])


def mtimes(d: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.glob("*"))}


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the run builds its model (any work past the checks)."""
    def refuse(*a, **k):
        raise AssertionError("the model was built: the refusal came too late")

    monkeypatch.setattr(runner, "build_gmm", refuse)
    monkeypatch.setattr(runner, "_pipeline_denoiser", refuse)


def seeded(calls=None):
    def fn(seeds):
        if calls is not None:
            calls.append(list(seeds))
        return torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in seeds])

    return fn


# ---------------------------------------------------------------------------------------------
# item 1: shards carry a fingerprint of what produced them; another one is refused
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddim_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddim")
    row = runner.run(compose("solver=ddim", "nfe=3"), d, d / "results.csv")
    return d, row


@pytest.mark.parametrize("overrides,field", [
    (["solver=dpmpp_3m", "nfe=20"], "solver.name"),
    (["solver=ddim", "nfe=5"], "nfe"),
    (["solver=ddim", "nfe=3", "+solver.options.eta=1.0"], "solver.options.eta"),
    (["solver=ddim", "nfe=3", "spacing=logsnr"], "spacing"),
    (["solver=ddim", "nfe=3", "final=last"], "final"),
    (["solver=ddim", "nfe=3", "model.schedule=edm"], "model.schedule"),
    (["solver=ddim", "nfe=3", "model.seed=1"], "model.seed"),
    (["solver=ddim", "nfe=3", "time_shift={window:2,cutoff:300}"], "time_shift"),
    (["solver=dpmpp_2m_sde", "nfe=3", "guidance=svdd"], "guidance.name"),
])
def test_item01_rerun_with_other_config_refused(ddim_run, tmp_path, no_model, overrides, field):
    d = tmp_path / "run"
    shutil.copytree(ddim_run[0], d)
    before = mtimes(d / "samples")
    with pytest.raises(ConfigError) as e:
        runner.run(compose(*overrides), d, d / "results.csv")
    msg = str(e.value)
    assert field in msg, msg
    assert "hydra.run.dir" in msg and f"delete {d / 'samples'}" in msg, msg
    assert mtimes(d / "samples") == before  # nothing generated, nothing rewritten
    assert len(runner.read_rows(d / "results.csv")) == 1  # no row written under the new config


def test_item01_message_names_both_values(ddim_run, tmp_path, no_model):
    d = tmp_path / "run"
    shutil.copytree(ddim_run[0], d)
    with pytest.raises(ConfigError) as e:
        runner.run(compose("solver=dpmpp_3m", "nfe=20"), d, d / "results.csv")
    msg = str(e.value)
    assert "nfe: 3 in the shards, 20 now" in msg and "solver.name: 'ddim' in the shards, 'dpmpp_3m' now" in msg, msg


def test_item01_same_config_resumes_and_extends(ddim_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(ddim_run[0], d)
    shards = sorted((d / "samples").glob("shard_*.pt"))
    assert len(shards) == 2
    rec = shard_record(d / "samples")
    assert rec.fingerprint["solver"]["name"] == "ddim" and rec.fingerprint["nfe"] == 3
    assert rec.fingerprint["device"] == "cpu" and rec.value_range is None
    shards[1].unlink()  # an interrupted run: one shard missing
    kept = shards[0].stat().st_mtime_ns
    row = runner.run(compose("solver=ddim", "nfe=3"), d, d / "results.csv")
    assert shards[0].stat().st_mtime_ns == kept and shards[1].exists()
    assert row["rmse"] == ddim_run[1]["rmse"]
    more = runner.run(compose("solver=ddim", "nfe=3", "num_samples=48"), d, d / "results.csv")  # more shards
    assert more["num_samples"] == 48 and len(list((d / "samples").glob("shard_*.pt"))) == 3


def test_item01_cli_rerun_with_other_solver_refused(tmp_path):
    run = tmp_path / "x"
    base = [sys.executable, "-m", "diffsampler", "model=gmm", "num_samples=32", "progress=false", f"hydra.run.dir={run}"]
    first = subprocess.run(base + ["solver=ddim", "nfe=3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr
    before = mtimes(run / "samples")
    r = subprocess.run(base + ["solver=dpmpp_3m", "nfe=20"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "solver.name" in r.stderr and "'dpmpp_3m'" in r.stderr and "hydra.run.dir" in r.stderr, r.stderr
    assert mtimes(run / "samples") == before
    assert len(runner.read_rows(run / "results.csv")) == 1


def test_item01_generate_shards_stores_fingerprint_and_refuses_mix(tmp_path):
    fp = {"solver": "ddim", "nfe": 3, "options": {"eta": 0.0}}
    generate_shards(seeded(), range(8), tmp_path, shard_size=4, progress=False, fingerprint=fp)
    rec = shard_record(tmp_path)
    assert rec.fingerprint == fp and len(rec.digest) == 16
    assert torch.load(tmp_path / shard_name(range(4)), weights_only=True)["fingerprint"]
    before = mtimes(tmp_path)
    for other, named in [({"solver": "ddim", "nfe": 5, "options": {"eta": 0.0}}, "nfe: 3 in the shards, 5 now"),
                         ({"solver": "ddim", "nfe": 3, "options": {"eta": 1.0}}, "options.eta: 0.0 in the shards, 1.0 now"),
                         (None, "this call gives none")]:
        calls = []
        with pytest.raises(ShardMismatchError) as e:
            generate_shards(seeded(calls), range(8, 16), tmp_path, shard_size=4, progress=False, fingerprint=other)
        assert named in str(e.value) and str(tmp_path) in str(e.value), str(e.value)
        assert isinstance(e.value, ValueError) and calls == [] and mtimes(tmp_path) == before
    # the same fingerprint (keys in any order) resumes
    generate_shards(seeded(), range(8, 16), tmp_path, shard_size=4, progress=False,
                    fingerprint={"options": {"eta": 0.0}, "nfe": 3, "solver": "ddim"})
    assert len(list(tmp_path.glob("shard_*.pt"))) == 4
    with pytest.raises(TypeError, match="fingerprint"):
        generate_shards(seeded(), range(4), tmp_path / "b", progress=False, fingerprint={"f": object()})


# ---------------------------------------------------------------------------------------------
# item 3: the shards record their value range; fid_from_shards reads it and checks the samples
# ---------------------------------------------------------------------------------------------

class Projection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, x):
        x = x.flatten(1).double()
        return x[:, :48] @ self.w if x.shape[1] >= 48 else x @ self.w[:x.shape[1]]


def images(n, seed):
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_item03_recorded_range_is_read(tmp_path):
    x = images(60, 1)  # decoded images in [0, 1], as the CLI saves them
    generate_shards(lambda s: x[s], range(60), tmp_path, shard_size=25, progress=False, value_range=(0, 1))
    assert shard_record(tmp_path).value_range == (0.0, 1.0)
    ref = stats_from_features(Projection()(images(100, 2)))
    ev = FIDEvaluator(Projection())
    ev.set_reference(ref)
    ev.update_fake(x)
    assert fid_from_shards(tmp_path, ref, Projection()) == pytest.approx(ev.compute(), rel=1e-9)
    assert fid_from_shards(tmp_path, ref, Projection(), value_range=(0, 1)) == pytest.approx(ev.compute(), rel=1e-9)


def test_item03_contradicting_range_refused(tmp_path):
    generate_shards(lambda s: images(len(s), 1), range(8), tmp_path / "01", progress=False, value_range=(0, 1))
    generate_shards(lambda s: images(len(s), 1) * 2 - 1, range(8), tmp_path / "pm1", progress=False,
                    value_range=(-1, 1))
    ref = stats_from_features(Projection()(images(100, 2)))
    for d, bad, recorded in [("01", (-1, 1), "(0.0, 1.0)"), ("01", (0, 255), "(0.0, 1.0)"),
                             ("pm1", None, "(-1.0, 1.0)"), ("pm1", (0, 1), "(-1.0, 1.0)")]:
        with pytest.raises(ValueError) as e:
            fid_from_shards(tmp_path / d, ref, Projection(), value_range=bad)
        assert f"value_range={bad!r}" in str(e.value) and recorded in str(e.value), str(e.value)
    # None passes samples through as [0, 1]: it agrees with a recorded (0, 1)
    assert fid_from_shards(tmp_path / "01", ref, Projection(), value_range=None) == pytest.approx(
        fid_from_shards(tmp_path / "01", ref, Projection()), rel=1e-12)


def test_item03_samples_outside_declared_range_refused(tmp_path):
    x = images(20, 1) * 255  # 8-bit values, declared (by default) as [-1, 1]
    generate_shards(lambda s: x[s], range(20), tmp_path / "old", progress=False)  # no range recorded
    ref = stats_from_features(Projection()(images(100, 2)))
    with pytest.raises(ValueError) as e:
        fid_from_shards(tmp_path / "old", ref, Projection())
    msg = str(e.value)
    assert "(-1.0, 1.0)" in msg and f"{float(x.min()):.4g}" in msg and f"{float(x.max()):.4g}" in msg, msg
    # an old shard without a record: the argument is the declaration
    assert fid_from_shards(tmp_path / "old", ref, Projection(), value_range=(0, 255)) > 0
    generate_shards(lambda s: x[s] / 255 * 2 - 1, range(20), tmp_path / "pm1", progress=False)
    with pytest.raises(ValueError, match=r"outside the declared value_range \(0.0, 1.0\)"):
        fid_from_shards(tmp_path / "pm1", ref, Projection(), value_range=(0, 1))
    with pytest.raises(ValueError, match="value_range"):
        generate_shards(lambda s: x[s], range(4), tmp_path / "bad", progress=False, value_range=(1, 0))


def test_item03_runner_records_image_range(tmp_path):
    gmm = tmp_path / "gmm"
    runner.run(compose("solver=ddim", "nfe=2"), gmm, gmm / "results.csv")
    assert shard_record(gmm / "samples").value_range is None  # mixture samples are vectors, not images
    digits = tmp_path / "digits"
    runner.run(compose("model=digits", "solver=ddim", "nfe=2", "num_samples=16", "grid_size=4",
                       f"eval.cache_dir={tmp_path / 'cache'}"), digits, digits / "results.csv")
    assert shard_record(digits / "samples").value_range == (0.0, 1.0)  # decoded images
    assert shard_record(digits / "samples").dtype == "uint8"  # images stored as 0..255 (eval.shard_dtype=auto)
    x = torch.load(next((digits / "samples").glob("shard_*.pt")), weights_only=True)["samples"]
    assert x.dtype == torch.uint8
    x = x.float() / 255
    ref = stats_from_features(Projection()(torch.rand(100, 1, 16, 16, generator=torch.Generator().manual_seed(3))))
    ev = FIDEvaluator(Projection())
    ev.set_reference(ref)
    ev.update_fake(x)
    assert fid_from_shards(digits / "samples", ref, Projection()) == pytest.approx(ev.compute(), rel=1e-9)
    with pytest.raises(ValueError, match=r"contradicts the range \(0.0, 1.0\)"):
        fid_from_shards(digits / "samples", ref, Projection(), value_range=(-1, 1))


# ---------------------------------------------------------------------------------------------
# item 5: an unwritable results table is refused before any work; metrics.json is written first
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ["/proc/diffsampler_x.csv", "/proc/nope/r.csv"])
def test_item05_unwritable_results_file_refused(tmp_path, no_model, table):
    with pytest.raises(ConfigError) as e:
        runner.run(compose("solver=ddim", "nfe=2"), tmp_path / "run", Path(table))
    assert "results_file" in str(e.value) and table in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "samples").exists()


def test_item05_results_file_that_is_a_directory_refused(tmp_path, no_model):
    (tmp_path / "r.csv").mkdir()
    with pytest.raises(ConfigError, match=r"results_file .*r\.csv is a directory"):
        runner.run(compose("solver=ddim", "nfe=2"), tmp_path / "run", tmp_path / "r.csv")


def test_item05_metrics_json_written_before_the_row(tmp_path, monkeypatch):
    def fail(table, row):
        raise OSError("disk full")

    monkeypatch.setattr(runner, "append_row", fail)
    with pytest.raises(OSError, match="metrics.json"):
        runner.run(compose("solver=ddim", "nfe=2"), tmp_path, tmp_path / "results.csv")
    import json

    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["rmse"] > 0 and m["fingerprint"]["solver"]["name"] == "ddim"


# ---------------------------------------------------------------------------------------------
# item 6: negative seeds are refused up front
# ---------------------------------------------------------------------------------------------

def test_item06_negative_seed_refused_by_run(tmp_path, no_model):
    with pytest.raises(ConfigError, match=r"seed must be an integer >= 0, got -5"):
        runner.run(compose("seed=-5"), tmp_path, tmp_path / "results.csv")
    assert not (tmp_path / "samples").exists()


def test_item06_negative_seed_refused_by_generate_shards(tmp_path):
    calls = []
    with pytest.raises(ValueError, match=r"seeds must be integers >= 0.*-3"):
        generate_shards(seeded(calls), range(-3, 5), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"seeds must be integers >= 0.*1\.5"):
        generate_shards(seeded(calls), [0, 1.5], tmp_path, progress=False)
    assert calls == [] and not list(tmp_path.glob("shard_*"))
    with pytest.raises(ValueError, match=r"seeds must be integers >= 0.*-1"):
        shard_name([-1, 4])
