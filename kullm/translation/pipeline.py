"""The translation run behind ``kullm-translate``: every translatable field of a data set, translated once.

A run reads any source kullm reads (:mod:`kullm.data.sources`), walks the translatable fields of each row's layout
(flat ``instruction/input/output``, self-instruct ``instances[k].input/output``, OpenAI ``messages[k].content``,
ShareGPT ``conversations[k].value``), masks each field's protected spans (:mod:`kullm.translation.spans`) and sends
what still has words to the backend through its cache. Each field's translation is appended to
``<output>/translations.jsonl`` as its batch finishes, keyed by the sha256 of the source row and the field's path:
a killed run resumes where it stopped, an id shift (a row inserted above) changes nothing, and a rerun of a finished
run sends no request. At the end the log is assembled into ``<output>/data/`` — the same layout and field names,
one JSONL file per source file, every row carrying its ``id`` and a ``translation`` record (source id and row sha256,
backend and model, the QC verdicts of each field) — with the rows that failed a check in ``rejects.jsonl`` (reasons
named per field) and the counts in ``stats.json``.

A backend that stops for good (quota, bad key, unreachable) ends the loop; what was done is kept and written, and
the command fails naming why. A field the backend could not translate (retries exhausted, a broken reply) is not
logged: its row is pending and the next run asks again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.atomic import rewrite, write_folder
from kullm.cache import cache_root
from kullm.data.conversations import detect_format, parse_turns, unencodable
from kullm.data.records import Fields, open_private
from kullm.data.sources import DataError, Reject, SourceReport, check_source, read_rows
from kullm.errors import KullmError
from kullm.resumable import AppendLog, read_done
from kullm.translation.quality import Verdict, check, rejections
from kullm.translation.spans import TAG, Masked, SpanError, mask, restore, unmasked_text

log = logging.getLogger(__name__)

LOG_NAME = "translations.jsonl"
DATA_DIR = "data"
# The kullm-translate knobs users type most (kullm.config.validate collects this table; qc.* sit with the gates).
SCHEMA: dict[str, Any] = {"window": int, "dry_run": bool}
MINIMUM: dict[str, float] = {"window": 1}


class TranslateRunError(KullmError, RuntimeError):
    """A run that could not finish (the backend stopped it) or translated nothing; the message says why."""


Path_ = tuple[str | int, ...]  # a field's place in its row: ("messages", 2, "content")


@dataclass
class Item:
    """One source row: where it came from, its parsed object, and the fields to translate."""

    source: str  # file:line
    file: str  # the output file it goes to, relative to <output>/data
    obj: Any
    raw: str
    id: str
    sha: str  # sha256 of the source row
    fields: list[tuple[Path_, str]] = field(default_factory=list)
    bad: Reject | None = None


@dataclass
class Plan:
    """What a run has to do: the rows, each field's masked text, and the keys already in the log."""

    items: list[Item]
    masked: dict[str, Masked]  # field key -> its masked source
    kept: set[str]  # field keys with nothing to translate (no words): copied as they are
    done: dict[str, dict]  # field key -> its log line
    report: SourceReport
    estimate: dict[str, Any] = field(default_factory=dict)  # a dry run's figures
    adequacy: dict[str, float] = field(default_factory=dict)  # field key -> back-translation similarity (a sample)

    def todo(self) -> list[str]:
        """The field keys still to translate, in row order, each once."""
        keys = (key(it, p) for it in self.items if it.bad is None for p, _ in it.fields)
        return list(dict.fromkeys(k for k in keys if k not in self.done and k not in self.kept))


def path_str(path: Path_) -> str:
    """``messages[2].content`` for ``("messages", 2, "content")``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def key(item: Item, path: Path_) -> str:
    return f"{item.sha}:{path_str(path)}"


def identity_hash(identity: str) -> str:
    """A short hash of a backend's identity (name, model, every option that changes its output)."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def row_sha(obj: Any) -> str:
    """sha256 of a row's content (keys sorted, so a reordered row is the same row)."""
    text = json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# --- reading --------------------------------------------------------------------------------------------------


