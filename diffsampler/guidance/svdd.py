"""SVDD: soft value-based decoding (Li et al. 2024, "Derivative-free guidance in continuous and
discrete diffusion models with soft value-based decoding", Alg. 1).

Target of each step: p*(x_{t-1} | x_t) ∝ p_pre(x_{t-1} | x_t) exp(v(x_{t-1}) / alpha), with the soft
value exp(v(x_t)/alpha) = E[exp(r(x0)/alpha) | x_t].  Per step and per sample SVDD draws M
candidates x_{t-1}^(m) from the pre-trained stochastic step, values them, and keeps one with
probability softmax(v / alpha) (alpha = 0: argmax, what both reference repositories run):

* SVDD-PM (``value="pm"``): v(x) = r(x0_hat(x)), the reward of the model's data prediction at the
  candidate's time -- one model call per candidate, no training.
* SVDD-MC (``value=net``): v(x, t) from a value network regressed on r(x0) (:func:`train_value_model`),
  or any callable (e.g. an exact value on the analytic mixture).

The steps are the solver's own compiled plan (``samplers.plan``): the deterministic part of step i
is the plan's update Combo and its noise coefficient c_i makes the candidates
x^(m) = update(x_i, model outputs) + c_i z^(m).  Any stochastic plan works (``ddim`` with eta > 0,
``dpmpp_2m_sde``); there is no second copy of any solver.

Model calls (PM): the chosen candidate's prediction is the next step's first model call whenever
that call is at the state itself (every stochastic solver here), so a plan of N one-call steps
onto sigma = 0 costs 1 + M (N - 1) calls instead of N (M = 1 reproduces the solver's cost);
MC costs the plan's calls.  :meth:`SVDD.nfe` gives the exact count, ``den.nfe`` counts it.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..samplers.plan import Plan, run_plan

__all__ = ["SVDD", "ValueNet", "train_value_model", "check_reward_values", "stochastic_solvers"]


def check_reward_values(values, n: int, what: str = "reward") -> torch.Tensor:
    """Validate what a reward / value callable returned for a batch of n: a finite tensor of shape (n,)."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{what} must return a torch.Tensor of shape ({n},), got {type(values).__name__}")
    if tuple(values.shape) != (n,):
        raise ValueError(f"{what} returned shape {tuple(values.shape)} for a batch of {n}; expected shape ({n},)")
    if not values.is_floating_point() and values.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} must return real values, got dtype {values.dtype}")
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(f"{what} returned NaN/Inf for {int(bad.sum())} of {n} samples (e.g. index "
                         f"{int(torch.nonzero(bad)[0])}); rewards must be finite")
    return values.to(torch.float64)


def stochastic_solvers() -> list[str]:
    """Registered solvers that draw noise with their default options, and those with an `eta` option."""
    from ..samplers import registry

    names = []
    for name in registry.available():
        s = registry.get(name)
        if s.stochastic:
            names.append(name)
        elif "eta" in inspect.signature(type(s).__init__).parameters:
            names.append(f"{name} (eta > 0)")
    return names


