"""The schema of the Hydra config: the keys of `configs/config.yaml` and of each group option, and
the type of each value.  `check(cfg)` walks a composed config against it and raises ConfigError for
an unknown key (naming the nearest valid one and the keys allowed there), a missing key, or a value
of the wrong type.

An explicit walk rather than structured configs alone: Hydra's `+key=value` adds keys even to a
struct config, the keys allowed in a group depend on the option chosen (model=gmm vs diffusers),
user-registered solvers become `solver=<name>` options at start-up, and one walk gives one error
format (with the nearest key) whether the config comes from the command line or from `compose`.
Everything under `hydra.*` (launchers, sweepers, run dirs) belongs to Hydra and is not checked here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from ..grids import SPACING_REFUSED
from ..schedules import SPACINGS

__all__ = ["ConfigError", "check", "TOP", "GROUPS", "SCHEDULES", "MODELS", "GUIDANCES"]

SCHEDULES = ("discrete_vp", "linear_vp", "cosine_vp", "edm", "flow")


class ConfigError(ValueError):
    """A bad configuration value, raised before any work."""


@dataclass(frozen=True)
class Type:
    """What a value must be (`what`, for the message) and the test of it."""

    what: str
    ok: Callable[[Any], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def optional(t: Type) -> Type:
    return Type(f"{t.what} or null", lambda v: v is None or t.ok(v))


def one_of(*values: str) -> Type:
    return Type(f"one of {values}", lambda v: isinstance(v, str) and v in values)


def either(*types: Type) -> Type:
    return Type(" or ".join(t.what for t in types), lambda v: any(t.ok(v) for t in types))


INT = Type("an integer", _is_int)
NUMBER = Type("a number", _is_num)
BOOL = Type("a boolean (true or false)", lambda v: isinstance(v, bool))
STR = Type("a string", lambda v: isinstance(v, str))
MAPPING = Type("a mapping", lambda v: isinstance(v, dict))
NUMBERS = Type("a list of numbers", lambda v: isinstance(v, list) and all(_is_num(x) for x in v))
GROUP = Type("a config group", lambda v: isinstance(v, dict))

TOP: dict[str, Type] = {
    "model": GROUP, "solver": GROUP, "guidance": GROUP, "eval": GROUP,
    "nfe": INT, "spacing": optional(one_of(*SPACINGS, *SPACING_REFUSED)),  # refused ones: by time_grid, with why
    "final": optional(one_of("zero", "last")),
    "time_shift": Type("a mapping or null", lambda v: v is None or isinstance(v, dict)),
    "num_samples": INT, "seed": INT, "batch_size": INT, "shard_size": INT, "device": STR, "progress": BOOL,
    "grid_size": INT, "results_file": STR,
}

MODELS: dict[str, dict[str, Type]] = {
    "gmm": {"name": STR, "dim": INT, "components": INT, "seed": INT, "scale": NUMBER, "std": NUMBERS,
            "schedule": one_of(*SCHEDULES), "prediction_type": one_of("epsilon", "v_prediction", "sample", "flow")},
    "digits": {"name": STR, "path": optional(STR)},
    "diffusers": {"name": STR, "path": STR, "prompt": optional(STR), "negative_prompt": optional(STR),
                  "height": optional(INT), "width": optional(INT), "class_label": optional(INT),
                  "null_class": optional(INT), "dtype": one_of("float32", "float16", "bfloat16")},
}

GUIDANCES: dict[str, dict[str, Type]] = {
    "none": {"name": STR},
    "cfg": {"name": STR, "scale": NUMBER, "rescale": NUMBER, "interval": optional(NUMBERS)},
    "minority": {"name": STR, "classifier": optional(STR), "scale": NUMBER, "target": optional(INT),
                 "interval": NUMBERS},
    "svdd": {"name": STR, "reward": one_of("auto", "classifier", "jpeg", "distance"),
             "target": optional(either(INT, NUMBERS)), "num_candidates": INT, "alpha": NUMBER},
}

EVAL: dict[str, Type] = {
    "feature": STR, "weights_path": optional(STR), "sha256": optional(STR), "reference": optional(STR),
    "cache_dir": STR, "kid": BOOL, "shard_dtype": STR,
}


def _solver_keys(name: str | None) -> dict[str, Type]:
    """Every solver takes `name` and free-form `options` (checked by the solver itself); a saved plan
    (solver=plan) also takes `path`."""
    keys = {"name": STR, "options": MAPPING}
    if name == "plan":
        keys["path"] = optional(STR)
        keys["plan_dir"] = optional(STR)
    return keys


def _named(group: str, table: dict[str, dict[str, Type]]) -> Callable[[str | None], dict[str, Type]]:
    def keys(option: str | None) -> dict[str, Type]:
        if option not in table:
            raise ConfigError(f"{group}.name must be one of {tuple(table)}, got {option!r}")
        return table[option]

    return keys


GROUPS: dict[str, Callable[[str | None], dict[str, Type]]] = {
    "model": _named("model", MODELS),
    "solver": _solver_keys,
    "guidance": _named("guidance", GUIDANCES),
    "eval": lambda option: EVAL,
}


# ---------------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------------

def check(cfg) -> None:
    """Refuse unknown, missing and mistyped keys of a composed config (`hydra.*` is Hydra's own)."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    _check_node(cfg, "", TOP, "top-level keys", skip=("hydra",))
    for group, keys_of in GROUPS.items():
        node = cfg[group]
        option = node.get("name") if OmegaConf.is_dict(node) else None
        where = f"keys of {group} ({group}={option})" if group != "eval" else "keys of eval"
        _check_node(node, f"{group}.", keys_of(option), where)


def _check_node(node, prefix: str, schema: dict[str, Type], where: str, skip=()) -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.is_dict(node):
        raise ConfigError(f"{prefix[:-1]} must be a mapping, got {node!r}")
    for key in node.keys():
        if key not in schema and key not in skip:
            raise ConfigError(_unknown(node, prefix, str(key), schema, where))
    for key, t in schema.items():
        if key not in node.keys():
            raise ConfigError(f"missing key {prefix}{key}; the {where} are: {', '.join(schema)}")
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{prefix}{key} is required{_for_option(prefix, node)}: set {prefix}{key}=<value>")
        value = _plain(node, prefix + key)
        if not t.ok(value):
            raise ConfigError(f"{prefix}{key} must be {t.what}, got {value!r}")


def _plain(node, key: str):
    """The value of `key` (last part) of `node`, interpolations resolved, as plain Python."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        v = node[key.rsplit(".", 1)[-1]]
        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _for_option(prefix: str, node) -> str:
    return f" for {prefix[:-1]}={node.get('name')}" if prefix and "name" in node else ""


def _unknown(node, prefix: str, key: str, schema: dict[str, Type], where: str) -> str:
    msg = f"unknown key {prefix}{key}"
    near = difflib.get_close_matches(key, list(schema), n=1)
    if near:
        msg += f" (did you mean {prefix}{near[0]}?)"
    msg += f"; the {where} are: {', '.join(schema)}"
    if not near and prefix in ("", "solver."):
        msg += f". Solver options go under solver.options: +solver.options.{key}={_cli_value(node, prefix + key)}"
    return msg


def _cli_value(node, key: str) -> str:
    v = _plain(node, key)
    return str(v).lower() if isinstance(v, bool) else str(v)
