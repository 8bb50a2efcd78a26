"""Generation at scale: seeded samples written as resumable, atomically saved shards.

* :func:`dist_env` / :func:`barrier` / :func:`is_main` -- distributed set-up from torchrun, submitit /
  SLURM tasks or srun alike (:func:`launch_env`; one process per GPU with ``nccl``, or CPU processes
  with ``gloo``); a plain ``python`` run is rank 0 of a world of 1.
* :func:`generate_shards` -- split a list of seeds into consecutive shards; shard ``j`` is produced
  by rank ``j % world_size`` and saved as ``shard_{first:08d}_{last:08d}.pt`` holding
  ``{"seeds": LongTensor, "samples": float32 or uint8 tensor, "fingerprint": str | None,
  "value_range": [lo, hi] | None}`` (uint8: images, ``value_range`` quantised to 0..255).  A shard is
  written to a temporary file and
  renamed into place, so a file with the final name is always complete; a restarted run skips
  every finished shard and regenerates only the missing ones (a killed run at most loses the
  shard it was working on).  Because :func:`diffsampler.sample` with ``seeds=`` makes sample k
  depend only on seed k, the result does not depend on the shard size, the world size or on how
  often the run was interrupted.  ``fingerprint=`` (a JSON-able mapping of everything that
  determines the samples: model, solver, NFE, grid, ...) is stored in every shard, and a directory
  holding shards of another fingerprint is refused (:class:`ShardMismatchError`) before any sample
  is drawn; ``value_range=`` records the samples' range (images: (0, 1) or (-1, 1)).
* :func:`load_shards` / :func:`iter_shards` -- read them back ordered by seed;
  :func:`shard_record` -- the fingerprint and value range they were written with.
* :func:`save_image_grid` -- a PNG grid of images in [0, 1] (PIL; no torchvision).

Typical use (``torchrun --nproc_per_node=8 gen.py`` or plain ``python gen.py``)::

    rank, world = dist_env()
    fn = lambda seeds: ds.sample(den, shape=(len(seeds), 3, 32, 32), seeds=seeds, solver="dpmpp_2m", nfe=10)
    paths = generate_shards(fn, range(50_000), "out/samples", shard_size=256)
    if is_main():
        seeds, x = load_shards("out/samples")
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import re
import socket
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch

__all__ = ["dist_env", "launch_env", "Launch", "barrier", "is_main", "shard_name", "generate_shards", "load_shards",
           "iter_shards", "MissingSeedsError", "ShardMismatchError", "ShardRecord", "shard_record", "check_shards", "shard_index",
           "checked_value_range", "fingerprint_digest", "save_image_grid", "SHARD_DTYPES", "checked_shard_dtype",
           "quantize", "dequantize"]

_SHARD_RE = re.compile(r"^shard_(\d+)_(\d+)\.pt$")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------

def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Launch(NamedTuple):
    """This process's place among the processes of one job, as its launcher set it up."""
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "submitit" | "srun" | "single"


