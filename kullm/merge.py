"""``kullm-merge``: fold a LoRA adapter into its base and write a plain Hugging Face checkpoint.

    kullm-merge adapter=outputs/.../adapter out=merged/
    kullm-merge adapter=outputs/.../adapter out=merged/ dtype=float16 max_shard_size=2GB overwrite=true
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from kullm.cli import run_cli
from kullm.config import validate


def run(cfg: DictConfig) -> Path:
    """What ``kullm-merge`` does: merge, then print the merged folder's :func:`summary`."""
    from kullm.inference.merging import merge

    validate(cfg)
    out = merge(cfg)
    print(json.dumps(summary(out), ensure_ascii=False))
    return out


def summary(folder: Path) -> dict[str, Sequence[str] | int]:
    """Files and tensor count of a merged folder (printed at the end of a run)."""
    from kullm.inference.merging import weight_names

    return {"files": sorted(p.name for p in folder.iterdir()), "tensors": len(weight_names(folder))}


def main() -> None:
    """``kullm-merge``: see ``conf/merge.yaml``."""
    run_cli("kullm-merge", "merge", run, catch=(ValueError, OSError))


if __name__ == "__main__":
    main()
