"""``kullm-bench``'s engine: a suite's entries run on one loaded model, into one results folder.

Three kinds of entry (``conf/suite/*.yaml``):

* ``lm_eval`` — a task of EleutherAI's lm-evaluation-harness, run through its Python API (``simple_evaluate``) on
  kullm's own loaded model wrapped in lm-eval's ``HFLM``: an adapter is applied, never merged; nothing of lm-eval's
  prompts, metrics or few-shot sampling is redone here.
* ``purity`` — judge-free: kullm's batched generator answers Korean prompts; each answer's letter shares (Hangul,
  CJK, Latin, other) and language verdict (:mod:`kullm.language`).
* ``judge`` — a judge-scored chat suite (:mod:`kullm.evaluation.judge_suites`).

Every entry ends as one dict ``{name, kind, metrics, ci, n, main, meta, failed, pending}`` under ``results[name]``
of ``results.json``. Names an entry gives are checked before any model loads: an unknown lm-eval task, a missing
suite file, a judge suite this kullm lacks each end in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.config import CONF_DIR, nearest
from kullm.errors import KullmError
from kullm.evaluation.bench_model import BenchModel

log = logging.getLogger(__name__)

KINDS = ("lm_eval", "purity", "judge")
SUITE_DIR = CONF_DIR / "suite"
RESULTS_FILE = "results.json"
CHAT_TEMPLATE = (True, False, "auto")
# The settings kullm-bench users type most (kullm.config.validate collects this table; batch_size and seed are
# kullm-train's table's, limit kullm-eval's).
SCHEMA: dict[str, Any] = {
    "bootstrap_iters": int,
    "confidence": float,
}
MINIMUM: dict[str, float] = {"bootstrap_iters": 0}
RANGE: dict[str, str] = {"confidence": "(0, 1)"}


class BenchError(KullmError, ValueError):
    """A suite, task or results folder kullm-bench cannot use."""


# --- what to run ------------------------------------------------------------------------------------------------


def suite_entries(cfg: DictConfig) -> list[dict[str, Any]]:
    """The entries to run: ``tasks=`` (lm-eval names) instead of the suite's when given; with ``limit``,
    ``num_fewshot`` and ``apply_chat_template`` set for all when the command line sets them."""
    if cfg.tasks:
        names = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
        entries = [{"kind": "lm_eval", "task": str(t)} for t in names]
    else:
        entries = expand(OmegaConf.to_container(cfg.suite.tasks, resolve=True), [str(cfg.suite.name)])
    overrides = {k: cfg[k] for k in ("limit", "num_fewshot", "apply_chat_template") if cfg[k] is not None}
    out = []
    for entry in entries:
        entry = {**entry, **overrides} if entry.get("kind") == "lm_eval" else {**entry, **_only(overrides, "limit")}
        entry.setdefault("name", entry.get("task"))
        check_entry(entry)
        out.append(entry)
    names = [e["name"] for e in out]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise BenchError(f"suite {cfg.suite.name}: {', '.join(twice)} listed twice")
    return out


def _only(d: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k in keys}


def expand(entries: Sequence[Mapping[str, Any]], path: list[str]) -> list[dict[str, Any]]:
    """Suite entries with each ``{suite: other, ...}`` replaced by the entries of ``conf/suite/<other>.yaml`` (the
    entry's other keys over each of them)."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        entry = dict(entry)
        other = entry.pop("suite", None)
        if other is None:
            out.append(entry)
            continue
        if other in path:
            raise BenchError(f"suite {path[0]}: includes itself through {' → '.join([*path, other])}")
        out += [{**e, **entry} for e in expand(load_suite(str(other))["tasks"], [*path, str(other)])]
    return out


def load_suite(name: str) -> dict[str, Any]:
    """``conf/suite/<name>.yaml`` as plain data."""
    path = SUITE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))
        raise BenchError(f"suite {name!r}: no {path}{nearest(name, known)} (suites: {', '.join(known)})")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise BenchError(f"{path}: a suite needs a list `tasks:`")
    return data


