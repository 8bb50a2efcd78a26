"""Issue 18 item 4: `report` shows the samples -- an image matrix of the same seeds across
configurations x NFE read from the runs' shards (a scatter matrix for vector samples), each search
run's convergence plot and table -- on one page (report.md / report.html) that references every
file it wrote."""

import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from diffsampler.eval.generate import load_shards
from diffsampler.tools import report as rep
from diffsampler.tools.runner import execute
from diffsampler.tools.run_checks import validate


def _composed(*overrides):
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        return compose("config", overrides=list(overrides))


def _sweep(root: Path, model: str, solvers, nfes, *extra) -> list[Path]:
    """A small sweep through the runner itself (shards, rows in one results.csv), in this process."""
    dirs = []
    for solver in solvers:
        for nfe in nfes:
            d = root / f"{solver}_{nfe}"
            execute(validate(_composed(f"model={model}", f"solver={solver}", f"nfe={nfe}", "progress=false", *extra)),
                    d, root / "results.csv")
            dirs.append(d)
    return dirs


def _capture(monkeypatch, name):
    seen = []
    real = getattr(rep, name)
    monkeypatch.setattr(rep, name, lambda *a, **k: seen.append((a, k, real(*a, **k))) or seen[-1][2])
    return seen


def _pages_reference_every_file(d: Path):
    md, html = (d / "report.md").read_text(), (d / "report.html").read_text()
    md_refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    html_refs = re.findall(r"<img src='([^']+)'", html)
    assert md_refs and md_refs == html_refs
    for ref in md_refs:
        assert (d / unquote(ref)).is_file(), ref
    written = {p.name for p in d.glob("report_*.png")}
    assert written <= {Path(r).name for r in md_refs if "/" not in r}, written
    return md_refs