def launch_env() -> Launch:
    """``(rank, world_size, local_rank, launcher)`` from the environment, without initialising anything.

    * torchrun (or any ``env://`` launcher, e.g. submitit's ``TorchDistributedEnvironment().export()``):
      ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
    * submitit (``SUBMITIT_EXECUTOR`` set: Hydra's ``submitit_slurm`` / ``submitit_local`` launchers with
      ``tasks_per_node`` > 1): ``submitit.JobEnvironment()``'s global rank, number of tasks, local rank
      (on SLURM: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``);
    * srun without submitit: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (set inside a job step only, so
      a plain ``python`` in an sbatch script is one process), ``SLURM_LOCALID``;
    * otherwise one process: ``(0, 1, 0, "single")``.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "torchrun")
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit  # it launched this process

        job = submitit.JobEnvironment()
        return Launch(int(job.global_rank), int(job.num_tasks), int(job.local_rank), "submitit")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0")),
                      "srun")
    return Launch(0, 1, 0, "single")


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = head.group(1), head.group(2)
    return prefix + re.split(r"[-,]", ranges)[0] if ranges else prefix


def _rendezvous(launch: Launch) -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) for a launcher that does not set them (submitit, srun): rank 0's host
    and a port derived from the job id, the same on every task; the environment's values win."""
    env = os.environ
    if launch.launcher == "submitit":
        from submitit.helpers import TorchDistributedEnvironment

        t = TorchDistributedEnvironment()  # first host of the job, a port seeded by the job id
        addr, port = t.master_addr, t.master_port
    else:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = _first_host(nodes)
        job = env.get("SLURM_JOB_ID", "0") + "." + env.get("SLURM_STEP_ID", "0")
        port = 20000 + int(hashlib.sha256(job.encode()).hexdigest(), 16) % 40000
    return env.get("MASTER_ADDR", addr), env.get("MASTER_PORT", str(port))


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    Reads the launcher's environment (:func:`launch_env`: torchrun, submitit / SLURM tasks, srun).
    When the world has more than one process and ``torch.distributed`` is not initialised yet,
    initialises the default process group (``env://``) with backend ``nccl`` if CUDA is available
    (after selecting the GPU of the local rank) and ``gloo`` otherwise.  For submitit and srun the
    torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
    are set first from the launcher's, so later readers see the same ranks.  One process: ``(0, 1)``.
    """
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    launch = launch_env()
    if launch.world_size > 1:
        if not torch.distributed.is_available():
            raise RuntimeError(f"{launch.launcher} started {launch.world_size} processes but this torch build has "
                               "no torch.distributed")
        if launch.launcher != "torchrun":
            addr, port = _rendezvous(launch)
            for k, v in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size), ("LOCAL_RANK", launch.local_rank),
                         ("MASTER_ADDR", addr), ("MASTER_PORT", port)):
                os.environ.setdefault(k, str(v))
        if torch.cuda.is_available():
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
            backend = "nccl"
        else:
            backend = "gloo"
        log.info("rank %d of %d (%s): joining the process group (%s, %s:%s)", launch.rank, launch.world_size,
                 launch.launcher, backend, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
        torch.distributed.init_process_group(backend=backend, init_method="env://")
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return launch.rank, launch.world_size


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group of more than one process is running."""
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def is_main() -> bool:
    """True on rank 0 (and in a non-distributed run)."""
    if _dist_ready():
        return torch.distributed.get_rank() == 0
    return launch_env().rank == 0


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------

def _seed(s) -> int:
    """A seed as a non-negative int: shard file names carry seeds as unsigned digits."""
    try:
        v = operator.index(s)
    except TypeError:
        v = None
    if v is None or v < 0:
        raise ValueError(f"seeds must be integers >= 0 (shard file names carry them), got {s!r}")
    return v


def shard_name(seeds: Sequence[int]) -> str:
    """File name of the shard holding ``seeds``: ``shard_{first:08d}_{last:08d}.pt``."""
    return f"shard_{_seed(seeds[0]):08d}_{_seed(seeds[-1]):08d}.pt"


# ---------------------------------------------------------------------------------------------
# what a shard was made with: fingerprint and value range
# ---------------------------------------------------------------------------------------------

class ShardMismatchError(ValueError):
    """A shard directory holds shards written with another fingerprint or value range.

    ``path``: the directory; ``differences``: one line per differing field."""

    def __init__(self, path: Path, differences: list[str]):
        self.path, self.differences = Path(path), list(differences)
        super().__init__(f"{path} holds shards made with another configuration ({'; '.join(differences)}); "
                         "use a fresh out_dir or delete its shard files")


class ShardRecord(NamedTuple):
    """What the shards of a directory were written with (None: not recorded)."""
    fingerprint: dict | None
    value_range: tuple[float, float] | None
    digest: str | None  # fingerprint_digest(fingerprint)
    dtype: str = "float32"  # how the samples are stored: "float32" or "uint8" (quantised value_range)


#: how ``generate_shards`` may store samples: float32 as returned, or uint8 (images: ``value_range``
#: mapped to 0..255 and rounded, the quantisation every image file and FID tool applies)
SHARD_DTYPES = ("float32", "uint8")


def checked_shard_dtype(dtype, value_range=None) -> str:
    """``dtype`` as one of :data:`SHARD_DTYPES` (a torch dtype is accepted); a ValueError naming the
    allowed ones otherwise, or for uint8 without a value range (the range is what 0..255 maps to)."""
    name = str(dtype).removeprefix("torch.")
    if name not in SHARD_DTYPES:
        raise ValueError(f"shard dtype must be one of {', '.join(SHARD_DTYPES)}, got {dtype!r}")
    if name == "uint8" and value_range is None:
        raise ValueError("shard dtype uint8 stores images: give value_range=(lo, hi), the range mapped to 0..255 "
                         "(decoded images: (0, 1)); keep float32 for samples that are not images")
    return name


def quantize(x: torch.Tensor, value_range) -> torch.Tensor:
    """Samples in ``value_range`` as uint8: ``round((x - lo) / (hi - lo) * 255)``.  Values outside the
    range (beyond float rounding) raise ValueError: they are refused, never clamped into it."""
    lo, hi = checked_value_range(value_range)
    mn, mx = float(x.min()), float(x.max())
    tol = 1e-5 * (hi - lo)
    if not (lo - tol <= mn and mx <= hi + tol):  # NaN fails too
        raise ValueError(f"samples have values in [{mn:.4g}, {mx:.4g}], outside value_range ({lo}, {hi}); they "
                         "cannot be stored as uint8 (declare the range they are in, or store float32)")
    return ((x.double() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)


def dequantize(x: torch.Tensor, value_range) -> torch.Tensor:
    """uint8 shard samples back to float32 values in ``value_range`` (float samples pass through)."""
    if x.dtype != torch.uint8:
        return x
    lo, hi = (float(v) for v in value_range)
    return x.float() / 255 if (lo, hi) == (0.0, 1.0) else (x.double() * ((hi - lo) / 255) + lo).float()


def _canonical(fingerprint: Mapping | None) -> str | None:
    """The fingerprint as canonical JSON (sorted keys, no spaces): equal configurations, equal strings."""
    if fingerprint is None:
        return None
    if not isinstance(fingerprint, Mapping):
        raise TypeError(f"fingerprint must be a mapping of JSON values or None, got {type(fingerprint).__name__}")
    try:
        return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise TypeError(f"fingerprint must hold only JSON values (str, number, bool, None, lists, mappings): {e}") from None


def fingerprint_digest(fingerprint: Mapping | None) -> str | None:
    """First 16 hex digits of the SHA-256 of the canonical JSON of ``fingerprint``."""
    text = _canonical(fingerprint)
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def checked_value_range(value_range) -> tuple[float, float] | None:
    """`value_range` as (lo, hi) floats (None stays None); a ValueError unless finite lo < hi."""
    if value_range is None:
        return None
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be None or (lo, hi) with finite lo < hi, got {value_range!r}")
    return lo, hi


def _shard_header(path: Path) -> dict | None:
    """Seeds, fingerprint (canonical JSON) and value range of a finished shard (memory-mapped: the
    samples are not read), or None if the file cannot be read.  Shards written before fingerprints
    and ranges were recorded give None for both."""
    try:
        d = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        vr = d.get("value_range")
        return {"seeds": d["seeds"], "fingerprint": d.get("fingerprint"),
                "value_range": None if vr is None else tuple(float(v) for v in vr),
                "dtype": str(d["samples"].dtype).removeprefix("torch.")}
    except Exception:  # noqa: BLE001 - an unreadable file is treated as missing
        return None


def _shard_seeds(path: Path) -> torch.Tensor | None:
    h = _shard_header(path)
    return None if h is None else h["seeds"]


def _differences(stored: str | None, given: str | None) -> list[str]:
    """'field: <in the shards>, <now>' for every field that differs between two canonical fingerprints."""
    if stored is None or given is None:
        return ["the shards carry no fingerprint" if stored is None else "this call gives none"]

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    def show(d, k):
        return repr(d[k]) if k in d else "absent"

    a, b = flat(json.loads(stored)), flat(json.loads(given))
    diffs = [f"{k}: {show(a, k)} in the shards, {show(b, k)} now"
             for k in sorted(a.keys() | b.keys()) if k not in a or k not in b or repr(a[k]) != repr(b[k])]
    return diffs or [f"fingerprint: {stored} in the shards, {given} now"]


def _check_headers(out: Path, fingerprint: str | None, value_range, dtype: str | None = None) -> None:
    """Every readable shard of ``out`` was written with ``fingerprint`` and ``value_range`` (and
    stores its samples as ``dtype``, unless None)."""
    if not out.is_dir():
        return
    for f in _shard_files(out):
        h = _shard_header(f)
        if h is None:
            continue  # unreadable: regenerated if it is one of ours
        diffs = _differences(h["fingerprint"], fingerprint) if h["fingerprint"] != fingerprint else []
        if h["value_range"] != value_range:
            diffs.append(f"value_range: {h['value_range']} in the shards, {value_range} now")
        if dtype is not None and (h["dtype"] == "uint8") != (dtype == "uint8"):  # float32: any float kept as is
            diffs.append(f"shard dtype: {h['dtype']} in the shards, {dtype} now")
        if diffs:
            raise ShardMismatchError(out, diffs)


def check_shards(out_dir: str | os.PathLike, fingerprint: Mapping | None = None, value_range=None,
                 dtype: str | None = None) -> None:
    """Raise :class:`ShardMismatchError` naming the differing fields if a shard in ``out_dir`` was
    written with another ``fingerprint`` or ``value_range``, or (``dtype`` given) stores its samples
    in another dtype (what :func:`generate_shards` checks before drawing any sample).  A missing or
    empty directory passes."""
    value_range = checked_value_range(value_range)
    dtype = None if dtype is None else checked_shard_dtype(dtype, value_range)
    _check_headers(Path(out_dir), _canonical(fingerprint), value_range, dtype)


def shard_record(out_dir: str | os.PathLike) -> ShardRecord:
    """The fingerprint and value range the shards of ``out_dir`` were written with (None where not
    recorded).  Raises :class:`ShardMismatchError` if the shards disagree, :class:`MissingSeedsError`
    if there are none."""
    out = Path(out_dir)
    headers = [h for h in (_shard_header(f) for f in _shard_files(out)) if h is not None]
    if not headers:
        raise MissingSeedsError(f"no readable shards in {out}")
    first = headers[0]
    _check_headers(out, first["fingerprint"], first["value_range"], first["dtype"])
    fp = None if first["fingerprint"] is None else json.loads(first["fingerprint"])
    return ShardRecord(fp, first["value_range"], fingerprint_digest(fp), first["dtype"])


def tmp_path(path: Path) -> Path:
    """A temporary name next to ``path`` that no other process uses (host and process id): ranks and
    jobs sharing a directory on a shared filesystem never write the same temporary file.  Not a shard
    name, so a leftover of a killed process is never read; the next run on the same host removes it."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_tmp(path: Path) -> None:
    """Delete the temporary files of ``path`` left by killed processes of this host (and the older
    ``<name>.tmp`` form).  A live writer's file, or one written on another host, is left alone."""
    host = socket.gethostname()
    for tmp in [path.with_name(path.name + ".tmp"), *path.parent.glob(f".{glob_escape(path.name)}.*.tmp")]:
        stem = tmp.name[len(path.name) + 2:-len(".tmp")] if tmp.name.startswith(".") else None
        if stem is not None:
            tmp_host, _, pid = stem.rpartition(".")
            if tmp_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
        tmp.unlink(missing_ok=True)


def _save_atomic(obj, path: Path) -> None:
    """torch.save to a per-process temporary file in the same directory, fsync, then os.replace: a file
    with the final name is always complete, whichever process wrote it."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_shards(
    sample_fn: Callable[[list[int]], torch.Tensor],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    shard_size: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    desc: str = "generating",
    *,
    fingerprint: Mapping | None = None,
    value_range: tuple[float, float] | None = None,
    dtype: str = "float32",
) -> list[Path]:
    """Generate ``sample_fn(shard_seeds)`` for consecutive shards of ``seeds`` and save each shard.

    Shard ``j`` (seeds ``seeds[j*shard_size:(j+1)*shard_size]``) is produced by rank
    ``j % world_size``; ``rank``/``world_size`` default to :func:`dist_env`.  Every finished shard
    is saved atomically to ``out_dir/shard_{first:08d}_{last:08d}.pt`` as
    ``{"seeds": LongTensor, "samples": float32 or uint8 CPU tensor, "fingerprint", "value_range"}``; shards
    that already exist are skipped, so re-running after an interruption only generates the missing
    shards.  Seeds must be integers >= 0 (the file names carry them).

    ``fingerprint``: a mapping of JSON values naming everything that determines the samples (model,
    solver and its options, NFE, grid, ...; not the seeds, which each shard lists), stored in every
    shard as canonical JSON.  ``value_range``: the samples' range, e.g. (0, 1) for decoded images
    (None: not recorded), read back by :func:`~diffsampler.eval.fid.fid_from_shards`.  ``dtype``: how
    the samples are stored, ``"float32"`` (as returned) or ``"uint8"`` (images: ``value_range`` mapped
    to 0..255 and rounded, a quarter of the bytes; values outside the range raise ValueError);
    :func:`iter_shards` / :func:`load_shards` give them back as float32 in ``value_range``.  Before
    ``sample_fn`` is called once, every shard already in ``out_dir`` is checked: one written with
    another fingerprint, value range or dtype raises :class:`ShardMismatchError` naming the differing
    fields, and one holding other seeds than this run's shard of the same name raises ``ValueError``.

    ``sample_fn`` must return a tensor whose first dimension is ``len(shard_seeds)``.  A progress
    bar with ETA is shown on rank 0 (``progress=False`` disables it).  Returns the paths of all
    shards of all ranks, in seed order (after a barrier when distributed).
    """
    seeds = [_seed(s) for s in seeds]
    canonical, value_range = _canonical(fingerprint), checked_value_range(value_range)
    dtype = checked_shard_dtype(dtype, value_range)
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
    _check_headers(out, canonical, value_range, dtype)
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
    for j in todo:
        _remove_stale_tmp(paths[j])

    from tqdm.auto import tqdm

    record = {"fingerprint": canonical, "value_range": None if value_range is None else list(value_range)}
    total = sum(len(shards[j]) for j in mine)
    done = total - sum(len(shards[j]) for j in todo)
    log.info("%s: rank %d of %d makes %d of %d shards (%d samples) in %s; %d finished earlier, %d to generate",
             desc, rank, world_size, len(mine), len(shards), total, out, len(mine) - len(todo), len(todo))
    started, made = time.perf_counter(), 0
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
            if dtype == "uint8":
                x = quantize(x, value_range)
            _save_atomic({"seeds": torch.tensor(s, dtype=torch.long), "samples": x.contiguous(), **record}, paths[j])
            bar.update(len(s))
            done, made = done + len(s), made + len(s)
            log.info("%s: rank %d saved %s (%d/%d samples of this rank, %.1f samples/s)", desc, rank, paths[j].name,
                     done, total, made / max(time.perf_counter() - started, 1e-9))
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


def shard_index(out_dir: Path, seeds: Sequence[int] | None):
    """[(file, rows to take, seeds taken)] covering `seeds` (or every seed once), each seed taken from
    the first file (in name order) that holds it."""
    files = _shard_files(Path(out_dir))
    taken: set[int] = set()
    want = None if seeds is None else {int(s) for s in seeds}
    index = []
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
            index.append((f, rows, got))
    if want is not None and len(taken) != len(want):
        missing = sorted(want - taken)
        raise MissingSeedsError(
            f"{len(missing)} of {len(want)} requested seeds are not in any shard of {out_dir} "
            f"(first missing: {missing[:10]}); generate them with generate_shards first")
    return index


def iter_shards(out_dir: str | os.PathLike, seeds: Sequence[int] | None = None, *, raw: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(seeds, samples)`` shard by shard (shard files in seed order, each seed once), restricted
    to ``seeds`` if given; checks first that every requested seed exists (:class:`MissingSeedsError`).
    Memory stays at one shard, so it suits scoring tens of thousands of images.  uint8 shards are
    given back as float32 in their value range (``raw=True``: as stored)."""
    for f, rows, got in shard_index(Path(out_dir), seeds):
        d = torch.load(f, map_location="cpu", weights_only=True)
        x = d["samples"][rows]
        if not raw:
            x = dequantize(x, d.get("value_range"))
        yield torch.tensor(got, dtype=torch.long), x


def load_shards(out_dir: str | os.PathLike, seeds: Sequence[int] | None = None, *, raw: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of ``out_dir`` as ``(seeds LongTensor (N,), samples (N, ...))`` ordered by seed.

    With ``seeds``: exactly those, in the order given (sorted order for the usual ``range``); raises
    :class:`MissingSeedsError` naming the missing ones if any is not in a shard.  A seed present in
    several shard files (e.g. runs with different shard sizes) is taken once.  uint8 shards come back
    as float32 in their value range (``raw=True``: as stored).
    """
    parts = list(iter_shards(out_dir, seeds, raw=raw))
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
