"""What a run reached, in its ``result.json``: final and best ``val/loss``, optimizer steps, tokens/s, status.

:class:`RunRecord` (a Lightning callback) collects it during training and writes it; a sweep's
:class:`~kullm.training.sweep.SweepSummary` adds the job's overrides and status and ranks the jobs by it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L

from kullm.atomic import rewrite

RESULT_FILE = "result.json"
REWARD_KEYS = ("accuracy", "margin")  # recorded when the objective logs val/rewards/<key> (objective=dpo, …)


class RunRecord(L.Callback):
    """Collects what a run reached — final and best ``val/loss``, optimizer steps, tokens/s — for ``result.json``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / RESULT_FILE
        self.val_losses: list[float] = []
        self.val_rewards: list[dict[str, float]] = []  # preference objectives: val/rewards/{accuracy,margin}
        self.tokens_per_s: list[float] = []
        self._step = -1
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self._step:  # an optimizer step just ended: its throughput is logged
            self._step = trainer.global_step
            value = _scalar(trainer.callback_metrics.get("train/tokens_per_s"))
            if value is not None:
                self.tokens_per_s.append(value)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        value = _scalar(trainer.callback_metrics.get("val/loss"))
        if not trainer.sanity_checking and value is not None:
            self.val_losses.append(value)
            rewards = {k: _scalar(trainer.callback_metrics.get(f"val/rewards/{k}")) for k in REWARD_KEYS}
            if any(v is not None for v in rewards.values()):
                self.val_rewards.append(rewards)

    def write(self, trainer: L.Trainer, status: str, adapter: str | Path | None = None) -> dict[str, Any]:
        """Write ``result.json`` (rank zero) and return it."""
        record = {
            "status": status,
            "val_loss": self.val_losses[-1] if self.val_losses else None,
            "best_val_loss": min(self.val_losses) if self.val_losses else None,
            "steps": trainer.global_step,
            # the median step: neither the first (warm-up) nor a step that ran a validation skews it
            "tokens_per_s": round(statistics.median(self.tokens_per_s), 1) if self.tokens_per_s else None,
            "adapter": str(adapter) if adapter else None,
            "output_dir": str(self.path.parent),
            "wall_s": round(time.monotonic() - self._start, 1),
            "pid": os.getpid(),
        }
        for key in REWARD_KEYS if self.val_rewards else ():
            seen = [r[key] for r in self.val_rewards if r[key] is not None]
            record[f"val_rewards_{key}"] = self.val_rewards[-1][key]
            record[f"best_val_rewards_{key}"] = max(seen) if seen else None
        bench = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if k.startswith("bench/")}
        if bench:  # callbacks.bench: kullm-bench's main metric per task
            record["bench"] = bench
        if trainer.is_global_zero:
            write_result(self.path.parent, {**read_result(self.path.parent), **record})
        return record


def _scalar(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def read_result(folder: str | Path) -> dict[str, Any]:
    """A run folder's ``result.json`` (``{}`` when absent or unreadable)."""
    try:
        data = json.loads((Path(folder) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_result(folder: str | Path, data: dict[str, Any]) -> None:
    """Replace a run folder's ``result.json`` with ``data``: readers see the old file or the new one, never half."""
    path = Path(folder) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with rewrite(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
