"""`diffsampler export RUN_DIR --format png|npz`: a run's samples in the files other FID tools read.

* ``png``: one 8-bit PNG per sample, ``<seed:08d>.png`` (grey images stay 1-channel "L"; RGB stay
  RGB), in ``RUN_DIR/export_png`` -- the folder clean-fid (``fid.compute_fid(folder, ...)``) and
  torch-fidelity (``fidelity --input1 folder``) read; both convert to RGB on loading.
* ``npz``: ``arr_0``, uint8 ``(N, H, W, 3)`` (NHWC; grey replicated to 3 channels), the sample
  batch ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``) reads, plus ``seeds`` (N,)
  int64 naming row k's seed; ``RUN_DIR/samples.npz``.

Samples are quantised to uint8 once: uint8 shards (the default for image models) are written as
stored; float shards with a recorded value range are rounded as ``generate.quantize`` does.
Shards are read one at a time and the .npz is written as a stream (memory flat in the number of
samples); both outputs are written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

FORMATS = ("png", "npz")

__all__ = ["FORMATS", "export"]


def _samples_dir(run_dir: Path) -> Path:
    """RUN_DIR/samples, or RUN_DIR itself when it holds the shards."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    d = run_dir / "samples"
    if d.is_dir():
        return d
    if any(run_dir.glob("shard_*.pt")):
        return run_dir
    raise FileNotFoundError(f"{run_dir} holds no samples (no samples/ directory of shard_*.pt files): give the "
                            "directory of a `diffsampler` run")


def _uint8_nhwc(x, value_range) -> np.ndarray:
    """A shard's samples (B, C, H, W), uint8 or float in ``value_range``, as uint8 (B, H, W, C)."""
    import torch

    from ..eval.generate import quantize

    if x.dtype != torch.uint8:
        x = quantize(x, value_range)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def export(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> tuple[Path, int]:
    """Write the samples of ``run_dir`` as ``fmt`` (``"png"`` or ``"npz"``) to ``out`` (default
    ``run_dir/export_png`` or ``run_dir/samples.npz``); returns ``(out, number of images)``.

    Refused (ValueError / FileNotFoundError, before anything is written): another format, a run
    without shards, shards that are not images (no value range recorded, e.g. model=gmm vectors, or
    not (N, C, H, W) with C = 1 or 3), an existing ``out``."""
    from ..eval.generate import iter_shards, shard_index, shard_record

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir).expanduser()
    samples = _samples_dir(run_dir)
    rec = shard_record(samples)
    if rec.value_range is None:
        raise ValueError(f"the shards of {samples} record no value range: they are not images (e.g. model=gmm "
                         "vectors), so there is nothing to write as png / npz")
    index = shard_index(samples, None)
    n = sum(len(rows) for _, rows, _ in index)
    first = next(iter_shards(samples, index[0][2][:1], raw=True))[1]
    if first.ndim != 4 or first.shape[1] not in (1, 3):
        raise ValueError(f"the samples of {samples} have shape {tuple(first.shape[1:])} per sample; png / npz export "
                         "takes images (C, H, W) with C = 1 (grey) or 3 (RGB)")
    out = Path(out).expanduser() if out is not None else run_dir / ("export_png" if fmt == "png" else "samples.npz")
    if out.exists():
        raise ValueError(f"{out} already exists; delete it or give another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..eval.generate import tmp_path

    tmp = tmp_path(out)
    if fmt == "png":
        _write_png(samples, rec.value_range, tmp)
    else:
        _write_npz(samples, rec.value_range, tmp, n, tuple(first.shape[2:]))
    os.replace(tmp, out)
    return out, n


def _write_png(samples: Path, value_range, tmp: Path) -> None:
    from PIL import Image

    from ..eval.generate import iter_shards

    tmp.mkdir()
    for seeds, x in iter_shards(samples, raw=True):
        for s, img in zip(seeds.tolist(), _uint8_nhwc(x, value_range)):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp / f"{s:08d}.png")


def _write_npz(samples: Path, value_range, tmp: Path, n: int, hw: tuple[int, int]) -> None:
    """arr_0 written into the archive shard by shard (np.savez would hold all of it in memory)."""
    from numpy.lib import format as npy

    from ..eval.generate import iter_shards

    order = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as fp:
            npy.write_array_header_1_0(fp, {"descr": npy.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                            "shape": (n, *hw, 3)})
            for seeds, x in iter_shards(samples, raw=True):
                img = _uint8_nhwc(x, value_range)
                if img.shape[-1] == 1:  # ADM's evaluator feeds arr_0 to an RGB network
                    img = np.repeat(img, 3, axis=-1)
                fp.write(np.ascontiguousarray(img).tobytes())
                order += seeds.tolist()
        with zf.open("seeds.npy", "w") as fp:
            npy.write_array(fp, np.asarray(order, dtype=np.int64))
    if len(order) != n:
        raise RuntimeError(f"wrote {len(order)} images, expected {n}")
