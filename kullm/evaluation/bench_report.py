"""``kullm-bench``'s results folder and its comparison across models.

A results folder holds ``results.json`` (every number with its interval, what produced it and with which
versions), ``results.md`` and ``results.csv``. A comparison reads several such folders and writes
``comparison.md``, ``comparison.csv`` and ``comparison.png``: rows are models, columns benchmarks, each cell the
benchmark's main metric with its interval; the chart draws one panel per benchmark (their scales differ: accuracy
0–1, judge scores 1–10), a bar per model with its interval, in :mod:`kullm.evaluation.report`'s style.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kullm.atomic import rewrite
from kullm.evaluation.harness import RESULTS_FILE, BenchError
from kullm.evaluation.report import _ascii, _f

FORMAT = 1  # results.json layout version
CSV_COLUMNS = ["model", "benchmark", "kind", "metric", "value", "stderr", "ci_low", "ci_high", "n", "n_shot",
               "version"]  # fmt: skip


def versions() -> dict[str, str | None]:
    """The versions of what produced the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    from kullm import __version__

    found: dict[str, str | None] = {"kullm": __version__}
    for pkg in ("lm_eval", "torch", "transformers", "peft"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return found


def merge_results(path: Path, model: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """This run's results over the folder's earlier ones for the same model (same hashes); another model's earlier
    results are dropped, never mixed in."""
    if not path.is_file():
        return dict(results)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(results)
    if not isinstance(old, dict) or old.get("model", {}).get("hashes") != model.get("hashes"):
        return dict(results)
    return {**{k: v for k, v in old.get("results", {}).items() if k not in results}, **results}


def write_results(
    out_dir: Path, model: Mapping[str, Any], suite: str, settings: Mapping[str, Any], results: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.csv`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / RESULTS_FILE, "md": out_dir / "results.md", "csv": out_dir / "results.csv"}
    doc = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": dict(model),
        "suite": suite,
        "settings": dict(settings),
        "versions": versions(),
        "results": merge_results(paths["json"], model, results),
    }
    with rewrite(paths["json"]) as tmp:
        tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=2, default=_plain) + "\n", encoding="utf-8")
    with rewrite(paths["md"]) as tmp:
        tmp.write_text(markdown(doc), encoding="utf-8")
    with rewrite(paths["csv"]) as tmp:
        write_csv(csv_rows(doc), tmp)
    return paths


def _plain(x: Any) -> Any:
    """JSON for what ``json`` cannot write itself (numpy numbers, paths)."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def csv_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark and metric (a group's subtasks after it, named ``group/subtask``)."""
    rows = []
    model = doc["model"]["name"]
    for name, r in doc["results"].items():
        parts = [(name, r, r.get("meta", {}).get("n_shot"), r.get("meta", {}).get("version"))]
        parts += [(f"{name}/{t}", s, s.get("n_shot"), s.get("version")) for t, s in (r.get("subtasks") or {}).items()]
        for bench, part, n_shot, version in parts:
            for metric, value in part["metrics"].items():
                lo, hi = (part.get("ci") or {}).get(metric, (None, None))
                rows.append(
                    {
                        "model": model,
                        "benchmark": bench,
                        "kind": r.get("kind"),
                        "metric": metric,
                        "value": value,
                        "stderr": (part.get("stderr") or {}).get(metric),
                        "ci_low": lo,
                        "ci_high": hi,
                        "n": part.get("n"),
                        "n_shot": n_shot,
                        "version": version,
                    }
                )
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None or row.get(k) != row.get(k) else row.get(k)) for k in CSV_COLUMNS})


def _cell(r: Mapping[str, Any], metric: str | None, nd: int = 4) -> str:
    if metric is None or metric not in r.get("metrics", {}):
        return "–"
    lo, hi = (r.get("ci") or {}).get(metric, (None, None))
    value = _f(r["metrics"][metric], nd)
    return value if lo is None else f"{value} [{_f(lo, nd)}, {_f(hi, nd)}]"


def markdown(doc: Mapping[str, Any]) -> str:
    """One model's results: a row per benchmark (main metric and interval), then every metric."""
    m = doc["model"]
    conf = doc["settings"].get("confidence")
    lines = [f"# kullm-bench: {m['name']}", ""]
    lines += [f"- model: `{m['path']}`" + (f" (adapter on `{m['base']}`, not merged)" if m.get("adapter") else "")]
    lines += [f"- hashes: {', '.join(f'{k} `{v}`' for k, v in m['hashes'].items() if v)}"]
    lines += [f"- suite: {doc['suite']}; versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items() if v)}"]
    lines += ["", f"## Main metric ({_f(conf * 100 if conf else None, 0)}% interval)", ""]
    lines += ["| benchmark | kind | metric | value [interval] | n | n-shot | chat template | failed | pending |"]
    lines += ["|---" * 9 + "|"]
    for name, r in doc["results"].items():
        meta = r.get("meta", {})
        settings = meta.get("settings") or {}
        chat = settings.get("apply_chat_template", "–")
        lines.append(
            f"| {name} | {r.get('kind')} | {r.get('main')} | {_cell(r, r.get('main'))} | {r.get('n')} | "
            f"{meta.get('n_shot', '–')} | {chat} | {r.get('failed', 0)} | {r.get('pending', 0)} |"
        )
    results = doc["results"]
    agreement = [(name, pair, a) for name, r in results.items() for pair, a in (r.get("agreement") or {}).items()]
    if agreement:  # judge suites scored by two judges
        lines += ["", "## Judge agreement", "", "| benchmark | judges | Spearman | Kendall | mean abs. diff | n |"]
        lines += ["|---" * 6 + "|"]
        lines += [
            f"| {name} | {pair} | {_f(a.get('spearman'), 3)} | {_f(a.get('kendall'), 3)} | {_f(a.get('mae'), 3)} "
            f"| {a.get('n')} |"
            for name, pair, a in agreement
        ]
    lines += ["", "## Every metric", "", "| benchmark | metric | value [interval] | stderr | n |", "|---" * 5 + "|"]
    for row in csv_rows(doc):
        lo, hi = row["ci_low"], row["ci_high"]
        ci = f" [{_f(lo, 4)}, {_f(hi, 4)}]" if lo is not None else ""
        lines.append(f"| {row['benchmark']} | {row['metric']} | {_f(row['value'], 4)}{ci} | {_f(row['stderr'], 4)} "
                     f"| {row['n']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# --- comparison ---------------------------------------------------------------------------------------------------


def read_results(folder: str | Path) -> dict[str, Any]:
    """A results folder's ``results.json``."""
    path = Path(folder).expanduser()
    path = path if path.name == RESULTS_FILE else path / RESULTS_FILE
    if not path.is_file():
        raise BenchError(f"{path}: no such file (a kullm-bench results folder holds one)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BenchError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict) or "model" not in doc:
        raise BenchError(f"{path}: not a kullm-bench results.json (no model/results)")
    return doc


def compare(folders: Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` over several results folders."""
    if not folders:
        raise BenchError("compare=[...]: give at least one results folder")
    docs = [read_results(f) for f in folders]
    names = model_names(docs, folders)
    benches = list(dict.fromkeys(b for d in docs for b in d["results"]))
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "comparison.md", "csv": out / "comparison.csv", "png": out / "comparison.png"}
    with rewrite(paths["md"]) as tmp:
        tmp.write_text(comparison_markdown(docs, names, benches), encoding="utf-8")
    rows = [{**row, "model": name} for d, name in zip(docs, names, strict=True) for row in csv_rows(d)]
    with rewrite(paths["csv"]) as tmp:
        write_csv(rows, tmp)
    with rewrite(paths["png"]) as tmp:
        plot(docs, names, benches, tmp)
    return paths


def model_names(docs: Sequence[Mapping[str, Any]], folders: Sequence[str | Path]) -> list[str]:
    """Each model's row label: its name, or its folder's when two share a name."""
    names = [str(d["model"]["name"]) for d in docs]
    return [n if names.count(n) == 1 else f"{n} ({Path(f).name})" for n, f in zip(names, folders, strict=True)]


def main_metric(docs: Sequence[Mapping[str, Any]], bench: str) -> str | None:
    """The metric a benchmark's column shows: the first model's main metric for it."""
    return next((d["results"][bench].get("main") for d in docs if bench in d["results"]), None)


def comparison_markdown(docs: Sequence[Mapping[str, Any]], names: Sequence[str], benches: Sequence[str]) -> str:
    """Rows models, columns benchmarks: the main metric [interval]; then what each model is."""
    metrics = [main_metric(docs, b) for b in benches]
    lines = ["# kullm-bench comparison", ""]
    lines.append("| model | " + " | ".join(f"{b} ({m})" for b, m in zip(benches, metrics, strict=True)) + " |")
    lines.append("|---" * (1 + len(benches)) + "|")
    for d, name in zip(docs, names, strict=True):
        cells = [_cell(d["results"][b], m) if b in d["results"] else "–" for b, m in zip(benches, metrics, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| model | path | adapter on | hashes | created |", "|---" * 5 + "|"]
    for d, name in zip(docs, names, strict=True):
        m = d["model"]
        hashes = ", ".join(f"{k} `{str(v)[:19]}`" for k, v in m.get("hashes", {}).items() if v)
        base = m.get("base") if m.get("adapter") else "–"
        lines.append(f"| {name} | `{m.get('path')}` | {base} | {hashes} | {d.get('created', '–')} |")
    settings = {json.dumps(d.get("settings", {}), sort_keys=True) for d in docs}
    if len(settings) > 1:
        lines += ["", "> **Note**: the folders were scored with different settings (limit, seed, batch size…); "
                  "see each results.json."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(docs: Sequence[Mapping[str, Any]], names: Sequence[str], benches: Sequence[str], path: Path) -> None:
    """One panel per benchmark, a bar per model with its interval (ASCII labels: no Hangul glyphs in the fonts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = min(4, max(1, len(benches)))
    rows = math.ceil(max(1, len(benches)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1.5, 3.0 * rows + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, ax in enumerate(axes.flat):
        if k >= len(benches):
            ax.axis("off")
            continue
        bench = benches[k]
        metric = main_metric(docs, bench)
        vals, errs = [], [[], []]
        for d in docs:
            r = d["results"].get(bench)
            v = r["metrics"].get(metric, np.nan) if r else np.nan
            lo, hi = (r.get("ci") or {}).get(metric, (v, v)) if r else (np.nan, np.nan)
            vals.append(v)
            errs[0].append(abs(v - lo) if lo is not None else 0.0)
            errs[1].append(abs(hi - v) if hi is not None else 0.0)
        x = np.arange(len(docs))
        ax.bar(x, vals, yerr=np.array(errs), capsize=3, color=[colors[i % len(colors)] for i in range(len(docs))])
        ax.set_xticks(x, [_ascii(n) for n in names], rotation=20, ha="right", fontsize="small")
        ax.set_title(_ascii(f"{bench} ({metric})"), fontsize="medium")
    fig.suptitle("kullm-bench")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the path may be a temporary without the .png suffix
    plt.close(fig)
