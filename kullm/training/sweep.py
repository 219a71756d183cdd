"""Comparing the jobs of a sweep: after each job of a multirun, ``sweep_summary.csv``/``.md``.

Each run records what it reached in its ``result.json`` (:mod:`kullm.training.result`); a Hydra callback
(:class:`SweepSummary`) adds the job's overrides, status and error, and after the last job ranks every job of the
sweep folder.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kullm.atomic import rewrite
from kullm.cli import JobFailed
from kullm.redaction import scrub, secret_values
from kullm.training.result import RESULT_FILE, read_result, write_result

SUMMARY_COLUMNS = (
    "rank",
    "job",
    "status",
    "val_loss",
    "best_val_loss",
    "val_rewards_accuracy",
    "steps",
    "tokens_per_s",
    "bench",
    "overrides",
    "adapter",
    "error",
)


class SweepSummary(Callback):
    """A Hydra callback. Each job: its overrides, pid and status (and the error of a failed job, on one line) go
    into its ``result.json``, and in a multirun the sweep's ``sweep_summary.csv``/``.md`` are rewritten — best
    ``val/loss`` first, jobs that did not finish last with their error — so the table is there even when a failed
    job makes the sweep itself end with an error (Hydra then skips ``on_multirun_end``)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = _job_folder(config)
        if folder is not None and _rank() == 0:
            (folder / RESULT_FILE).unlink(missing_ok=True)  # a result from an earlier attempt is not this one's

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        from kullm.redaction import redact_args

        folder = _job_folder(config)
        if folder is None or _rank() != 0:
            return
        record = read_result(folder)
        # the job's whole config: job_return.hydra_cfg lacks the job's keys that hydra.sweep.dir names (run_name)
        hydra_cfg = config.get("hydra")
        num = hydra_cfg.job.get("num") if hydra_cfg is not None else None
        record["job"] = int(num) if num is not None else None
        record["overrides"] = redact_args(list(job_return.overrides or []))
        record.setdefault("pid", os.getpid())
        record.setdefault("output_dir", str(folder))
        if job_return.status == JobStatus.COMPLETED:
            record.setdefault("status", "finished")
        else:
            record["status"] = "failed"
            record["error"] = _one_line(job_return._return_value, config, list(job_return.overrides or []))
        write_result(folder, record)
        if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
            sweep_dir = Path(str(hydra_cfg.sweep.dir))
            rows = summarize(sweep_dir)
            if rows:
                write_summary(sweep_dir, rows)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = summarize(sweep_dir)
        if not rows:
            return
        _, md_path = write_summary(sweep_dir, rows)
        print(summary_line(md_path, rows), flush=True)


def summary_line(md_path: Path, rows: list[dict[str, Any]]) -> str:
    """``kullm: sweep summary <path> (N jobs); best: job K (<overrides>) val/loss X``."""
    unfinished = sum(r["status"] != "finished" for r in rows)
    line = f"kullm: sweep summary {md_path} ({len(rows)} jobs"
    line += f", {unfinished} not finished)" if unfinished else ")"
    best = rows[0]
    if best["status"] == "finished" and best.get("val_loss") is not None:
        line += f"; best: job {best['job']} ({best['overrides'] or 'no overrides'}) val/loss {best['val_loss']:.4f}"
    return line


def bench_cell(bench: Any) -> str | None:
    """A job's ``bench/<task>`` metrics in one cell: ``bench/kobest_boolq=0.5200 bench/purity=1.0000``."""
    if not isinstance(bench, dict) or not bench:
        return None
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in bench.items())


def _job_folder(config: DictConfig) -> Path | None:
    out = config.get("output_dir") if isinstance(config, DictConfig) else None
    return Path(str(out)) if out else None