def read_items(data: Mapping[str, Any]) -> tuple[list[Item], SourceReport]:
    """Every row of ``data.path`` with its translatable fields; a row that cannot be read or has no known layout
    carries its :class:`Reject` (``bad``) and goes to the rejects."""
    fields = Fields(**{k: v for k, v in dict(data["fields"] or {}).items() if v})
    roles = dict(data["roles"] or {})
    report = SourceReport()
    formats: dict[str, str] = {}
    items = []
    names: dict[str, str] = {}  # output file -> source file (two sources must not share one)
    for row in read_rows(data["path"], data["split"], data["revision"], data["source"], report):
        file_part = row.default_id.rsplit(":", 1)[0] if row.default_id else "data"
        out = out_name(file_part, names)
        item = Item(row.source, out, row.obj, row.raw, row.default_id, row_sha(row.obj if row.bad is None else row.raw))
        try:
            if row.bad is not None:
                raise row.bad
            fmt = data["format"] or "auto"
            if fmt == "auto":
                fmt = formats.setdefault(
                    row.source.rsplit(":", 1)[0], detect_format(row.obj, fields.messages, fields.conversations)
                )
            item.obj = dict(row.obj) if isinstance(row.obj, Mapping) else row.obj
            if row.empty:  # an empty CSV cell is an empty text: written back as ""
                item.obj |= dict.fromkeys(row.empty, "")
            item.id = _row_id(item.obj, fields, row.default_id)
            item.fields = translatable(item.obj, fmt, fields, roles)
        except Reject as bad:
            item.bad = bad
        items.append(item)
    return items, report


def out_name(source_file: str, names: dict[str, str]) -> str:
    """The output file (relative) for a source file: its path with ``.jsonl`` (``a.csv`` -> ``a.jsonl``), or
    ``a.csv.jsonl`` when another source file already took that name."""
    base = str(Path(source_file).with_suffix(".jsonl")) if Path(source_file).suffix else f"{source_file}.jsonl"
    if names.setdefault(base, source_file) != source_file:
        base = f"{source_file}.jsonl"
        names.setdefault(base, source_file)
    return base


def _row_id(obj: Any, f: Fields, default: str) -> str:
    rid = obj.get(f.id) if isinstance(obj, Mapping) else None
    if rid is not None and not isinstance(rid, (str, int)):
        raise Reject("not_a_string", f.id, f"expected a string or integer id, got {type(rid).__name__}")
    return str(rid) if rid is not None else default


def translatable(obj: Any, fmt: str, f: Fields, roles: Mapping[str, str]) -> list[tuple[Path_, str]]:
    """The (path, text) of every field of ``obj`` to translate in layout ``fmt``; :class:`Reject` when the row does
    not fit it. A conversation given as a JSON string (a CSV cell) is parsed into the row (written back as a list)."""
    if not isinstance(obj, dict):
        raise Reject("not_an_object", "<row>", f"expected a JSON object, got {type(obj).__name__}")
    if fmt in ("messages", "sharegpt"):
        name = f.messages if fmt == "messages" else f.conversations
        parse_turns(obj, fmt, key=name, roles=roles, open_end=True)  # the row is a conversation kullm reads
        if isinstance(obj[name], str):
            obj[name] = json.loads(obj[name])
        content = "content" if fmt == "messages" else "value"
        return [((name, k, content), turn[content]) for k, turn in enumerate(obj[name])]
    if f.instruction not in obj:
        known = ", ".join(sorted(str(k) for k in obj)[:8])
        raise Reject(
            "unknown_layout",
            "<row>",
            f"no {f.instruction!r}, {f.messages!r} or {f.conversations!r} field (it has: {known}); set data.fields",
        )
    out = [((f.instruction,), _string(obj, (f.instruction,)))]
    instances = obj.get(f.instances)
    if instances is not None and obj.get(f.output) is None:
        if not isinstance(instances, list) or not instances:
            raise Reject("bad_instances", f.instances, "expected a non-empty list of {input, output} objects")
        for k, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise Reject("bad_instances", f"{f.instances}[{k}]", f"expected an object, got {type(inst).__name__}")
            for name in (f.input, f.output):
                if inst.get(name) is not None:
                    out.append(((f.instances, k, name), _string(obj, (f.instances, k, name))))
        return out
    for name in (f.input, f.output):
        if obj.get(name) is not None:
            out.append(((name,), _string(obj, (name,))))
    return out


