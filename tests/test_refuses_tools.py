"""Tools above the library refuse what they cannot honour: `report` keeps every configuration that
varies apart, a search log resumes past an interrupted write but names any other damage, and data
files are loaded without executing pickles."""

import json
import re
import time

import pytest
import torch

from diffsampler.tools.report import report
from diffsampler.tools.runner import append_row


def _row(run_dir, rmse, solver="ddim", nfe=5, spacing="logsnr", final="zero", **kw):
    """A row shaped like the one `runner.run` appends."""
    row = {"model": "gmm", "solver": solver, "solver_options": "{}", "nfe": nfe, "nfe_counted": nfe,
           "spacing": spacing, "final": final, "guidance": "none", "time_shift": "", "num_samples": 64,
           "seeds": "0-63", "rng_device": "cpu", "rmse": rmse, "fd": 2 * rmse, "wall_time_s": time.time() % 7,
           "gen_time_s": 0.1, "world_size": 1, "run_dir": str(run_dir)}
    row.update(kw)
    return row


def _section(text, metric):
    """The markdown table lines of one metric."""
    block = text.split(f"## {metric}\n", 1)[1].split("\n## ", 1)[0]
    return [l for l in block.splitlines() if l.startswith("|")]


def test_item07_report_keeps_spacings_apart(tmp_path):
    for i, (spacing, nfe, rmse) in enumerate([("logsnr", 5, 0.1), ("time_uniform", 5, 0.3),
                                              ("logsnr", 10, 0.05), ("time_uniform", 10, 0.2)]):
        append_row(tmp_path / "results.csv", _row(tmp_path / str(i), rmse, nfe=nfe, spacing=spacing))
    lines = _section(report(tmp_path), "rmse")
    assert lines[0] == "| spacing | NFE 5 | NFE 10 |"
    assert "| logsnr | 0.1 | 0.05 |" in lines
    assert "| time_uniform | 0.3 | 0.2 |" in lines
    assert len(lines) == 4


def test_item07_report_one_column_per_varying_key(tmp_path):
    rows = [("ddim", "zero", 0.4), ("ddim", "last", 0.5), ("dpmpp_2m", "zero", 0.1), ("dpmpp_2m", "last", 0.2)]
    for i, (solver, final, rmse) in enumerate(rows):
        append_row(tmp_path / "results.csv", _row(tmp_path / str(i), rmse, solver=solver, final=final))
    lines = _section(report(tmp_path), "rmse")
    assert lines[0] == "| solver | final | NFE 5 |"
    for solver, final, rmse in rows:
        assert f"| {solver} | {final} | {rmse:.4g} |" in lines


def test_item07_report_reads_every_results_csv(tmp_path):
    append_row(tmp_path / "a" / "results.csv", _row(tmp_path / "a" / "0", 0.7, final="zero"))
    append_row(tmp_path / "b" / "deeper" / "results.csv", _row(tmp_path / "b" / "0", 0.9, final="last"))
    lines = _section(report(tmp_path), "rmse")
    assert "| zero | 0.7 |" in lines and "| last | 0.9 |" in lines


def test_item07_report_rerun_row_counted_once_last_wins(tmp_path):
    table = tmp_path / "results.csv"
    append_row(table, _row(tmp_path / "0", 0.5))
    append_row(table, _row(tmp_path / "1", 0.3, solver="dpmpp_2m"))
    append_row(table, _row(tmp_path / "0", 0.25))  # the same run dir, run again
    lines = _section(report(tmp_path), "rmse")
    assert "| ddim | 0.25 |" in lines and "| dpmpp_2m | 0.3 |" in lines
    assert len(lines) == 4


def test_item07_report_same_config_in_two_dirs_is_marked_as_mean(tmp_path):
    append_row(tmp_path / "results.csv", _row(tmp_path / "0", 0.2))
    append_row(tmp_path / "results.csv", _row(tmp_path / "1", 0.4))
    lines = _section(report(tmp_path), "rmse")
    assert "| ddim | 0.3 (mean of 2) |" in lines


