"""The G-Eval pipeline behind ``kullm-eval``: generate answers when given an adapter, judge one or several runs of
generated answers (resumably) and write their report.

Each run's judgments go to ``<output_dir>/<run>.judgments.jsonl``, one line appended (and flushed) as each
judgment arrives, so a kill loses at most the requests in flight. Re-running the same command skips ids already in
the file; an id is never written twice (and duplicates are dropped on read, keeping the first). A reply that cannot
be parsed is re-asked up to ``max_parse_retries`` times, then written as ``status: "failed"`` with the raw reply;
failures are reported, never scored as 0. A request that fails for good (retries exhausted) is *not* written, so
the next run asks again; the report counts such ids as "not judged".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from kullm.atomic import rewrite
from kullm.config import compose
from kullm.data.conversations import split_reference
from kullm.data.records import ReadOptions, Record, read_records, write_rejects
from kullm.data.sources import DataError, check_source
from kullm.evaluation.geval import JudgePrompt, parse_scores, weighted_from_logprobs
from kullm.evaluation.judges import Judge, JudgeError, build_judge
from kullm.evaluation.report import RunStats, log_wandb, set_relative, summarize, write_report
from kullm.redaction import redact
from kullm.resumable import AppendLog, read_done

log = logging.getLogger(__name__)

# The kullm-eval knobs users type most (kullm.config.validate collects this table; judge.* sit with the judges).
SCHEMA: dict[str, Any] = {
    "limit": int,
    "max_parse_retries": int,
    "bootstrap.samples": int,
    "bootstrap.confidence": float,
}
MINIMUM: dict[str, float] = {"limit": 1, "max_parse_retries": 0, "bootstrap.samples": 1}
RANGE: dict[str, str] = {"bootstrap.confidence": "(0, 1)"}

GENERIC_STEMS = {"responses", "generations", "outputs", "output", "adapter"}


@dataclass
class Run:
    """One set of responses to judge, and where its judgments go."""

    name: str
    path: Path
    judgments: Path
    records: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)  # id -> why it is not judged yet


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Judge every run's responses (resuming), write the report, and return a summary of the numbers."""
    prompt = JudgePrompt.from_config(cfg.judge_prompt)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(name, Path(path), out_dir, cfg.limit) for name, path in resolve_runs(cfg, out_dir).items()]
    references = load_references(cfg.references)
    for run in runs:
        check_references(run, references, float(cfg.reference_threshold))
    asyncio.run(judge_runs(cfg, prompt, runs))

    bs = cfg.bootstrap
    identity = judge_identity(cfg.judge)
    stats = []
    for run in runs:
        current, _, _ = current_judgments(run.records, read_judgments(run.judgments), identity, prompt.hash())
        js = list(current.values())
        st = summarize(
            run.name,
            js,
            prompt.criteria,
            len(run.records),
            int(bs.samples),
            float(bs.confidence),
            int(bs.seed),
        )
        st.notes = run.notes + _outcome_notes(st, js, run)
        stats.append(st)
    reference = cfg.reference or (runs[0].name if len(runs) > 1 else None)
    set_relative(stats, reference)
    judge_name, judge_model = judge_identity(cfg.judge)
    header = f"judge: {judge_name} / {judge_model} · prompt: {prompt.name} ({prompt.hash()})"
    paths = write_report(stats, prompt.criteria, out_dir, reference, header=header)
    summary = _summary(stats, runs, paths, prompt, judge_identity(cfg.judge))
    with rewrite(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    if cfg.wandb.enabled:
        log_wandb(stats, prompt.criteria, paths["png"], cfg.wandb, redact(cfg))
    log.info("report: %s\n%s", paths["md"], paths["md"].read_text(encoding="utf-8"))
    return summary


# --- inputs ---------------------------------------------------------------------------------------------------


def resolve_runs(cfg: DictConfig, out_dir: Path) -> dict[str, str]:
    """Run name -> responses file, from ``responses=`` (path, list or mapping) or ``adapter=`` (generate first)."""
    responses, adapter = cfg.responses, cfg.adapter
    if (responses is None) == (adapter is None):
        raise ValueError("give exactly one of responses=<jsonl | [jsonl, ...] | {name: jsonl}> or adapter=<folder>")
    if adapter is not None:
        return {run_names([str(adapter)])[0]: str(generate_responses(cfg, Path(adapter), out_dir))}
    if isinstance(responses, (DictConfig, Mapping)):
        return {check_run_name(str(k)): str(v) for k, v in responses.items()}
    paths = [str(p) for p in responses] if isinstance(responses, (ListConfig, list, tuple)) else [str(responses)]
    return dict(zip(run_names(paths), paths, strict=True))


def run_names(paths: Sequence[str]) -> list[str]:
    """Short unique names: the file stem, or ``folder-stem`` when the stem is generic or repeated."""
    stems = [Path(p).stem for p in paths]
    names = [
        f"{Path(p).parent.name}-{s}" if s in GENERIC_STEMS or stems.count(s) > 1 else s
        for p, s in zip(paths, stems, strict=True)
    ]
    names = [re.sub(r"[^\w.-]", "_", n).lstrip(".") or "run" for n in names]  # file names inside output_dir
    return [n if names.count(n) == 1 else f"{n}-{k}" for k, n in enumerate(names)]


def check_run_name(name: str) -> str:
    """A run name given by the user names files inside ``output_dir``: no path, no leading dot."""
    if not re.fullmatch(r"[\w][\w.-]*", name) or ".." in name:
        raise ValueError(
            f"run name {name!r}: use letters, digits, '_', '-' and '.' only (it names files inside output_dir)"
        )
    return name


def generate_responses(cfg: DictConfig, adapter: Path, out_dir: Path) -> Path:
    """Generate answers to ``eval_set`` with the adapter (kullm-generate); reuse a finished file on re-runs."""
    out = out_dir / f"{run_names([str(adapter)])[0]}.responses.jsonl"
    if out.exists():
        log.info("reusing %s (delete it to generate again)", out)
        return out
    from kullm.inference.files import generate_file  # heavy (torch, transformers): only in adapter mode

    partial = out.with_suffix(".partial.jsonl")
    overrides = [
        f"adapter={adapter}",
        f"input_file={cfg.eval_set}",
        f"output_file={partial}",
        f"++output_dir={out_dir}",
        f"trust_remote_code={bool(cfg.trust_remote_code)}",
    ]
    extra = list(cfg.generate_overrides or [])
    gen_cfg = _compose_generate([*overrides, *extra])
    if cfg.generation is not None:  # kullm-eval's own generation=greedy generation.max_new_tokens=32 …
        changed = _changed(gen_cfg.generation, _compose_generate(overrides).generation) if extra else {}
        gen_cfg.generation = OmegaConf.merge(cfg.generation, changed)  # … with generate_overrides applied last
    written = Path(generate_file(gen_cfg))
    written.replace(out)  # only a finished file gets the final name
    return out


def _changed(node: DictConfig, plain: DictConfig) -> dict[str, Any]:
    """The settings of ``node`` that differ from ``plain``'s (what ``generate_overrides`` changed)."""
    return {k: v for k, v in node.items() if k not in plain or plain[k] != v}


def _compose_generate(overrides: list[str]) -> DictConfig:
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside kullm-eval's own @hydra.main: same config tree
        return hydra.compose(config_name="generate", overrides=overrides)
    return compose("generate", overrides)


def load_run(name: str, path: Path, out_dir: Path, limit: int | None = None) -> Run:
    """Read a responses JSONL (``id``, ``instruction``, ``input``, ``response`` — or KULLM's own format, where the
    answer is ``output``, flat or in ``instances``; or a conversation, ``messages``/``conversations`` with the
    ``response`` to its last user turn, or ending with the assistant turn to judge); bad rows are reported with
    file:line in ``<run>.rejects.jsonl`` and the rest still run. An empty response is judged, not dropped."""
    check_source(path, "files")
    field = response_field(path)
    records, report = read_records(path, ReadOptions.responses(field))
    run = Run(name, path, out_dir / f"{name}.judgments.jsonl", records)
    rejects = report.rejects
    for rej in rejects:
        run.notes.append(f"{rej.source}: {rej.field}: {rej.reason} ({rej.message}); row not judged")
    if rejects:
        write_rejects(rejects, out_dir / f"{name}.rejects.jsonl")
    if limit is not None:
        run.records = run.records[: int(limit)]
    if not run.records:
        raise DataError(f"{path}: no usable responses")
    return run


def response_field(path: Path) -> str:
    """``response`` (kullm-generate's files) unless the first row has only KULLM's ``output``."""
    try:
        with Path(path).open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if isinstance(row, dict) and "response" not in row:
                        inner = (row.get("instances") or [{}])[0] if "output" not in row else row
                        if isinstance(inner, dict) and "output" in inner:
                            return "output"
                    break
    except (OSError, ValueError, LookupError, TypeError, RecursionError):  # e.g. "instances": 5
        pass  # read_records reports the file's problems with file:line
    return "response"


def load_references(path: str | None) -> dict[str, str]:
    """The eval set's reference outputs by id and by instruction+input ({} when the file is missing)."""
    if not path or not Path(path).exists():
        log.info("no reference file at %s: skipping the reference-outputs check", path)
        return {}
    records, _ = read_records(path, ReadOptions(source="files"))
    refs = {f"id:{r.id}": r.output for r in records}
    refs |= {f"text:{r.instruction}\x00{r.input}": r.output for r in records}
    return refs


def check_references(run: Run, refs: Mapping[str, str], threshold: float) -> None:
    """Warn loudly (log and report) if most responses are the dataset's reference outputs, not generations."""
    if not refs:
        return
    compared = same = 0
    for r in run.records:
        ref = refs.get(f"id:{r.id}", refs.get(f"text:{r.instruction}\x00{r.input}"))
        if ref is None:
            continue
        compared += 1
        same += r.output.strip() == ref.strip()
    if compared and same / compared >= threshold:
        msg = (
            f"{same} of {compared} responses in {run.path} equal the eval set's reference outputs: this scores the "
            "dataset, not a model. Judge generated answers (kullm-generate, or kullm-eval adapter=...)."
        )
        log.warning("%s", msg)
        run.notes.append(msg)


# --- judging --------------------------------------------------------------------------------------------------


def judge_identity(judge_cfg: Mapping[str, Any]) -> tuple[str, str]:
    """``(judge name, model)`` as the judgments record them, known from the config without building the judge."""
    name = str(judge_cfg["name"])
    model = judge_cfg["model"]
    if isinstance(model, Mapping):  # the hf judge: a model node
        model = model["name_or_path"]
    return name, str(model)


def judged_key(rec: Record, identity: tuple[str, str], prompt_hash: str) -> str:
    """A hash of what a judgment judged: the instruction, input and response (or the conversation), the judge and
    the prompt. A judgment whose key no longer matches its record judged something else."""
    body = json.dumps([rec.instruction, rec.input, rec.output, rec.turns, *identity, prompt_hash], ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def read_judgments(path: Path) -> dict[tuple[str, str | None], dict]:
    """A judgments file by (id, key of what was judged); the key is ``None`` in files written before keys."""
    return read_done(path, "judgment", key=lambda j: (str(j["id"]), j.get("key")))


def current_judgments(
    records: Sequence[Record], judgments: Mapping[tuple, dict], identity: tuple[str, str], prompt_hash: str
) -> tuple[dict[str, dict], list[str], int]:
    """Each record's judgment of what it holds now (by id); the ids judged before their response (instruction,
    input, conversation) changed, which need judging again; and how many judgments without a key (older files) were
    taken as they are, unchecked."""
    ids = {rid for rid, _ in judgments}
    current, changed, unchecked = {}, [], 0
    for r in records:
        j = judgments.get((r.id, judged_key(r, identity, prompt_hash)))
        if j is None and (j := judgments.get((r.id, None))) is not None:
            unchecked += 1
        if j is not None:
            current[r.id] = j
        elif r.id in ids:
            changed.append(r.id)
    return current, changed, unchecked


async def judge_runs(cfg: DictConfig, prompt: JudgePrompt, runs: Sequence[Run]) -> None:
    """Judge every run with one judge (built inside the event loop that uses it): the ids never judged, and those
    whose response changed since (said in the log and the report)."""
    identity = judge_identity(cfg.judge)
    todo = []
    for run in runs:  # before any request, and even when every id is judged already
        judgments = read_judgments(run.judgments)
        _check_compatible(run.judgments, judgments.values(), identity, prompt)
        done, changed, unchecked = current_judgments(run.records, judgments, identity, prompt.hash())
        if changed:
            ids = ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else "")
            run.notes.append(f"{len(changed)} responses changed since they were judged: judged again ({ids})")
            log.warning("%s: %s", run.name, run.notes[-1])
        if unchecked:
            run.notes.append(
                f"{unchecked} judgments in {run.judgments.name} come from an older kullm that did not record what "
                "was judged: kept as they are (delete the file to judge edited responses again)"
            )
            log.warning("%s: %s", run.name, run.notes[-1])
        todo.append((run, done))
    if all(all(r.id in done for r in run.records) for run, done in todo):
        return  # everything judged already: no judge (no model load, no HTTP client) needed
    judge = build_judge(cfg.judge, prompt)
    try:
        for run, done in todo:
            await judge_run(judge, prompt, run, done, int(cfg.max_parse_retries), bool(cfg.progress))
    finally:
        await judge.aclose()


async def judge_run(
    judge: Judge, prompt: JudgePrompt, run: Run, done: Mapping[str, dict], max_parse_retries: int, progress: bool
) -> None:
    """Judge the ids of ``run`` not in ``done``, appending each judgment to the run's file as it arrives."""
    _check_compatible(run.judgments, done.values(), (judge.name, judge.model), prompt)
    todo = [r for r in run.records if r.id not in done]
    if not todo:
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=len(run.records), initial=len(run.records) - len(todo), desc=run.name, disable=not progress)
    tasks = [asyncio.ensure_future(judge_one(judge, prompt, r, max_parse_retries)) for r in todo]
    try:
        with AppendLog(run.judgments) as out:
            for fut in asyncio.as_completed(tasks):
                rid, result = await fut
                if isinstance(result, JudgeError):
                    if result.fatal:
                        raise result
                    run.pending[rid] = str(result)
                    log.warning("%s: %s: not judged: %s", run.name, rid, result)
                else:
                    out.write(result)
                bar.update(1)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()


