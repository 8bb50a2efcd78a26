"""FID through torchmetrics with pluggable feature extractors (diffsampler.eval.fid)."""

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from diffsampler.eval import fid
from diffsampler.eval.fid import (FeatureExtractorUnavailable, FIDEvaluator, WeightsChecksumError, fid_from_shards,
                                  frechet_distance, get_feature_extractor, reference_stats, stats_from_features)
from diffsampler.eval.generate import generate_shards


class RandomProjection(nn.Module):
    """A fixed random linear feature map of (B, 3, 8, 8) images to 16 features."""

    name = "randproj16"

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(3 * 8 * 8, 16, generator=g, dtype=torch.float64) / 8)

    def forward(self, x):
        return x.flatten(1).double() @ self.w


def images(n, seed=0, shift=0.0):
    """Structured synthetic images in [0, 1]: a random smooth pattern per image plus a shift."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(z, size=(8, 8), mode="bilinear", align_corners=False)
    return (torch.sigmoid(x) + shift).clamp(0, 1)


def test_self_fid_is_zero_and_grows_with_shift():
    ev = FIDEvaluator(RandomProjection())
    real = images(400)
    ev.update_real(real)
    ev.update_fake(real)
    scale = float(np.trace(ev.real_stats()["sigma"]))
    assert abs(ev.compute()) < 1e-6 * scale
    vals = []
    for shift in (0.02, 0.05, 0.1, 0.2):
        ev.reset_fake()
        ev.update_fake(images(400, shift=shift))
        vals.append(ev.compute())
    assert vals[0] > 1e-6 * scale and all(a < b for a, b in zip(vals, vals[1:]))
    assert ev.real_stats()["n"] == 400  # reset_fake keeps the real images


def test_torchmetrics_equals_frechet_distance_of_float64_stats():
    ev = FIDEvaluator(RandomProjection(), batch_size=64)  # several batches
    real, fake = images(300, seed=1), images(250, seed=2, shift=0.03)
    ev.update_real(real)
    for i in range(0, 250, 100):
        ev.update_fake(fake[i:i + 100])
    proj = RandomProjection()
    sr, sf = stats_from_features(proj(real)), stats_from_features(proj(fake))
    np.testing.assert_allclose(ev.fake_stats()["mu"], sf["mu"], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ev.fake_stats()["sigma"], sf["sigma"], rtol=1e-9, atol=1e-13)
    assert ev.fake_stats()["n"] == 250
    ref = frechet_distance(sr["mu"], sr["sigma"], sf["mu"], sf["sigma"])
    got = ev.compute()
    assert isinstance(got, float) and ref > 0
    assert got == pytest.approx(ref, rel=1e-8)

    # the same with reference statistics instead of real images
    ev2 = FIDEvaluator(RandomProjection())
    ev2.set_reference(sr)
    ev2.update_fake(fake)
    assert ev2.compute() == pytest.approx(ref, rel=1e-8)
    np.testing.assert_allclose(ev2.real_stats()["sigma"], sr["sigma"], rtol=1e-9, atol=1e-12)


def test_frechet_distance_closed_form():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2;  diagonal: sum over coordinates
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)
    d = frechet_distance(np.zeros(3), np.diag([1.0, 4, 9]), np.ones(3), np.diag([4.0, 4, 1]))
    assert d == pytest.approx(3 + 1 + 0 + 4, rel=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_reference_stats_cached(tmp_path):
    calls = []

    def images_fn():
        calls.append(1)
        return (images(100, seed=s) for s in range(3))  # streamed batches

    fx = get_feature_extractor(RandomProjection())
    st = reference_stats("synth", images_fn, fx, tmp_path, batch_size=64)
    (path,) = tmp_path.glob("synth__randproj16__*.npz")  # name, extractor, key of content and features
    assert path.is_file() and len(calls) == 1 and st["n"] == 300
    mtime = path.stat().st_mtime_ns
    st2 = reference_stats("synth", images_fn, fx, tmp_path)
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime  # cache used, images_fn not called
    np.testing.assert_array_equal(st["mu"], st2["mu"])
    np.testing.assert_array_equal(st["sigma"], st2["sigma"])
    direct = stats_from_features(RandomProjection()(torch.cat([images(100, seed=s) for s in range(3)])))
    np.testing.assert_allclose(st["sigma"], direct["sigma"], rtol=1e-9, atol=1e-13)
    # the cache file is a reference for the evaluator, and a different extractor has its own cache entry
    ev = FIDEvaluator(fx)
    ev.set_reference(path)
    ev.update_fake(torch.cat([images(100, seed=s) for s in range(3)]))
    assert abs(ev.compute()) < 1e-9
    reference_stats("synth", images_fn, "identity", tmp_path)
    (other,) = tmp_path.glob("synth__identity__*.npz")
    assert other.is_file() and len(calls) == 2


def test_fid_from_shards(tmp_path):
    x = images(120, seed=5) * 2 - 1  # samples in [-1, 1], as a diffusion model returns them
    generate_shards(lambda seeds: x[seeds], range(120), tmp_path / "s", shard_size=50, progress=False)
    ref = stats_from_features(RandomProjection()(images(200, seed=6)))
    ev = FIDEvaluator(RandomProjection())
    ev.set_reference(ref)
    ev.update_fake(images(120, seed=5))
    # equal up to the float32 rounding of the [-1, 1] -> [0, 1] round trip
    assert fid_from_shards(tmp_path / "s", ref, RandomProjection()) == pytest.approx(ev.compute(), rel=1e-6)
    sub = fid_from_shards(tmp_path / "s", ref, RandomProjection(), seeds=range(10, 70))
    ev.reset_fake()
    ev.update_fake(images(120, seed=5)[10:70])
    assert sub == pytest.approx(ev.compute(), rel=1e-6)


def test_kid_optional():
    ev = FIDEvaluator(RandomProjection(), kid=True, kid_subsets=5, kid_subset_size=50)
    ev.update_real(images(100, seed=1))
    ev.update_fake(images(100, seed=1))
    same, _ = ev.compute_kid()  # different random subsets of the same images: ~0 (unbiased, may be < 0)
    ev.reset_fake()
    ev.update_fake(images(100, seed=2, shift=0.2))
    shifted, _ = ev.compute_kid()
    assert abs(same) < 0.1 * shifted
    assert ev.compute_kid() == ev.compute_kid()  # fixed subset seed


def test_extractor_registry_and_plugins():
    x = torch.rand(4, 2, 3)
    ident = get_feature_extractor("identity")
    assert ident.name == "identity" and torch.equal(ident(x), x.flatten(1).double())
    plug = get_feature_extractor("torch.nn:Flatten")
    assert plug.name == "torch.nn-Flatten" and plug(x).shape == (4, 6)
    mod = get_feature_extractor(RandomProjection())
    assert mod.name == "randproj16" and mod(images(2)).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'"):
        get_feature_extractor("nope")
    with pytest.raises(FeatureExtractorUnavailable, match="no_such_module"):
        get_feature_extractor("no_such_module:f")


def test_inception_unavailable_names_both_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(fid, "INCEPTION_URL", "http://127.0.0.1:9/weights-inception.pth")  # offline
    with pytest.raises(FeatureExtractorUnavailable) as e:
        get_feature_extractor("inception")
    msg = str(e.value)
    assert "feature_extractor_weights_path=" in msg and "pt_inception-2015-12-05" in msg
    assert "torchmetrics[image]" in msg and "torch-fidelity" in msg and "'digits'" in msg
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)  # no chained traceback
    with pytest.raises(FeatureExtractorUnavailable, match="feature_extractor_weights_path"):
        FIDEvaluator("inception")


def test_bad_sha256_names_expected_and_actual(tmp_path):
    p = tmp_path / "pt_inception-2015-12-05.pth"
    p.write_bytes(b"not really weights")
    actual = hashlib.sha256(b"not really weights").hexdigest()
    with pytest.raises(WeightsChecksumError) as e:
        get_feature_extractor("inception", weights_path=p, sha256="ab" * 32)
    assert "ab" * 32 in str(e.value) and actual in str(e.value) and "expected" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_feature_extractor("inception", weights_path=tmp_path / "missing.pth")


def test_inception_with_local_weights(tmp_path, monkeypatch):
    """The full 'inception' path on a weights file (random weights: no download here)."""
    if not fid._torch_fidelity_ok():
        pytest.skip("torch-fidelity's InceptionV3 code cannot be imported here")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    tm = fid.torchmetrics_fid()
    dummy = tmp_path / "dummy.pth"
    torch.save({}, dummy)
    with monkeypatch.context() as m:
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = tm.NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                    feature_extractor_weights_path=str(dummy))
    w = tmp_path / "pt_inception-2015-12-05-random.pth"
    torch.save(net.state_dict(), w)
    sha = hashlib.sha256(w.read_bytes()).hexdigest()
    fx = get_feature_extractor("inception", weights_path=w, sha256=sha)
    assert fx.name == "inception" and fx.num_features == 2048 and fx.net.use_antialias is False
    f = fx(torch.rand(1, 1, 16, 16))  # grey images are repeated to RGB, everything resized to 299
    assert f.shape == (1, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()


def test_digits_extractor_from_a_saved_classifier(tmp_path):
    digits = pytest.importorskip("diffsampler.eval.digits")
    torch.manual_seed(0)
    clf = digits.DigitsClassifier()
    clf.save_pretrained(tmp_path / "clf")
    fx = get_feature_extractor("digits", weights_path=tmp_path / "clf")
    x = torch.rand(5, 1, 16, 16)
    assert fx.name == "digits" and fx.num_features == 64
    torch.testing.assert_close(fx(x), clf.eval().features(x * 2 - 1).double())


def test_digits_extractor_packaged():
    digits = pytest.importorskip("diffsampler.eval.digits")
    if not (digits.ASSET_DIR / "classifier" / digits.DigitsClassifier.CONFIG_NAME).is_file():
        with pytest.raises(FeatureExtractorUnavailable, match="train_digits"):
            get_feature_extractor("digits")
        pytest.skip(f"packaged digits classifier not built yet ({digits.TRAIN_COMMAND})")
    ev = FIDEvaluator("digits")
    ref, _ = digits.digits_dataset("test")
    ev.update_real((ref + 1) / 2)
    ev.update_fake((ref + 1) / 2)
    assert abs(ev.compute()) < 1e-6
