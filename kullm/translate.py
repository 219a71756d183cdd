"""``kullm-translate``: an English instruction or chat data set into Korean, checked field by field, resumable.

    kullm-translate data.path=my_set.jsonl
    kullm-translate data.path=my_set.jsonl dry_run=true
    kullm-translate recipe=kullm-v2
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from kullm.cli import run_cli
from kullm.config import validate


def run(cfg: DictConfig) -> dict[str, Any]:
    """What ``kullm-translate`` does: translate ``data`` into ``output`` (or estimate it under ``dry_run``); return
    the stats. A run the backend stopped, or that translated nothing, fails the command with the reason."""
    from kullm.translation.pipeline import translate

    validate(cfg)
    return translate(cfg)


def main() -> None:
    """``kullm-translate``: see ``conf/translate.yaml``."""
    run_cli("kullm-translate", "translate", run, catch=(ValueError, OSError))


if __name__ == "__main__":
    main()
