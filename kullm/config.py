"""The config tree every entry point reads: its folder, kullm's resolvers, composing configs in code, the YAML's
values for a partial node (``defaults``: defaults live in conf/ only), and the check of the values users type
(``validate``, over the tables each stage declares beside the code that consumes the keys)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.errors import KullmError

ROOT = Path(__file__).resolve().parent.parent  # the checkout (holds conf/, data/ and outputs/)
_PACKAGED_CONF = Path(__file__).parent / "conf"  # where a wheel ships the config tree
# The config tree sits at the top of the checkout (conf/); an installed wheel carries it inside the package.
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else ROOT / "conf"
_PACKAGED_DATA = Path(__file__).parent / "assets" / "data"  # where a wheel ships data/sample and data/sample_chat
# The data sets conf/ names (${kullm_data:sample}): the checkout's data/ (the bundled samples, and the sets
# scripts/download_data.py fetches); an installed wheel carries the bundled samples inside the package.
DATA_DIR = _PACKAGED_DATA if _PACKAGED_DATA.is_dir() else ROOT / "data"

if not OmegaConf.has_resolver("kullm_data"):  # a path under DATA_DIR
    OmegaConf.register_new_resolver("kullm_data", lambda path="": str(DATA_DIR / str(path)))
if not OmegaConf.has_resolver("kullm_either"):  # the first value unless it is null or empty
    OmegaConf.register_new_resolver("kullm_either", lambda value, default: default if value in (None, "") else value)
if not OmegaConf.has_resolver("kullm_basename"):
    OmegaConf.register_new_resolver("kullm_basename", lambda path: Path(str(path)).name)


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides, outside ``@hydra.main``.

    No run folder exists outside a Hydra run: pass ``output_dir=...`` among the overrides.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


class ConfigError(KullmError, ValueError):
    """A config value or combination that cannot work, named with its key."""


def defaults(where: str, given: Mapping[str, Any] | None = None) -> DictConfig:
    """One config node as ``conf/`` gives it, with the keys of ``given`` over it.

    ``where`` names a group option, ``"judge/openai"`` (with the options its defaults list names, as Hydra composes
    it), or a node of a top-level config, ``"train.loss"``. For code called from Python with a partial node (a judge
    built from a small dict, a module built in a test): the keys it leaves out take the YAML's values, never a second
    default in code. Each key given replaces the YAML's whole (an ``optimizer`` given is the optimizer); a composed
    node is resolved first.
    """
    if isinstance(given, DictConfig):
        given = OmegaConf.to_container(given, resolve=True)
    return OmegaConf.create({**OmegaConf.to_container(_yaml_node(where)), **dict(given or {})})


@functools.cache
def _yaml_node(where: str) -> DictConfig:
    if "/" not in where:  # "train.loss": a node of conf/train.yaml
        name, _, key = where.partition(".")
        node = OmegaConf.select(OmegaConf.load(CONF_DIR / f"{name}.yaml"), key)
        if not isinstance(node, DictConfig):
            raise KeyError(f"conf/{name}.yaml has no node {key!r}")
        return node
    group, option = where.rsplit("/", 1)
    own = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    entries = list(own.pop("defaults", None) or [])
    parts = []
    for entry in entries if "_self_" in entries else [*entries, "_self_"]:
        if entry == "_self_":
            parts.append(own)
        elif isinstance(entry, str):  # a sibling option it extends
            parts.append(_yaml_node(f"{group}/{entry}"))
        else:
            raise ValueError(f"conf/{where}.yaml: defaults entry {entry!r} is not an option of {group}/")
    return OmegaConf.merge(*parts)


# The knobs users type most are declared beside the code that consumes them, in modules light to import (no torch):
# each may hold SCHEMA (a type, or a tuple of the allowed values), MINIMUM (lower bounds of numbers: below, a run
# hangs, does nothing or crashes later), RANGE (intervals: "[" / "]" the edge is allowed, "(" / ")" it is not),
# EXCLUDED (values refused although in range), TARGET_NODES (nodes instantiated with a ``_target_``: their keys must
# be arguments of it) and check_config(cfg) (a rule over a value's form). They are named here, not imported: the
# stages sit above config.
SCHEMA_MODULES = (
    "kullm.modeling",
    "kullm.data.records",
    "kullm.data.sft",
    "kullm.data.sft_chat",
    "kullm.data.preprocess",
    "kullm.data.preference",
    "kullm.training.schema",
    "kullm.inference.generator",
    "kullm.evaluation.judges",
    "kullm.evaluation.pipeline",
    "kullm.evaluation.harness",
    "kullm.translation.backends",
    "kullm.translation.quality",
    "kullm.translation.pipeline",
)
_TABLES = ("SCHEMA", "MINIMUM", "RANGE", "EXCLUDED")


@functools.cache
def _collected() -> dict[str, Any]:
    """Every stage's tables, merged (a key declared twice is an error)."""
    found: dict[str, Any] = {name: {} for name in _TABLES} | {"TARGET_NODES": (), "checks": ()}
    for name in SCHEMA_MODULES:
        module = importlib.import_module(name)
        for table in _TABLES:
            mine = getattr(module, table, {})
            if twice := found[table].keys() & mine.keys():
                raise RuntimeError(f"{name}.{table} declares {sorted(twice)} again")
            found[table] |= mine
        found["TARGET_NODES"] += tuple(getattr(module, "TARGET_NODES", ()))
        if hasattr(module, "check_config"):
            found["checks"] += (module.check_config,)
    return found


