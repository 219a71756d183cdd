"""Hydra plumbing shared by every entry point: the config folder, resolvers, and composing configs in code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).parent / "conf"
ROOT = Path(__file__).resolve().parent.parent  # the checkout (holds data/sample/ and outputs/)

if not OmegaConf.has_resolver("kullm_root"):
    OmegaConf.register_new_resolver("kullm_root", lambda: str(ROOT))


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides, outside ``@hydra.main``.

    No run folder exists outside a Hydra run: pass ``output_dir=...`` among the overrides.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password", "authorization")


def redact(cfg: DictConfig | dict) -> dict:
    """A plain, resolved copy of ``cfg`` with every secret-looking value (api keys, tokens…) replaced.

    Keys naming tokenizer tokens (``eos_token``, ``pad_token``…) are not secrets and are kept.
    """
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg

    def walk(node):
        if isinstance(node, dict):
            return {k: ("<redacted>" if _is_secret(str(k), v) else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(data)


def _is_secret(key: str, value) -> bool:
    k = key.lower()
    if value is None or isinstance(value, (dict, list, bool)):
        return False
    if k.endswith("_token") and k.split("_")[0] in ("eos", "pad", "bos", "unk", "sep", "cls", "mask"):
        return False
    if k in ("max_tokens", "max_new_tokens", "tokens"):
        return False
    return any(w in k for w in SECRET_WORDS)
