"""Scoring at scale (issue 18 items 1-2): uint8 image shards, FID streamed and all-reduced over
torchrun ranks, reference folders streamed (nested, png/jpg/jpeg/webp/npz), `diffsampler export`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsampler.eval import fid
from diffsampler.eval.generate import (ShardMismatchError, generate_shards, load_shards, quantize,
                                       shard_record)
from diffsampler.tools.export import export

ROOT = Path(__file__).resolve().parent.parent


def images(seeds, c=1, h=6, w=5):
    """Image k in [0, 1] is a function of seed k alone."""
    return torch.stack([torch.rand(c, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _run(cmd, timeout=300):
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


# ---------------------------------------------------------------------------------------------
# uint8 shards
# ---------------------------------------------------------------------------------------------

def test_uint8_shards_quarter_size_same_values_any_shard_size(tmp_path):
    seeds = list(range(3, 40))
    for size in (4, 16):
        generate_shards(images, seeds, tmp_path / f"u{size}", shard_size=size, progress=False, value_range=(0, 1),
                        dtype="uint8")
    generate_shards(images, seeds, tmp_path / "f", shard_size=16, progress=False, value_range=(0, 1))
    raw = torch.load(next((tmp_path / "u16").glob("shard_*.pt")), weights_only=True)["samples"]
    assert raw.dtype == torch.uint8 and shard_record(tmp_path / "u16").dtype == "uint8"
    assert shard_record(tmp_path / "f").dtype == "float32"
    a, b = load_shards(tmp_path / "u4", raw=True), load_shards(tmp_path / "u16", raw=True)
    assert torch.equal(a[1], b[1]) and a[0].tolist() == seeds  # sample k depends on seed k only
    want = (images(seeds) * 255).round().to(torch.uint8)
    assert torch.equal(a[1], want)
    x = load_shards(tmp_path / "u16")[1]  # read back as float32 in the value range
    assert x.dtype == torch.float32 and torch.equal(x, want.float() / 255)
    assert (x - images(seeds)).abs().max() <= 0.5 / 255 + 1e-7


def test_uint8_in_another_range_and_resume_after_interrupt(tmp_path):
    def fn(calls, fail_after=None):
        def f(seeds):
            if fail_after is not None and len(calls) == fail_after:
                raise KeyboardInterrupt
            calls.append(seeds[0])
            return images(seeds) * 2 - 1
        return f

    first = []
    with pytest.raises(KeyboardInterrupt):
        generate_shards(fn(first, 2), range(20), tmp_path, shard_size=4, progress=False, value_range=(-1, 1),
                        dtype="uint8")
    assert first == [0, 4] and len(list(tmp_path.glob("shard_*.pt"))) == 2
    second = []
    generate_shards(fn(second), range(20), tmp_path, shard_size=4, progress=False, value_range=(-1, 1), dtype="uint8")
    assert second == [8, 12, 16]  # finished shards are not regenerated
    x = load_shards(tmp_path)[1]
    ref = quantize(images(range(20)) * 2 - 1, (-1, 1)).double() * (2 / 255) - 1
    assert x.dtype == torch.float32 and torch.allclose(x.double(), ref, atol=1e-6) and x.min() >= -1 and x.max() <= 1
    assert (x - (images(range(20)) * 2 - 1)).abs().max() <= 1 / 255 + 1e-6
    # the same directory under another storage dtype is refused, naming it
    with pytest.raises(ShardMismatchError, match="shard dtype: uint8 in the shards, float32 now"):
        generate_shards(lambda s: images(s) * 2 - 1, range(24), tmp_path, shard_size=4, progress=False,
                        value_range=(-1, 1))


def test_shard_dtype_refusals(tmp_path):
    with pytest.raises(ValueError, match="shard dtype must be one of float32, uint8, got 'float16'"):
        generate_shards(images, range(4), tmp_path / "a", progress=False, value_range=(0, 1), dtype="float16")
    with pytest.raises(ValueError, match="uint8 stores images: give value_range"):
        generate_shards(images, range(4), tmp_path / "b", progress=False, dtype="uint8")
    with pytest.raises(ValueError, match=r"outside value_range \(0.0, 1.0\)"):  # refused, never clamped
        generate_shards(lambda s: images(s) * 1.5, range(4), tmp_path / "c", progress=False, value_range=(0, 1),
                        dtype="uint8")
    assert not list((tmp_path / "c").glob("shard_*"))


@pytest.mark.parametrize("overrides,message", [
    (["model=digits", "eval.shard_dtype=float16"], "eval.shard_dtype must be one of auto, uint8, float32, got 'float16'"),
    (["model=gmm", "eval.shard_dtype=uint8"], "eval.shard_dtype=uint8 stores images"),
])
def test_shard_dtype_config_refused(overrides, message):
    from test_refuses_fid import compose

    from diffsampler.tools.runner import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


# ---------------------------------------------------------------------------------------------
# reference folders: streamed, recursive, png / jpg / jpeg / webp / npz
# ---------------------------------------------------------------------------------------------

def _npz(path, arr, key="arr_0", compressed=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to "e.NPZ"
        (np.savez_compressed if compressed else np.savez)(f, **{key: arr})


def _rgb(n, seed, h=6, w=5):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_reference_folder_nested_mixed_formats_streamed(tmp_path):
    ref = tmp_path / "ref"
    want = {}
    for rel, arr in (("a.png", _rgb(1, 1)[0]), ("sub/b.jpg", _rgb(1, 2)[0]), ("sub/deep/c.webp", _rgb(1, 3)[0])):
        (ref / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(ref / rel, **({"lossless": True} if rel.endswith("webp") else {}))
        with Image.open(ref / rel) as im:
            want[rel] = np.asarray(im.convert("RGB"))[None]  # jpg is lossy: what PIL decodes
    want["sub/deep/d.npz"] = _rgb(7, 4)
    _npz(ref / "sub/deep/d.npz", want["sub/deep/d.npz"])
    grey = np.random.default_rng(5).integers(0, 256, (3, 6, 5, 1), dtype=np.uint8)
    _npz(ref / "sub/e.NPZ", grey, compressed=True)
    want["sub/e.NPZ"] = np.repeat(grey, 3, axis=3)
    (ref / "sub/notes.txt").write_text("not an image")
    files = fid.list_reference_images(ref, check_sizes=True)
    assert [f.relative_to(ref).as_posix() for f in files] == sorted(want)
    batches = list(fid.reference_images(ref, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 4, 1]  # one batch in memory at a time
    x = torch.cat(batches)
    expect = np.concatenate([want[k] for k in sorted(want)])
    assert torch.equal(x, torch.from_numpy(expect).permute(0, 3, 1, 2).float() / 255)
    st = fid.reference_stats(ref, extractor="identity", cache_dir=tmp_path / "cache", batch_size=4)
    assert st["n"] == 13
    np.testing.assert_allclose(st["mu"], x.flatten(1).double().mean(0).numpy(), rtol=1e-12)
    # one .npz file is a reference too (an ADM reference batch)
    one = fid.reference_stats(ref / "sub/deep/d.npz", extractor="identity", cache_dir=tmp_path / "cache")
    d = torch.from_numpy(want["sub/deep/d.npz"]).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(one["mu"], d.flatten(1).double().mean(0).numpy(), rtol=1e-12)


@pytest.mark.parametrize("bad,message", [
    ("nokey", r"holds no arr_0 \(it holds \['images'\]\)"),
    ("float", r"arr_0 is float32 \(2, 6, 5, 3\); reference arrays must be uint8 images"),
    ("channels", r"arr_0 is uint8 \(2, 6, 5, 2\)"),
    ("flat", r"arr_0 is uint8 \(2, 90\)"),
    ("notzip", "cannot be read as an .npz file"),
    ("size", r"z.npz is 4x6 but a.png is 5x6"),
])
def test_reference_npz_refusals_name_file_and_format(tmp_path, bad, message):
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.fromarray(_rgb(1, 1)[0]).save(ref / "a.png")
    arrays = {"nokey": ("images", _rgb(2, 2)), "float": ("arr_0", _rgb(2, 2).astype(np.float32)),
              "channels": ("arr_0", _rgb(2, 2)[..., :2]), "flat": ("arr_0", _rgb(2, 2).reshape(2, -1)),
              "size": ("arr_0", _rgb(2, 2, w=4))}
    if bad == "notzip":
        (ref / "z.npz").write_bytes(b"not a zip")
    else:
        key, arr = arrays[bad]
        _npz(ref / "z.npz", arr, key)
    with pytest.raises(fid.ReferenceDataError, match=message) as e:
        fid.list_reference_images(ref, check_sizes=True)
    assert "z.npz" in str(e.value)
    with pytest.raises(fid.ReferenceDataError, match=message):
        list(fid.reference_images(ref))


def test_reference_truncated_npz_named(tmp_path):
    _npz(tmp_path / "t.npz", _rgb(10, 1))  # 90 bytes per image
    with zipfile.ZipFile(tmp_path / "t.npz") as zf:  # rewrite arr_0.npy cut short, in a valid archive
        raw = zf.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as zf:
        zf.writestr("arr_0.npy", raw[: len(raw) - 200])
    with pytest.raises(fid.ReferenceDataError, match=r"cut.npz: arr_0 ends after 7 of its 10 images"):
        list(fid.reference_images(tmp_path / "cut.npz", batch_size=4))


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,dtype", [(1, "uint8"), (3, "uint8"), (3, "float32")])
def test_export_round_trip(tmp_path, channels, dtype):
    run = tmp_path / "run"
    seeds = list(range(5, 26))
    generate_shards(lambda s: images(s, c=channels), seeds, run / "samples", shard_size=8, progress=False,
                    value_range=(0, 1), dtype=dtype)
    want = (images(seeds, c=channels) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # NHWC
    png, n = export(run, "png")
    assert n == len(seeds) and png == run / "export_png"
    assert sorted(p.name for p in png.iterdir()) == [f"{s:08d}.png" for s in seeds]
    for s, w in zip(seeds, want):
        with Image.open(png / f"{s:08d}.png") as im:
            assert im.mode == ("L" if channels == 1 else "RGB")
            assert np.array_equal(np.asarray(im).reshape(w.shape), w)
    npz, _ = export(run, "npz")
    with np.load(npz) as d:
        assert d["arr_0"].dtype == np.uint8 and d["arr_0"].shape == (len(seeds), 6, 5, 3)  # ADM: NHWC RGB
        assert np.array_equal(d["arr_0"], np.repeat(want, 3, axis=3) if channels == 1 else want)
        assert d["seeds"].tolist() == seeds
    # both read back as reference data give the same statistics, and the run scores 0 against them
    cache = tmp_path / "cache"
    a = fid.reference_stats(png, extractor="identity", cache_dir=cache)
    b = fid.reference_stats(npz, extractor="identity", cache_dir=cache)
    np.testing.assert_array_equal(a["mu"], b["mu"])
    np.testing.assert_array_equal(a["sigma"], b["sigma"])
    ev = fid.FIDEvaluator(_Rgb(), sync=False)
    ev.set_reference(a)
    fid.fid_from_shards(run / "samples", a, ev)
    fake = ev.fake_stats()
    if dtype == "uint8":  # the files hold exactly the shards' values
        np.testing.assert_allclose(fake["mu"], a["mu"], rtol=1e-12)
        np.testing.assert_allclose(fake["sigma"], a["sigma"], rtol=1e-9, atol=1e-15)
    else:  # float shards are scored unquantised; the files are rounded to 1/255
        assert 0 < np.abs(fake["mu"] - a["mu"]).max() <= 0.5 / 255
    with pytest.raises(ValueError, match="already exists"):
        export(run, "png")


class _Rgb(torch.nn.Module):
    """Identity features of grey images expanded to RGB (what PIL's convert("RGB") gives)."""
    name = "rgb_identity"

    def forward(self, x):
        return x.expand(-1, 3, -1, -1).flatten(1).double()


def test_export_refusals(tmp_path):
    generate_shards(lambda s: torch.randn(len(s), 4), range(8), tmp_path / "gmm" / "samples", progress=False)
    with pytest.raises(ValueError, match="record no value range: they are not images"):
        export(tmp_path / "gmm", "png")
    with pytest.raises(ValueError, match="--format must be one of png, npz, got 'jpg'"):
        export(tmp_path / "gmm", "jpg")
    with pytest.raises(FileNotFoundError, match="holds no samples"):
        export(tmp_path, "npz")
    r = subprocess.run([sys.executable, "-m", "diffsampler", "export", str(tmp_path / "gmm"), "--format", "jpg"],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice: 'jpg' (choose from png, npz)" in r.stderr.replace("'png', 'npz'",
                                                                                                  "png, npz")
    r = subprocess.run([sys.executable, "-m", "diffsampler", "export", str(tmp_path / "gmm"), "--format", "npz"],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "diffsampler export: error:" in r.stderr and "not images" in r.stderr


# ---------------------------------------------------------------------------------------------
# the CLI: 2 torchrun ranks (gloo) generate and score; the FID is the one-process FID
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_score_like_one(tmp_path):
    args = ["model=digits", "solver=ddim", "nfe=3", "num_samples=96", "shard_size=16", "batch_size=16",
            "progress=false", "grid_size=4", "eval.kid=true", f"eval.cache_dir={tmp_path / 'cache'}"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "diffsampler", *args, f"hydra.run.dir={one}"])
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    _run(launcher + ["--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                     "-m", "diffsampler", *args, f"hydra.run.dir={two}"])
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["fid_proxy"] > 0 and abs(a["fid_proxy"] - b["fid_proxy"]) <= 1e-9 * a["fid_proxy"]
    # KID: the ranks' features gathered in the one-process order, the same subsets drawn
    assert a["kid_subset_size"] == b["kid_subset_size"] == 96
    assert (a["kid_mean"], a["kid_std"]) == pytest.approx((b["kid_mean"], b["kid_std"]), rel=1e-9)
    sa, sb = load_shards(one / "samples", raw=True), load_shards(two / "samples", raw=True)
    assert sb[1].dtype == torch.uint8 and torch.equal(sa[0], sb[0]) and torch.equal(sa[1], sb[1])
    # the score is the streamed FID of those shards against the digits test split
    from diffsampler.eval.digits import digits_dataset

    ref = fid.reference_stats("digits_ref", lambda: (digits_dataset("test")[0] + 1) / 2, "digits",
                              tmp_path / "cache2")
    assert fid.fid_from_shards(two / "samples", ref, fid.FIDEvaluator("digits", sync=False)) == pytest.approx(
        b["fid_proxy"], rel=1e-9)
