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
DDIM / PLMS / UniPC samplers; the spacing stays the caller's there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Alias", "ALIASES", "alias_of", "aliases_of"]


@dataclass(frozen=True)
class Alias:
    """What a user-facing sampler name means here."""

    solver: str
    spacing: str | None = None  # the grid the name fixes (None: the caller's)
    options: dict = field(default_factory=dict)
    source: str = "A1111"

    def describe(self) -> str:
        parts = [self.solver] + ([f"spacing={self.spacing}"] if self.spacing else [])
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        return ", ".join(parts)


_BROWNIAN = {"noise": "brownian"}  # k-diffusion's SDE samplers draw from a Brownian tree


def _a1111(base: str, solver: str, options: dict | None = None, schedules=("karras",)) -> dict[str, Alias]:
    """An A1111 sampler name and its "<name> Karras" / "<name> Exponential" variants."""
    out = {base: Alias(solver, None, dict(options or {}))}
    for sp in schedules:
        out[f"{base} {sp.capitalize()}"] = Alias(solver, sp, dict(options or {}))
    return out


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
    "UniPC": Alias("unipc", None, {"solver_type": "bh1"}),  # A1111's default uni_pc_variant
    # ComfyUI names that differ from the registered ones (euler, heun, lms, dpmpp_2m, ... are the same)
    "dpm_2": Alias("dpm2", source="ComfyUI"),
    "dpm_2_ancestral": Alias("dpm2_ancestral", source="ComfyUI"),
    "dpmpp_sde_gpu": Alias("dpmpp_sde", None, dict(_BROWNIAN), "ComfyUI"),
    "dpmpp_2m_sde_gpu": Alias("dpmpp_2m_sde", None, dict(_BROWNIAN), "ComfyUI"),
    "dpmpp_3m_sde_gpu": Alias("dpmpp_3m_sde", None, dict(_BROWNIAN), "ComfyUI"),
    "uni_pc": Alias("unipc", None, {"solver_type": "bh1"}, "ComfyUI"),  # diffusers' name of the B(h) choice
    "uni_pc_bh2": Alias("unipc", None, {"solver_type": "bh2"}, "ComfyUI"),
}


def alias_of(name) -> Alias | None:
    """The alias `name` stands for, or None when it is not one."""
    return ALIASES.get(name) if isinstance(name, str) else None


def aliases_of(solver: str) -> list[str]:
    """The aliases that map to registered name `solver`."""
    return [name for name, a in ALIASES.items() if a.solver == solver]
