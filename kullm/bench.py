"""``kullm-bench``: Korean benchmark scores of an adapter (on its base, not merged), a merged folder or a hub model;
or a comparison table and chart across several results folders.

    kullm-bench adapter=outputs/.../adapter suite=ko_quick
    kullm-bench base=outputs/.../merged suite=kmmlu
    kullm-bench 'compare=[outputs/bench/base,outputs/bench/adapter]'
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from omegaconf import DictConfig

from kullm.cli import run_cli
from kullm.config import validate
from kullm.errors import KullmError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """What ``kullm-bench`` does: score the model on the suite (or compare folders); return the first entry's main
    metric (what a sweep optimises), None when comparing."""
    from kullm.evaluation.bench_report import compare

    validate(cfg)
    if cfg.compare:
        folders = [cfg.compare] if isinstance(cfg.compare, str) else [str(f) for f in cfg.compare]
        paths = compare(folders, cfg.output_dir or "outputs/bench/compare")
        print(f"kullm-bench: compared {len(folders)} results folders: {paths['md']}, {paths['csv']}, {paths['png']}")
        return None
    results, paths = score(cfg)
    for r in results.values():
        main = r.get("main")
        value = r["metrics"].get(main) if main else None
        extra = f" ({r['failed']} failed, {r['pending']} pending)" if r.get("failed") or r.get("pending") else ""
        print(f"{r['name']}: {main}={value:.4f} (n={r.get('n')}){extra}" if value is not None else f"{r['name']}: –")
    print(f"kullm-bench: results in {paths['json'].parent}")
    first = next(iter(results.values()))
    return first["metrics"].get(first.get("main")) if first.get("main") else None


def score(cfg: DictConfig) -> tuple[dict, dict[str, Path]]:
    """Check the suite's names and the model's folders, load the model, run the suite, write its results folder."""
    from kullm.evaluation.bench_model import describe, load_bench_model
    from kullm.evaluation.bench_report import write_results
    from kullm.evaluation.harness import check_names, run_entries, suite_entries

    entries = suite_entries(cfg)
    check_names(entries, cfg)
    check_model(cfg)
    bm = load_bench_model(cfg)
    out_dir = Path(cfg.output_dir or f"outputs/bench/{folder_name(bm.name)}")
    results = run_entries(entries, bm, cfg, out_dir)
    settings = {
        k: cfg[k]
        for k in ("limit", "num_fewshot", "apply_chat_template", "batch_size", "seed", "bootstrap_iters", "confidence")
    }
    settings |= {"device": str(bm.model.device), "tasks": [e["name"] for e in entries]}
    paths = write_results(out_dir, describe(bm), str(cfg.suite.name) if not cfg.tasks else "tasks", settings, results)
    return results, paths


def check_model(cfg: DictConfig) -> None:
    """An adapter's folder and its base, before anything loads: one line naming what is missing."""
    from kullm.adapter import CONFIG_FILE, read_adapter
    from kullm.evaluation.bench_model import ADAPTER_CONFIG

    if cfg.adapter and cfg.base:
        raise KullmError("give adapter=<folder> or base=<folder or hub id>, not both (an adapter names its own base)")
    folder = cfg.adapter or (cfg.base if (Path(str(cfg.base)).expanduser() / ADAPTER_CONFIG).is_file() else None)
    if folder:
        spec = read_adapter(folder)
        base = str(spec.model.get("name_or_path") or "")
        if looks_like_path(base) and not Path(base).expanduser().exists():
            raise KullmError(
                f"{spec.path / CONFIG_FILE}: its base model {base!r} does not exist on this machine: copy the base "
                f"there, or score the merged folder (kullm-merge adapter={spec.path}) with base=<merged folder>"
            )
    elif cfg.base and looks_like_path(str(cfg.base)) and not Path(str(cfg.base)).expanduser().exists():
        raise KullmError(f"base={cfg.base}: no such folder")


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name``) or ``kullm:tiny``."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def folder_name(name: str) -> str:
    """A model name as one folder name (a hub id's ``/`` becomes ``--``, as the hub cache does)."""
    return re.sub(r"[^\w.\-]+", "-", name.replace("/", "--")).strip("-") or "model"


def main() -> None:
    """``kullm-bench``: see ``conf/bench.yaml``."""
    run_cli("kullm-bench", "bench", run, catch=(ValueError, OSError))


if __name__ == "__main__":
    main()