async def judge_one(
    judge: Judge, prompt: JudgePrompt, rec: Record, max_parse_retries: int
) -> tuple[str, dict | JudgeError]:
    """One id's judgment, re-asking up to ``max_parse_retries`` times when the reply cannot be parsed."""
    if rec.turns:  # a conversation: the answer to its last user turn, after the turns before it
        messages = prompt.conversation_messages(split_reference(rec.turns)[0], rec.output)
    else:
        messages = prompt.messages(rec.instruction, rec.input, rec.output)
    attempts, errors = 0, []
    for _ in range(max_parse_retries + 1):
        try:
            reply = await judge.reply(messages)
        except JudgeError as e:
            e.attempts += attempts
            return rec.id, e
        attempts += reply.attempts
        parsed = parse_scores(reply.text, prompt.criteria)
        if parsed.ok:
            break
        errors.append(parsed.error)
    weighted = reply.weighted
    if weighted is None and reply.tokens is not None and parsed.ok:
        weighted = weighted_from_logprobs(reply.text, reply.tokens, parsed, prompt.criteria)
    return rec.id, {
        "id": rec.id,
        "status": "ok" if parsed.ok else "failed",
        "scores": parsed.scores if parsed.ok else None,
        "weighted": weighted if parsed.ok else None,
        "error": None if parsed.ok else errors[-1],
        "parse_errors": errors,
        "raw": reply.text,
        "judge": judge.name,
        "model": judge.model,
        "prompt_hash": prompt.hash(),
        "key": judged_key(rec, (judge.name, judge.model), prompt.hash()),
        "attempts": attempts,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_compatible(path: Path, judgments: Iterable[dict], identity: tuple[str, str], prompt: JudgePrompt) -> None:
    """Refuse to mix (or report) judgments from another prompt or judge in one file."""
    want = (*identity, prompt.hash())
    for j in judgments:
        have = (j.get("judge"), j.get("model"), j.get("prompt_hash"))
        if have != want:
            raise ValueError(
                f"{path}: id {j['id']!r} was judged by {have[0]}/{have[1]} with prompt {have[2]}, this run uses "
                f"{want[0]}/{want[1]} with prompt {want[2]}; pass another output_dir= to keep both"
            )


# --- summary --------------------------------------------------------------------------------------------------


def _outcome_notes(st: RunStats, judgments: Sequence[dict], run: Run) -> list[str]:
    notes = []
    if st.n_failed:
        ids = [j["id"] for j in judgments if j.get("status") != "ok"]
        notes.append(
            f"{st.n_failed} judgments unparseable after retries (not scored): {', '.join(ids[:10])}"
            + (" ..." if len(ids) > 10 else "")
        )
    if st.n_pending:
        notes.append(f"{st.n_pending} ids not judged (requests failed); re-run the same command to finish them")
    return notes


def _summary(
    stats: Sequence[RunStats],
    runs: Sequence[Run],
    paths: Mapping[str, Path],
    prompt: JudgePrompt,
    identity: tuple[str, str],
) -> dict:
    return {
        "judge": identity[0],
        "judge_model": identity[1],
        "prompt": prompt.name,
        "prompt_hash": prompt.hash(),
        "report": {k: str(v) for k, v in paths.items()},
        "runs": {
            st.name: {
                "responses": str(run.path),
                "judgments": str(run.judgments),
                "total": st.n_total,
                "judged": st.n_ok,
                "failed": st.n_failed,
                "not_judged": st.n_pending,
                "pending_errors": run.pending,
                "means": st.means,
                "weighted": st.weighted,
                "overall": st.overall,
                "relative": st.relative,
                "notes": st.notes,
            }
            for st, run in zip(stats, runs, strict=True)
        },
    }
