"""`diffsampler report DIR`: one page (report.md and report.html, side by side in DIR) with a table
and a metric-vs-NFE plot per metric from every results table under a run or sweep directory, an image
matrix of the same seeds across configurations x NFE (a scatter-plot matrix for vector samples such as
the mixture's), and each search run's convergence plot and comparison table.

The matrix is read from the runs' saved shards (`<run dir>/samples`): the first `PREVIEW` seeds common
to every run of the matrix (`SCATTER` for vector samples), so no model is loaded.  One matrix per
model; rows are the configurations of the table, columns the NFE; images are upscaled by pixel
repetition (nearest neighbour) to at least `MIN_SIDE` pixels, so a 16x16 digit is visible.  A run whose
shards are gone (or lack the seeds) leaves its cell empty and is named on the page.

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
PREVIEW = 8  # images per matrix cell: the first seeds common to the runs
SCATTER = 512  # points per scatter cell (vector samples)
MIN_SIDE = 64  # images smaller than this are upscaled by an integer factor (nearest neighbour)
MAX_SIDE = 128  # larger ones are shrunk to this (a preview, not the samples)
SEARCH = "summary.json"  # a search run directory (tools/search_job.py) holds this, convergence.png, ...


def _find_tables(d: Path) -> list[Path]:
    """Every results table under `d`, oldest write first (so later rows of a run dir win)."""
    return sorted(d.rglob(TABLE), key=lambda p: (p.stat().st_mtime_ns, str(p)))


def _find_searches(d: Path) -> list[Path]:
    """Every search run directory under `d` (it holds summary.json and search outputs), by name."""
    return sorted(p.parent for p in d.rglob(SEARCH)
                  if (p.parent / "convergence.csv").exists() or (p.parent / "plan.yaml").exists())


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


def _load(d: Path, files: list[Path]):
    """All rows of `files` (missing cells as ''), de-duplicated by run directory; and the files read."""
    import pandas as pd

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
    md = [f"{len(df)} runs from {len(files)} table(s): " + ", ".join(str(f.relative_to(d)) for f in files)]
    if n_read > len(df):
        md.append(f"{n_read - len(df)} earlier row(s) of a rerun run directory dropped (the last row wins).")
    if common:
        md.append("Common to all runs: " + ", ".join(common))
    return md + [""]


# ---------------------------------------------------------------------------------------------
# The sample matrix: the same seeds across configurations x NFE, read from the runs' shards
# ---------------------------------------------------------------------------------------------

def _seed_range(text: str) -> range | None:
    """The row's `seeds` cell ('0-63') as a range; None if absent or not of that form."""
    lo, sep, hi = str(text).partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        return None
    return range(int(lo), int(hi) + 1)


def _samples_dir(d: Path, run_dir: str) -> Path | None:
    """`<run dir>/samples` as the row names it, or, for a sweep folder moved since, the folder of that
    name under `d`."""
    if not run_dir:
        return None
    p = Path(run_dir)
    for cand in (p, d / p.name, *(q for q in d.rglob(p.name) if q.is_dir())):
        if (cand / "samples").is_dir():
            return cand / "samples"
    return None


def _preview(samples_dir: Path, seeds: list[int]):
    """The first PREVIEW images (SCATTER vectors: shards recording no value range) of `seeds` from a
    run's shards as float: images mapped to [0, 1] from the range the shards recorded (uint8 shards
    from 0..255); vectors as they are."""
    import torch

    from ..eval.generate import load_shards, shard_record

    rec = shard_record(samples_dir)
    _, x = load_shards(samples_dir, seeds[:SCATTER if rec.value_range is None else PREVIEW])
    if x.dim() == 4:
        x = x[:PREVIEW]
    if x.dtype == torch.uint8:
        return x.float() / 255
    x = x.float()
    if x.dim() == 4:
        lo, hi = rec.value_range or (0.0, 1.0)
        x = ((x - lo) / (hi - lo)).clamp(0, 1)
    return x


def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font
        return ImageFont.load_default()


