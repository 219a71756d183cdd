"""``kullm-merge``: fold a LoRA adapter into its base and write a plain Hugging Face checkpoint.

    kullm-merge adapter=outputs/.../adapter out=merged/
    kullm-merge adapter=outputs/.../adapter out=merged/ dtype=float16 max_shard_size=2GB overwrite=true
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kullm.adapter import AdapterError
from kullm.config import CONF_DIR, exit_on_version, fail, print_redacted_cfg, validate
from kullm.console import quiet_third_party
from kullm.inference.merging import MergeError, merge, weight_names


def summary(folder: Path) -> dict[str, Sequence[str] | int]:
    """Files and tensor count of a merged folder (printed at the end of a run)."""
    return {"files": sorted(p.name for p in folder.iterdir()), "tensors": len(weight_names(folder))}


@hydra.main(config_path=str(CONF_DIR), config_name="merge", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
        out = merge(cfg)
    except (AdapterError, MergeError, ValueError, OSError) as e:
        fail("kullm-merge", e)
    print(json.dumps(summary(out), ensure_ascii=False))


def main() -> None:
    """``kullm-merge``: see ``conf/merge.yaml``."""
    exit_on_version("kullm-merge", sys.argv[1:])
    quiet_third_party()
    if not print_redacted_cfg("merge", sys.argv[1:]):
        _hydra_main()


if __name__ == "__main__":
    main()
