"""The W&B mode a run gets: online with an API key, offline without one (shared by training's logger and the
evaluation report, so neither stage reaches into the other)."""

from __future__ import annotations

import os


def wandb_mode(mode: str) -> str:
    """``auto``: online with an API key (environment or ``wandb login``), else offline. ``WANDB_MODE`` wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"
