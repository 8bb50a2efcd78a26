"""Shared helpers of the benchmark scripts: RESULTS.md sections, CSV output, markdown tables,
a model-call counter and the plain diffusers sampling loop."""

from __future__ import annotations

import csv
import os
import platform
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"

_HEADER = """# diffsampler benchmarks

Each section below is written by one script in `benchmarks/` (between its `<!-- name:start -->` /
`<!-- name:end -->` markers; re-running a script replaces only its own section).  Raw numbers are in
`benchmarks/results/*.csv`.
"""


def write_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in RESULTS.md
    (appending the section, or creating the file, if missing).  Other sections are left alone."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else _HEADER
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


def write_csv(name: str, rows: Sequence[dict]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_val(r.get(k, "")) for k in keys})
    return path


def _csv_val(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def md_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A markdown table; `align` is a string of 'l'/'r' per column (default: first left, rest right)."""
    header = list(header)
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def fmt_e(x, digits: int = 2) -> str:
    if x is None or x == "" or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.{digits}e}"


def machine_line() -> str:
    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}, "
            f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}")


class CountingModel:
    """Wraps a diffusers-style model and counts its calls."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def run_diffusers(scheduler, model, num_inference_steps: int, x_T: torch.Tensor, generator=None,
                  variance_noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The standard diffusers denoising loop (as in its pipelines), starting from unit-variance x_T."""
    scheduler.set_timesteps(num_inference_steps)
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), t).sample
        kw = {}
        if generator is not None:
            kw["generator"] = generator
        if variance_noise is not None:
            kw["variance_noise"] = variance_noise[i]
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x