def check_entry(entry: Mapping[str, Any]) -> None:
    """One entry's kind and the keys its kind needs."""
    kind = entry.get("kind")
    if kind not in KINDS:
        raise BenchError(f"suite entry {dict(entry)}: kind must be one of {', '.join(KINDS)}")
    if kind == "lm_eval" and not entry.get("task"):
        raise BenchError(f"suite entry {dict(entry)}: an lm_eval entry names its `task`")
    if not entry.get("name"):
        raise BenchError(f"suite entry {dict(entry)}: give it a `name`")
    if kind == "lm_eval" and entry.get("apply_chat_template") not in (*CHAT_TEMPLATE, None):
        raise BenchError(f"{entry['name']}: apply_chat_template must be true, false or auto")


def check_names(entries: Sequence[Mapping[str, Any]], cfg: DictConfig) -> None:
    """Everything knowable before the model loads: lm-eval task names, the judge module."""
    tasks = [str(e["task"]) for e in entries if e["kind"] == "lm_eval"]
    if tasks:
        unknown = unknown_tasks(tasks, cfg.include_path)
        if unknown:
            known = default_task_names() | (included_task_names(str(cfg.include_path)) if cfg.include_path else set())
            hint = nearest(unknown[0], sorted(known))
            where = f" (nor in include_path={cfg.include_path})" if cfg.include_path else ""
            raise BenchError(f"lm-eval knows no task {', '.join(unknown)}{where}{hint}")
    judges = [e for e in entries if e["kind"] == "judge"]
    if judges:
        if importlib.util.find_spec("kullm.evaluation.judge_suites") is None:
            raise BenchError(f"{judges[0]['name']}: judge suites are not part of this kullm version")
        from kullm.evaluation import judge_suites

        for e in judges:  # a suite whose files are not downloaded: one line naming the command that fetches them
            judge_suites.check_judge_suite(OmegaConf.create(e))


def unknown_tasks(tasks: Iterable[str], include_path: str | None) -> list[str]:
    """The names among ``tasks`` that lm-eval cannot run, with ``include_path``'s task YAMLs."""
    missing = [t for t in dict.fromkeys(tasks) if t not in default_task_names()]
    if missing and include_path:
        missing = [t for t in missing if t not in included_task_names(str(include_path))]
    return missing


@cache
def included_task_names(include_path: str) -> frozenset[str]:
    """The task names a folder of the user's own task YAMLs declares (lm-eval's ``TaskManager`` reads them)."""
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise BenchError(f"include_path={include_path}: no such folder")
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=str(folder), include_defaults=False).all_tasks)


@cache
def default_task_names() -> frozenset[str]:
    """Every task, group and tag name lm-eval ships, as its ``TaskManager`` lists them. Indexing its ~14,000 YAMLs
    takes seconds, so the list is kept in kullm's cache, one file per lm-eval version."""
    from importlib.metadata import version

    from kullm.atomic import rewrite
    from kullm.cache import cache_root

    path = cache_root() / "lm_eval" / f"task-names-{version('lm_eval')}.json"
    try:
        return frozenset(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager().all_tasks)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rewrite(path) as tmp:
        tmp.write_text(json.dumps(names), encoding="utf-8")
    return frozenset(names)


@cache
def task_manager(include_path: str | None):
    """lm-eval's ``TaskManager`` (with ``include_path``'s task YAMLs), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)


# --- running ------------------------------------------------------------------------------------------------------


def run_entries(
    entries: Sequence[Mapping[str, Any]], bm: BenchModel, cfg: DictConfig, out_dir: Path
) -> dict[str, dict[str, Any]]:
    """Run every entry on ``bm``; ``{name: result}`` in suite order."""
    results: dict[str, dict[str, Any]] = {}
    lm = None
    for entry in entries:
        log.info("kullm-bench: %s (%s)", entry["name"], entry["kind"])
        if entry["kind"] == "lm_eval":
            lm = lm or hflm(bm, cfg)
            results[entry["name"]] = run_lm_eval(entry, bm, lm, cfg)
        elif entry["kind"] == "purity":
            results[entry["name"]] = run_purity(entry, bm, cfg, out_dir / entry["name"])
        else:
            results[entry["name"]] = run_judge(entry, bm, cfg, out_dir / entry["name"])
    return results


def hflm(bm: BenchModel, cfg: DictConfig):
    """lm-eval's ``HFLM`` around kullm's loaded model (an adapter stays a ``PeftModel``: applied, not merged)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=bm.model, tokenizer=bm.tokenizer, batch_size=int(cfg.batch_size))


