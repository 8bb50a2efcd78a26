"""`diffsampler report DIR`: metric-vs-NFE plots (one line per solver) and a markdown table from the
results table of a run or sweep."""

from __future__ import annotations

from pathlib import Path

METRICS = ("fid_proxy", "fid", "kid", "rmse", "fd")


def _find_table(d: Path) -> Path:
    for name in ("results.csv",):
        if (d / name).exists():
            return d / name
    found = sorted(d.rglob("results.csv"))
    if not found:
        raise FileNotFoundError(f"no results.csv under {d}")
    return found[0]


def report(d: Path) -> str:
    """Write report.md and report_<metric>.png into `d`; return the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    d = Path(d)
    df = pd.read_csv(_find_table(d))
    metrics = [m for m in METRICS if m in df.columns]
    if not metrics:
        raise ValueError(f"results in {d} have no metric columns ({METRICS})")
    label = df["solver"] + df["solver_options"].fillna("{}").map(lambda o: "" if o in ("{}", "") else " " + o)
    df = df.assign(label=label)
    md = [f"# diffsampler report: {d}", ""]
    for m in metrics:
        table = df.pivot_table(index="label", columns="nfe", values=m, aggfunc="mean").sort_index()
        md += [f"## {m}", "", "| solver | " + " | ".join(f"NFE {c}" for c in table.columns) + " |",
               "| --- |" + " ---: |" * len(table.columns)]
        md += ["| " + idx + " | " + " | ".join(f"{v:.4g}" for v in row) + " |" for idx, row in table.iterrows()]
        md.append("")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for idx, row in table.iterrows():
            ax.plot(table.columns, row.values, marker="o", label=idx)
        ax.set_xlabel("NFE")
        ax.set_ylabel(m)
        ax.set_yscale("log")
        ax.set_xticks(list(table.columns))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(d / f"report_{m}.png", dpi=120)
        plt.close(fig)
        md.append(f"![{m} vs NFE](report_{m}.png)")
        md.append("")
    text = "\n".join(md)
    (d / "report.md").write_text(text)
    return text
