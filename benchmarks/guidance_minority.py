"""Minority guidance: base vs guided rates on the rare-mode Gaussian mixture (truth known) and on the
digits model (share of samples whose minority score lies in the real data's top decile).

    python benchmarks/guidance_minority.py        # writes the `minority` section of RESULTS.md,
                                                   # results/minority_*.csv, docs/minority_digits.png
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.guidance.minority import MinorityClassifier, MinorityGuidance, fit_minority_classifier, minority_score
from diffsampler.schedules import LinearVP
from diffsampler.tools.minority_classifier import feature_fn

from _common import machine_line, md_table, write_csv, write_section

DOCS = Path(__file__).resolve().parent.parent / "docs"
RARE = torch.tensor([4, 5])


def gmm_table(n: int = 4000, nfe: int = 20):
    """The mixture of tests/test_minority.py: 4 common modes of 24.5%, 2 rare modes of 1%."""
    means = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 2.0
    gmm = GaussianMixture(means, [0.5] * 6, [0.245] * 4 + [0.01] * 2)
    den = gmm_denoiser(gmm, LinearVP())
    x0, _ = gmm.sample(20000, generator=torch.Generator().manual_seed(1), return_labels=True)
    t = time.perf_counter()
    clf, _ = fit_minority_classifier(den, x0, num_classes=20, t_frac=0.4, steps=2000, batch_size=256)
    fit_s = time.perf_counter() - t
    ref_min = torch.stack([gmm.component_log_prob(gmm.component_subset([k]).sample(
        100000, generator=torch.Generator().manual_seed(9)).double())[:, k].min() for k in range(6)])
    rows = []
    base = None
    for w in (0.0, 0.5, 0.75, 1.0, 1.5, 2.0):
        mg = MinorityGuidance(clf, scale=w)
        den.reset_nfe()
        x = ds.sample(den, shape=(n, 8), seeds=range(n), solver="dpmpp_2m", nfe=nfe, guidance=mg)
        comp = (gmm.component_log_prob(x.double()) + gmm._log_w).argmax(1)
        lp = gmm.component_log_prob(x.double()).gather(1, comp[:, None]).flatten()
        rate = torch.isin(comp, RARE).float().mean().item()
        base = rate if base is None else base
        rows.append({"scale": w, "rare_rate": rate, "x_base": rate / base, "off_range": int((lp < ref_min[comp]).sum()),
                     "nfe": den.nfe, "classifier_calls": mg.classifier_calls})
    return rows, fit_s


def digits_table(n: int = 256, nfe: int = 20, solver: str = "dpmpp_2m"):
    from diffsampler.eval.digits import ASSET_DIR, digits_dataset, load_digits_pipeline
    from diffsampler.eval.generate import save_image_grid
    from diffsampler.pipelines import denoiser_from_pipeline

    den = denoiser_from_pipeline(load_digits_pipeline())
    clf = MinorityClassifier.from_pretrained(ASSET_DIR / "minority")
    meta, top = clf.config["meta"], float(clf.thresholds[-1])
    feature = feature_fn(meta["feature"], "cpu")

    def share(x):
        s = minority_score(den, x, meta["t_frac"], meta["num_draws"], feature, seed=10**6)
        return (s >= top).float().mean().item()

    real = digits_dataset("test")[0]
    rows = [{"scale": "real test digits", "top_decile_share": share(real), "nfe": "", "classifier_calls": "",
             "wall_s": ""}]
    grids = {}
    for w in (0.0, 2.0, 5.0, 10.0):
        mg = MinorityGuidance(clf, scale=w)
        den.reset_nfe()
        t = time.perf_counter()
        x = ds.sample(den, shape=(n, 1, 16, 16), seeds=range(n), solver=solver, nfe=nfe, guidance=mg)
        wall = time.perf_counter() - t
        calls = den.nfe
        rows.append({"scale": w, "top_decile_share": share(x.clamp(-1, 1)), "nfe": calls,
                     "classifier_calls": mg.classifier_calls, "wall_s": round(wall, 2)})
        grids[w] = (x[:64].clamp(-1, 1) + 1) / 2
    DOCS.mkdir(exist_ok=True)
    pad = torch.ones(64, 1, 16, 4)
    side = torch.cat([grids[0.0], pad, grids[5.0]], dim=3)  # base | guided, same seeds
    save_image_grid(side, DOCS / "minority_digits.png", nrow=8)
    return rows


def main():
    g_rows, fit_s = gmm_table()
    d_rows = digits_table()
    write_csv("minority_gmm.csv", g_rows)
    write_csv("minority_digits.csv", d_rows)
    body = [
        "## Minority guidance (`benchmarks/guidance_minority.py`)", "",
        machine_line(), "",
        "**Gaussian mixture with rare modes** (8-d; four modes of 24.5%, two of 1%). Classifier: 20 quantile",
        f"classes of the minority score (t = 0.4), trained in {fit_s:.0f} s. 4000 samples, DPM-Solver++(2M), 20 NFE.",
        "`off_range`: guided samples whose log-density under their own mode is below the lowest of",
        "100k real samples of that mode.", "",
        md_table(["scale w", "rare-mode rate", "x base", "off-range", "NFE", "classifier calls"],
                 [[r["scale"], f"{r['rare_rate']:.3f}", f"{r['x_base']:.1f}", r["off_range"], r["nfe"],
                   r["classifier_calls"]] for r in g_rows]), "",
        "**Digits model**: the share of samples whose minority score (digit-classifier features, t = 0.4) is",
        "in the real training data's top decile. 256 samples, DPM-Solver++(2M), 20 NFE. The classifier",
        "(`assets/digits/minority`, from `diffsampler minority-classifier`) adds one forward and backward",
        "pass per model call; NFE counts network calls only.", "",
        md_table(["scale w", "top-decile share", "NFE", "classifier calls", "wall s"],
                 [[r["scale"], f"{r['top_decile_share']:.3f}", r["nfe"], r["classifier_calls"], r["wall_s"]]
                  for r in d_rows]), "",
        "![base (left) vs minority-guided w = 5 (right), same seeds](../docs/minority_digits.png)",
    ]
    write_section("minority", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
