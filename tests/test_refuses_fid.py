"""FID references and their cache: every setting takes effect or is refused before any model call.

item 02: the reference-statistics cache is keyed by content, extractor, weights and resize mode, and
         its tags are verified on load.
item 04: reference folders: png/jpg/jpeg/webp, recursive; mixed sizes, empty or missing refused early.
item 08: eval.kid puts kid_mean / kid_std in the row (torchmetrics' KernelInceptionDistance).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from diffsampler.eval import fid
from diffsampler.eval.fid import FeatureExtractor, FIDEvaluator, reference_stats


def write_images(folder, n, seed=0, size=(8, 8), ext="png", mode="RGB"):
    """n random images saved under `folder` (created); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        p = folder / f"img{seed}_{i:03d}.{ext}"
        kw = {"lossless": True} if ext.lower() == "webp" else {}
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p, **kw)
        paths.append(p)
    return paths


def folder_tensor(folder):
    return torch.cat(list(fid.reference_images(folder)))


def read_pngs(folder):
    """The png files of `folder` as float (N, 3, H, W) in [0, 1], read with PIL alone."""
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*.png"))])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from diffsampler.cli import _register_solver_configs

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def score(cfg, samples, where):
    """The runner's image metrics of `samples` (float in [0, 1]), saved as a run saves them (uint8
    shards) in a fresh directory under `where`, scored streamed from the shards."""
    import tempfile

    from diffsampler.eval.generate import generate_shards
    from diffsampler.tools.runner import _image_metrics, resolve

    spec = resolve(cfg)
    d = Path(tempfile.mkdtemp(dir=where)) / "samples"
    generate_shards(lambda s: samples[s], range(len(samples)), d, shard_size=16, progress=False, value_range=(0, 1),
                    dtype="uint8")
    return _image_metrics(spec.model.name, spec.eval, d, list(range(len(samples))), "cpu")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "diffsampler", *args], capture_output=True, text=True, timeout=300)


class Scaled(nn.Module):
    """Flattened images times a weight: same name, different weights."""

    name = "scaled"

    def __init__(self, w=1.0):
        super().__init__()
        self.register_buffer("w", torch.tensor(float(w)))

    def forward(self, x):
        return x.flatten(1).double() * self.w


# ---------------------------------------------------------------------------------------------
# item 02: the reference-statistics cache
# ---------------------------------------------------------------------------------------------

