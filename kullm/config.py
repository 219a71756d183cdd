"""Hydra plumbing shared by every entry point: the config folder, resolvers, and composing configs in code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.redaction import scrub, secret_values

ROOT = Path(__file__).resolve().parent.parent  # the checkout (holds conf/, data/sample/ and outputs/)
_PACKAGED_CONF = Path(__file__).parent / "conf"  # where a wheel ships the config tree
# The config tree sits at the top of the checkout (conf/); an installed wheel carries it inside the package.
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else ROOT / "conf"

if not OmegaConf.has_resolver("kullm_root"):
    OmegaConf.register_new_resolver("kullm_root", lambda: str(ROOT))
if not OmegaConf.has_resolver("kullm_either"):  # the first value unless it is null or empty
    OmegaConf.register_new_resolver("kullm_either", lambda value, default: default if value in (None, "") else value)
if not OmegaConf.has_resolver("kullm_help"):  # hydra.help.template of each CLI
    OmegaConf.register_new_resolver("kullm_help", lambda name: help_text(str(name)))
if not OmegaConf.has_resolver("kullm_basename"):
    OmegaConf.register_new_resolver("kullm_basename", lambda path: Path(str(path)).name)


def help_text(config_name: str) -> str:
    """``--help`` of one CLI: its usage (the root config's header), the config groups it uses with each option's
    one-line description (the option file's first comment), launchers for kullm-train, and its own settings."""
    import re

    root = CONF_DIR / f"{config_name}.yaml"
    text = root.read_text(encoding="utf-8")
    header = [line[2:] if line.startswith("# ") else line[1:] for line in _header(text)]
    out = [*header, "", "Config groups (group=option; * is the default):"]
    defaults = OmegaConf.load(root).get("defaults") or []
    groups = [(str(k), v) for entry in defaults if isinstance(entry, DictConfig) for k, v in entry.items()]
    if config_name == "train":
        groups.append(("hydra/launcher", "basic"))
    for group, default in groups:
        folder = CONF_DIR / group
        options = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
        out.append(f"  {group}=")
        if group == "hydra/launcher":
            out.append(f"    {'basic':<30}* jobs one after another in this process")
            out.append(f"    {'submitit_local':<30}  each job a separate local process (Hydra's submitit plugin)")
        for path in options:
            mark = "*" if path.stem == default else " "
            out.append(f"    {path.stem:<30}{mark} {_describe(path)}".rstrip())
    settings = re.findall(r"^([A-Za-z_]\w*):[ \t]*([^#\n]*?)[ \t]+#[ \t]*(.+)$", text, flags=re.M)
    if settings:
        out += ["", "Settings (key=value; any key of the composed config can be set the same way):"]
        out += [f"  {f'{key}={value.strip()}':<31} {note.strip()}" for key, value, note in settings]
    out += [
        "",
        "--cfg job prints the composed config (credentials redacted); -m runs a sweep (one job per combination);",
        "--version prints kullm's version. The README explains every group.",
    ]
    return "\n".join(out).replace("$", "$$") + "\n"  # Hydra fills the template with string.Template


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            lines.append(line)
    return lines


def _describe(path: Path) -> str:
    """The first sentence of an option file's header comment (its usage lines left out)."""
    words = " ".join(line.lstrip("#").strip() for line in _header(path.read_text(encoding="utf-8"))
                     if not line.startswith("#  ")).strip()  # fmt: skip
    if ". " in words:
        words = words[: words.index(". ") + 1]
    return words if len(words) <= 110 else words[:107].rstrip() + "..."


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides, outside ``@hydra.main``.

    No run folder exists outside a Hydra run: pass ``output_dir=...`` among the overrides.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def expose_hydra_plugins() -> None:
    """Register kullm's own Hydra plugins (``hydra_plugins/kullm_sweeper``) with Hydra; call before ``hydra.main``.

    Hydra finds plugins by walking the folders of the ``hydra_plugins`` namespace once, when its ``Plugins``
    registry is first used (composing a config is enough). A setuptools editable install serves kullm's part of the
    namespace through an import hook that such a walk cannot list, so the plugin imports but is never found.
    Registering the class by name, through Hydra's ``Plugins.register``, works for every kind of install and
    whenever the walk ran. Without the ``sweeps`` extra there is nothing to register."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # the walk runs first: it would re-import our module and replace the class
    try:
        from hydra_plugins.kullm_sweeper.resumable_optuna import ResumableOptunaSweeper
    except ImportError:
        return
    plugins.register(ResumableOptunaSweeper)


def exit_on_version(prog: str, argv: Sequence[str]) -> None:
    """``--version``: print kullm's version (not Hydra's) and exit."""
    if "--version" in argv or "-V" in argv:
        from kullm import __version__

        print(f"{prog} (kullm {__version__})")
        raise SystemExit(0)


class ConfigError(ValueError):
    """A config value or combination that cannot work, named with its key."""


class JobFailed(RuntimeError):
    """One job of a multirun sweep failed (its config or data): Hydra records it and runs the other jobs."""


def fail(prog: str, error: BaseException) -> None:
    """Stop with ``<prog>: <error>`` on one line: ``SystemExit`` in a single run; in a multirun sweep an ordinary
    exception, which Hydra records as this job's failure while the other jobs still run (the sweep then exits
    non-zero). Hydra does not catch ``SystemExit``: one bad job would end the whole sweep."""
    message = f"{prog}: {' '.join(str(error).split())}"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except ImportError:
        multirun = False
    if multirun:
        raise JobFailed(message) from None
    raise SystemExit(message) from None


# The knobs users type most, with their types (a tuple of strings: the allowed values).
SCHEMA: dict[str, Any] = {
    "seed": int,
    "batch_size": int,
    "micro_batch_size": int,
    "num_workers": int,
    "pad_to_multiple_of": int,
    "gradient_checkpointing": bool,
    "sampler": ("random", "length_grouped", "sequential"),
    "data.cutoff_len": int,
    "data.val_set_size": float,  # a count of rows (an integer) or a fraction of them (a float below 1)
    "data.train_on_inputs": bool,
    "data.add_eos": bool,
    "data.policy": ("skip", "strict"),
    "data.source": ("auto", "files", "hub"),
    "data.seed": int,
    "data.packing": bool,
    "data.batching": ("rows", "tokens"),
    "data.verify": bool,
    "data.format": ("auto", "instruction", "messages", "sharegpt"),
    "data.train_on": ("all_assistant", "last", "all"),
    "data.chat_template": ("template", "tokenizer"),
    "optim.lr": float,
    "optim.weight_decay": float,
    "optim.warmup_ratio": float,
    "optim.min_lr_ratio": float,
    "optim.schedule": ("cosine", "linear", "constant"),
    "lora.r": int,
    "lora.lora_alpha": float,
    "lora.lora_dropout": float,
    "quant.mode": ("none", "int8", "nf4", "fp4"),
    "logger.name": ("wandb", "csv", "none"),
    "loss.head_only": bool,
    "loss.impl": ("auto", "torch", "liger", "cce"),
    "val_every_n_steps": int,
    "trainer.max_epochs": int,
    "trainer.max_steps": int,
    "generation.batch_size": int,
    "generation.num_beams": int,
    "generation.max_length": int,
    "generation.max_new_tokens": int,
    "judge.concurrency": int,
    "judge.max_retries": int,
    "judge.timeout": float,
    "limit": int,
    "max_parse_retries": int,
    "generation.top_p": float,
    "bootstrap.samples": int,
    "bootstrap.confidence": float,
    "optim.warmup_steps": int,
    "callbacks.checkpoint.every_n_train_steps": int,
    "callbacks.checkpoint.save_top_k": int,
    "callbacks.samples.num": int,
}
# Lower bounds of numeric knobs (a value below makes a run hang, do nothing, or crash later).
MINIMUM: dict[str, float] = {
    "batch_size": 1,
    "micro_batch_size": 1,
    "num_workers": 0,
    "data.cutoff_len": 2,
    "data.val_set_size": 0,
    "lora.r": 1,
    "trainer.max_epochs": -1,
    "trainer.max_steps": -1,
    "generation.batch_size": 1,
    "generation.num_beams": 1,
    "generation.max_length": 1,
    "generation.max_new_tokens": 1,
    "judge.concurrency": 1,
    "judge.max_retries": 0,
    "judge.timeout": 0.001,
    "limit": 1,
    "max_parse_retries": 0,
    "bootstrap.samples": 1,
    "optim.warmup_steps": 0,
    "callbacks.checkpoint.every_n_train_steps": 1,
    "callbacks.checkpoint.save_top_k": -1,
    "callbacks.samples.num": 0,
}
# Knobs whose values lie in an interval ("[" / "]": the edge is allowed, "(" / ")": it is not).
RANGE: dict[str, str] = {
    "optim.lr": "[0, inf)",
    "optim.warmup_ratio": "[0, 1]",
    "optim.min_lr_ratio": "[0, 1]",
    "lora.lora_dropout": "[0, 1)",
    "generation.top_p": "(0, 1]",
    "bootstrap.confidence": "(0, 1)",
}
# Values refused although in range: a limit of 0 optimizer steps or epochs trains nothing (-1: no limit).
EXCLUDED: dict[str, float] = {"trainer.max_steps": 0, "trainer.max_epochs": 0}
# Nodes instantiated with a ``_target_``: their keys must be arguments of the target.
TARGET_NODES = ("trainer", "lora", "optim.optimizer", "strategy.impl")


def validate(cfg: DictConfig) -> None:
    """Check types of the known knobs and the keys of ``_target_`` nodes; raise :class:`ConfigError` naming the key."""
    for key, want in SCHEMA.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(want, tuple):
            if value not in want:
                raise ConfigError(f"{key}={value!r}: must be one of {', '.join(want)}{_nearest(str(value), want)}")
        elif not _is_type(value, want):
            raise ConfigError(f"{key}={value!r}: expected {want.__name__}, got {type(value).__name__}")
        elif key in MINIMUM and not value >= MINIMUM[key]:  # NaN too
            raise ConfigError(f"{key}={value!r}: must be at least {MINIMUM[key]:g}")
        elif key in RANGE and not _in_range(value, RANGE[key]):
            raise ConfigError(f"{key}={value!r}: must lie in {RANGE[key]}")
        elif EXCLUDED.get(key) == value:
            raise ConfigError(f"{key}={value!r}: trains nothing; give a positive number, or -1 for no limit")
    held_out = OmegaConf.select(cfg, "data.val_set_size", default=None)
    if isinstance(held_out, float) and held_out >= 1:
        raise ConfigError(f"data.val_set_size={held_out!r}: a fraction must lie below 1; a count of rows is an integer")
    for path in TARGET_NODES:
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
        raise ConfigError(f"{path}.{key}: not an argument of {node['_target_']}{_nearest(str(key), list(params))}")


def _nearest(word: str, candidates) -> str:
    import difflib

    match = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_overrides(config_name: str, args: Sequence[str]) -> None:
    """Fail on a command-line override of a key that does not exist, naming the nearest valid key.

    Hydra refuses such keys too, but without a suggestion; group selections (``model=tiny``) are left to Hydra,
    which lists the available options itself.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in _strip_flags(args) if "=" in a]
    if not plain:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception:
        return  # a syntax error: Hydra reports it with its own message
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    selections, keys = [], []
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or key.startswith("hydra") or o.package:
            continue
        if key in groups:
            if not o.is_sweep_override():
                selections.append(f"{key}={o.value()}")
        else:
            keys.append(key)
    if not keys:
        return
    try:
        cfg = compose(config_name, [*selections, "output_dir=/dev/null"])
    except Exception:
        return  # a bad group option: Hydra reports it with the list of options
    for key in keys:
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            if isinstance(node, DictConfig):
                hint = _nearest(leaf, list(node.keys()))
                hint = hint.replace("'", f"'{parent}." if parent else "'", 1) if hint else ""
            else:
                hint = _nearest(key, _paths(cfg))
            raise ConfigError(f"unknown config key '{key}'{hint}; add it with '+{key}=…' if it is meant to be new")