def _string(obj: Any, path: Path_) -> str:
    value = get(obj, path)
    where = path_str(path)
    if not isinstance(value, str):
        raise Reject("not_a_string", where, f"expected a string, got {type(value).__name__}")
    if (why := unencodable(value)) is not None:
        raise Reject("lone_surrogate", where, why)
    return value


def get(obj: Any, path: Path_) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def put(obj: Any, path: Path_, value: Any) -> None:
    for part in path[:-1]:
        obj = obj[part]
    obj[path[-1]] = value


def plan(items: list[Item], log_path: Path, identity: str, report: SourceReport) -> Plan:
    """Mask every field, and read what the log already holds (refusing a log written by another backend)."""
    masked, kept = {}, set()
    for it in items:
        if it.bad is not None:
            continue
        for path, text in it.fields:
            k = key(it, path)
            if k in masked or k in kept:
                continue
            m = mask(text)
            if not any(ch.isalpha() for ch in unmasked_text(m)):
                kept.add(k)  # empty, or only code/numbers/symbols: nothing for a translator
            else:
                masked[k] = m
    done = read_done(log_path, "translation", key=lambda row: row["key"])
    want = identity_hash(identity)
    for k, row in done.items():
        if row.get("identity") != want:
            raise TranslateRunError(
                f"{log_path}: field {k} was translated by {row.get('backend')}/{row.get('model')} with other "
                "options; resume with the same backend settings, or pass another output= to keep both"
            )
    return Plan(items, masked, kept, done, report)


# --- translating ----------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the loop did: requests, cache hits, characters sent, fields failed by reason, why it stopped."""

    requests: int = 0
    cached: int = 0
    sent_texts: int = 0
    characters: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    failed: Counter = field(default_factory=Counter)
    failed_examples: dict[str, str] = field(default_factory=dict)
    failed_keys: dict[str, str] = field(default_factory=dict)  # field key -> why it is not translated
    stopped: str | None = None
    seconds: float = 0.0
    adequacy_requests: int = 0


async def translate_plan(p: Plan, backend: Any, cache: Any, log_path: Path, window: int, bar: bool) -> Progress:
    """Translate the plan's remaining fields window by window (each window's unique texts through the cache and
    the backend), appending each field's result to the log as its window finishes."""
    from tqdm.auto import tqdm

    from kullm.translation.backends import translate_many

    progress = Progress()
    todo = p.todo()
    start = time.perf_counter()
    meter = tqdm(total=len(todo), unit="field", disable=not bar)
    try:
        with AppendLog(log_path) as out:
            for i in range(0, len(todo), window):
                part = todo[i : i + window]
                texts = list(dict.fromkeys(p.masked[k].text for k in part))
                hits = cache.get_many(texts) if cache is not None else {}
                result = await translate_many(backend, texts, cache=cache)
                await isolate(result, backend, cache)
                progress.requests += result.requests
                progress.cached += result.cached
                sent = [t for t in texts if t not in hits and t in result.translations]  # what was billed
                if sent:
                    est = backend.estimate(sent)
                    progress.characters += int(est["characters"])
                    progress.tokens += int(est["tokens"])
                    progress.cost_usd += float(est["cost_usd"])
                progress.sent_texts += len(sent)
                lines = []
                for k in part:
                    m = p.masked[k]
                    if m.text in result.translations:
                        lines.append(log_line(k, m, result.translations[m.text], backend))
                    elif m.text in result.failed:
                        err = result.failed[m.text]
                        reason = "backend_stopped" if result.stopped is not None else "backend_error"
                        progress.failed[reason] += 1
                        progress.failed_examples.setdefault(reason, str(err))
                        progress.failed_keys[k] = str(err)
                out.write_many(lines)  # the round's fields, durable together
                meter.update(len(part))
                if result.stopped is not None:
                    progress.stopped = str(result.stopped)
                    break
    finally:
        meter.close()
        progress.seconds = time.perf_counter() - start
    return progress


