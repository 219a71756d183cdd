"""The G-Eval report: per-criterion means with bootstrap intervals, a 0–100 overall score, scores relative to a
reference run, as Markdown, CSV, a PNG bar chart and (optionally) a W&B table.

Scaling follows KULLM's README graph: a criterion's mean is shown on 0–100 as ``(mean − min) / (max − min) × 100``
(a criterion at its minimum scores 0, at its maximum 100; 29 of the graph's 30 bars reproduce that way, and
koVicuna's 26 and 29 on 1–3 criteria are impossible under ``score / max``), and the overall score is the mean of
the six scaled criteria. The relative score of a run is ``overall / overall_of_reference × 100``. Intervals are
percentile bootstraps over items (fixed seed), resampling whole items so the overall interval respects the
correlation between criteria.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kullm.atomic import rewrite
from kullm.evaluation.geval import Criterion

log = logging.getLogger(__name__)

CSV_COLUMNS = [
    "run",
    "criterion",
    "label",
    "min",
    "max",
    "n",
    "mean",
    "ci_low",
    "ci_high",
    "scaled",
    "weighted_mean",
    "relative",
]


@dataclass
class RunStats:
    """One run's numbers: counts, per-criterion means and intervals, scaled overall and relative score."""

    name: str
    n_total: int
    n_ok: int
    n_failed: int
    n_pending: int
    means: dict[str, float] = field(default_factory=dict)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    weighted: dict[str, float | None] = field(default_factory=dict)
    overall: float = float("nan")
    overall_ci: tuple[float, float] = (float("nan"), float("nan"))
    relative: float | None = None
    notes: list[str] = field(default_factory=list)

    def scaled(self, c: Criterion) -> float:
        return scale(self.means.get(c.name, float("nan")), c)


def scale(score: float, c: Criterion) -> float:
    """A criterion's score on 0–100 as in KULLM's graph: ``(score − min) / (max − min) × 100``."""
    return (score - c.min) / (c.max - c.min) * 100.0


def summarize(
    name: str,
    judgments: Sequence[Mapping[str, Any]],
    criteria: Sequence[Criterion],
    n_total: int,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RunStats:
    """Statistics of one run's judgments (only ``status == "ok"`` ones are scored; failures are counted)."""
    ok = [j for j in judgments if j.get("status") == "ok"]
    failed = sum(1 for j in judgments if j.get("status") != "ok")
    st = RunStats(name, n_total, len(ok), failed, max(0, n_total - len(judgments)))
    if not ok:
        return st
    x = np.array([[float(j["scores"][c.name]) for c in criteria] for j in ok])  # items x criteria
    lows, spans = np.array([c.min for c in criteria]), np.array([c.max - c.min for c in criteria])
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)  # samples x criteria
    lo_q, hi_q = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    for k, c in enumerate(criteria):
        st.means[c.name] = float(x[:, k].mean())
        st.ci[c.name] = (float(np.percentile(boot[:, k], lo_q)), float(np.percentile(boot[:, k], hi_q)))
        w = [j["weighted"][c.name] for j in ok if (j.get("weighted") or {}).get(c.name) is not None]
        st.weighted[c.name] = float(np.mean(w)) if len(w) == len(ok) else None  # only when every item has one
    st.overall = float(((x.mean(axis=0) - lows) / spans * 100).mean())
    overall_boot = ((boot - lows) / spans * 100).mean(axis=1)
    st.overall_ci = (float(np.percentile(overall_boot, lo_q)), float(np.percentile(overall_boot, hi_q)))
    return st


def set_relative(runs: Sequence[RunStats], reference: str | None) -> None:
    """Fill ``relative`` (overall / reference overall * 100) for every run."""
    if reference is None:
        return
    ref = next((r for r in runs if r.name == reference), None)
    if ref is None:
        raise ValueError(f"reference run {reference!r} is not among the runs {[r.name for r in runs]}")
    for r in runs:
        r.relative = r.overall / ref.overall * 100 if ref.overall and ref.overall == ref.overall else None


def write_report(
    runs: Sequence[RunStats],
    criteria: Sequence[Criterion],
    out_dir: str | Path,
    reference: str | None = None,
    header: str = "",
) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    with rewrite(paths["md"]) as tmp:  # each file replaced whole: never written through a link planted there
        tmp.write_text(markdown(runs, criteria, reference, header), encoding="utf-8")
    with rewrite(paths["csv"]) as tmp:
        write_csv(runs, criteria, tmp)
    with rewrite(paths["png"]) as tmp:
        plot(runs, criteria, tmp)
    return paths


def _f(x: float | None, nd: int = 2) -> str:
    return "–" if x is None or x != x else f"{x:.{nd}f}"


def _mean_ci(r: RunStats, c: Criterion) -> str:
    lo, hi = r.ci.get(c.name, (None, None))
    return f"{_f(r.means.get(c.name))} [{_f(lo)}, {_f(hi)}]"


