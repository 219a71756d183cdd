"""Credentials never leave a run: which config keys hold them, and scrubbing their values from everything a run
writes or prints (configs, Hydra's run files, recorded command lines)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# Key names that hold credentials: a key, a token in the credential sense, a password, a secret.
SECRET_WORDS = ("password", "passwd", "secret", "authorization", "credential", "api_key", "apikey")
TOKENIZER_TOKENS = ("eos", "pad", "bos", "unk", "sep", "cls", "mask", "additional_special")


def redact(cfg: DictConfig | dict) -> dict:
    """A plain, resolved copy of ``cfg`` with every credential value (api keys, access tokens, passwords…)
    replaced by ``<redacted>``; everything else, tokenizer settings included, is kept."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg

    def walk(node):
        if isinstance(node, dict):
            return {k: ("<redacted>" if _is_secret(str(k), v) else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(data)


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential: ``hf_token``, ``api_key``, ``password`` — not ``eos_token``,
    ``tokenizer``, ``token_budget`` or ``max_new_tokens``."""
    k = key.lower().replace("-", "_")
    if any(w in k for w in SECRET_WORDS):
        return True
    if k in ("token", "key") or k.endswith("_key"):
        return True
    return k.endswith("_token") and k.removesuffix("_token") not in TOKENIZER_TOKENS


def _is_secret(key: str, value) -> bool:
    return value is not None and not isinstance(value, (dict, list, bool)) and is_secret_key(key)


def secret_values(cfg: DictConfig | None = None, args: Sequence[str] = ()) -> set[str]:
    """The values of credential keys in ``cfg`` and in ``key=value`` command-line arguments."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if _is_secret(str(k), v) and str(v).strip():
                    found.add(str(v))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    if cfg is not None:
        walk(OmegaConf.to_container(cfg, resolve=False))
    for arg in args:
        key, eq, value = str(arg).partition("=")
        if eq and is_secret_key(key.lstrip("+~").rsplit(".", 1)[-1]) and value.strip("'\" "):
            found.add(value.strip("'\""))
    return found


def scrub(text: str, secrets: set[str]) -> str:
    """``text`` with every secret value replaced by ``<redacted>`` (longest first)."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "<redacted>")
    return text


def redact_args(args: Sequence[str]) -> list[str]:
    """Command-line arguments with credential values replaced (what a logger may record)."""
    return [scrub(a, secret_values(args=[a])) for a in args]


class RedactRunFiles(Callback):
    """A Hydra callback: rewrites ``.hydra/{config,hydra,overrides}.yaml`` (and a sweep's ``multirun.yaml``) with
    credential values replaced, right after Hydra writes them."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        secrets = secret_values(config, list(hc.overrides.task))
        if hc.output_subdir:
            folder = Path(hc.runtime.output_dir) / str(hc.output_subdir)
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                _scrub_file(folder / name, secrets)
        if hc.mode == RunMode.MULTIRUN:  # the launcher writes multirun.yaml after on_multirun_start, before jobs
            _scrub_file(Path(hc.sweep.dir) / "multirun.yaml", secrets)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = list(config.hydra.overrides.task)
        _scrub_file(Path(str(config.hydra.sweep.dir)) / "multirun.yaml", secret_values(config, overrides))


def _scrub_file(path: Path, secrets: set[str]) -> None:
    if secrets and path.is_file():
        text = path.read_text(encoding="utf-8")
        clean = scrub(text, secrets)
        if clean != text:
            path.write_text(clean, encoding="utf-8")