def seeds(seed: int | None) -> dict[str, int]:
    """lm-eval's four seeds: its own defaults for ``seed=null``, else ``seed`` for all."""
    if seed is None:
        return {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
    return dict.fromkeys(("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"), int(seed))


def chat_template_on(entry: Mapping[str, Any], tokenizer) -> bool:
    """Whether an lm-eval entry renders prompts through the chat template (``auto``: if the tokenizer has one)."""
    value = entry.get("apply_chat_template", False)
    if value == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(value)


def run_lm_eval(entry: Mapping[str, Any], bm: BenchModel, lm, cfg: DictConfig) -> dict[str, Any]:
    """One lm-eval task (or group) through ``simple_evaluate``."""
    from lm_eval import simple_evaluate

    task = str(entry["task"])
    chat = chat_template_on(entry, bm.tokenizer)
    limit = entry.get("limit")
    settings = {
        "num_fewshot": entry.get("num_fewshot"),
        "limit": limit,
        "apply_chat_template": chat,
        "batch_size": int(cfg.batch_size),
        "bootstrap_iters": int(cfg.bootstrap_iters),
        **seeds(cfg.seed),
    }
    out = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=task_manager(cfg.include_path),
        log_samples=False,
        **_only(settings, "num_fewshot", "limit", "apply_chat_template", "bootstrap_iters"),
        **seeds(cfg.seed),
    )
    if out is None:  # not rank 0 of a distributed run
        raise BenchError(f"{task}: lm-eval returned no results")
    return lm_eval_result(str(entry["name"]), task, out, settings, float(cfg.confidence))


def lm_eval_result(
    name: str, task: str, out: Mapping[str, Any], settings: Mapping[str, Any], confidence: float
) -> dict[str, Any]:
    """kullm's result dict for ``task`` from ``simple_evaluate``'s output (a group's subtasks kept beneath it)."""
    z = normal_quantile(confidence)
    by_task = {**out.get("results", {}), **out.get("groups", {})}
    if task not in by_task:
        raise BenchError(f"{task}: lm-eval returned no results for it (got {sorted(by_task)})")

    def one(t: str) -> dict[str, Any]:
        metrics, stderr, ci = parse_metrics(by_task[t], z)
        n = out.get("n-samples", {}).get(t, {}).get("effective")
        config = out.get("configs", {}).get(t)
        return {
            "metrics": metrics,
            "stderr": stderr,
            "ci": ci,
            "n": n,
            "version": out.get("versions", {}).get(t),
            "n_shot": out.get("n-shot", {}).get(t),
            "config_hash": _hash(json.dumps(config, sort_keys=True, default=str)) if config else None,
        }

    head = one(task)
    subtasks = [t for t in _subtasks(out, task) if t in by_task and t != task]
    if head["n"] is None and subtasks:
        head["n"] = sum(one(t)["n"] or 0 for t in subtasks)
    return {
        "name": name,
        "kind": "lm_eval",
        "task": task,
        "metrics": head["metrics"],
        "stderr": head["stderr"],
        "ci": head["ci"],
        "n": head["n"],
        "main": next(iter(head["metrics"]), None),
        "failed": 0,
        "pending": 0,
        "meta": {
            "version": head["version"],
            "n_shot": head["n_shot"],
            "config_hash": head["config_hash"],
            "higher_is_better": out.get("higher_is_better", {}).get(task, {}),
            "settings": dict(settings),
        },
        "subtasks": {t: one(t) for t in subtasks},
    }


def _subtasks(out: Mapping[str, Any], task: str) -> list[str]:
    """Every task under a group, depth first (lm-eval's ``group_subtasks``)."""
    found: list[str] = []
    for t in out.get("group_subtasks", {}).get(task, []):
        found += [t, *_subtasks(out, t)]
    return found


