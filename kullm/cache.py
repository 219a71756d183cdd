"""Where kullm keeps what it builds once and reuses: the tiny models (``models/``) and processed datasets
(``processed/``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where kullm keeps built models and processed datasets (``$KULLM_CACHE``, else ``~/.cache/kullm``)."""
    return Path(os.environ.get("KULLM_CACHE", "~/.cache/kullm")).expanduser()