def test_image_matrix_of_a_digits_sweep_shows_the_same_seeds_upscaled(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    dirs = _sweep(root, "digits", ["ddim", "dpmpp_2m"], [2, 3], "num_samples=12", "batch_size=12", "shard_size=5")
    # a run drawing other seeds (its own row): the matrix keeps to the seeds every run has (4..11)
    execute(validate(_composed("model=digits", "solver=ddim", "nfe=4", "num_samples=12", "seed=4", "progress=false")),
            root / "ddim_4", root / "results.csv")
    seen = _capture(monkeypatch, "image_matrix")
    md = rep.report(root)
    (cells, rows, cols, path), _, lay = seen[0]
    assert rows == ["solver=ddim, seeds=0-11", "solver=ddim, seeds=4-15", "solver=dpmpp_2m, seeds=0-11"]
    assert cols == ["NFE 2", "NFE 3", "NFE 4"]
    assert lay["rows"] == rows and lay["cols"] == cols
    assert lay["scale"] == 4 and lay["image"] == (64, 64) and lay["per_cell"] == 8  # 16x16 digits, x4
    assert lay["per_row"] == 8  # three columns: the eight seeds in one line per cell
    img = np.asarray(Image.open(path).convert("L"))
    x0, y0 = lay["origin"]
    px, py = lay["pitch"]
    w = 8 * 64 + 7 * lay["gap"]
    assert img.shape == (lay["size"][1], lay["size"][0]) == (y0 + 3 * py, x0 + 3 * px)
    assert px == w + 10 and py == 64 + 10
    # labels are drawn: dark text left of each row and above each column, on white
    for i in range(3):
        assert img[y0 + i * py:y0 + i * py + 64, :x0].min() < 100
    for j in range(3):
        assert img[:y0, x0 + j * px:x0 + j * px + w].min() < 100
    # cell (r, c), image k = seed 4 + k of that run, repeated 4x4 (nearest neighbour), from the shards
    runs = {(0, 0): dirs[0], (0, 1): dirs[1], (1, 2): root / "ddim_4", (2, 0): dirs[2], (2, 1): dirs[3]}
    for (r, c), d in runs.items():
        _, x = load_shards(d / "samples", list(range(4, 12)))
        for k in range(8):
            want = np.kron((x[k, 0].clamp(0, 1) * 255).round().numpy(), np.ones((4, 4)))
            top, left = y0 + r * py, x0 + c * px + k * (64 + lay["gap"])
            np.testing.assert_array_equal(img[top:top + 64, left:left + 64], want.astype(np.uint8))
    for r, c in ((0, 2), (1, 0), (1, 1), (2, 2)):  # configurations that never ran at that NFE: blank
        assert (img[y0 + r * py:y0 + r * py + 64, x0 + c * px:x0 + c * px + w] == 255).all()
    assert "seeds 4..11 in every cell" in md and "## samples: model=digits" in md
    refs = _pages_reference_every_file(root)
    assert "report_samples_digits.png" in refs and "report_fid_proxy.png" in refs


def test_scatter_matrix_of_mixture_runs_and_a_lost_run_is_named(tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "sweep"
    dirs = _sweep(root, "gmm", ["ddim", "dpmpp_2m"], [3, 5], "num_samples=40", "model.dim=2")
    shutil.rmtree(dirs[3] / "samples")  # dpmpp_2m at NFE 5: its shards are gone
    seen = _capture(monkeypatch, "scatter_matrix")
    md = rep.report(root)
    (cells, rows, cols, path), _, fig = seen[0]
    assert rows == ["ddim", "dpmpp_2m"] and cols == ["NFE 3", "NFE 5"] and path.exists()
    axes = fig.axes
    assert len(axes) == 4
    assert [a.get_title() for a in axes[:2]] == cols and [axes[0].get_ylabel(), axes[2].get_ylabel()] == rows
    for a, d in zip(axes[:3], dirs[:3]):
        _, x = load_shards(d / "samples")
        np.testing.assert_allclose(a.collections[0].get_offsets(), x[:, :2].double().numpy(), rtol=1e-6)
    assert not axes[3].collections  # the lost run: an empty panel, named on the page
    assert f"dpmpp_2m NFE 5 ({dirs[3]}/samples not found)" in md
    _pages_reference_every_file(root)


def test_search_run_convergence_and_table_on_the_page(tmp_path):
    """A sweep folder holding a search run (as search_job writes it) and runs: the page shows the
    search's convergence plot and comparison table next to the runs' sections."""
    from diffsampler.tools.runner import append_row
    from diffsampler.tools.search_job import _write_convergence

    s = tmp_path / "0_search.nfe=5"
    s.mkdir()
    _write_convergence(s, [{"evaluations": 1, "best_calib": 0.5, "verify": 0.6, "key": "a"},
                           {"evaluations": 9, "best_calib": 0.2, "verify": 0.25, "key": "b"}], "rmse")
    (s / "summary.json").write_text('{"name": "gmm_nfe5", "nfe": 5, "metric": "rmse", "calib_score": 0.2, '
                                    '"verify_score": 0.25, "evaluations": 9}')
    (s / "comparison.md").write_text("# gmm_nfe5: search.metric=rmse\n\n| method | spacing | score | plan / this |\n"
                                     "|---|---|---|---|\n| searched plan gmm_nfe5 | plan | 0.2 | 1.000 |\n")
    md = rep.report(tmp_path)  # a folder with only a search run
    assert "## search: gmm_nfe5 (0_search.nfe=5)" in md and "![convergence of gmm_nfe5](0_search.nfe=5/convergence.png)" in md
    assert "| searched plan gmm_nfe5 | plan | 0.2 | 1.000 |" in md
    html = (tmp_path / "report.html").read_text()
    assert "<td>searched plan gmm_nfe5</td>" in html
    _pages_reference_every_file(tmp_path)
    append_row(tmp_path / "results.csv", {"model": "gmm", "solver": "ddim", "nfe": 5, "rmse": 0.3,
                                          "run_dir": str(tmp_path / "gone")})
    md = rep.report(tmp_path)
    assert "## rmse" in md and "## search: gmm_nfe5" in md and "No sample shards found for the 1 run(s)" in md
    refs = _pages_reference_every_file(tmp_path)
    assert refs == ["report_rmse.png", "0_search.nfe=5/convergence.png"]


def test_report_refuses_a_folder_with_nothing_to_show(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.csv .* or summary.json"):
        rep.report(tmp_path)
