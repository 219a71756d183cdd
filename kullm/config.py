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
