"""Generate GMM samples with generate_shards (plain python or torchrun) and score them with FIDEvaluator.

    python tests/dist_generate_script.py --out DIR --n 64 --shard-size 8
    torchrun --nproc_per_node=2 tests/dist_generate_script.py --out DIR --num-seeds 64 --shard-size 8

(under torchrun spell --n as --num-seeds: torchrun rejects `--n` as an ambiguous abbreviation of its own options)

Samples: the fixed 8-d mixture below, exact `gmm_denoiser`, solver dpmpp_2m_sde (stochastic, so
the per-seed noise matters), seeds 0..n-1.  FID: identity features of the samples against the
exact mixture mean/covariance.  Rank 0 writes {out}/result.json.  --log appends one line per
generated shard ("rank first_seed"), --sleep slows every shard down (for kill/restart tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import diffsampler as ds  # noqa: E402
from diffsampler.eval.fid import FIDEvaluator, fid_from_shards, reference_stats  # noqa: E402
from diffsampler.eval.generate import dist_env, generate_shards, is_main, load_shards  # noqa: E402
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser  # noqa: E402

NFE = 8


def mixture() -> GaussianMixture:
    return GaussianMixture.random(8, 4, seed=0, scale=1.5, std=(0.3, 0.6))


def make_sample_fn(sleep: float = 0.0, log: str | None = None, rank: int = 0):
    den = gmm_denoiser(mixture(), ds.LinearVP(), "epsilon")

    def sample_fn(seeds):
        if log:
            with open(log, "a") as f:
                f.write(f"{rank} {seeds[0]}\n")
        if sleep:
            time.sleep(sleep)
        return ds.sample(den, solver="dpmpp_2m_sde", nfe=NFE, shape=(len(seeds), 8), seeds=seeds)

    return sample_fn


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    # torchrun parses abbreviations of its own options everywhere: `--n` is ambiguous there, use --num-seeds
    p.add_argument("--n", "--num-seeds", dest="n", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--log-file", dest="log", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    rank, world = dist_env()
    paths = generate_shards(make_sample_fn(a.sleep, a.log, rank), range(a.n), a.out, shard_size=a.shard_size,
                            progress=False)
    g = mixture()
    reference = {"mu": g.mean, "sigma": g.covariance, "n": 10**6}
    ev = FIDEvaluator("identity")
    fid = fid_from_shards(a.out, reference, ev, value_range=None)
    local = int(ev.metric.fake_features_num_samples)  # this rank's own samples (compute() restores local states)
    per_rank, local_per_rank = [fid], [local]
    if world > 1:
        per_rank, local_per_rank = [None] * world, [None] * world
        torch.distributed.all_gather_object(per_rank, fid)
        torch.distributed.all_gather_object(local_per_rank, local)
    if is_main():
        st = ev.fake_stats()
        # scoring on rank 0 alone (sync=False, no collectives) gives the same value, and
        # reference_stats called on rank 0 only does not wait for the other ranks
        alone = fid_from_shards(a.out, reference, FIDEvaluator("identity", sync=False), value_range=None)
        own = reference_stats("own_samples", lambda: load_shards(a.out)[1], "identity", Path(a.out) / "ref")
        self_fid = fid_from_shards(a.out, own, FIDEvaluator("identity", sync=False), value_range=None)
        result = {"fid": fid, "fid_per_rank": per_rank, "n_scored_per_rank": local_per_rank, "world_size": world,
                  "n_fake": st["n"],
                  "n_shards": len(paths), "fid_rank0_alone": alone, "self_fid": self_fid}
        tmp = Path(a.out) / "result.json.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, Path(a.out) / "result.json")
    else:
        ev.fake_stats()  # collective: every rank takes part
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