_ABSENT = object()


def _strip_flags(args: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in (
            "--cfg",
            "-c",
            "--package",
            "-p",
            "--config-path",
            "-cp",
            "--config-name",
            "-cn",
            "--config-dir",
            "-cd",
            "--experimental-rerun",
            "--info",
            "-i",
        ):
            skip = a not in ("--info", "-i")
        elif not a.startswith("-"):
            out.append(a)
    return out


def _paths(cfg: DictConfig, prefix: str = "") -> list[str]:
    paths = []
    for k in cfg.keys():
        node = cfg._get_node(k)
        path = f"{prefix}{k}"
        paths.append(path)
        if isinstance(node, DictConfig):
            paths += _paths(node, f"{path}.")
    return paths


def print_redacted_cfg(config_name: str, args: Sequence[str]) -> bool:
    """``--cfg job`` (``-c job``): print the composed job config with credentials redacted instead of Hydra's
    plain dump; return whether it did. ``--cfg hydra|all`` are left to Hydra (they print no job values)."""
    argv = list(args)
    for flag in ("--cfg", "-c"):
        if flag in argv and argv.index(flag) + 1 < len(argv) and argv[argv.index(flag) + 1] == "job":
            i = argv.index(flag)
            rest = [a for k, a in enumerate(argv) if k not in (i, i + 1) and a not in ("--resolve",)]
            overrides = [a for a in rest if not a.startswith("-")]
            cfg = compose(config_name, overrides)
            secrets = secret_values(cfg, overrides)
            print(scrub(OmegaConf.to_yaml(cfg, resolve="--resolve" in argv), secrets), end="")
            return True
    return False
