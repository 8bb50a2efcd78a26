"""The Hydra app: sweeps write one tidy table, `report` plots it, bad configs fail before any work."""

import re
import subprocess
import sys

import pandas as pd
import pytest


def cli(*args, cwd=None, check=True):
    r = subprocess.run([sys.executable, "-m", "diffsampler", *args], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"diffsampler {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def test_sweep_writes_one_row_per_job_and_report_plots(tmp_path):
    sweep = tmp_path / "sweep"
    cli("-m", "model=gmm", "solver=ddim,dpmpp_2m", "nfe=5,10", "num_samples=64", "shard_size=32",
        "progress=false", f"hydra.sweep.dir={sweep}")
    df = pd.read_csv(sweep / "results.csv")
    assert len(df) == 4
    for col in ("model", "solver", "solver_options", "nfe", "nfe_counted", "spacing", "final", "guidance",
                "num_samples", "seeds", "rmse", "fd", "wall_time_s"):
        assert col in df.columns, col
    assert sorted(zip(df.solver, df.nfe)) == [("ddim", 5), ("ddim", 10), ("dpmpp_2m", 5), ("dpmpp_2m", 10)]
    assert (df.nfe == df.nfe_counted).all() and (df.seeds == "0-63").all()
    for solver in ("ddim", "dpmpp_2m"):  # more NFE, closer to the exact ODE solution
        s = df[df.solver == solver].sort_values("nfe")
        assert s.rmse.iloc[1] < s.rmse.iloc[0]
    out = cli("report", str(sweep)).stdout
    assert (sweep / "report_rmse.png").stat().st_size > 1000 and (sweep / "report.md").exists()
    assert (sweep / "report_samples_gmm.png").stat().st_size > 1000  # the scatter matrix of the same seeds
    html = (sweep / "report.html").read_text()
    assert all(f"<img src='{f}'" in html for f in ("report_rmse.png", "report_fd.png", "report_samples_gmm.png"))
    assert "| dpmpp_2m |" in out and "NFE 10" in out


def test_single_run_with_solver_options(tmp_path):
    run = tmp_path / "run"
    cli("solver=ddim", "+solver.options.eta=1.0", "nfe=8", "num_samples=32", "progress=false", f"hydra.run.dir={run}")
    df = pd.read_csv(run / "results.csv")
    assert len(df) == 1 and df.solver_options[0] == '{"eta": 1.0}'


@pytest.mark.parametrize("args,message", [
    (["solver=nope"], "solver/nope"),
    (["nfe=0"], "nfe must be an integer >= 1, got 0"),
    (["num_samples=-1"], "num_samples must be an integer >= 1"),
    (["model=diffusers", "model.path=/does/not/exist"], "model.path '/does/not/exist' does not exist"),
    (["model=nope"], "model/nope"),
    (["solver=dpmpp_2m", "+solver.options.order=7"], "solver 'dpmpp_2m': order must be an integer in 1..3, got 7"),
    (["guidance=minority"], "guidance=minority needs an image model"),
    (["model=digits", "guidance=minority", "guidance.scale=-2"], "guidance.scale must be a number >= 0, got -2"),
    (["model=digits", "guidance=minority", "guidance.classifier=/nope"], "guidance.classifier: no config.json in /nope"),
    (["model=digits", "guidance=svdd", "solver=dpmpp_2m"], "guidance=svdd draws candidates from a stochastic solver"),
    (["model=digits", "guidance=svdd", "solver=dpmpp_2m_sde", "guidance.num_candidates=0"],
     "guidance.num_candidates must be an integer >= 1, got 0"),
    (["guidance=svdd", "solver=dpmpp_2m_sde", "guidance.reward=jpeg"], "guidance.reward='jpeg' is not available for model=gmm"),
])
def test_bad_configs_fail_before_any_work(tmp_path, args, message):
    run = tmp_path / "run"
    r = cli(*args, f"hydra.run.dir={run}", check=False)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert not (run / "samples").exists()


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_module

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from diffsampler.cli import _register_solver_configs

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        slurm = compose("config", overrides=["+launcher=slurm"], return_hydra_config=True)
        assert "submitit" in slurm.hydra.launcher._target_ and slurm.hydra.launcher.timeout_min == 120
        opt = compose("config", overrides=["+launcher=optuna"], return_hydra_config=True)
        assert "optuna" in opt.hydra.sweeper._target_ and opt.hydra.sweeper.direction == "minimize"


def test_momentum_ghvb_and_time_shift_from_the_command_line(tmp_path):
    run = tmp_path / "ts"
    cli("solver=ghvb", "+solver.options.order=1.5", "time_shift={window:10,cutoff:300}", "nfe=6", "num_samples=32",
        "progress=false", f"hydra.run.dir={run}")
    df = pd.read_csv(run / "results.csv")
    assert df.solver[0] == "ghvb" and df.solver_options[0] == '{"order": 1.5}'
    assert df.time_shift[0] == '{"cutoff": 300, "window": 10}'
    r = cli("time_shift={window:0}", f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert r.returncode != 0 and re.search(r"time_shift: time_shift window must be an integer >= 2 .*, got 0", r.stderr)


def test_minority_guidance_on_digits_from_the_command_line(tmp_path):
    """guidance=minority with the packaged digits minority classifier: the row records the network
    calls per sample (unchanged by classifier guidance), the classifier calls, and the share of samples
    in the real data's top minority-score decile."""
    run = tmp_path / "run"
    cli("model=digits", "guidance=minority", "guidance.scale=2.0", "solver=ddim", "nfe=5", "num_samples=16",
        "batch_size=16", "progress=false", "eval.feature=digits", f"hydra.run.dir={run}")
    df = pd.read_csv(run / "results.csv")
    assert df.nfe_counted[0] == 5 and df.classifier_calls[0] == 5
    assert 0.0 <= df.minority_top_share[0] <= 1.0
    assert df.guidance[0].startswith("minority")


def test_svdd_from_the_command_line(tmp_path):
    """guidance=svdd on the exact mixture (reward: minus the distance to the first mean): the table
    records the measured model calls (M = 4 candidates valued by one call each at the 5 steps that
    do not end at sigma = 0: 1 + 4 * 5 = 21 for 6 steps; M = 1 is the plain solver's 6), and the mean
    reward rises over M = 1 with the same seeds."""
    rows = {}
    for m in (1, 4):
        run = tmp_path / f"m{m}"
        cli("guidance=svdd", f"guidance.num_candidates={m}", "solver=dpmpp_2m_sde", "nfe=6", "num_samples=64",
            "progress=false", f"hydra.run.dir={run}")
        rows[m] = pd.read_csv(run / "results.csv").iloc[0]
    assert rows[1].nfe_counted == 6 and rows[4].nfe_counted == 21
    assert rows[4].reward_mean > rows[1].reward_mean + 0.1, (rows[1].reward_mean, rows[4].reward_mean)


def test_svdd_on_digits_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    cli("model=digits", "guidance=svdd", "guidance.target=7", "solver=ddim", "+solver.options.eta=1.0", "nfe=6",
        "num_samples=16", "batch_size=16", "progress=false", "eval.feature=digits", f"hydra.run.dir={run}")
    row = pd.read_csv(run / "results.csv").iloc[0]
    assert row.nfe_counted == 21 and 0.0 <= row.target_share <= 1.0 and row.reward_mean <= 0.0
