"""Credentials never leave a run: which config keys hold them, and scrubbing their values from everything a run
writes or prints (configs, Hydra's run files and log, recorded command lines).

Credentials are found by key name (``api_key``, ``hf_token``…) and by value shape, whatever key holds the value: a
URL's user info (``https://user:pass@host``) and its secret query parameters (``?api-key=…``, ``&sig=…``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# Key names that hold credentials: a key, a token in the credential sense, a password, a secret.
SECRET_WORDS = ("password", "passwd", "secret", "authorization", "credential", "api_key", "apikey")
TOKENIZER_TOKENS = ("eos", "pad", "bos", "unk", "sep", "cls", "mask", "additional_special")
# Query parameters that sign or authorise a request besides those is_secret_key names (Azure SAS, presigned URLs).
SECRET_PARAMS = ("sig", "signature", "auth", "x_amz_signature", "x_amz_credential", "x_amz_security_token")
REDACTED = "<redacted>"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@'\"]+)@")
_PARAM = re.compile(r"(?P<lead>[?&;](?P<name>[^\s=&;#?'\"]+)=)(?P<value>[^\s&;#'\"]*)")


def redact(cfg: DictConfig | dict) -> dict:
    """A plain, resolved copy of ``cfg`` with every credential value (api keys, access tokens, passwords…)
    replaced by ``<redacted>``; everything else, tokenizer settings included, is kept."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg

    def walk(node):
        if isinstance(node, dict):
            return {k: (REDACTED if _is_secret(str(k), v) else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return scrub_urls(node) if isinstance(node, str) else node

    return walk(data)


def scrub_urls(text: str) -> str:
    """``text`` with every URL's user info and secret query values replaced: ``http://<redacted>@host/v1?
    api-key=<redacted>&api-version=2024-06-01``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _PARAM.sub(lambda m: m["lead"] + (REDACTED if _is_secret_param(m["name"]) else m["value"]), text)


def _is_secret_param(name: str) -> bool:
    k = name.lower().replace("-", "_")
    return is_secret_key(k) or k in SECRET_PARAMS


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
    """``text`` with every secret value (longest first) and every URL credential replaced by ``<redacted>``."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return scrub_urls(text)


def redact_args(args: Sequence[str]) -> list[str]:
    """Command-line arguments with credential values replaced (what a logger may record)."""
    return [scrub(a, secret_values(args=[a])) for a in args]


class RedactRunFiles(Callback):
    """A Hydra callback: rewrites ``.hydra/{config,hydra,overrides}.yaml`` (and a sweep's ``multirun.yaml``) with
    credentials replaced, right after Hydra writes them; scrubs every line the run's log handlers write; and makes
    those files readable by their owner only (0600), since a config or a log may hold anything."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        secrets = secret_values(config, list(hc.overrides.task))
        scrub_log_handlers(secrets)
        if hc.output_subdir:
            folder = Path(hc.runtime.output_dir) / str(hc.output_subdir)
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                _scrub_file(folder / name, secrets)
        if hc.mode == RunMode.MULTIRUN:  # the launcher writes multirun.yaml after on_multirun_start, before jobs
            _scrub_file(Path(hc.sweep.dir) / "multirun.yaml", secrets)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = list(config.hydra.overrides.task)
        _scrub_file(Path(str(config.hydra.sweep.dir)) / "multirun.yaml", secret_values(config, overrides))


class ScrubLog(logging.Filter):
    """A handler filter that scrubs credentials (URL user info, secret query values, ``secrets``) from each line."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = set(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def scrub_log_handlers(secrets: set[str]) -> None:
    """Scrub every line the root logger's handlers write (Hydra's console and run log), and make the run's log
    files readable by their owner only."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubLog) for f in handler.filters):
            handler.addFilter(ScrubLog(secrets))
        if isinstance(handler, logging.FileHandler) and os.path.isfile(handler.baseFilename):
            os.chmod(handler.baseFilename, 0o600)


def _scrub_file(path: Path, secrets: set[str]) -> None:
    if not path.is_file():
        return
    os.chmod(path, 0o600)
    text = path.read_text(encoding="utf-8")
    clean = scrub(text, secrets)
    if clean != text:
        path.write_text(clean, encoding="utf-8")
