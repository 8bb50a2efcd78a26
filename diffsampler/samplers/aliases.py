"""The sampler names of AUTOMATIC1111's web UI and ComfyUI, mapped to a registered solver, the time
grid the name implies and the options that make the solver the method the name stands for.

`get("DPM++ 2M Karras")` (registry.py) is `get("dpmpp_2m")` with spacing "karras" fixed: `sample()`,
`make_plan`, the diffusers adapter and Hydra (`solver="DPM++ 2M Karras"`) accept an alias wherever
they accept a solver name.  A name without a schedule ("DPM++ 2M", ComfyUI's "dpmpp_2m_sde_gpu")
leaves the spacing to the caller (ComfyUI's scheduler names are spacings: `spacing="karras"`).
An alias whose solver is not registered, or whose options the solver does not take, is refused
naming both when it is used.

What the names stand for: A1111's modules/sd_samplers_kdiffusion.py and sd_samplers_timesteps.py
(k-diffusion's `sample_*` functions; their SDE samplers draw Brownian-tree noise), ComfyUI's
comfy/samplers.py KSAMPLER_NAMES (the same functions; `*_gpu` only moves the Brownian tree to the
GPU; `uni_pc` is UniPC-bh1, `uni_pc_bh2` bh2).  Not part of an alias: A1111's
`discard_next_to_last_sigma` (DPM2, DPM2 a, DPM++ 3M SDE) and the timestep discretisation of its
DDIM / PLMS / UniPC samplers; the spacing stays the caller's there.  A1111 >= 1.9 labels carry no
schedule; its "Automatic" schedule type is the sampler's default (karras for DPM++ 2M / SDE / 2S a, DPM2,
DPM2 a, Restart; exponential for DPM++ 2M SDE (Heun) and 3M SDE): here such a label takes the caller's
spacing (spacing="karras", or A1111's label spacing="Karras").

Every name of ComfyUI's SAMPLER_NAMES and A1111's sampler labels is one of: a registered name (ComfyUI's
euler, heun, lms, dpmpp_2m, ddim, ...; `REGISTERED_NAMES_NOTES` says how ComfyUI's sampler relates), an
alias here, or refused by name with the reason (`Alias.refused`: CFG++ samplers, LCM, heunpp2, deis,
ipndm_v, res_multistep, gradient_estimation, er_sde, seeds_2/3, sa_solver_pece, ...).  Name collision:
`sa_solver` is a registered name (diffusers' SASolverScheduler, predictor 2 / corrector 2, tau = 1
throughout), so ComfyUI's `sa_solver` (predictor 3 / corrector 4, tau only inside a sigma window) is
NOT what the name gives; a registered name always wins over a ComfyUI meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Alias", "ALIASES", "alias_of", "aliases_of", "refused_names", "REGISTERED_NAMES_NOTES"]


@dataclass(frozen=True)
class Alias:
    """What a user-facing sampler name means here."""

    solver: str | None
    spacing: str | None = None  # the grid the name fixes (None: the caller's)
    options: dict = field(default_factory=dict)
    source: str = "A1111"
    #: set for a name diffsampler does not have: why (the name is then refused by get())
    refused: str | None = None
    #: what of the source's sampler the name does not reproduce (printed by `diffsampler list`)
    note: str | None = None

    def describe(self) -> str:
        if self.refused:
            return f"not registered: {self.refused}"
        parts = [self.solver] + ([f"spacing={self.spacing}"] if self.spacing else [])
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        return ", ".join(parts) + (f"; note: {self.note}" if self.note else "")


_BROWNIAN = {"noise": "brownian"}  # k-diffusion's SDE samplers draw from a Brownian tree


def _a1111(base: str, solver: str, options: dict | None = None, schedules=("karras",)) -> dict[str, Alias]:
    """An A1111 sampler name and its "<name> Karras" / "<name> Exponential" variants."""
    out = {base: Alias(solver, None, dict(options or {}))}
    for sp in schedules:
        out[f"{base} {sp.capitalize()}"] = Alias(solver, sp, dict(options or {}))
    return out


_CFGPP = ("CFG++ (Chung et al. 2024) renoises with the unconditional prediction, which a solver does not see: "
          "guidance here hands the solver one combined model output")
_COMFY_UNIPC = ("ComfyUI replaces a final sigma = 0 by 0.001 and returns x there (divided by its alpha), here the "
                "last step lands on sigma = 0; ComfyUI lowers the order on the last steps at any step count, here "
                "below 15 steps (diffusers' rule)")
_LCM = ("the LCM sampler (x_0 = D, then fresh noise at the next level) is the consistency-model sampler of "
        "distilled LCM models; it is not a solver here")


def _refused(source: str, why: str, *names: str) -> dict[str, Alias]:
    return {name: Alias(None, source=source, refused=why) for name in names}


ALIASES: dict[str, Alias] = {
    # AUTOMATIC1111 (k-diffusion samplers)
    **_a1111("Euler a", "euler_ancestral", schedules=()),
    **_a1111("Euler", "euler", schedules=()),
    **_a1111("LMS", "lms"),
    **_a1111("Heun", "heun", schedules=()),
    **_a1111("DPM2", "dpm2"),
    **_a1111("DPM2 a", "dpm2_ancestral"),
    **_a1111("DPM++ 2S a", "dpmpp_2s_ancestral"),
    **_a1111("DPM++ 2M", "dpmpp_2m"),
    **_a1111("DPM++ SDE", "dpmpp_sde", _BROWNIAN),
    **_a1111("DPM++ 2M SDE", "dpmpp_2m_sde", _BROWNIAN, schedules=("karras", "exponential")),
    **_a1111("DPM++ 2M SDE Heun", "dpmpp_2m_sde", {**_BROWNIAN, "solver_type": "heun"},
             schedules=("karras", "exponential")),
    **_a1111("DPM++ 3M SDE", "dpmpp_3m_sde", _BROWNIAN, schedules=("karras", "exponential")),
    # sample_dpm_fast: uniform in t = -log sigma (= lambda, "logsnr") from sigma_max to sigma_min; A1111 ends
    # there (final="last", the caller's: an alias fixes no final)
    "DPM fast": Alias("dpm_fast", "logsnr"),
    "DPM adaptive": Alias("dpm_adaptive"),
    "Restart": Alias("restart", "karras"),  # A1111 runs Restart on Karras sigmas
    # AUTOMATIC1111 (timestep samplers)
    "DDIM": Alias("ddim"),
    "PLMS": Alias("plms"),  # LDM's PLMS: Heun-like first step, then Adams-Bashforth 2-4 (diffusers' PNDM form)
    # A1111's defaults uni_pc_variant=bh1, uni_pc_order=3 (on its own timestep discretisation: not part of the name)
    "UniPC": Alias("unipc", None, {"solver_type": "bh1", "order": 3},
                   note="A1111 runs it on its DDIM-style timesteps (uni_pc_skip_type), which the name does not fix"),
    # ComfyUI names that differ from the registered ones (euler, heun, lms, dpmpp_2m, ... are the same)
    "dpm_2": Alias("dpm2", source="ComfyUI"),
    "dpm_2_ancestral": Alias("dpm2_ancestral", source="ComfyUI"),
    "dpmpp_sde_gpu": Alias("dpmpp_sde", None, dict(_BROWNIAN), "ComfyUI"),
    "dpmpp_2m_sde_gpu": Alias("dpmpp_2m_sde", None, dict(_BROWNIAN), "ComfyUI"),
    "dpmpp_3m_sde_gpu": Alias("dpmpp_3m_sde", None, dict(_BROWNIAN), "ComfyUI"),
    # ComfyUI's sample_unipc: UniPC (data prediction) of order min(3, steps - 1), variant bh1 / bh2
    "uni_pc": Alias("unipc", None, {"solver_type": "bh1", "order": 3}, "ComfyUI", note=_COMFY_UNIPC),
    "uni_pc_bh2": Alias("unipc", None, {"solver_type": "bh2", "order": 3}, "ComfyUI", note=_COMFY_UNIPC),
    "dpmpp_2m_sde_heun": Alias("dpmpp_2m_sde", None, {**_BROWNIAN, "solver_type": "heun"}, "ComfyUI"),
    "dpmpp_2m_sde_heun_gpu": Alias("dpmpp_2m_sde", None, {**_BROWNIAN, "solver_type": "heun"}, "ComfyUI"),
    # names diffsampler does not have: refused by name, with why
    **_refused("A1111", _CFGPP, "DDIM CFG++"),
    **_refused("A1111", _LCM, "LCM"),
    **_refused("ComfyUI", _CFGPP, "euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
               "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp",
               "gradient_estimation_cfg_pp"),
    **_refused("ComfyUI", _LCM, "lcm"),
    **_refused("ComfyUI", "Heun++ (ComfyUI's sample_heunpp2: a third model call per step, weighted by the "
                          "step's position in the sigma list) is not a solver here", "heunpp2"),
    **_refused("ComfyUI", "the exponential Heun method in data prediction and log-SNR time (ComfyUI's "
                          "sample_exp_heun_2_x0 = sample_seeds_2 with r=1; the _sde form with eta=1) is not a solver "
                          "here (dpmpp_sde with r=1 draws its noise differently)", "exp_heun_2_x0", "exp_heun_2_x0_sde"),
    **_refused("ComfyUI", "SEEDS (Gonzalez et al. 2023; ComfyUI's sample_seeds_2 / sample_seeds_3) is not a solver "
                          "here", "seeds_2", "seeds_3"),
    **_refused("ComfyUI", "RES multistep (ComfyUI's sample_res_multistep: exponential 2-step Adams with phi_2 "
                          "weights, ancestral noise in the _ancestral form) is not a solver here", "res_multistep",
               "res_multistep_ancestral"),
    **_refused("ComfyUI", "gradient estimation (Permenter & Yuan 2024; ComfyUI's sample_gradient_estimation, "
                          "ge_gamma=2) is not a solver here", "gradient_estimation"),
    **_refused("ComfyUI", "ER-SDE-Solver (Cui et al. 2023; ComfyUI's sample_er_sde) is not a solver here", "er_sde"),
    **_refused("ComfyUI", "ComfyUI's deis (diff-solvers' 'tab' DEIS: coefficients by a 10,000-point Riemann sum in "
                          "the VP time of a linear-beta schedule fitted to the sigmas) is not reproduced exactly; "
                          "the exact DEIS-AB solvers are deis_1..3 (in t), deis_rho_1..3 (in sigma), "
                          "deis_logrho_1..3", "deis"),
    **_refused("ComfyUI", "variable-step iPNDM (ComfyUI's sample_ipndm_v) is not a solver here: ipndm / pndm use "
                          "the equal-step Adams-Bashforth weights", "ipndm_v"),
    **_refused("ComfyUI", "SA-Solver in PECE mode (ComfyUI's sample_sa_solver_pece: a model call at each corrected "
                          "point) is not a solver here; sa_solver is PEC (diffusers' SASolverScheduler: the corrector "
                          "reuses the next step's model call)", "sa_solver_pece"),
    **_refused("ComfyUI", "cfgpp_ud10_ab (a CFG++ Adams sampler of recent ComfyUI) is not a solver here", "cfgpp_ud10_ab"),
}

#: ComfyUI sampler names that are registered names here, and how ComfyUI's sampler relates to the registered
#: solver (the registered name wins: `solver="sa_solver"` is diffsampler's / diffusers' SA-Solver)
REGISTERED_NAMES_NOTES = {
    "euler": "k-diffusion's sample_euler (s_churn=0)",
    "euler_ancestral": "k-diffusion's sample_euler_ancestral (eta=1, s_noise=1); on flow (CONST) models ComfyUI "
                       "runs its own sample_euler_ancestral_RF instead, which is not reproduced",
    "heun": "k-diffusion's sample_heun (s_churn=0)",
    "lms": "k-diffusion's sample_lms (order=4)",
    "dpm_fast": "k-diffusion's sample_dpm_fast(sigma_min, sigma_max, steps) (eta=0): on spacing='logsnr'",
    "dpm_adaptive": "k-diffusion's sample_dpm_adaptive (order 3, rtol 0.05, atol 0.0078, h_init 0.05, "
                    "PID 0/1/0, safety 0.81, eta 0)",
    "dpmpp_2s_ancestral": "k-diffusion's sample_dpmpp_2s_ancestral (eta=1, s_noise=1)",
    "dpmpp_sde": "k-diffusion's sample_dpmpp_sde (eta=1, s_noise=1, r=1/2, Brownian tree)",
    "dpmpp_2m": "k-diffusion's sample_dpmpp_2m",
    "dpmpp_2m_sde": "k-diffusion's sample_dpmpp_2m_sde (eta=1, s_noise=1, midpoint); ComfyUI draws its noise from "
                    "a Brownian tree, the registered default is independent Gaussians per step (diffusers' form, "
                    "the same law): dpmpp_2m_sde_gpu or noise='brownian' for the tree",
    "dpmpp_3m_sde": "k-diffusion's sample_dpmpp_3m_sde (eta=1, s_noise=1); Brownian tree as dpmpp_2m_sde: "
                    "dpmpp_3m_sde_gpu or noise='brownian'",
    "ddpm": "ComfyUI's sample_ddpm: the DDPM posterior step (fixed_small variance) between the grid's levels",
    "ipndm": "ComfyUI's sample_ipndm (max_order 4, an Euler step onto sigma = 0)",
    "ddim": "ComfyUI's ddim runs its euler sampler: DDIM with eta=0 is Euler in sigma = sigma_t / alpha_t",
    "sa_solver": "NOT ComfyUI's defaults: the registered sa_solver is diffusers' SASolverScheduler (predictor 2, "
                 "corrector 2, tau=1 on every step); ComfyUI's sample_sa_solver takes predictor 3 / corrector 4 and "
                 "tau=1 only between the sigmas of 20% and 80% of the model's timesteps, evaluated at each step's "
                 "end, which is not reproduced (pass predictor_order=3, corrector_order=4, tau_interval=(lo, hi) "
                 "for the nearest)",
}


def alias_of(name) -> Alias | None:
    """The alias `name` stands for, or None when it is not one."""
    return ALIASES.get(name) if isinstance(name, str) else None


def aliases_of(solver: str) -> list[str]:
    """The aliases that map to registered name `solver`."""
    return [name for name, a in ALIASES.items() if a.solver == solver]


def refused_names() -> list[str]:
    """The A1111 / ComfyUI sampler names diffsampler refuses (each with its reason in ALIASES)."""
    return [name for name, a in ALIASES.items() if a.refused]