async def isolate(result: Any, backend: Any, cache: Any) -> None:
    """Send each text of a failed batch alone, once: one bad text (a reply the server chokes on, a wrong count)
    then fails by itself instead of taking its batch with it. Updates ``result`` in place."""
    from kullm.translation.backends import translate_many

    if result.stopped is not None or len(result.failed) < 2 or int(getattr(backend, "batch_size", 1)) < 2:
        return
    slots = asyncio.Semaphore(max(int(getattr(backend, "concurrency", 1)), 1))

    async def alone(text: str) -> tuple[str, Any]:
        async with slots:
            return text, await translate_many(backend, [text], cache=cache)

    for text, one in await asyncio.gather(*(alone(t) for t in list(result.failed))):
        result.requests += one.requests
        if text in one.translations:
            result.translations[text] = one.translations[text]
            del result.failed[text]
        elif text in one.failed:
            result.failed[text] = one.failed[text]
        if one.stopped is not None and result.stopped is None:
            result.stopped = one.stopped


def log_line(k: str, m: Masked, translated: str, backend: Any) -> dict[str, Any]:
    """One field's log line: the raw (masked) translation, and the restored text or why it cannot be restored."""
    row, _, path = k.partition(":")
    line: dict[str, Any] = {
        "key": k,
        "row": row,
        "field": path,
        "raw": translated,
        "backend": backend.name,
        "model": backend.model,
        "identity": identity_hash(backend.identity),
    }
    try:
        line |= {"status": "ok", "text": restore(translated, m)}
    except SpanError as e:
        line |= {"status": "span_error", "reason": e.reason, "message": e.message}
    return line


# --- writing --------------------------------------------------------------------------------------------------


@dataclass
class Assembled:
    rows: dict[str, list[dict]]  # output file -> rows
    rejects: list[dict]
    rejected: Counter
    flagged: Counter
    pending: int
    written: int
    field_counts: Counter
    pending_rows: list[dict]  # {source, id, error} of each row not finished


def assemble(
    p: Plan,
    qc: Mapping[str, Any],
    meta_field: str,
    id_field: str,
    identity: tuple[str, str],
    failed: Mapping[str, str] | None = None,
) -> Assembled:
    """The translated rows (source order, per output file), the rejects with their reasons, and the counts."""
    done, failed = p.done, failed or {}
    rows: dict[str, list[dict]] = {}
    rejects, rejected, flagged, fields = [], Counter(), Counter(), Counter()
    pending = written = 0
    pending_rows: list[dict] = []
    for it in p.items:
        rows.setdefault(it.file, [])
        if it.bad is not None:
            rejected[it.bad.reason] += 1
            rejects.append(_reject(it, [{"field": it.bad.field, "reason": it.bad.reason, "detail": it.bad.message}]))
            continue
        out = json.loads(json.dumps(it.obj, ensure_ascii=False, default=str))  # a deep, JSON-safe copy
        reasons, verdicts, missing = [], {}, False
        for path, _ in it.fields:
            k = key(it, path)
            where = path_str(path)
            if k in p.kept:
                fields["kept"] += 1
                continue
            line = done.get(k)
            if line is None:
                missing = True
                continue
            if line["status"] != "ok":
                reasons.append({"field": where, "reason": line["reason"], "detail": line["message"]})
                continue
            found = check(unmasked_text(p.masked[k]), _words(line["raw"]), qc)
            if k in p.adequacy and p.adequacy[k] < float(qc["adequacy"]["min_similarity"]):
                if (action := qc["adequacy"]["action"]) != "off":
                    detail = f"its back-translation shares {p.adequacy[k]:.0%} of the source's words"
                    found.append(Verdict("inadequate", action, detail))
            if found:
                verdicts[where] = [v.as_dict() for v in found]
            reasons += [{"field": where, "reason": v.gate, "detail": v.detail} for v in rejections(found)]
            flagged.update(v.gate for v in found if v.action == "flag")
            put(out, path, line["text"])
            fields["translated"] += 1
        if missing:
            pending += 1
            why = next((failed[key(it, q)] for q, _ in it.fields if key(it, q) in failed), "not sent yet")
            pending_rows.append({"source": it.source, "id": it.id, "error": why})
            continue
        if reasons:
            for r in {r["reason"] for r in reasons}:
                rejected[r] += 1
            rejects.append(_reject(it, reasons))
            continue
        if isinstance(out, dict):
            out.setdefault(id_field, it.id)
            out[meta_field] = {
                "source_id": it.id,
                "source": it.source,
                "source_sha256": it.sha,
                "backend": identity[0],
                "model": identity[1],
                "qc": verdicts,
            }
        rows[it.file].append(out)
        written += 1
    return Assembled(rows, rejects, rejected, flagged, pending, written, fields, pending_rows)


