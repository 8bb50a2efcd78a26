"""Generation at scale: seeded samples written as resumable, atomically saved shards.

* :func:`dist_env` / :func:`barrier` / :func:`is_main` -- torchrun-style distributed set-up (one
  process per GPU with ``nccl``, or CPU processes with ``gloo``); a plain ``python`` run is rank 0
  of a world of 1.
* :func:`generate_shards` -- split a list of seeds into consecutive shards; shard ``j`` is produced
  by rank ``j % world_size`` and saved as ``shard_{first:08d}_{last:08d}.pt`` holding
  ``{"seeds": LongTensor, "samples": float tensor}``.  A shard is written to a temporary file and
  renamed into place, so a file with the final name is always complete; a restarted run skips
  every finished shard and regenerates only the missing ones (a killed run at most loses the
  shard it was working on).  Because :func:`diffsampler.sample` with ``seeds=`` makes sample k
  depend only on seed k, the result does not depend on the shard size, the world size or on how
  often the run was interrupted.
* :func:`load_shards` / :func:`iter_shards` -- read them back ordered by seed.
* :func:`save_image_grid` -- a PNG grid of images in [0, 1] (PIL; no torchvision).

Typical use (``torchrun --nproc_per_node=8 gen.py`` or plain ``python gen.py``)::

    rank, world = dist_env()
    fn = lambda seeds: ds.sample(den, shape=(len(seeds), 3, 32, 32), seeds=seeds, solver="dpmpp_2m", nfe=10)
    paths = generate_shards(fn, range(50_000), "out/samples", shard_size=256)
    if is_main():
        seeds, x = load_shards("out/samples")
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["dist_env", "barrier", "is_main", "shard_name", "generate_shards", "load_shards", "iter_shards",
           "MissingSeedsError", "save_image_grid"]

_SHARD_RE = re.compile(r"^shard_(\d+)_(\d+)\.pt$")


# ---------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------

def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    Reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).  When ``WORLD_SIZE > 1``
    and ``torch.distributed`` is not initialised yet, initialises the default process group from
    the environment (``env://``) with backend ``nccl`` if CUDA is available (after selecting the
    GPU ``LOCAL_RANK``) and ``gloo`` otherwise.  Without torchrun's variables: ``(0, 1)``.
    """
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if not torch.distributed.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            backend = "gloo"
        torch.distributed.init_process_group(backend=backend, init_method="env://")
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank, world


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group of more than one process is running."""
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def is_main() -> bool:
    """True on rank 0 (and in a non-distributed run)."""
    if _dist_ready():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------

def shard_name(seeds: Sequence[int]) -> str:
    """File name of the shard holding ``seeds``: ``shard_{first:08d}_{last:08d}.pt``."""
    return f"shard_{int(seeds[0]):08d}_{int(seeds[-1]):08d}.pt"


def _shard_seeds(path: Path) -> torch.Tensor | None:
    """The seeds stored in a finished shard (memory-mapped: the samples are not read), or None if
    the file cannot be read."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["seeds"]
    except Exception:  # noqa: BLE001 - an unreadable file is treated as missing
        return None