def markdown(
    runs: Sequence[RunStats], criteria: Sequence[Criterion], reference: str | None = None, header: str = ""
) -> str:
    """The report as Markdown: who judged, notes (loud), raw means with intervals, then the 0–100 table."""
    lines = ["# G-Eval report", ""] + ([header, ""] if header else [])
    for r in runs:
        for note in r.notes:
            lines.append(f"> **WARNING ({r.name})**: {note}")
    if any(r.notes for r in runs):
        lines.append("")
    heads = [f"{c.name} ({_f(c.min, 0)} - {_f(c.max, 0)})" for c in criteria]
    lines += ["## Mean scores (95% bootstrap interval)", ""]
    lines.append("| run | judged | failed | not judged | " + " | ".join(heads) + " |")
    lines.append("|---" * (4 + len(criteria)) + "|")
    for r in runs:
        cells = [_mean_ci(r, c) for c in criteria]
        lines.append(f"| {r.name} | {r.n_ok} | {r.n_failed} | {r.n_pending} | " + " | ".join(cells) + " |")
    lines += ["", "## Scaled to 0–100 ((mean − min) / (max − min) × 100, as in KULLM's graph)", ""]
    rel = f"relative to {reference} (%)" if reference else "relative (%)"
    lines.append("| run | " + " | ".join(c.label for c in criteria) + f" | overall [95% CI] | {rel} |")
    lines.append("|---" * (3 + len(criteria)) + "|")
    for r in runs:
        cells = [_f(r.scaled(c), 1) for c in criteria]
        overall = f"{_f(r.overall, 1)} [{_f(r.overall_ci[0], 1)}, {_f(r.overall_ci[1], 1)}]"
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {overall} | {_f(r.relative, 1)} |")
    if any(v is not None for r in runs for v in r.weighted.values()):
        lines += ["", "## G-Eval probability-weighted means", ""]
        lines.append("| run | " + " | ".join(heads) + " |")
        lines.append("|---" * (1 + len(criteria)) + "|")
        for r in runs:
            lines.append(f"| {r.name} | " + " | ".join(_f(r.weighted.get(c.name), 3) for c in criteria) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(runs: Sequence[RunStats], criteria: Sequence[Criterion]) -> list[dict[str, Any]]:
    """One row per run and criterion, plus an ``overall`` row per run (on the 0–100 scale)."""
    rows = []
    for r in runs:
        for c in criteria:
            lo, hi = r.ci.get(c.name, (None, None))
            rows.append(
                {
                    "run": r.name,
                    "criterion": c.name,
                    "label": c.label,
                    "min": c.min,
                    "max": c.max,
                    "n": r.n_ok,
                    "mean": r.means.get(c.name),
                    "ci_low": lo,
                    "ci_high": hi,
                    "scaled": r.scaled(c),
                    "weighted_mean": r.weighted.get(c.name),
                    "relative": None,
                }
            )
        rows.append(
            {
                "run": r.name,
                "criterion": "overall",
                "label": "Overall",
                "min": 0,
                "max": 100,
                "n": r.n_ok,
                "mean": r.overall,
                "ci_low": r.overall_ci[0],
                "ci_high": r.overall_ci[1],
                "scaled": r.overall,
                "weighted_mean": None,
                "relative": r.relative,
            }
        )
    return rows


def write_csv(runs: Sequence[RunStats], criteria: Sequence[Criterion], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in csv_rows(runs, criteria):
            w.writerow({k: ("" if v is None or v != v else v) for k, v in row.items()})


def plot(runs: Sequence[RunStats], criteria: Sequence[Criterion], path: Path) -> None:
    """Grouped bars: each criterion (and the overall score) on 0–100, one bar per run, with the run's interval.

    Axis labels are the criteria's ASCII labels: matplotlib's default fonts have no Hangul glyphs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c.label for c in criteria] + ["Overall"]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.4 * len(labels)), 4.8))
    for k, r in enumerate(runs):
        vals = [r.scaled(c) for c in criteria] + [r.overall]
        lows = [scale(r.ci[c.name][0], c) if c.name in r.ci else np.nan for c in criteria] + [r.overall_ci[0]]
        highs = [scale(r.ci[c.name][1], c) if c.name in r.ci else np.nan for c in criteria] + [r.overall_ci[1]]
        err = np.abs(np.array([np.subtract(vals, lows), np.subtract(highs, vals)]))
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=_ascii(r.name))
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("(mean - min) / (max - min) x 100")
    ax.set_title("G-Eval")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the path may be a temporary without the .png suffix
    plt.close(fig)


def _ascii(name: str) -> str:
    """Run names in the legend, with characters the default font cannot draw replaced (no tofu boxes)."""
    return name if name.isascii() else name.encode("ascii", "replace").decode()


def log_wandb(
    runs: Sequence[RunStats], criteria: Sequence[Criterion], png: Path, wandb_cfg: Mapping[str, Any], config: Any
) -> None:
    """Log the CSV rows as a W&B table and the chart as an image (W&B's offline/disabled modes apply); ``wandb_cfg``
    is kullm-eval's ``wandb`` node, ``config`` the (redacted) config the run records."""
    import wandb

    from kullm.wandb_mode import wandb_mode

    run = wandb.init(
        project=wandb_cfg["project"] or "kullm",
        # resolved here, as for training (WANDB_MODE, else online with a key, else offline): left to W&B, a process
        # that already ran W&B keeps the mode its first run read from the environment
        mode=wandb_cfg["mode"] or wandb_mode("auto"),
        config=config,
        job_type="eval",
        dir=str(png.parent),
    )
    rows = csv_rows(runs, criteria)
    table = wandb.Table(columns=CSV_COLUMNS, data=[[row[k] for k in CSV_COLUMNS] for row in rows])
    run.log({"eval/report": table, "eval/chart": wandb.Image(str(png))})
    run.finish()
    wandb.teardown()  # the service writes the run asynchronously: wait for it