class SVDD:
    """Soft value-based decoding as a sampling strategy: ``sample(den, ..., guidance=SVDD(reward))``.

    Args:
        reward: callable on a batch of clean samples x0 ``(n, *shape)`` returning ``(n,)`` rewards;
            differentiable or not (it runs under ``torch.no_grad``).
        num_candidates: M >= 1 candidates per step (M = 1 is the unguided solver).
        alpha: temperature >= 0 of the selection, probability ∝ exp(v / alpha); 0 = argmax.
        value: ``"pm"`` (posterior mean: r(x0_hat), M model calls per step) or a callable
            ``v(x_t, t) -> (n,)`` with t the schedule times (float64, shape (n,)) -- SVDD-MC.
        decode: optional map applied to x0 before the reward (e.g. a VAE decode for latent models).

    After a run, ``last_nfe`` holds the model calls it spent (equal to ``nfe(plan)``).
    """

    def __init__(self, reward: Callable[[torch.Tensor], torch.Tensor], num_candidates: int = 4,
                 alpha: float = 0.0, value: str | Callable = "pm", decode: Callable | None = None):
        if not callable(reward):
            raise ValueError(f"reward must be callable on an x0 batch, got {type(reward).__name__}")
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates (M) must be an integer >= 1, got {num_candidates!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha (selection temperature) must be a finite float >= 0, got {alpha!r}")
        if not (value == "pm" or callable(value)):
            raise ValueError(f"value must be 'pm' or a callable v(x_t, t) -> (n,) (SVDD-MC), got {value!r}")
        if decode is not None and not callable(decode):
            raise ValueError(f"decode must be callable or None, got {type(decode).__name__}")
        self.reward, self.M, self.alpha, self.value, self.decode = reward, int(num_candidates), float(alpha), value, decode
        self.last_nfe: int | None = None

    def __repr__(self) -> str:
        v = "pm" if self.value == "pm" else type(self.value).__name__
        return f"SVDD(M={self.M}, alpha={self.alpha:g}, value={v})"

    # -- cost -----------------------------------------------------------------------------------
    def nfe(self, plan: Plan) -> int:
        """Exact number of model calls of a run over `plan` (what `den.nfe` will count)."""
        self._check_plan(plan)
        calls = plan.nfe
        for i, s in enumerate(plan.steps):
            if s.noise == 0.0 or self.value != "pm" or float(plan.grid.sigma[i + 1]) == 0.0:
                continue
            calls += self.M - (1 if _reusable(plan, i + 1) else 0)
        return calls

    # -- the loop -------------------------------------------------------------------------------
    def run(self, plan: Plan, denoiser, x: torch.Tensor, noise_fn=None, callback=None, progress: bool = False):
        """Run `plan` from x = x_{t_0}, choosing among M candidates at every stochastic step."""
        self._check_plan(plan)
        if noise_fn is None:  # noise_fn(like) -> N(0, I) of like's shape, batch row k from sample k's stream
            raise ValueError("SVDD draws candidate noise: pass seeds= (or generator=) to sample()")
        start = denoiser.nfe
        # candidates are valued at the grid times t_{i+1}: their model time inputs, built once
        times = sorted(float(t) for t in plan.grid.t[1:])
        model_t = denoiser.schedule.model_time(torch.tensor(times, dtype=torch.float64)).to(x.device, torch.float32)
        t_in = {t: model_t[j] for j, t in enumerate(times)}

        def transition(i, mean, c_z):  # the stepper's transition hook: the M-candidate choice
            return self._select(plan, i, denoiser, mean, c_z, noise_fn, t_in)

        x = run_plan(plan, denoiser, x, noise_fn, callback, progress, transition=transition)
        self.last_nfe = denoiser.nfe - start
        return x

    def _select(self, plan, i, denoiser, mean, c_z, noise_fn, t_in):
        """Draw M candidates x^(m) = mean + c_z z^(m), value them, keep one per sample."""
        M, B = self.M, mean.shape[0]
        a1, s1, t1 = float(plan.grid.alpha[i + 1]), float(plan.grid.sigma[i + 1]), float(plan.grid.t[i + 1])
        z = noise_fn(mean.new_empty(B, M, *mean.shape[1:]))  # sample k's M draws come from its own stream
        cands = mean + c_z * z.transpose(0, 1)  # (M, B, ...)
        flat = cands.flatten(0, 1)
        outs = None
        if s1 == 0.0:  # the candidates are clean samples: v = r exactly
            values = self._reward(flat)
        elif self.value == "pm":  # v = r(x0_hat(x^(m), t_{i+1})), one model call per candidate
            kind = plan.steps[i + 1].evals[0].kind if _reusable(plan, i + 1) else "data"
            outs = torch.stack([denoiser.predict_at(c, t_in[t1].expand(B), a1, s1, kind) for c in cands])
            x0 = outs if kind == "data" else (cands - s1 * outs) / a1
            values = self._reward(x0.flatten(0, 1))
        else:
            t = torch.full((M * B,), t1, dtype=torch.float64, device=mean.device)
            values = check_reward_values(self.value(flat, t), M * B, "value model")
        values = values.view(M, B)
        if self.alpha > 0:  # Gumbel-max: argmax(v/alpha + G) ~ Categorical(softmax(v/alpha))
            u = torch.special.ndtr(noise_fn(mean.new_empty(B, M)).double()).clamp(1e-300, 1 - 1e-16)
            values = values / self.alpha - torch.log(-torch.log(u)).T.to(values.device)  # G = -log(-log U)
        idx = values.argmax(0).to(mean.device)
        rows = torch.arange(B, device=mean.device)
        carried = outs[idx, rows] if outs is not None and _reusable(plan, i + 1) else None
        return cands[idx, rows], carried

    def _reward(self, x0: torch.Tensor) -> torch.Tensor:
        r = self.reward(self.decode(x0) if self.decode is not None else x0)
        return check_reward_values(r, x0.shape[0], "reward")

    def _check_plan(self, plan: Plan) -> None:
        if not plan.stochastic:
            raise ValueError(
                f"SVDD draws its candidates from the stochastic transition, but solver {plan.solver!r} has no "
                f"noise; use a stochastic solver: {', '.join(stochastic_solvers())}")


def _reusable(plan: Plan, j: int) -> bool:
    """Step j's first model call is at the state x_j itself at grid time t_j (so a candidate's
    prediction there is exactly that call)."""
    if j >= len(plan.steps) or not plan.steps[j].evals:
        return False
    ev = plan.steps[j].evals[0]  # (a two-output "data|raw_noise" call is not handed over)
    return (ev.kind in ("data", "noise") and ev.x.is_identity and ev.t == float(plan.grid.t[j])
            and ev.sigma == float(plan.grid.sigma[j]))


# ---------------------------------------------------------------------------------------------
# SVDD-MC: a value network regressed on rewards
# ---------------------------------------------------------------------------------------------

class ValueNet(nn.Module):
    """v(x_t, t): an MLP on the flattened state and Fourier features of the normalised time t / t_max.

    The regression target is standardised (``r_mean``, ``r_std`` buffers), the output is in reward units.
    """

    def __init__(self, shape: tuple[int, ...], t_max: float, hidden: int = 256, depth: int = 3, n_freq: int = 8):
        super().__init__()
        self.config = {"shape": list(shape), "t_max": float(t_max), "hidden": hidden, "depth": depth, "n_freq": n_freq}
        d = math.prod(shape)
        layers, width = [], d + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32))
        self.register_buffer("r_mean", torch.zeros(()))
        self.register_buffer("r_std", torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = (torch.as_tensor(t, device=x.device).float().reshape(-1, 1) / self.config["t_max"]) * self.freqs
        h = torch.cat([x.float().flatten(1), tau.sin(), tau.cos()], 1)
        return self.mlp(h).squeeze(1) * self.r_std + self.r_mean

    def save(self, path: str | Path) -> Path:
        """Weights and config in one safetensors file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path),
                  metadata={"config": json.dumps(self.config)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ValueNet":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} is not a ValueNet file (no config in its safetensors metadata)")
        cfg = json.loads(meta["config"])
        net = cls(tuple(cfg["shape"]), cfg["t_max"], cfg["hidden"], cfg["depth"], cfg["n_freq"])
        net.load_state_dict(load_file(str(path)))
        return net.eval()


def train_value_model(reward: Callable, x0: torch.Tensor, schedule, *, steps: int = 2000, batch_size: int = 256,
                      lr: float = 2e-3, seed: int = 0, net: ValueNet | None = None, path: str | Path | None = None,
                      **net_kwargs) -> ValueNet:
    """SVDD-MC value model: regress r(x0) on x_t = alpha_t x0 + sigma_t eps at t ~ U[t_min, t_max]
    (Li et al. 2024, SVDD-MC), so v(x_t, t) ≈ E[r(x0) | x_t] -- the paper's approximation of the soft
    value alpha log E[exp(r(x0)/alpha) | x_t], exact as alpha -> infinity.

    x0: clean samples (N, *shape) -- data, or the model's own samples; their rewards are computed once.
    Returns the trained :class:`ValueNet` (eval mode); with `path`, also saved there (safetensors).
    """
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2 or x0.shape[0] < 2:
        raise ValueError(f"x0 must be a tensor (N >= 2, *shape), got {getattr(x0, 'shape', type(x0).__name__)}")
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"steps and batch_size must be integers >= 1, got {steps!r}, {batch_size!r}")
    with torch.no_grad():
        r = check_reward_values(reward(x0), x0.shape[0]).float()
    x0 = x0.float()
    net = net if net is not None else ValueNet(tuple(x0.shape[1:]), schedule.t_max, **net_kwargs)
    net.r_mean.fill_(float(r.mean()))
    net.r_std.fill_(float(r.std().clamp(min=1e-8)))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x0.shape[0], (batch_size,), generator=g)
        t = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(batch_size, generator=g, dtype=torch.float64)
        a, s = schedule.alpha(t).float().view(shape), schedule.sigma(t).float().view(shape)
        xt = a * x0[idx] + s * torch.randn(x0[idx].shape, generator=g)
        loss = ((net(xt, t) - r[idx]) / net.r_std).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    if path is not None:
        net.save(path)
    return net