def _words(raw_translation: str) -> str:
    return TAG.sub(" ", raw_translation)


def _reject(it: Item, reasons: list[dict]) -> dict[str, Any]:
    return {
        "source": it.source,
        "id": it.id,
        "source_sha256": it.sha,
        "reason": reasons[0]["reason"],
        "reasons": reasons,
        "raw": it.raw,
    }


def write_outputs(out_dir: Path, a: Assembled, stats: Mapping[str, Any]) -> None:
    """``data/`` (replaced whole), ``rejects.jsonl`` (0600: it copies the user's rows) and ``stats.json``."""

    def fill(tmp: Path) -> None:
        for name, rows in a.rows.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_folder(out_dir / DATA_DIR, fill)
    rejects = out_dir / "rejects.jsonl"
    if a.rejects:
        with open_private(rejects) as f:
            for r in a.rejects:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        rejects.unlink(missing_ok=True)
    with rewrite(out_dir / "stats.json") as tmp:
        tmp.write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --- the run --------------------------------------------------------------------------------------------------


def translate(cfg: DictConfig) -> dict[str, Any]:
    """Translate ``cfg.data`` into ``cfg.output`` (resuming), or print the estimate under ``dry_run``; return the
    stats. Raise :class:`TranslateRunError` when the backend stopped the run or nothing was translated."""
    from kullm.translation.recipes import prepare_recipe

    out_dir = Path(str(cfg.output))
    out_dir.mkdir(parents=True, exist_ok=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if cfg.recipe.name != "none":
        data["path"] = str(prepare_recipe(cfg.recipe, out_dir / "source"))
    if not data.get("path"):
        raise DataError("give data.path=<a file, folder, save_to_disk folder or hub id> (or recipe=kullm-v2)")
    check_source(data["path"], data["source"])
    items, report = read_items(data)
    log_path = out_dir / LOG_NAME
    cache_path = Path(str(cfg.cache)) if cfg.cache else cache_root() / "translations.sqlite"
    backend, p, progress = asyncio.run(_session(cfg, items, report, log_path, cache_path))
    if progress is None:  # a dry run: the estimate is printed, nothing was sent
        return p.estimate
    p.done = read_done(log_path, "translation", key=lambda row: row["key"])
    identity = (backend.name, backend.model)
    id_field = str((data.get("fields") or {}).get("id") or "id")
    a = assemble(p, cfg.qc, str(cfg.meta_field), id_field, identity, progress.failed_keys)
    stats = make_stats(p, a, progress, backend, cache_path, out_dir)
    write_outputs(out_dir, a, stats)
    log.info("%s", summary_line(stats))
    if progress.stopped is not None:
        raise TranslateRunError(
            f"the backend stopped the run: {progress.stopped}; {a.written} rows translated and kept in "
            f"{out_dir / DATA_DIR}, {a.pending} pending: run the same command again to continue"
        )
    if a.written == 0:
        raise TranslateRunError(f"no row translated: {nothing_why(stats)}; see {out_dir / 'stats.json'}")
    return stats


async def _session(
    cfg: DictConfig, items: list[Item], report: SourceReport, log_path: Path, cache_path: Path
) -> tuple[Any, Plan, Progress | None]:
    """Build the backend in the event loop that uses it, plan against the log, translate (or estimate), close it."""
    from kullm.translation.cache import TranslationCache

    backend = open_backend(cfg.backend, bool(cfg.dry_run))
    try:
        p = plan(items, log_path, backend.identity, report)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with TranslationCache(cache_path, backend.identity) as cache:
            if cfg.dry_run:
                p.estimate = dry_run(p, backend, cache)
                return backend, p, None
            progress = await translate_plan(p, backend, cache, log_path, int(cfg.window), bool(cfg.progress))
        if int(cfg.qc.adequacy.sample) > 0 and progress.stopped is None:
            progress.adequacy_requests = await back_translate(p, cfg, log_path, cache_path)
    finally:
        await backend.aclose()
    return backend, p, progress


async def back_translate(p: Plan, cfg: DictConfig, log_path: Path, cache_path: Path) -> int:
    """Back-translate ``qc.adequacy.sample`` translated fields (the same ones every run) with the backend reversed,
    through the cache, and record each one's similarity to its source in ``p.adequacy``; return requests made."""
    from kullm.translation.adequacy import reverse_config, sample_keys, similarity
    from kullm.translation.backends import build_backend, translate_many
    from kullm.translation.cache import TranslationCache

    node = cfg.qc.adequacy
    done = read_done(log_path, "translation", key=lambda row: row["key"])
    keys = sorted(k for k, line in done.items() if line["status"] == "ok" and k in p.masked)
    chosen = sample_keys(keys, int(node.sample), int(node.seed))
    if not chosen:
        return 0
    reverse = build_backend(reverse_config(cfg.backend, node.reverse))
    try:
        with TranslationCache(cache_path, reverse.identity) as cache:
            result = await translate_many(reverse, [done[k]["raw"] for k in chosen], cache=cache)
    finally:
        await reverse.aclose()
    for k in chosen:
        back = result.translations.get(done[k]["raw"])
        if back is not None:
            p.adequacy[k] = similarity(unmasked_text(p.masked[k]), _words(back))
    if result.failed:
        log.warning("adequacy: %d of %d back-translations failed (not scored)", len(result.failed), len(chosen))
    return result.requests


def open_backend(node: Any, dry: bool) -> Any:
    """The backend of ``backend=``; a dry run needs no API key (it sends nothing), so one without is built against
    an address it never calls."""
    from kullm.translation.backends import TranslateError, build_backend

    try:
        return build_backend(node)
    except TranslateError:
        if not dry:
            raise
        given = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        quiet = logging.getLogger("kullm.translation.backends")  # its "no API key" warning: nothing is sent here
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return build_backend({**given, "base_url": "http://127.0.0.1:9/nothing-is-sent-in-a-dry-run"})
        finally:
            quiet.setLevel(level)


def dry_run(p: Plan, backend: Any, cache: Any) -> dict[str, Any]:
    """Print (and return) what a run would send: texts, characters, tokens, requests, cost; nothing is sent."""
    texts = list(dict.fromkeys(p.masked[k].text for k in p.todo()))
    hits = cache.get_many(texts) if texts else {}
    misses = [t for t in texts if t not in hits]
    est = backend.estimate(misses) if misses else {"characters": 0, "tokens": 0, "requests": 0, "cost_usd": 0.0}
    stats = {
        "dry_run": True,
        "backend": backend.name,
        "model": backend.model,
        "rows": len(p.items),
        "rows_unreadable": sum(1 for it in p.items if it.bad is not None),
        "fields_done": len(p.done),
        "texts_to_translate": len(texts),
        "texts_cached": len(hits),
        "texts_to_send": len(misses),
        **{k: est[k] for k in ("characters", "tokens", "requests", "cost_usd")},
    }
    print(
        f"kullm-translate: dry run ({backend.name}/{backend.model}): {stats['rows']} rows, "
        f"{len(texts)} texts to translate ({len(hits)} cached, {len(p.done)} fields done before), "
        f"{len(misses)} to send: {est['characters']:,} characters, ~{est['tokens']:,} tokens, "
        f"{est['requests']} requests, ~${est['cost_usd']:.2f}; nothing was sent"
    )
    return stats


def make_stats(p: Plan, a: Assembled, pr: Progress, backend: Any, cache_path: Path, out_dir: Path) -> dict[str, Any]:
    source_chars = sum(len(text) for it in p.items if it.bad is None for _, text in it.fields)
    return {
        "backend": backend.name,
        "model": backend.model,
        "rows": {
            "read": len(p.items),
            "written": a.written,
            "rejected": sum(1 for _ in a.rejects),
            "pending": a.pending,
        },
        "rejected_by_reason": dict(a.rejected),
        "flagged_by_reason": dict(a.flagged),
        "fields": {
            "total": sum(len(it.fields) for it in p.items if it.bad is None),
            "translated": a.field_counts["translated"],
            "kept_as_is": a.field_counts["kept"],
            "failed_by_reason": dict(pr.failed),
        },
        "characters": {"source": source_chars, "sent": pr.characters},
        "tokens_sent": pr.tokens,
        "cost_usd_estimate": round(pr.cost_usd, 4),
        "requests": pr.requests,
        "texts_sent": pr.sent_texts,
        "texts_cached": pr.cached,
        "adequacy": adequacy_stats(p, pr),
        "seconds": round(pr.seconds, 3),
        "stopped": pr.stopped,
        "failed_examples": pr.failed_examples,
        "pending_rows": a.pending_rows[:20],
        "repaired": dict(p.report.repaired),
        "data": str(out_dir / DATA_DIR),
        "log": str(out_dir / LOG_NAME),
        "cache": str(cache_path),
    }


def adequacy_stats(p: Plan, pr: Progress) -> dict[str, Any]:
    """The back-translation sample: fields scored, their mean similarity, requests made."""
    scores = list(p.adequacy.values())
    mean = round(sum(scores) / len(scores), 4) if scores else None
    return {"scored": len(scores), "mean_similarity": mean, "requests": pr.adequacy_requests}


def summary_line(stats: Mapping[str, Any]) -> str:
    r = stats["rows"]
    rej = ", ".join(f"{k}={v}" for k, v in sorted(stats["rejected_by_reason"].items())) or "none"
    return (
        f"{r['written']} of {r['read']} rows translated into {stats['data']}; rejected {r['rejected']} ({rej}); "
        f"pending {r['pending']}; {stats['requests']} requests, {stats['texts_cached']} texts from the cache, "
        f"{stats['characters']['sent']:,} characters sent (~${stats['cost_usd_estimate']:.2f})"
    )


def nothing_why(stats: Mapping[str, Any]) -> str:
    """Why a run wrote no row, in a few words."""
    r = stats["rows"]
    if r["read"] == 0:
        return "the source has no rows"
    failed = stats["fields"]["failed_by_reason"]
    if failed:
        first = next(iter(stats["failed_examples"].values()), "")
        return f"{sum(failed.values())} fields failed ({', '.join(sorted(failed))}): {first}"
    if r["rejected"]:
        rej = ", ".join(f"{k}={v}" for k, v in sorted(stats["rejected_by_reason"].items()))
        return f"all {r['rejected']} rows rejected ({rej})"
    return f"{r['pending']} rows pending"
