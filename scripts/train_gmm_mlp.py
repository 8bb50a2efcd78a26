"""Train the small, deliberately imperfect epsilon-MLP of `diffsampler/assets/gmm_mlp/`.

The network learns eps(x_t, t) for samples of a fixed isotropic Gaussian mixture
(`GaussianMixture.random(dim, components, seed, scale, std)`) under the 1000-step linear
discrete-VP schedule (`DiscreteVP.linear()`, t = integer training timestep 0..999,
x_t = alpha_t x0 + sigma_t eps).  Architecture: [x, sinusoidal(t)] -> `layers` x (Linear, SiLU)
-> Linear(d).  Trained for a few CPU minutes with fresh mixture samples every step, so it is a
trained model with the usual small errors (exposure bias is real for it), unlike the exact
`gmm_denoiser`.  Used by tests/test_time_shift.py and benchmarks/momentum_time_shift.py.

    python scripts/train_gmm_mlp.py                 # writes diffsampler/assets/gmm_mlp/
    python scripts/train_gmm_mlp.py --out /tmp/m --steps 500

Load it with `load_gmm_mlp()` (this module; not part of the package API):

    net, gmm, config = load_gmm_mlp()
    den = diffsampler.Denoiser(net, diffsampler.DiscreteVP.linear(), "epsilon")
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

ASSET_DIR = Path(__file__).resolve().parents[1] / "diffsampler" / "assets" / "gmm_mlp"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class GMMMLP(nn.Module):
    """eps-network: MLP on [x, sinusoidal(t / 1000)] (t in training timesteps)."""

    def __init__(self, dim: int, hidden: int = 192, layers: int = 3, emb_dim: int = 32):
        super().__init__()
        self.dim, self.emb_dim = dim, emb_dim
        half = emb_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(half) / half) * 1000.0,
                             persistent=False)
        mods, width = [], dim + emb_dim
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        mods.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*mods)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        a = (t.float().flatten() / 1000.0)[:, None] * self.freqs[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).flatten()
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        return self.net(torch.cat([x.float(), self.embed(t)], dim=1)).to(x.dtype)


def make_gmm(cfg: dict):
    from diffsampler.eval.gmm import GaussianMixture

    return GaussianMixture.random(cfg["dim"], cfg["components"], seed=cfg["gmm_seed"], scale=cfg["scale"],
                                  std=tuple(cfg["std"]))


def load_gmm_mlp(path: str | Path = ASSET_DIR):
    """(network in eval mode, its GaussianMixture, config dict) from `path`."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / CONFIG).read_text())
    net = GMMMLP(cfg["dim"], cfg["hidden"], cfg["layers"], cfg["emb_dim"])
    net.load_state_dict(load_file(str(path / WEIGHTS)))
    return net.eval().requires_grad_(False), make_gmm(cfg), cfg


def train(args) -> None:
    import diffsampler as ds
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    cfg = dict(dim=args.dim, components=args.components, gmm_seed=args.gmm_seed, scale=args.scale,
               std=list(args.std), hidden=args.hidden, layers=args.layers, emb_dim=args.emb_dim,
               schedule="DiscreteVP.linear()", prediction_type="epsilon", steps=args.steps, batch=args.batch,
               lr=args.lr, seed=args.seed)
    gmm = make_gmm(cfg)
    sch = ds.DiscreteVP.linear()
    acp = sch.alphas_cumprod.float()
    net = GMMMLP(args.dim, args.hidden, args.layers, args.emb_dim)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    t0, curve, run = time.time(), [], 0.0
    for step in range(1, args.steps + 1):
        x0 = gmm.sample(args.batch, generator=gen).float()
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        eps = torch.randn(args.batch, args.dim, generator=gen)
        a = acp[t].sqrt()[:, None]
        xt = a * x0 + (1 - a**2).sqrt() * eps
        loss = (net(xt, t) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        run = 0.98 * run + 0.02 * float(loss) if step > 1 else float(loss)
        if step % max(1, args.steps // 20) == 0 or step == args.steps:
            curve.append([step, round(run, 5)])
            print(f"step {step:6d}  loss(ema) {run:.4f}  {time.time() - t0:.0f}s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / WEIGHTS))
    cfg.update(final_loss_ema=round(run, 5), train_seconds=round(time.time() - t0, 1), loss_curve=curve,
               torch=torch.__version__)
    (out / CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    print(f"wrote {out}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSET_DIR))
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--gmm-seed", type=int, default=7)
    p.add_argument("--scale", type=float, default=0.6)
    p.add_argument("--std", type=float, nargs=2, default=(0.15, 0.35))
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--emb-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