def __getattr__(name: str) -> Any:
    """``SCHEMA``, ``MINIMUM``, ``RANGE``, ``EXCLUDED`` and ``TARGET_NODES``: the stages' tables, collected on first
    use."""
    if name in (*_TABLES, "TARGET_NODES"):
        return _collected()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def validate(cfg: DictConfig) -> None:
    """Check types of the known knobs and the keys of ``_target_`` nodes; raise :class:`ConfigError` naming the key."""
    tables = _collected()
    minimum, interval, excluded = tables["MINIMUM"], tables["RANGE"], tables["EXCLUDED"]
    for key, want in tables["SCHEMA"].items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(want, tuple):
            if value not in want:
                raise ConfigError(f"{key}={value!r}: must be one of {', '.join(want)}{nearest(str(value), want)}")
        elif not _is_type(value, want):
            raise ConfigError(f"{key}={value!r}: expected {want.__name__}, got {type(value).__name__}")
        elif key in minimum and not value >= minimum[key]:  # NaN too
            raise ConfigError(f"{key}={value!r}: must be at least {minimum[key]:g}")
        elif key in interval and not _in_range(value, interval[key]):
            raise ConfigError(f"{key}={value!r}: must lie in {interval[key]}")
        elif excluded.get(key) == value:
            raise ConfigError(f"{key}={value!r}: trains nothing; give a positive number, or -1 for no limit")
    for check in tables["checks"]:
        check(cfg)
    for path in tables["TARGET_NODES"]:
        node = OmegaConf.select(cfg, path, default=None)
        if isinstance(node, DictConfig) and "_target_" in node:
            _check_target_keys(path, node)


def _in_range(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval``, written as ``"[0, 1)"`` (NaN lies in none)."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


def _is_type(value, want: type) -> bool:
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def _check_target_keys(path: str, node: DictConfig) -> None:
    import inspect

    from hydra.utils import get_class

    target = get_class(node["_target_"])
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in node:
        if str(key).startswith("_") or key in params:
            continue
        raise ConfigError(f"{path}.{key}: not an argument of {node['_target_']}{nearest(str(key), list(params))}")


def nearest(word: str, candidates) -> str:
    """`` (did you mean '<the closest candidate>'?)`` for an error message, or '' when none is close."""
    import difflib

    match = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
