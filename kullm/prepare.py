"""``kullm-prepare``: preprocess a data set once, print its numbers, and save it with the tokenizer that made it.

    kullm-prepare data=kullm-v2 template=kullm model=polyglot-ko-12.8b
    kullm-prepare model=tiny data.path=my_set.jsonl data.policy=strict

Writes under the run's output folder: ``dataset/`` (``datasets`` ``save_to_disk``: ``train`` and ``validation``
with ``id``, ``input_ids``, ``labels``, ``attention_mask``), ``tokenizer/``, ``template.yaml``,
``data_stats.json`` and, when rows were rejected, ``rejects.jsonl`` (file:line, reason, raw row).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kullm.cli import run_cli
from kullm.config import validate

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Run the data pipeline for ``cfg`` and write its outputs; return the stats."""
    from kullm.chat_template import served_prompter, serving
    from kullm.data.pairs import stats_view
    from kullm.data.preference import check_layout
    from kullm.data.preprocess import preprocess, save_processed
    from kullm.data.records import open_private
    from kullm.data.sources import check_source
    from kullm.data.stats import format_stats, token_stats
    from kullm.modeling import load_tokenizer
    from kullm.templates import Prompter

    validate(cfg)
    check_source(cfg.data.path, cfg.data.source, cfg.data.missing_hint)
    check_layout(cfg.data)  # preference rows that cannot serve data.kind: one line, before the tokenizer loads
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    prompter = Prompter.from_config(cfg.template)
    processed = preprocess(cfg.data, tokenizer, prompter)
    stats = dict(processed.stats)
    stats["cache"] = {"dir": str(processed.cache_dir), "hit": processed.cache_hit}
    stats["tokens"] = {
        name: token_stats(stats_view(ds), int(cfg.micro_batch_size), int(cfg.pad_to_multiple_of), int(cfg.data.seed))
        for name, ds in processed.dataset.items()
    }
    save_processed(processed.dataset, out / "dataset")
    with serving(tokenizer, served_prompter(prompter, cfg.data)):
        tokenizer.save_pretrained(str(out / "tokenizer"))
    prompter.save(out / "template.yaml")
    if processed.rejects_path.exists():
        with open_private(out / "rejects.jsonl") as f:  # user-only, like the cache's copy: it holds the user's rows
            f.write(processed.rejects_path.read_text(encoding="utf-8"))
        stats["rejects_file"] = str(out / "rejects.jsonl")
    (out / "data_stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    print(format_stats(stats))
    print(f"\nprocessed dataset: {out / 'dataset'}\nstats: {out / 'data_stats.json'}")
    return stats


def main() -> None:
    """``kullm-prepare``: see ``conf/prepare.yaml``."""
    run_cli("kullm-prepare", "prepare", prepare)


if __name__ == "__main__":
    main()