def _rank() -> int:
    """This process's global rank as the launcher set it (torchrun/Lightning, or SLURM's task id)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def _one_line(error: Any, config: DictConfig, overrides: list[str]) -> str:
    text = str(error) if isinstance(error, JobFailed) else f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return scrub(text, secret_values(config, overrides))[:500]


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job folder under ``sweep_dir`` (any folder with ``.hydra/``), ranked: finished jobs by the
    ``val/loss`` ``kullm-train`` returned (what a search minimises), then jobs that did not finish."""
    rows, all_overrides = [], []
    for folder in _job_folders(Path(sweep_dir)):
        record = read_result(folder)
        overrides = record.get("overrides")
        if overrides is None:
            overrides = _overrides_file(folder)
        all_overrides.append(overrides)
        rows.append(
            {
                "job": record.get("job", folder.name),
                "status": record.get("status") or "no result (killed?)",
                "val_loss": record.get("val_loss"),
                "best_val_loss": record.get("best_val_loss"),
                "val_rewards_accuracy": record.get("val_rewards_accuracy"),  # preference objectives only
                "steps": record.get("steps"),
                "tokens_per_s": record.get("tokens_per_s"),
                "bench": bench_cell(record.get("bench")),  # callbacks.bench: kullm-bench's bench/<task> metrics
                "overrides": overrides,
                "adapter": record.get("adapter"),
                "error": record.get("error"),
                "folder": str(folder),
            }
        )

    def key(row: dict[str, Any]) -> tuple:
        finished = row["status"] == "finished"
        loss = row["val_loss"]
        return (not finished, loss is None, loss if loss is not None else 0.0, _natural(str(row["folder"])))

    # what every job shares (the experiment, the sweep's fixed settings) says nothing about one job
    common = set.intersection(*map(set, all_overrides)) if len(rows) > 1 else set()
    for row in rows:
        row["common"] = " ".join(o for o in row["overrides"] if o in common)
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in common)
    rows.sort(key=key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def _job_folders(sweep_dir: Path) -> Iterable[Path]:
    for hydra_dir in sorted(sweep_dir.glob("**/.hydra")):
        folder = hydra_dir.parent
        if folder != sweep_dir and ".submitit" not in folder.parts and (hydra_dir / "overrides.yaml").is_file():
            yield folder


def _overrides_file(folder: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        return [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
    except Exception:
        return []


def _natural(text: str) -> tuple:
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def write_summary(sweep_dir: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``sweep_summary.csv`` and ``sweep_summary.md``; return their paths."""
    sweep_dir = Path(sweep_dir)
    csv_path, md_path = sweep_dir / "sweep_summary.csv", sweep_dir / "sweep_summary.md"
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in SUMMARY_COLUMNS} for row in rows)
    _write_text(csv_path, table.getvalue())  # jobs running in parallel each rewrite it: readers never see half
    _write_text(md_path, _markdown(sweep_dir, rows))
    return csv_path, md_path


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rewrite(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _markdown(sweep_dir: Path, rows: list[dict[str, Any]]) -> str:
    def cell(value: Any, digits: int = 4) -> str:
        if value is None or value == "":
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}f}" if digits else f"{value:,.0f}"
        return str(value).replace("|", "\\|")

    lines = [f"# Sweep summary: {sweep_dir}", ""]
    if rows[0].get("common"):
        lines += [f"Every job: `{rows[0]['common']}`.", ""]
    best = rows[0]
    if best["status"] == "finished" and best.get("val_loss") is not None:
        lines += [f"Best: job {best['job']} (`{best['overrides']}`), val/loss {best['val_loss']:.4f}.", ""]
    rewards = any(r.get("val_rewards_accuracy") is not None for r in rows)  # a preference sweep: its accuracy too
    lines += [
        "| rank | job | status | val/loss | best val/loss |" + (" val/rewards/accuracy |" if rewards else "")
        + " steps | tokens/s | overrides | adapter |",
        "|---:|---:|---|---:|---:|" + ("---:|" if rewards else "") + "---:|---:|---|---|",
    ]  # fmt: skip
    for r in rows:
        accuracy = f" {cell(r.get('val_rewards_accuracy'))} |" if rewards else ""
        lines.append(
            f"| {r['rank']} | {cell(r['job'])} | {r['status']} | {cell(r['val_loss'])} | {cell(r['best_val_loss'])} |"
            f"{accuracy} {cell(r['steps'])} | {cell(r['tokens_per_s'], 0)} | {cell(r['overrides'])} "
            f"| {cell(r['adapter'])} |"
        )
    if any(r.get("bench") for r in rows):
        lines += ["", "## Benchmarks (callbacks.bench)", "", "| rank | job | bench |", "|---:|---:|---|"]
        lines += [f"| {r['rank']} | {cell(r['job'])} | {cell(r.get('bench'))} |" for r in rows]
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- job {r['job']} (`{r['overrides']}`): {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"
