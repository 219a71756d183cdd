"""The config tree every entry point reads: its folder, kullm's resolvers, composing configs in code, and the
check of the values users type (``validate``)."""

from __future__ import annotations

from collections.abc import Sequence
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
                raise ConfigError(f"{key}={value!r}: must be one of {', '.join(want)}{nearest(str(value), want)}")
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
        raise ConfigError(f"{path}.{key}: not an argument of {node['_target_']}{nearest(str(key), list(params))}")


def nearest(word: str, candidates) -> str:
    """`` (did you mean '<the closest candidate>'?)`` for an error message, or '' when none is close."""
    import difflib

    match = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