def test_item02_two_folders_with_one_name_get_their_own_statistics(tmp_path):
    a, b = tmp_path / "a" / "ref", tmp_path / "b" / "ref"
    write_images(a, 6, seed=1)
    write_images(b, 6, seed=2)
    sa = reference_stats(a, extractor="identity", cache_dir=tmp_path / "cache")
    sb = reference_stats(b, extractor="identity", cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(sb["mu"], folder_tensor(b).flatten(1).double().mean(0).numpy(), rtol=1e-12)
    assert not np.allclose(sa["mu"], sb["mu"])


def test_item02_runner_scores_against_the_folder_it_was_given(tmp_path):
    """The runner's FID for model=diffusers: the same base name in two places, one cache dir."""
    a, b = tmp_path / "a" / "ref", tmp_path / "b" / "ref"
    write_images(a, 8, seed=1)
    write_images(b, 8, seed=2)
    samples = read_pngs(b)
    scores = {}
    for folder in (a, b):
        cfg = compose("model=diffusers", f"model.path={tmp_path}", f"eval.reference={folder}",
                      "eval.feature=identity", f"eval.cache_dir={tmp_path / 'cache'}")
        scores[folder] = score(cfg, samples, tmp_path)["fid"]
    assert abs(scores[b]) < 1e-3 and scores[a] > 1  # singular 192-d covariances: sqrtm noise ~1e-6


def test_item02_changed_content_is_recomputed(tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 5, seed=1)
    assert reference_stats(ref, extractor="identity", cache_dir=tmp_path / "cache")["n"] == 5
    write_images(ref / "more", 3, seed=2)
    assert reference_stats(ref, extractor="identity", cache_dir=tmp_path / "cache")["n"] == 8


def test_item02_extractor_weights_and_resize_mode_are_part_of_the_key(tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 6, seed=1)
    one = reference_stats(ref, extractor=Scaled(1.0), cache_dir=tmp_path / "cache")
    two = reference_stats(ref, extractor=Scaled(2.0), cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(two["mu"], 2 * one["mu"], rtol=1e-12)
    half = FeatureExtractor(nn.Flatten(), "flat", preprocess=lambda x: x / 2, resize="halve")
    full = FeatureExtractor(nn.Flatten(), "flat", preprocess=lambda x: x, resize="none")
    h = reference_stats(ref, extractor=half, cache_dir=tmp_path / "cache")
    f = reference_stats(ref, extractor=full, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(h["mu"], f["mu"] / 2, rtol=1e-12)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4


def test_item02_corrupt_cache_file_is_named(tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 4, seed=1)
    reference_stats(ref, extractor="identity", cache_dir=tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("*.npz")
    path.write_bytes(b"not an npz file")
    with pytest.raises(fid.ReferenceStatsCacheError, match="cannot be read") as e:
        reference_stats(ref, extractor="identity", cache_dir=tmp_path / "cache")
    assert str(path) in str(e.value)


def test_item02_foreign_cache_file_names_file_and_mismatch(tmp_path):
    a, b = tmp_path / "a" / "ref", tmp_path / "b" / "ref"
    write_images(a, 4, seed=1)
    write_images(b, 4, seed=2)
    reference_stats(a, extractor="identity", cache_dir=tmp_path / "ca")
    reference_stats(b, extractor="identity", cache_dir=tmp_path / "cb")
    (pa,) = (tmp_path / "ca").glob("*.npz")
    (pb,) = (tmp_path / "cb").glob("*.npz")
    shutil.copy(pb, pa)  # b's statistics under a's name
    with pytest.raises(fid.ReferenceStatsCacheError, match="content") as e:
        reference_stats(a, extractor="identity", cache_dir=tmp_path / "ca")
    assert str(pa) in str(e.value)
    # a cache file of other features is refused as a reference of this evaluator
    ev = FIDEvaluator(Scaled(3.0))
    with pytest.raises(fid.ReferenceStatsCacheError, match="extractor") as e:
        ev.set_reference(pb)
    assert str(pb) in str(e.value)


def test_item02_named_data_without_a_folder_keys_by_name_and_content(tmp_path):
    x = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    s1 = reference_stats("data", lambda: x, "identity", tmp_path, content="v1")
    s2 = reference_stats("data", lambda: x * 0.5, "identity", tmp_path, content="v2")
    np.testing.assert_allclose(s2["mu"], s1["mu"] / 2, rtol=1e-12)
    assert reference_stats("data", lambda: 1 / 0, "identity", tmp_path, content="v1")["n"] == 10  # cached


# ---------------------------------------------------------------------------------------------
# item 04: reference folders
# ---------------------------------------------------------------------------------------------

def test_item04_reads_png_jpg_jpeg_webp_recursively(tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 5, seed=1, ext="png")
    write_images(ref, 20, seed=2, ext="jpg")
    write_images(ref / "sub", 6, seed=3, ext="JPG")
    write_images(ref / "sub" / "deeper", 2, seed=4, ext="jpeg")
    write_images(ref, 2, seed=5, ext="webp", mode="L")
    (ref / "notes.txt").write_text("not an image")
    files = fid.list_reference_images(ref)
    assert len(files) == 35
    x = folder_tensor(ref)
    assert x.shape == (35, 3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert reference_stats(ref, extractor="identity", cache_dir=tmp_path / "cache")["n"] == 35


def test_item04_mixed_sizes_name_the_file_and_both_sizes(tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 3, seed=1, size=(8, 8))
    (odd,) = write_images(ref / "z", 1, seed=2, size=(8, 6), ext="jpg")
    with pytest.raises(fid.ReferenceDataError, match=r"8x6.*8x8") as e:
        fid.list_reference_images(ref, check_sizes=True)
    assert "z/img2_000.jpg" in str(e.value)
    with pytest.raises(fid.ReferenceDataError, match="z/img2_000.jpg"):
        folder_tensor(ref)


def test_item04_unreadable_image_is_named(tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 2, seed=1)
    (ref / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(fid.ReferenceDataError, match="broken.png"):
        fid.list_reference_images(ref, check_sizes=True)


@pytest.mark.parametrize("make", ["missing", "empty", "only_text"])
def test_item04_empty_or_missing_reference_refused_in_validate(tmp_path, make):
    from diffsampler.tools.runner import ConfigError, validate

    ref = tmp_path / "ref"
    if make != "missing":
        ref.mkdir()
    if make == "only_text":
        (ref / "a.txt").write_text("x")
    for model in (["model=diffusers", f"model.path={tmp_path}"], ["model=digits"]):
        cfg = compose(*model, f"eval.reference={ref}")
        with pytest.raises(ConfigError, match="eval.reference") as e:
            validate(cfg)
        assert str(ref) in str(e.value)
        assert ("does not exist" if make == "missing" else "no images (.jpeg, .jpg, .png, .webp, .npz)") in str(e.value)


def test_item04_reference_refused_for_the_gmm_model(tmp_path):
    from diffsampler.tools.runner import ConfigError, validate

    write_images(tmp_path / "ref", 2)
    with pytest.raises(ConfigError, match="eval.reference is for image models"):
        validate(compose("model=gmm", f"eval.reference={tmp_path / 'ref'}"))


def test_item04_digits_scores_against_the_given_reference(tmp_path):
    """model=digits with eval.reference: the FID-proxy is against that folder, not the packaged test split."""
    from diffsampler.eval.digits import digits_dataset

    x = (digits_dataset("test")[0][:40] + 1) / 2
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(x):
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8), "L").save(ref / f"{i:02d}.png")
    cfg = compose("model=digits", f"eval.reference={ref}", f"eval.cache_dir={tmp_path / 'cache'}")
    samples = read_pngs(ref)[:, :1]
    assert abs(score(cfg, samples, tmp_path)["fid_proxy"]) < 1e-4  # vs the packaged split: 11


def test_item04_cli_empty_reference_refused_before_generation(tmp_path):
    ref, run = tmp_path / "empty", tmp_path / "run"
    ref.mkdir()
    r = cli("model=digits", f"eval.reference={ref}", "nfe=2", "num_samples=4", "batch_size=4", "progress=false",
            f"eval.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}")
    assert r.returncode != 0
    assert f"eval.reference: {ref} has no images" in r.stderr + r.stdout
    assert not (run / "samples").exists()


# ---------------------------------------------------------------------------------------------
# item 08: KID
# ---------------------------------------------------------------------------------------------

def test_item08_kid_is_torchmetrics_kernel_inception_distance():
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(60, 3, 4, 4, generator=g), torch.rand(50, 3, 4, 4, generator=g) * 0.9
    ev = FIDEvaluator("identity", kid=True, kid_subsets=7, kid_subset_size=20, kid_seed=3)
    ev.update_real(real)
    ev.update_fake(fake)

    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten(1).double()

    tm = KernelInceptionDistance(feature=Flat(), subsets=7, subset_size=20)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    torch.manual_seed(3)
    mean, std = tm.compute()
    assert ev.compute_kid() == pytest.approx((float(mean), float(std)), rel=1e-12)


def test_item08_kid_in_the_row_for_image_models(tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 30, seed=1)
    near = folder_tensor(ref)
    far = (near * 0.5 + 0.5)
    rows = {}
    for name, samples in (("near", near), ("far", far)):
        cfg = compose("model=diffusers", f"model.path={tmp_path}", f"eval.reference={ref}", "eval.feature=identity",
                      "eval.kid=true", f"eval.cache_dir={tmp_path / 'cache'}")
        rows[name] = score(cfg, samples, tmp_path)
    for row in rows.values():
        assert {"fid", "kid_mean", "kid_std", "kid_subset_size"} <= set(row)
        assert row["kid_subset_size"] == 30
    assert abs(rows["near"]["kid_mean"]) < 0.1 * rows["far"]["kid_mean"]
    off = score(compose("model=diffusers", f"model.path={tmp_path}", f"eval.reference={ref}",
                        "eval.feature=identity", f"eval.cache_dir={tmp_path / 'cache'}"), near, tmp_path)
    assert "kid_mean" not in off


def test_item08_kid_refused_for_the_gmm_model():
    from diffsampler.tools.runner import ConfigError, validate

    with pytest.raises(ConfigError, match=r"eval.kid=true .* model=gmm"):
        validate(compose("model=gmm", "eval.kid=true"))


def test_item08_kid_from_the_command_line_on_digits(tmp_path):
    run = tmp_path / "run"
    r = cli("model=digits", "eval.kid=true", "solver=ddim", "nfe=3", "num_samples=16", "batch_size=16",
            "progress=false", f"eval.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    row = pd.read_csv(run / "results.csv").iloc[0]
    assert np.isfinite(row.kid_mean) and np.isfinite(row.kid_std) and row.kid_subset_size == 16