def test_item07_report_plot_has_one_line_per_configuration(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: figs.append(real(*a, **k)) or figs[-1])
    for i, (spacing, guidance, rmse) in enumerate([("logsnr", "none", 0.1), ("time_uniform", "none", 0.3),
                                                   ("logsnr", "cfg", 0.2)]):
        append_row(tmp_path / "results.csv", _row(tmp_path / str(i), rmse, spacing=spacing, guidance=guidance))
    report(tmp_path)
    _, ax = figs[0]  # rmse, the first metric
    labels = sorted(l.get_label() for l in ax.get_lines())
    assert labels == ["spacing=logsnr, guidance=cfg", "spacing=logsnr, guidance=none",
                      "spacing=time_uniform, guidance=none"]
    assert (tmp_path / "report_rmse.png").exists() and (tmp_path / "report_fd.png").exists()


def test_item07_report_refuses_a_table_without_nfe(tmp_path):
    (tmp_path / "results.csv").write_text("solver,rmse\nddim,0.1\n")
    with pytest.raises(ValueError, match=r"results.csv.*'nfe'"):
        report(tmp_path)
    (tmp_path / "results.csv").write_text("solver,nfe,rmse\nddim,5,0.1\nddim,10,oops\n")
    with pytest.raises(ValueError, match=r"results.csv: rmse must be a number, got 'oops' \(row 2\)"):
        report(tmp_path)


# --- search log -------------------------------------------------------------------------------

def _tiny_search(log, budget=8):
    import diffsampler as ds
    from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
    from diffsampler.tools.search import search

    gmm = GaussianMixture.random(8, 4, seed=0, scale=1.5, std=(0.3, 0.6))
    sch = ds.DiscreteVP.linear()
    aT, sT = float(sch.alpha(sch.t_max)), float(sch.sigma(sch.t_max))
    return search(gmm_denoiser(gmm, sch, "epsilon"), 3, shape=(8,), n_calib=16, n_verify=2, budget=budget,
                  reference=lambda x: gmm.ode_endpoint(x.double(), aT, sT, 1.0, 0.0), dtype=torch.float64,
                  progress=False, log=log)


def test_item10_truncated_last_line_is_skipped_with_warning(tmp_path):
    log = tmp_path / "s.jsonl"
    first = _tiny_search(log)
    full = log.read_text()
    lines = full.splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the interrupted write
    with pytest.warns(UserWarning, match=rf"{re.escape(log.name)}.*line {len(lines)}"):
        again = _tiny_search(log)
    assert again.plan == first.plan and again.model_calls <= 3 * 3  # only the lost evaluation is redone
    assert all(json.loads(l) for l in log.read_text().splitlines())  # the partial line is gone, appends are whole


def _log_lines(tmp_path):
    from diffsampler.tools.search_log import SearchLog as _Log

    log = tmp_path / "s.jsonl"
    book = _Log(log, {"nfe": 3})
    book._append({"type": "eval", "phase": "calib", "key": "a", "score": 0.5, "seconds": 0.1, "plan": {}})
    book._append({"type": "eval", "phase": "calib", "key": "b", "score": None, "seconds": 0.1, "plan": {}})
    return log, log.read_text().splitlines()


def test_item10_log_reads_back_its_records(tmp_path):
    import math

    from diffsampler.tools.search_log import SearchLog as _Log

    log, _ = _log_lines(tmp_path)
    assert _Log(log, {"nfe": 3}).cache == {("calib", "a"): 0.5, ("calib", "b"): math.inf}


def test_item10_complete_last_line_without_newline_is_kept(tmp_path):
    from diffsampler.tools.search_log import SearchLog as _Log

    log, lines = _log_lines(tmp_path)
    log.write_text("\n".join(lines))  # the last record is whole, only its newline is missing
    book = _Log(log, {"nfe": 3})
    assert ("calib", "b") in book.cache
    book._append({"type": "eval", "phase": "verify", "key": "a", "score": 0.4, "seconds": 0.1, "plan": {}})
    assert _Log(log, {"nfe": 3}).cache[("verify", "a")] == 0.4


def test_item10_first_line_must_be_the_config(tmp_path):
    from diffsampler.tools.search_log import SearchLog as _Log

    log, lines = _log_lines(tmp_path)
    log.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))} is not a search log \(line 1 is not a config line\)"):
        _Log(log, {"nfe": 3})


def test_item10_damaged_middle_line_names_file_and_line(tmp_path):
    from diffsampler.tools.search_log import SearchLog as _Log

    log, lines = _log_lines(tmp_path)
    lines[1] = lines[1][:20]
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))}.* line 2: not valid JSON"):
        _Log(log, {"nfe": 3})


