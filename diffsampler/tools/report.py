"""`diffsampler report DIR`: metric-vs-NFE plots and a markdown table from every results table under
a run or sweep directory.

Each column of the runner's row is one of: the x axis (`nfe`), a measured outcome (metrics, the
counted network calls), a timing, bookkeeping (where the run was written, how many processes shared
it: samples are per-seed, so the world size never changes one), or configuration. Everything that is
not in the first four classes is configuration, including columns this module does not know: an
unknown column splits rows instead of being averaged away. Each configuration whose columns differ
from another's gets its own table row and plot line; rows with the same run directory are one run
(the last row written wins), and rows of the same configuration from different run directories are
averaged and marked as such."""

from __future__ import annotations

from pathlib import Path

METRICS = ("fid_proxy", "fid", "kid", "rmse", "fd", "reward_mean", "target_share", "minority_top_share")
X = "nfe"
MEASURED = (*METRICS, "nfe_counted", "classifier_calls")
TIMINGS = ("wall_time_s", "load_time_s", "gen_time_s", "score_time_s")
BOOKKEEPING = ("run_dir", "world_size")
TABLE = "results.csv"


def _find_tables(d: Path) -> list[Path]:
    """Every results table under `d`, oldest write first (so later rows of a run dir win)."""
    found = sorted(d.rglob(TABLE), key=lambda p: (p.stat().st_mtime_ns, str(p)))
    if not found:
        raise FileNotFoundError(f"no {TABLE} under {d}")
    return found


def _read_table(path: Path):
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if X not in df.columns:
        raise ValueError(f"{path} has no {X!r} column (columns: {', '.join(df.columns)})")
    nfe = pd.to_numeric(df[X], errors="coerce")
    bad = df[X][nfe.isna() | (nfe != nfe.round())]
    if len(bad):
        raise ValueError(f"{path}: {X} must be an integer, got {bad.iloc[0]!r}")
    df[X] = nfe.astype(int)
    for m in MEASURED:
        if m in df.columns:
            df[m] = _numbers(df[m], path, m)
    return df


def _numbers(col, path: Path, name: str):
    """A measured column as floats; an empty cell is a missing value, any other non-number is refused."""
    import pandas as pd

    x = pd.to_numeric(col.replace("", None), errors="coerce")
    bad = col[x.isna() & (col != "") & (col.str.lower() != "nan")]
    if len(bad):
        raise ValueError(f"{path}: {name} must be a number, got {bad.iloc[0]!r} (row {bad.index[0] + 1})")
    return x


def _dedupe(df):
    """One row per run directory: the last one written."""
    if "run_dir" not in df.columns:
        return df
    run_dir = df["run_dir"].fillna("")
    earlier = run_dir.duplicated(keep="last") & (run_dir != "")
    return df[~earlier].reset_index(drop=True)


def _config_columns(df) -> list[str]:
    other = {X, *MEASURED, *TIMINGS, *BOOKKEEPING}
    return [c for c in df.columns if c not in other]


def _load(d: Path):
    """All rows under `d` (missing cells as ''), de-duplicated by run directory; and the files read."""
    import pandas as pd

    files = _find_tables(d)
    df = pd.concat([_read_table(f) for f in files], ignore_index=True)
    config = _config_columns(df)
    df[config] = df[config].fillna("").astype(str)
    return _dedupe(df), len(df), files


def _label_columns(df, config: list[str]) -> list[str]:
    varying = [c for c in config if df[c].nunique() > 1]
    if varying:
        return varying
    return ["solver"] if "solver" in config else config[:1]


def _label(values: tuple, cols: list[str]) -> str:
    if len(cols) == 1:
        return str(values[0])
    return ", ".join(f"{c}={v}" for c, v in zip(cols, values))


def _pivot(df, metric: str, cols: list[str]):
    """Mean and run count of `metric` per configuration (rows) and NFE (columns)."""
    g = df[df[metric].notna()].groupby([*cols, X], sort=True)[metric].agg(["mean", "count"])
    return g["mean"].unstack(X).sort_index(axis=1), g["count"].unstack(X).sort_index(axis=1)


def _cell(v: float, n: float) -> str:
    if v != v:
        return ""
    return f"{v:.4g}" if n <= 1 else f"{v:.4g} (mean of {int(n)})"


def _md_table(mean, count, cols: list[str]) -> list[str]:
    def esc(s) -> str:
        return str(s).replace("|", "\\|")

    head = ["| " + " | ".join(cols) + " | " + " | ".join(f"NFE {c}" for c in mean.columns) + " |",
            "|" + " --- |" * len(cols) + " ---: |" * len(mean.columns)]
    rows = []
    for key, row in mean.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        cells = [_cell(v, n) for v, n in zip(row.values, count.loc[row.name].values)]
        rows.append("| " + " | ".join(esc(k) for k in key) + " | " + " | ".join(cells) + " |")
    return head + rows


def _plot(mean, cols: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, row in mean.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        y = row.dropna()
        ax.plot(list(y.index), y.values, marker="o", label=_label(key, cols))
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    if (mean.stack() > 0).all():
        ax.set_yscale("log")
    ax.set_xticks(list(mean.columns))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _header(d: Path, df, n_read: int, files: list[Path], config: list[str], cols: list[str]) -> list[str]:
    common = [f"{c}={df[c].iloc[0]}" for c in config if c not in cols and df[c].iloc[0] != ""]
    md = [f"# diffsampler report: {d}", "",
          f"{len(df)} runs from {len(files)} table(s): " + ", ".join(str(f.relative_to(d)) for f in files)]
    if n_read > len(df):
        md.append(f"{n_read - len(df)} earlier row(s) of a rerun run directory dropped (the last row wins).")
    if common:
        md.append("Common to all runs: " + ", ".join(common))
    return md + [""]


def report(d: Path) -> str:
    """Write report.md and report_<metric>.png into `d`; return the markdown."""
    d = Path(d)
    df, n_read, files = _load(d)
    metrics = [m for m in METRICS if m in df.columns and df[m].notna().any()]
    if not metrics:
        raise ValueError(f"results in {d} have no metric columns ({', '.join(METRICS)})")
    config = _config_columns(df)
    cols = _label_columns(df, config)
    if not cols:
        df, cols = df.assign(runs="all"), ["runs"]
    md = _header(d, df, n_read, files, config, cols)
    for m in metrics:
        mean, count = _pivot(df, m, cols)
        md += [f"## {m}", "", *_md_table(mean, count, cols), ""]
        _plot(mean, cols, m, d / f"report_{m}.png")
        md += [f"![{m} vs NFE](report_{m}.png)", ""]
    text = "\n".join(md)
    (d / "report.md").write_text(text)
    return text