def parse_metrics(row: Mapping[str, Any], z: float) -> tuple[dict[str, float], dict[str, float], dict[str, list]]:
    """``{metric: value}``, ``{metric: stderr}`` and ``{metric: [lo, hi]}`` of one lm-eval results row.

    lm-eval's keys are ``"<metric>,<filter>"``; a metric under the ``none`` filter keeps its bare name.
    """
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metric, flt = key.split(",", 1)
        name = metric if flt == "none" else f"{metric},{flt}"
        metrics[name] = float(value)
        se = row.get(f"{metric}_stderr,{flt}")
        if isinstance(se, int | float) and not isinstance(se, bool) and math.isfinite(se):
            stderr[name] = float(se)
    ci = {m: [metrics[m] - z * se, metrics[m] + z * se] for m, se in stderr.items()}
    return metrics, stderr, ci


def normal_quantile(confidence: float) -> float:
    """z such that mean ± z·stderr is a two-sided ``confidence`` interval."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


# --- purity -------------------------------------------------------------------------------------------------------

PURITY_METRICS = ("korean", "hangul", "cjk", "latin", "other")


def purity_prompts(entry: Mapping[str, Any]) -> list[Any]:
    """The entry's prompts: ``prompts_file`` rows (instruction/input, or conversations), else ``prompts``."""
    if entry.get("prompts_file"):
        from kullm.data.records import ReadOptions, read_records

        records, _ = read_records(str(entry["prompts_file"]), ReadOptions.prompts())
        prompts: list[Any] = list(records)
    else:
        prompts = [str(p) for p in entry.get("prompts") or []]
    if entry.get("limit") is not None:
        prompts = prompts[: int(entry["limit"])]
    if not prompts:
        raise BenchError(f"{entry['name']}: no prompts (give prompts: [...] or prompts_file)")
    return prompts


def run_purity(entry: Mapping[str, Any], bm: BenchModel, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Answers to Korean prompts through kullm's batched generator, and how Korean they are."""
    from kullm.atomic import rewrite
    from kullm.inference.generator import item_text, seed_everything
    from kullm.language import purity

    prompts = purity_prompts(entry)
    settings = OmegaConf.to_container(cfg.generation, resolve=True)
    seed_everything(settings.get("seed"))
    answers = bm.generator(settings).generate(prompts)
    rows = [
        {"instruction": item_text(p)[0], "output": a, **purity(a).as_dict()}
        for p, a in zip(prompts, answers, strict=True)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    with rewrite(out_dir / "answers.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    values = {m: [float(r[m]) for r in rows] for m in PURITY_METRICS}
    metrics = {m: sum(v) / len(v) for m, v in values.items()}
    ci = {m: bootstrap_ci(v, float(cfg.confidence), seed=0) for m, v in values.items()}
    return {
        "name": str(entry["name"]),
        "kind": "purity",
        "metrics": metrics,
        "ci": ci,
        "n": len(rows),
        "main": "korean",
        "failed": 0,
        "pending": 0,
        "meta": {
            "prompts_hash": _hash(json.dumps([item_text(p) for p in prompts], ensure_ascii=False)),
            "generation": settings,
            "detector": detector_version(),
            "answers": str(out_dir / "answers.jsonl"),
        },
    }


def bootstrap_ci(values: Sequence[float], confidence: float, seed: int = 0, samples: int = 2000) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return [math.nan, math.nan]
    means = np.random.default_rng(seed).choice(x, size=(samples, len(x)), replace=True).mean(axis=1)
    alpha = (1 - confidence) / 2
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]


def detector_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lingua-language-detector {version('lingua-language-detector')}"
    except PackageNotFoundError:
        return "lingua-language-detector"


# --- judge suites -------------------------------------------------------------------------------------------------


def run_judge(entry: Mapping[str, Any], bm: BenchModel, cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """A judge-scored suite (:func:`kullm.evaluation.judge_suites.run_judge_suite`)."""
    from kullm.evaluation.judge_suites import run_judge_suite

    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(run_judge_suite(OmegaConf.create(dict(entry)), bm, cfg, out_dir))
    result.setdefault("name", str(entry["name"]))
    result["kind"] = "judge"
    result.setdefault("main", next(iter(result.get("metrics") or {}), None))
    return result