@pytest.mark.parametrize("record,message", [
    ({"type": "eval", "phase": "calib", "score": 0.1}, "missing 'key'"),
    ({"type": "eval", "phase": "calib", "key": "c", "score": "x"}, "'score' must be a number or null"),
    ({"type": "evaluation", "phase": "calib", "key": "c", "score": 0.1}, "unknown record type 'evaluation'"),
    ([1, 2], "expected a JSON object"),
])
def test_item10_malformed_record_names_file_line_and_field(tmp_path, record, message):
    from diffsampler.tools.search_log import SearchLog as _Log

    log, lines = _log_lines(tmp_path)
    lines.insert(2, json.dumps(record))
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))}.* line 3: .*{message}"):
        _Log(log, {"nfe": 3})


def test_item10_log_of_another_search_names_file_and_difference(tmp_path):
    from diffsampler.tools.search_log import SearchLog as _Log

    log, _ = _log_lines(tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))} was written by a different search \(line 1.*nfe: 3 vs 4"):
        _Log(log, {"nfe": 4})


# --- data files --------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_item17_malicious_pickle_in_data_is_refused_not_executed(tmp_path):
    from diffsampler.tools.minority_classifier import load_data as _load_data

    marker, data = tmp_path / "pwned", tmp_path / "x.pt"
    torch.save({"x": torch.zeros(2), "payload": _Payload(marker)}, data)
    with pytest.raises(ValueError, match=rf"{re.escape(str(data))}.*weights_only"):
        _load_data(str(data))
    assert not marker.exists()


def test_item17_cli_refuses_malicious_data_before_loading_a_model(tmp_path, monkeypatch):
    from diffsampler.tools import minority_classifier as minority

    marker, data = tmp_path / "pwned", tmp_path / "x.pt"
    torch.save(_Payload(marker), data)
    monkeypatch.setattr("diffsampler.eval.digits.load_digits_pipeline",
                        lambda: pytest.fail("the pipeline was loaded before the data was checked"))
    with pytest.raises(ValueError, match=re.escape(str(data))):
        minority.build_from_args(["--data", str(data), "--out", str(tmp_path / "clf")])
    assert not marker.exists()


def test_item17_object_npy_is_refused(tmp_path):
    import numpy as np

    from diffsampler.tools.minority_classifier import load_data as _load_data

    data = tmp_path / "x.npy"
    np.save(data, np.array([_Payload(tmp_path / "pwned")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=rf"{re.escape(str(data))}.*pickle"):
        _load_data(str(data))
    assert not (tmp_path / "pwned").exists()


def test_item17_data_loads_tensors_and_arrays(tmp_path):
    import numpy as np

    from diffsampler.tools.minority_classifier import load_data as _load_data

    torch.save(torch.ones(3, 2), tmp_path / "x.pt")
    np.save(tmp_path / "y.npy", np.zeros((2, 2), dtype=np.float32))
    assert _load_data(str(tmp_path / "x.pt")).shape == (3, 2)
    assert _load_data(str(tmp_path / "y.npy")).dtype == torch.float32
    (tmp_path / "z.txt").write_text("1 2")
    with pytest.raises(ValueError, match=r"z.txt.*\.pt or \.npy"):
        _load_data(str(tmp_path / "z.txt"))
    torch.save({"a": torch.ones(1)}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"d.pt.*a tensor.*dict"):
        _load_data(str(tmp_path / "d.pt"))


def test_item17_no_unsafe_loads_in_sources():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = []
    for d in ("diffsampler", "scripts", "benchmarks"):
        for f in (root / d).rglob("*.py"):
            text = f.read_text()
            for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
                if "weights_only=True" not in m.group(0):
                    bad.append(f"{f.relative_to(root)}: {m.group(0)}")
            for pat in (r"allow_pickle\s*=\s*True", r"\bpickle\.loads?\(", r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)"):
                bad += [f"{f.relative_to(root)}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert not bad, bad


def test_item07_cli_report_refuses_a_bad_table_in_one_line(tmp_path):
    """`diffsampler report` on a table it cannot read: exit 2 and one line naming the file, no traceback."""
    import subprocess
    import sys

    (tmp_path / "results.csv").write_text("solver,rmse\nddim,1\n")
    r = subprocess.run([sys.executable, "-m", "diffsampler", "report", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{tmp_path / 'results.csv'} has no 'nfe' column" in r.stderr
