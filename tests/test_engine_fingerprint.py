"""Behaviour unchanged: every registered solver (x {time_uniform, logsnr} x NFE {5, 10}), through
`sample()` and through the diffusers adapter, and every shipped plan give the samples recorded in
tests/data/engine_fingerprint.npz (scripts/engine_fingerprint.py wrote it before the engine was
refactored)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from engine_fingerprint import OUT, fingerprint  # noqa: E402


@pytest.fixture(scope="module")
def now():
    return fingerprint()


def test_fingerprint_covers_the_same_runs(now):
    recorded = np.load(OUT)
    assert sorted(now) == sorted(recorded.files)


def test_samples_unchanged(now):
    recorded = np.load(OUT)
    worst = {k: float(np.abs(now[k] - recorded[k]).max()) for k in recorded.files}
    bad = {k: v for k, v in worst.items() if not v <= 1e-10}
    assert not bad, f"samples changed: {bad}"