def _save_atomic(obj, path: Path) -> None:
    """torch.save to ``<path>.tmp`` in the same directory, fsync, then os.replace: a file with the
    final name is always complete.  A ``.tmp`` left over by a killed run is simply overwritten."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def generate_shards(
    sample_fn: Callable[[list[int]], torch.Tensor],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    shard_size: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[Path]:
    """Generate ``sample_fn(shard_seeds)`` for consecutive shards of ``seeds`` and save each shard.

    Shard ``j`` (seeds ``seeds[j*shard_size:(j+1)*shard_size]``) is produced by rank
    ``j % world_size``; ``rank``/``world_size`` default to :func:`dist_env`.  Every finished shard
    is saved atomically to ``out_dir/shard_{first:08d}_{last:08d}.pt`` as
    ``{"seeds": LongTensor, "samples": float CPU tensor}``; shards that already exist are skipped,
    so re-running after an interruption only generates the missing shards.  An existing shard
    file holding different seeds (a directory reused for another seed list) raises ``ValueError``.

    ``sample_fn`` must return a tensor whose first dimension is ``len(shard_seeds)``.  A progress
    bar with ETA is shown on rank 0 (``progress=False`` disables it).  Returns the paths of all
    shards of all ranks, in seed order (after a barrier when distributed).
    """
    seeds = [int(s) for s in seeds]
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shard_size = int(shard_size)
    if rank is None or world_size is None:
        env_rank, env_world = dist_env()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    shards = [seeds[i:i + shard_size] for i in range(0, len(seeds), shard_size)]
    paths = [out / shard_name(s) for s in shards]
    if len(set(paths)) != len(paths):
        raise ValueError("two shards of this seed list would share a file name (same first and last seed); "
                         "pass distinct seeds")

    mine = [j for j in range(len(shards)) if j % world_size == rank]
    todo = []
    for j in mine:
        if paths[j].exists():
            stored = _shard_seeds(paths[j])
            if stored is not None:
                if stored.tolist() != shards[j]:
                    raise ValueError(
                        f"{paths[j]} already exists but holds other seeds ({len(stored)} seeds) than this run's "
                        f"shard ({len(shards[j])} seeds {shards[j][0]}..{shards[j][-1]}); use a fresh out_dir")
                continue  # finished earlier: never regenerate
        todo.append(j)

    from tqdm.auto import tqdm

    total = sum(len(shards[j]) for j in mine)
    done = total - sum(len(shards[j]) for j in todo)
    with tqdm(total=total, initial=done, desc=desc, unit="sample", dynamic_ncols=True,
              disable=not progress or rank != 0) as bar:
        for j in todo:
            s = shards[j]
            x = sample_fn(list(s))
            if not torch.is_tensor(x):
                raise TypeError(f"sample_fn must return a torch.Tensor, got {type(x).__name__}")
            if x.shape[0] != len(s):
                raise ValueError(f"sample_fn returned {x.shape[0]} samples for {len(s)} seeds")
            x = x.detach().to("cpu")
            if not x.is_floating_point():
                x = x.float()
            _save_atomic({"seeds": torch.tensor(s, dtype=torch.long), "samples": x.contiguous()}, paths[j])
            bar.update(len(s))
    if world_size > 1:
        barrier()
    return paths


class MissingSeedsError(LookupError):
    """Requested seeds are not in any shard of the directory."""


def _shard_files(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        raise FileNotFoundError(f"shard directory {out_dir} does not exist")
    files = [p for p in out_dir.iterdir() if _SHARD_RE.match(p.name)]
    return sorted(files, key=lambda p: tuple(int(g) for g in _SHARD_RE.match(p.name).groups()))


def _plan(out_dir: Path, seeds: Sequence[int] | None):
    """[(file, rows to take, seeds taken)] covering `seeds` (or every seed once), each seed taken from
    the first file (in name order) that holds it."""
    files = _shard_files(Path(out_dir))
    taken: set[int] = set()
    want = None if seeds is None else {int(s) for s in seeds}
    plan = []
    for f in files:
        stored = _shard_seeds(f)
        if stored is None:
            raise RuntimeError(f"cannot read shard {f}")
        rows, got = [], []
        for i, s in enumerate(stored.tolist()):
            if s in taken or (want is not None and s not in want):
                continue
            taken.add(s)
            rows.append(i)
            got.append(s)
        if rows:
            plan.append((f, rows, got))
    if want is not None and len(taken) != len(want):
        missing = sorted(want - taken)
        raise MissingSeedsError(
            f"{len(missing)} of {len(want)} requested seeds are not in any shard of {out_dir} "
            f"(first missing: {missing[:10]}); generate them with generate_shards first")
    return plan


def iter_shards(out_dir: str | os.PathLike, seeds: Sequence[int] | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(seeds, samples)`` shard by shard (shard files in seed order, each seed once), restricted
    to ``seeds`` if given; checks first that every requested seed exists (:class:`MissingSeedsError`).
    Memory stays at one shard, so it suits scoring tens of thousands of images."""
    for f, rows, got in _plan(Path(out_dir), seeds):
        d = torch.load(f, map_location="cpu", weights_only=True)
        yield torch.tensor(got, dtype=torch.long), d["samples"][rows]


def load_shards(out_dir: str | os.PathLike, seeds: Sequence[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of ``out_dir`` as ``(seeds LongTensor (N,), samples (N, ...))`` ordered by seed.

    With ``seeds``: exactly those, in the order given (sorted order for the usual ``range``); raises
    :class:`MissingSeedsError` naming the missing ones if any is not in a shard.  A seed present in
    several shard files (e.g. runs with different shard sizes) is taken once.
    """
    parts = list(iter_shards(out_dir, seeds))
    if not parts:
        raise MissingSeedsError(f"no shards in {out_dir}")
    all_seeds = torch.cat([p[0] for p in parts])
    samples = torch.cat([p[1] for p in parts])
    if seeds is None:
        order = torch.argsort(all_seeds)
    else:
        pos = {s: i for i, s in enumerate(all_seeds.tolist())}
        order = torch.tensor([pos[int(s)] for s in seeds], dtype=torch.long)
    return all_seeds[order], samples[order]


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    padding: int = 2, pad_value: float = 0.0) -> Path:
    """Save ``images`` (B, C, H, W) with values in [0, 1] (clamped) as one PNG/JPEG grid with PIL.

    ``nrow`` images per row (default ``ceil(sqrt(B))``); C = 1 (grey), 3 (RGB) or 4 (RGBA).
    """
    from PIL import Image

    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] not in (1, 3, 4) or x.shape[0] < 1:
        raise ValueError(f"images must have shape (B, C, H, W) with C in (1, 3, 4), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    nrow = max(1, min(b, int(nrow) if nrow else math.ceil(math.sqrt(b))))
    ncol = math.ceil(b / nrow)
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), float(pad_value))
    for k in range(b):
        r, q = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = x[k]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)  # uint8: L, RGB or RGBA
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