def image_matrix(cells: dict, rows: list[str], cols: list[str], path: Path, per_row: int | None = None,
                 gap: int = 2, space: int = 10) -> dict:
    """Write a labelled PNG matrix: row labels on the left, column labels on top, cell (r, c) the images
    `cells[(r, c)]` ((K, C, H, W) in [0, 1]) in seed order, `per_row` per line (default: all K in one
    line up to 3 columns, else 4); missing cells stay blank.  Images are enlarged by an integer factor
    by pixel repetition to at least MIN_SIDE pixels (shrunk to MAX_SIDE if larger).  Returns the
    layout: labels, scale, image size, images per cell line, cell origin and pitch, picture size;
    image k of cell (r, c) has its top-left corner at origin + (c, r) * pitch + (k % per_row, k //
    per_row) * (image + gap)."""
    import math

    import torch
    from PIL import Image, ImageDraw

    first = next(iter(cells.values()))
    k_max = max(len(v) for v in cells.values())
    c, h, w = first.shape[1:]
    side = max(h, w)
    scale = math.ceil(MIN_SIDE / side) if side < MIN_SIDE else 1
    shrink = MAX_SIDE / side if side > MAX_SIDE else 1.0
    ih, iw = (h * scale, w * scale) if shrink == 1.0 else (round(h * shrink), round(w * shrink))
    font = _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(t):
        x0, y0, x1, y1 = draw.textbbox((0, 0), t, font=font)
        return x1, y1

    label_w = max(text_size(r)[0] for r in rows) + 2 * space
    label_h = max(text_size(t)[1] for t in cols) + 2 * space
    per_row = int(per_row) if per_row else (k_max if len(cols) <= 3 else min(k_max, 4))
    lines = math.ceil(k_max / per_row)
    cell_w, cell_h = per_row * iw + (per_row - 1) * gap, lines * ih + (lines - 1) * gap
    pitch = (cell_w + space, cell_h + space)
    size = (label_w + len(cols) * pitch[0], label_h + len(rows) * pitch[1])
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for j, t in enumerate(cols):
        tw, _ = text_size(t)
        d.text((label_w + j * pitch[0] + (cell_w - tw) // 2, space // 2), t, fill="black", font=font)
    for i, t in enumerate(rows):
        _, th = text_size(t)
        d.text((space // 2, label_h + i * pitch[1] + (cell_h - th) // 2), t, fill="black", font=font)
        for j in range(len(cols)):
            x = cells.get((i, j))
            if x is None:
                continue
            x = x.detach().float().clamp(0, 1)
            if scale > 1:
                x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
            elif shrink != 1.0:
                x = torch.nn.functional.interpolate(x, size=(ih, iw), mode="area")
            arr = (x * 255).round().to(torch.uint8)
            for k in range(len(arr)):
                a = arr[k].permute(1, 2, 0).numpy()
                tile = Image.fromarray(a[..., 0] if c == 1 else a[..., :3]).convert("RGB")
                q, r = k % per_row, k // per_row
                img.paste(tile, (label_w + j * pitch[0] + q * (iw + gap), label_h + i * pitch[1] + r * (ih + gap)))
    path = Path(path)
    img.save(path)
    return {"rows": list(rows), "cols": list(cols), "scale": scale, "image": (ih, iw), "per_cell": k_max,
            "per_row": per_row, "origin": (label_w, label_h), "pitch": pitch, "gap": gap, "size": size}


def scatter_matrix(cells: dict, rows: list[str], cols: list[str], path: Path):
    """Write a scatter-plot matrix of vector samples (first two coordinates; a histogram for 1-d), one
    panel per (row, column) with shared axes, the column labels as titles of the top row and the row
    labels as y labels of the first column.  Returns the figure (closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.4 * len(cols) + 0.6, 2.2 * len(rows) + 0.4),
                             sharex=True, sharey=True, squeeze=False)
    for i, r in enumerate(rows):
        for j, t in enumerate(cols):
            ax = axes[i][j]
            x = cells.get((i, j))
            if x is not None:
                x = x.reshape(len(x), -1).double().numpy()
                if x.shape[1] >= 2:
                    ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6, linewidths=0)
                else:
                    ax.hist(x[:, 0], bins=30)
            if i == 0:
                ax.set_title(t, fontsize=9)
            if j == 0:
                ax.set_ylabel(r, fontsize=8)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def _link(rel: str) -> str:
    """A relative file path as a link target (spaces, parentheses and the like percent-encoded)."""
    from urllib.parse import quote

    return quote(rel, safe="/=,+-_.~")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "model"


def _matrices(d: Path, df, config: list[str]) -> list[str]:
    """Markdown of the sample matrices (one per model), writing report_samples_<model>.png."""
    if "run_dir" not in df.columns:
        return []
    md: list[str] = []
    groups = list(df.groupby("model", sort=True)) if "model" in df.columns else [("", df)]
    for model, g in groups:
        g = g[g["run_dir"].fillna("") != ""]
        if g.empty:
            continue
        cols = [c for c in _label_columns(g, config) if c != "model" or g["model"].nunique() > 1]
        if not cols:
            g, cols = g.assign(runs="all"), ["runs"]
        row_keys = [tuple(r) for r in g[cols].itertuples(index=False)]
        keys = sorted(set(row_keys))
        nfes = [int(n) for n in sorted(g[X].unique())]
        picked, missing, extra = {}, [], 0
        for (i, key) in enumerate(keys):
            for j, n in enumerate(nfes):
                sel = g[[k == key and int(v) == n for k, v in zip(row_keys, g[X])]]
                if sel.empty:
                    continue
                row = sel.iloc[-1]  # the last written of its configuration (the table averages them)
                extra += len(sel) - 1
                where = _samples_dir(d, row["run_dir"])
                if where is None:
                    missing.append(f"{_label(key, cols)} NFE {n} ({row['run_dir']}/samples not found)")
                else:
                    picked[(i, j)] = (where, row.get("seeds", ""))
        title = f"## samples{': model=' + str(model) if model else ''}"
        if not picked:
            md += [title, "", f"No sample shards found for the {len(g)} run(s) (their run folders hold no "
                              "`samples/`); nothing to show.", ""]
            continue
        ranges = [_seed_range(v[1]) for v in picked.values()]
        common = None
        if all(r is not None for r in ranges):
            common = sorted(set.intersection(*(set(r) for r in ranges)))
        cells, notes = {}, list(missing)
        kind = None
        for (i, j), (where, _) in picked.items():
            try:
                from ..eval.generate import shard_index

                if common is None:  # no seeds column: the run's own first seeds
                    seeds = sorted(s for _, _, got in shard_index(where, None) for s in got)
                else:
                    seeds = common
                cells[(i, j)] = x = _preview(where, seeds)
                kind = "image" if x.dim() == 4 else "vector"
            except (LookupError, OSError, RuntimeError, ValueError) as e:
                notes.append(f"{_label(keys[i], cols)} NFE {nfes[j]} ({where}: {str(e).splitlines()[0]})")
        if not cells:
            md += [title, "", "No readable samples: " + "; ".join(notes), ""]
            continue
        rows = [_label(k, cols) for k in keys]
        heads = [f"NFE {n}" for n in nfes]
        name = f"report_samples_{_safe(model or 'runs')}.png"
        shown = len(next(iter(cells.values())))
        if kind == "image":
            lay = image_matrix(cells, rows, heads, d / name)
            how = (f"each cell: the first {shown} seeds, upscaled x{lay['scale']} by pixel repetition"
                   if lay["scale"] > 1 else f"each cell: the first {shown} seeds")
        else:
            scatter_matrix(cells, rows, heads, d / name)
            how = f"each panel: {shown} samples, coordinates 0 and 1"
        seeds_note = (f"seeds {common[0]}..{common[min(len(common), shown) - 1]} in every cell" if common
                      else "no seed range common to all runs: each cell shows its run's first seeds")
        md += [title, "", f"Rows: {', '.join(cols)}; columns: NFE; {seeds_note}; {how}.", "",
               f"![samples: {', '.join(cols)} x NFE]({name})", ""]
        if extra:
            md.append(f"{extra} configuration(s) ran in several run folders: each cell shows the last one.")
        if notes:
            md.append("Empty cells: " + "; ".join(notes) + ".")
        if extra or notes:
            md.append("")
    return md


# ---------------------------------------------------------------------------------------------
# Search runs: their convergence plot and comparison table
# ---------------------------------------------------------------------------------------------

def _searches(d: Path, dirs: list[Path]) -> list[str]:
    import json

    md: list[str] = []
    for s in dirs:
        rel = s.relative_to(d).as_posix() if s != d else "."
        try:
            summary = json.loads((s / SEARCH).read_text())
        except (OSError, ValueError) as e:
            md += [f"## search: {rel}", "", f"{SEARCH} unreadable: {e}", ""]
            continue
        head = ", ".join(f"{k}={summary[k]}" for k in ("nfe", "metric", "calib_score", "verify_score", "evaluations")
                         if k in summary)
        md += [f"## search: {summary.get('name', rel)} ({rel})", "", head, ""]
        if (s / "convergence.png").exists():
            md += [f"![convergence of {summary.get('name', rel)}]({_link(rel + '/convergence.png')})", ""]
        else:
            md += ["No convergence.png in this run (matplotlib missing when it ran?); see convergence.csv.", ""]
        comp = s / "comparison.md"
        if comp.exists():
            lines = comp.read_text().splitlines()
            md += [("###" + l[1:]) if l.startswith("# ") else l for l in lines] + [""]
    return md


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

def _html(md: str, title: str) -> str:
    """The report's markdown (headings, pipe tables, images, paragraphs: all it uses) as one HTML page."""
    import html
    import re

    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
           "td.n{text-align:right}img{max-width:100%;image-rendering:pixelated}</style></head><body>"]
    lines = md.splitlines()
    i = 0

    def cells(line):
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(#+) (.*)$", line)
        img = re.match(r"^!\[(.*)\]\((.*)\)$", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{esc(m.group(2))}</h{n}>")
        elif img:
            out.append(f"<p><a href='{esc(img.group(2))}'><img src='{esc(img.group(2))}' alt='{esc(img.group(1))}'></a></p>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            i -= 1
            head, body = cells(block[0]), [cells(b) for b in block[2:]]
            right = ["---:" in a for a in cells(block[1])] if len(block) > 1 else []
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
            for r in body:
                out.append("<tr>" + "".join(f"<td{' class=n' if k < len(right) and right[k] else ''}>{esc(v)}</td>"
                                            for k, v in enumerate(r)) + "</tr>")
            out.append("</table>")
        elif line.strip():
            out.append(f"<p>{esc(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def report(d: Path) -> str:
    """Write report.md, report.html, report_<metric>.png and report_samples_<model>.png into `d`;
    return the markdown."""
    d = Path(d)
    files, searches = _find_tables(d), _find_searches(d)
    if not files and not searches:
        raise FileNotFoundError(f"no {TABLE} (runs) or {SEARCH} (search runs) under {d}")
    md = [f"# diffsampler report: {d}", ""]
    if files:
        df, n_read, files = _load(d, files)
        metrics = [m for m in METRICS if m in df.columns and df[m].notna().any()]
        if not metrics and not searches:
            raise ValueError(f"results in {d} have no metric columns ({', '.join(METRICS)})")
        config = _config_columns(df)
        cols = _label_columns(df, config)
        if not cols:
            df, cols = df.assign(runs="all"), ["runs"]
        md += _header(d, df, n_read, files, config, cols)
        for m in metrics:
            mean, count = _pivot(df, m, cols)
            md += [f"## {m}", "", *_md_table(mean, count, cols), ""]
            _plot(mean, cols, m, d / f"report_{m}.png")
            md += [f"![{m} vs NFE](report_{m}.png)", ""]
        md += _matrices(d, df, config)
    md += _searches(d, searches)
    text = "\n".join(md)
    (d / "report.md").write_text(text)
    (d / "report.html").write_text(_html(text, f"diffsampler report: {d}"))
    return text
