"""Item 6 of issue 18: a sweep's jobs in one process load the pipeline and the FID feature network
once per model config (not once per job), and every row records load, generation and scoring times
separately."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

from diffsampler.tools import runner

# Runs `diffsampler -m ...` in-process (Hydra's basic launcher: every job in this one process) with
# the real loaders wrapped by counters, and prints the counts.
_COUNTING = textwrap.dedent("""
    import json, sys
    from collections import Counter
    import diffsampler.eval.digits as digits
    from diffsampler.cli import main

    counts = Counter()
    def counting(kind, fn):
        def wrapped(*a, **k):
            counts[kind] += 1
            return fn(*a, **k)
        return wrapped
    digits.load_digits_pipeline = counting("pipeline", digits.load_digits_pipeline)
    digits.load_digits_classifier = counting("feature", digits.load_digits_classifier)  # the FID-proxy's network
    main(sys.argv[1:])
    print("LOADS=" + json.dumps(counts))
""")


def _sweep(tmp_path, *overrides):
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-c", _COUNTING, "-m", "model=digits", "solver=ddim", "num_samples=8",
                        "batch_size=8", "progress=false", f"hydra.sweep.dir={sweep}", *overrides],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    loads = json.loads(r.stdout.split("LOADS=")[-1])
    rows = pd.read_csv(sweep / "results.csv")
    timings = [json.loads((Path(d) / "metrics.json").read_text())["timing"] for d in rows.run_dir]
    return loads, rows, timings


def test_sweep_loads_once_per_model_config_and_times_each_phase(tmp_path):
    """Six jobs of one process, three on each of two model configs (two copies of the packaged
    digits pipeline): the pipeline is loaded twice, once per config, the feature network once; the
    rows' load time drops to (near) nothing after a job that loaded."""
    a, b = tmp_path / "a", tmp_path / "b"
    from diffsampler.eval.digits import ASSET_DIR

    for d in (a, b):
        shutil.copytree(ASSET_DIR / "ddpm", d)
    loads, rows, timings = _sweep(tmp_path, f"model.path={a},{b}", "nfe=1,2,3")
    assert len(rows) == 6 and sorted(rows.nfe.tolist()) == [1, 1, 2, 2, 3, 3]
    paths = [json.loads((Path(d) / "metrics.json").read_text())["fingerprint"]["model"]["path"]
             for d in rows.run_dir]
    changed = [i == 0 or paths[i] != paths[i - 1] for i in range(len(paths))]
    assert sum(changed) == 2  # the sweep runs one config's three jobs, then the other's
    assert loads == {"pipeline": 2, "feature": 1}
    assert [t["loaded_now"]["pipeline"] for t in timings] == changed
    assert [t["loaded_now"]["feature"] for t in timings] == [True] + [False] * 5
    for col in ("load_time_s", "gen_time_s", "score_time_s", "wall_time_s"):
        assert (rows[col] >= 0).all(), col
    assert (rows.wall_time_s >= rows.load_time_s + rows.gen_time_s + rows.score_time_s - 1e-2).all()
    # the first job pays the imports and both loads; a kept pipeline costs next to nothing
    kept = rows.load_time_s[[not c for c in changed]]
    assert kept.max() < rows.load_time_s.iloc[0] and kept.max() < 1.0


def test_cache_rebuilds_on_another_key_and_drops_the_old_object():
    runner.clear_cache()
    built = []

    def build(tag):
        built.append(tag)
        return object()

    x, new = runner.cached("pipeline", {"model": {"name": "digits", "path": None}}, lambda: build("a"))
    y, again = runner.cached("pipeline", {"model": {"path": None, "name": "digits"}}, lambda: build("b"))
    assert new and not again and y is x and built == ["a"]  # key order does not matter
    z, other = runner.cached("pipeline", {"model": {"name": "digits", "path": "/elsewhere"}}, lambda: build("c"))
    assert other and z is not x and built == ["a", "c"]
    w, back = runner.cached("pipeline", {"model": {"name": "digits", "path": None}}, lambda: build("d"))
    assert back and w is not x  # one object per kind is kept: the first was dropped
    f, fnew = runner.cached("feature", {"feature": "digits"}, lambda: build("f"))
    assert fnew and runner.cached("pipeline", {"model": {"name": "digits", "path": None}}, lambda: build("e"))[0] is w
    runner.clear_cache()
