"""Read instruction data and validate every row.

Four layouts are understood, each with configurable field names:

* flat (KULLM v2): ``{"id"?, "instruction", "input"?, "output"}``
* self-instruct (KULLM v1, the evaluation set): ``{"id", "instruction", "instances": [{"input", "output"}, ...]}``,
  one record per instance.
* OpenAI ``messages`` and ShareGPT ``conversations`` (see :mod:`kullm.data.chat`): one record per conversation.

The layout is detected per file from its first row (``format="auto"``) or given. Sources are a ``.jsonl`` /
``.json`` (one array) / ``.csv`` / ``.parquet`` file, a folder of them, a ``datasets`` ``save_to_disk`` folder, or a
hub dataset id (through ``datasets``).
Under ``policy="skip"`` bad rows are counted by reason and written to a rejects file with ``file:line``;
under ``policy="strict"`` the first bad row raises :class:`DataError` naming ``file:line: field: reason``.
Harmless encoding quirks (a byte-order mark, CRLF line ends) are repaired and counted, never rejected. A folder's
links are read only when they resolve inside it, and rejects files are written user-only (0600), never through a link:
a shared data folder cannot get another file's lines copied out.

Duplicates never cost a distinct row: a row whose id was already used but whose content (instruction, input,
output) differs is kept under a deterministic new id (``<id>#<content hash>``), counted and reported; exact
duplicate rows (same content) can be dropped and counted (``drop_duplicates``, on for training data).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kullm.data.chat import FORMATS, Turn, detect_format, parse_turns, split_reference, unencodable
from kullm.data.chat import BadTurn as _BadTurn

log = logging.getLogger(__name__)

BOM = "\ufeff"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SAVED_DATASET = ("dataset_dict.json", "state.json")  # a folder holding either is a ``save_to_disk`` dataset


class DataError(ValueError):
    """A bad input row (strict policy) or an unreadable source, with ``file:line: field: reason``."""


@dataclass(frozen=True)
class Record:
    """One instruction example or one conversation, ready for a prompt template.

    A conversation keeps its checked ``turns`` ((role, content) pairs); its ``instruction`` is the first user turn
    and its ``output`` the last assistant turn (what overlap checks and previews look at) — for an open
    conversation (``read_records(open_conversations=True)``) the answer given beside the turns, if any.
    """

    id: str
    instruction: str
    input: str
    output: str
    source: str = ""  # "file:line" (or "file:line#k" for the k-th instance) where it was read
    turns: tuple[Turn, ...] = ()

    @property
    def content(self) -> tuple:
        """What makes two records the same example (duplicates, colliding ids)."""
        return self.turns or (self.instruction, self.input, self.output)


@dataclass(frozen=True)
class Fields:
    """Names of the fields in the source rows (e.g. ``instruction="question", output="answer"``)."""

    id: str = "id"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    instances: str = "instances"
    messages: str = "messages"  # OpenAI layout: a list of {role, content}
    conversations: str = "conversations"  # ShareGPT layout: a list of {from, value}


@dataclass
class Reject:
    """A row that was not used, and why."""

    source: str
    reason: str
    field: str
    message: str
    raw: str = ""

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.reason} ({self.message})"


@dataclass
class ReadReport:
    """What reading a source did: rows seen, records made, rows rejected by reason, repairs made."""

    rows: int = 0
    records: int = 0
    rejected: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    rejects: list[Reject] = field(default_factory=list)
    duplicates: int = 0  # exact duplicate rows dropped (drop_duplicates)
    hidden_files: int = 0  # files under hidden folders (or hidden themselves) not read
    links_skipped: int = 0  # links under the data folder that lead out of it, not read
    conversations: int = 0  # records that are conversations (messages / ShareGPT)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)  # (source, id, new id) for colliding ids

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "records": self.records,
            "conversations": self.conversations,
            "rejected": dict(self.rejected),
            "repaired": dict(self.repaired),
            "duplicates_dropped": self.duplicates,
            "ids_renamed": len(self.renamed),
            "hidden_files_skipped": self.hidden_files,
            "links_skipped": self.links_skipped,
        }


class _Bad(Exception):
    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


def _too_deep() -> _Bad:
    return _Bad("nested_too_deep", "<row>", "JSON nested too deeply to read")


@dataclass
class _Row:
    """A raw row from a source: parsed object (or the reason it could not be parsed)."""

    source: str
    raw: str
    obj: Any = None
    bad: _Bad | None = None
    default_id: str = ""  # for rows without an id: ``<path relative to the data root>:<line>``
    empty: tuple[str, ...] = ()  # a CSV row's empty cells (left out of ``obj``)


def read_records(
    path: str | Path,
    fields: Fields | Mapping[str, str] | None = None,
    policy: str = "skip",
    rejects_path: str | Path | None = None,
    split: str = "train",
    revision: str | None = None,
    source: str = "auto",
    require_output: bool = True,
    allow_empty_output: bool = False,
    drop_duplicates: bool = False,
    content_ids: bool = False,
    format: str = "auto",
    roles: Mapping[str, str] | None = None,
    open_conversations: bool = False,
) -> tuple[list[Record], ReadReport]:
    """Read and validate every row of ``path``; return the good records and a report.

    :param path: a ``.jsonl``/``.json`` file, a folder of them, or a hub dataset id.
    :param fields: field names of the source rows.
    :param policy: ``"skip"`` (count and write rejects) or ``"strict"`` (raise on the first bad row).
    :param rejects_path: where to write rejected rows as JSONL (only written when some are rejected).
    :param split: the split to load for a hub dataset.
    :param revision: the hub revision (commit, tag or branch) to pin.
    :param source: ``"auto"`` (local path if it exists, else hub), ``"files"`` or ``"hub"``.
    :param require_output: rows must have the output field (False for prompts to answer: generation input).
    :param allow_empty_output: an empty output is kept, not rejected (a model's empty answer is still an answer).
    :param drop_duplicates: drop (and count) records whose instruction, input and output repeat an earlier one.
    :param content_ids: rows without an id get ``sha:<hash of instruction and input>`` instead of ``<file>:<line>``
        (generation keys its resumption on ids: inserting a row above must not shift the others' ids).
    :param format: ``"auto"`` (each file's layout from its first row), ``"instruction"`` (flat or self-instruct),
        ``"messages"`` (OpenAI) or ``"sharegpt"``.
    :param roles: extra role names for conversations, e.g. ``{"User": "user", "Bot": "assistant"}``.
    :param open_conversations: a conversation may end with a user turn (the turn to answer: generation input), and
        its ``output`` is the output field beside its turns when the row has one (a generated ``response``), else
        its trailing assistant turn, else empty.
    """
    if policy not in ("skip", "strict"):
        raise ValueError(f"policy must be 'skip' or 'strict', got {policy!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    fields = _fields(fields)
    output_rule = (require_output, allow_empty_output)
    report = ReadReport()
    records: list[Record] = []
    ids: dict[str, str] = {}  # id -> where it was first used
    contents: set[tuple] = set()
    formats: dict[str, str] = {}  # file -> the layout its first row showed
    for row in _rows(path, split, revision, source, report):
        report.rows += 1
        try:
            if row.bad is not None:
                raise row.bad
            obj = row.obj
            if row.empty:  # an empty instruction or input cell is an empty text, not a missing field
                obj = {**obj, **{k: "" for k in (fields.instruction, fields.input) if k in row.empty}}
            fmt = format
            if fmt == "auto":
                file = row.source.rsplit(":", 1)[0]
                fmt = formats.setdefault(file, detect_format(obj, fields.messages, fields.conversations))
            default_id = "" if content_ids else row.default_id
            if fmt == "instruction":
                made = _to_records(obj, row.source, fields, output_rule, default_id)
            else:
                opened = output_rule if open_conversations else None
                made = [_to_conversation(obj, row.source, fields, fmt, roles, default_id, opened)]
            if content_ids and isinstance(obj, dict) and obj.get(fields.id) is None:
                made = [replace(r, id=f"sha:{_prompt_digest(r)[:12]}") for r in made]
        except _Bad as bad:
            if bad.field in row.empty:
                line = row.raw if len(row.raw) <= 80 else row.raw[:79] + "…"
                bad = _Bad("empty_field", bad.field, f"the {bad.field!r} cell is empty in {line!r}")
            reject = Reject(row.source, bad.reason, bad.field, bad.message, row.raw)
            if policy == "strict":
                raise DataError(f"{reject.source}: {bad.field}: {bad.reason}: {bad.message}") from None
            report.rejected[bad.reason] += 1
            report.rejects.append(reject)
            continue
        for rec in made:
            content = rec.content
            if drop_duplicates and content in contents:
                report.duplicates += 1
                continue
            contents.add(content)
            if rec.id in ids:
                new_id = _unique_id(rec, ids)
                report.renamed.append((rec.source, rec.id, new_id))
                rec = replace(rec, id=new_id)
            ids[rec.id] = rec.source
            records.append(rec)
    report.records = len(records)
    report.conversations = sum(1 for r in records if r.turns)
    if report.duplicates:
        log.info("%d exact duplicate row(s) dropped (same instruction, input and output)", report.duplicates)
    if report.renamed:
        src, old, new = report.renamed[0]
        log.warning(
            "%d row(s) reuse an earlier id with other content: kept under new ids (first: %s: %r -> %r)",
            len(report.renamed),
            src,
            old,
            new,
        )
    if report.rejects:
        log.warning(
            "%d of %d rows rejected (%s)%s",
            report.n_rejected,
            report.rows,
            ", ".join(f"{k}={v}" for k, v in sorted(report.rejected.items())),
            f"; see {rejects_path}" if rejects_path else "",
        )
        if rejects_path is not None:
            write_rejects(report.rejects, rejects_path)
    return records, report


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def _prompt_digest(rec: Record) -> str:
    """A hash of what a record asks: its instruction and input, or a conversation's turns up to the last user turn."""
    if rec.turns:
        return _digest(*(f"{role}\x01{text}" for role, text in split_reference(rec.turns)[0]))
    return _digest(rec.instruction, rec.input)


def _unique_id(rec: Record, ids: Mapping[str, str]) -> str:
    """``<id>#<8 hex of the content hash>``: the same row gets the same id on every read, whatever the order (a
    repeat of the very same content under the same id gets a counter)."""
    parts = [f"{role}\x01{text}" for role, text in rec.turns] or [rec.instruction, rec.input, rec.output]
    new = f"{rec.id}#{_digest(*parts)[:8]}"
    k = 2
    while (candidate := new if k == 2 else f"{new}~{k - 1}") in ids:
        k += 1
    return candidate


def write_rejects(rejects: list[Reject], path: str | Path) -> None:
    """Write rejected rows as JSONL: source (file:line), reason, field, message and the raw row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_private(path) as f:
        for r in rejects:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")


def open_private(path: Path) -> io.TextIOWrapper:
    """``path`` opened to write text readable by its owner only (0600: rejects copy the user's rows); a symbolic
    link there is refused, never written through."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        if os.path.islink(path):
            raise DataError(f"{path}: a symbolic link: refusing to write rejected rows through it") from None
        raise DataError(f"{path}: cannot write it ({e.strerror or type(e).__name__})") from None
    os.fchmod(fd, 0o600)  # a file that was there keeps its old mode otherwise
    return open(fd, "w", encoding="utf-8", errors="backslashreplace")


def _fields(fields: Fields | Mapping[str, str] | None) -> Fields:
    if fields is None:
        return Fields()
    if isinstance(fields, Fields):
        return fields
    unknown = set(fields) - set(Fields.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown field-name keys {sorted(unknown)}; known: {sorted(Fields.__dataclass_fields__)}")
    return Fields(**{k: v for k, v in fields.items() if v is not None})


# --- sources -------------------------------------------------------------------------------------------------


def _rows(path: str | Path, split: str, revision: str | None, source: str, report: ReadReport) -> Iterator[_Row]:
    p = Path(str(path)).expanduser()
    if source not in ("auto", "files", "hub"):
        raise ValueError(f"source must be 'auto', 'files' or 'hub', got {source!r}")
    if source == "hub" or (source == "auto" and not p.exists()):
        if source == "auto" and (p.suffix in SUFFIXES or str(path).startswith((".", "/", "~"))):
            raise DataError(f"{path}: no such file or folder")
        yield from _hub_rows(str(path), split, revision)
        return
    if is_saved_dataset(p):
        yield from _saved_rows(p, split)
        return
    files = data_files(p)
    links = outside_links(p)
    if links:
        report.links_skipped = len(links)
        log.warning(
            "%d link(s) under %s lead out of it and were not read, e.g. %s -> %s",
            len(links),
            p,
            links[0],
            links[0].resolve(),
        )
    if not files:
        raise DataError(f"{p}: folder holds no {', '.join(SUFFIXES)} file")
    root = p if p.is_dir() else p.parent
    skipped = hidden_files(p)
    if skipped:
        report.hidden_files = len(skipped)
        log.warning("%d hidden file(s) under %s skipped, e.g. %s", len(skipped), p, skipped[0])
    for f in files:
        try:
            if f.suffix == ".csv":
                rows = _csv_rows(f, report)
            elif f.suffix == ".parquet":
                rows = _parquet_rows(f)
            elif f.suffix == ".json" and _looks_like_array(f):
                rows = _json_array_rows(f, report)
            else:
                rows = _jsonl_rows(f, report)
            rel = f.relative_to(root).as_posix()
            for row in rows:
                row.default_id = f"{rel}:{row.source.rsplit(':', 1)[1]}"
                yield row
        except OSError as e:  # unreadable (permissions, I/O error): one line naming the file
            raise DataError(f"{f}: cannot read it ({e.strerror or type(e).__name__})") from None


def check_source(path: str | Path, source: str = "auto", hint: str | None = None) -> None:
    """Fail fast on a local source that is missing or not a regular file or folder (a FIFO would block forever).

    A name that does not exist locally and does not look like a path is left to the hub.
    """
    p = Path(str(path)).expanduser()
    if p.exists():
        if not (p.is_file() or p.is_dir()):
            raise DataError(f"{path}: not a regular file or folder (a pipe, socket or device cannot be read as data)")
        return
    if source == "files" or (source == "auto" and (p.suffix in SUFFIXES or str(path).startswith((".", "/", "~")))):
        raise DataError(f"{path}: no such file or folder" + (f"; {hint}" if hint else ""))


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder ``datasets``' ``save_to_disk`` wrote (a ``Dataset`` or a ``DatasetDict``)."""
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET)


def data_files(path: Path) -> list[Path]:
    """The files a local source reads: the file itself, or every data file (.jsonl/.json/.csv/.parquet) under a
    folder, sorted — without hidden files and folders (``.ipynb_checkpoints/``, editor backups: see
    :func:`hidden_files`) and links that lead out of the folder (:func:`outside_links`). A ``save_to_disk``
    folder's files are all of its files (what its content hashes over)."""
    if not path.is_dir():
        return [path]
    if is_saved_dataset(path):
        return sorted(f for f in path.rglob("*") if f.is_file())
    files = sorted(f for f in _visible(path) if _inside(f, path))
    nested = next((f.parent for f in files if f.name in SAVED_DATASET), None)
    if nested is not None:  # its dataset_info.json / state.json are metadata, not rows
        raise DataError(f"{nested}: a save_to_disk dataset inside the data folder {path}: point data.path at it alone")
    return files


def hidden_files(path: Path) -> list[Path]:
    """The data files under a folder that :func:`data_files` skips because they or a folder above them are hidden."""
    if not path.is_dir():
        return []
    return sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file() and _hidden(f, path))


def outside_links(path: Path) -> list[Path]:
    """The data files under a folder that :func:`data_files` skips because they resolve to a file outside it: a
    shared folder's link to e.g. a password file must not get that file's lines copied into the rejects. (A link
    that stays inside the folder is read.)"""
    if not path.is_dir() or is_saved_dataset(path):
        return []
    return sorted(f for f in _visible(path) if not _inside(f, path))


def _visible(root: Path) -> Iterator[Path]:
    return (f for f in root.rglob("*") if f.suffix in SUFFIXES and f.is_file() and not _hidden(f, root))


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def _inside(f: Path, root: Path) -> bool:
    return f.resolve().is_relative_to(root.resolve())


def _looks_like_array(f: Path) -> bool:
    with f.open("rb") as fh:
        head = fh.read(64).decode("utf-8", errors="ignore").lstrip(BOM + " \t\r\n")
    return head.startswith("[")


def _jsonl_rows(f: Path, report: ReadReport) -> Iterator[_Row]:
    with f.open("rb") as fh:
        for lineno, raw_bytes in enumerate(fh, start=1):
            src = f"{f}:{lineno}"
            if raw_bytes.endswith(b"\r\n"):
                report.repaired["crlf"] += 1
            try:
                line = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raw = raw_bytes.decode("utf-8", errors="replace").rstrip("\r\n")
                yield _Row(src, raw, bad=_Bad("invalid_utf8", "<row>", f"byte {e.start}: {e.reason}"))
                continue
            if line.startswith(BOM):
                report.repaired["bom"] += 1
                line = line[1:]
            line = line.rstrip("\r\n")
            if not line.strip():
                continue  # blank lines separate nothing; they are not rows
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield _Row(src, line, bad=_Bad("malformed_json", "<row>", f"column {e.colno}: {e.msg}"))
                continue
            except RecursionError:
                yield _Row(src, line, bad=_too_deep())
                continue
            yield _Row(src, line, obj)


def _whole_text(f: Path, report: ReadReport) -> str:
    """A whole file as UTF-8 text, a BOM removed and counted; invalid UTF-8 names the line."""
    data = f.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{f}:{line}: <file>: invalid_utf8: {e.reason}") from None
    if text.startswith(BOM):
        report.repaired["bom"] += 1
        text = text[1:]
    return text


def _json_array_rows(f: Path, report: ReadReport) -> Iterator[_Row]:
    text = _whole_text(f, report)
    if "\r\n" in text:
        report.repaired["crlf"] += text.count("\r\n")
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    while True:
        i = skip(i)
        if i >= n:
            raise DataError(f"{f}:{text.count(chr(10)) + 1}: <file>: malformed_json: the array is never closed")
        if text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            obj, end = decoder.raw_decode(text, i)
            row = _Row(f"{f}:{line}", text[i:end], obj)
        except json.JSONDecodeError as e:
            # a broken element leaves nothing reliable to resynchronise on: stop here, naming the place
            raise DataError(f"{f}:{line}: <row>: malformed_json: {e.msg} at line {e.lineno} column {e.colno}") from None
        except RecursionError:  # well-formed but too deep to decode: skip it by its brackets
            end = _container_end(text, i)
            if end < 0:
                raise DataError(f"{f}:{line}: <row>: malformed_json: the element is never closed") from None
            row = _Row(f"{f}:{line}", text[i:end], bad=_too_deep())
        yield row
        i = skip(end)
        if i < n and text[i] == ",":
            i += 1


def _container_end(text: str, i: int) -> int:
    """The end of the JSON array or object that starts at ``text[i]``, by bracket depth outside strings (without
    recursion, for one too deep to decode); -1 when it is never closed."""
    depth, k, n = 0, i, len(text)
    while k < n:
        c = text[k]
        if c == '"':
            k += 1
            while k < n and text[k] != '"':
                k += 2 if text[k] == "\\" else 1
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return k + 1
        k += 1
    return -1


def _csv_rows(f: Path, report: ReadReport) -> Iterator[_Row]:
    """One row per CSV record, keyed by its first line (a quoted cell may span lines); empty cells are absent from
    the row and named in ``_Row.empty``; a rejected row is shown as its lines in the file."""
    import csv

    text = _whole_text(f, report)
    lines = io.StringIO(text, newline="").readlines()  # split as the reader splits, so line numbers agree
    reader = csv.reader(io.StringIO(text, newline=""))

    def record(line: int, field: str) -> list[str] | None:
        try:
            return next(reader)
        except StopIteration:
            return None
        except csv.Error as e:
            raise DataError(f"{f}:{line}: {field}: malformed_csv: {e}") from None

    header = record(1, "<header>")
    if header is None:
        return
    line = reader.line_num + 1
    while (cells := record(line, "<row>")) is not None:
        start, line = line, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        src = f"{f}:{start}"
        raw = "".join(lines[start - 1 : line - 1]).rstrip("\r\n")
        if len(cells) != len(header):
            message = f"{len(cells)} cells, the header has {len(header)}"
            yield _Row(src, raw, bad=_Bad("malformed_csv", "<row>", message))
            continue
        obj = {k: v.replace("\r\n", "\n") for k, v in zip(header, cells, strict=True) if v != ""}
        empty = tuple(k for k, v in zip(header, cells, strict=True) if v == "")
        yield _Row(src, raw, obj, empty=empty)


def _parquet_rows(f: Path) -> Iterator[_Row]:
    """One row per Parquet row; its "line" is the row's 1-based index."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
        raise DataError(f"{f}: <file>: not_parquet: {e}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            i += 1
            yield _Row(f"{f}:{i}", json.dumps(obj, ensure_ascii=False, default=str), obj)


def _saved_rows(p: Path, split: str) -> Iterator[_Row]:
    """The rows of a ``save_to_disk`` folder (``split`` of a ``DatasetDict``); sources are ``<folder>[split]:i``."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # a damaged or foreign folder
        raise DataError(f"{p}: cannot load it as a save_to_disk dataset: {type(e).__name__}: {e}") from None
    name = str(p)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{p}: no split {split!r} in this saved dataset (it has {', '.join(ds)}): set data.split")
        ds, name = ds[split], f"{p}[{split}]"
    for i, obj in enumerate(ds, start=1):
        yield _Row(f"{name}:{i}", json.dumps(obj, ensure_ascii=False, default=str), obj, default_id=f"{split}:{i}")


def _hub_rows(name: str, split: str, revision: str | None) -> Iterator[_Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as e:  # the hub raises many types: network, missing repo, bad split
        raise DataError(
            f"{name}: could not load as a hub dataset (split={split!r}): {type(e).__name__}: {e}. "
            "Offline? Fetch it first with scripts/download_data.py, or point data.path at a local file."
        ) from None
    for i, obj in enumerate(ds, start=1):
        raw = json.dumps(obj, ensure_ascii=False, default=str)
        yield _Row(f"{name}[{split}]:{i}", raw, obj, default_id=f"{split}:{i}")


# --- validation -----------------------------------------------------------------------------------------------


def _text(obj: Mapping[str, Any], key: str, *, required: bool) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise _Bad("missing_field", key, f"no {key!r} field")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad("not_a_string", key, f"expected a string, got {type(value).__name__}")
    _check_encodable(value, key)
    return value.replace("\r\n", "\n").removeprefix(BOM)


def _check_encodable(text: str, key: str) -> None:
    if (why := unencodable(text)) is not None:
        raise _Bad("lone_surrogate", key, why)


def _id(obj: Mapping[str, Any], f: Fields) -> str | int | None:
    rid = obj.get(f.id)
    if rid is not None and not isinstance(rid, (str, int)):
        raise _Bad("not_a_string", f.id, f"expected a string or integer id, got {type(rid).__name__}")
    if isinstance(rid, str):
        _check_encodable(rid, f.id)
    return rid


def _check_prompt(instruction: str, inp: str, f: Fields) -> None:
    """A row asks something: an instruction, or (KULLM's own example) an empty instruction and an input."""
    if not instruction.strip() and not inp.strip():
        raise _Bad("empty_instruction", f.instruction, "instruction is empty (and there is no input)")


def _to_records(
    obj: Any, src: str, f: Fields, output_rule: tuple[bool, bool] = (True, False), default_id: str = ""
) -> list[Record]:
    if not isinstance(obj, dict):
        raise _Bad("not_an_object", "<row>", f"expected a JSON object, got {type(obj).__name__}")
    rid = _id(obj, f)
    instruction = _text(obj, f.instruction, required=True)
    base_id = str(rid) if rid is not None else default_id or src.rsplit("/", 1)[-1]

    if obj.get(f.instances) is not None and obj.get(f.output) is None:
        instances = obj[f.instances]
        if not isinstance(instances, list) or not instances:
            raise _Bad("bad_instances", f.instances, "expected a non-empty list of {input, output} objects")
        out = []
        for k, inst in enumerate(instances):
            where = f"{f.instances}[{k}]"
            if not isinstance(inst, dict):
                raise _Bad("bad_instances", where, f"expected an object, got {type(inst).__name__}")
            try:
                rec = _one(inst, f, output_rule)
            except _Bad as bad:
                raise _Bad(bad.reason, f"{where}.{bad.field}", bad.message) from None
            _check_prompt(instruction, rec[0], f)
            rid_k = base_id if len(instances) == 1 else f"{base_id}_{k}"
            src_k = src if len(instances) == 1 else f"{src}#{k}"
            out.append(Record(rid_k, instruction, rec[0], rec[1], src_k))
        return out
    _check_prompt(instruction, _text(obj, f.input, required=False), f)
    inp, output = _one(obj, f, output_rule)
    return [Record(base_id, instruction, inp, output, src)]


def _to_conversation(
    obj: Any,
    src: str,
    f: Fields,
    fmt: str,
    roles: Mapping[str, str] | None,
    default_id: str,
    open_output: tuple[bool, bool] | None = None,
) -> Record:
    """One conversation record; ``open_output`` (``(require, allow_empty)`` of the output rule) lets it end with a
    user turn and take its output from the output field beside the turns (see ``read_records``)."""
    if not isinstance(obj, dict):
        raise _Bad("not_an_object", "<row>", f"expected a JSON object, got {type(obj).__name__}")
    rid = _id(obj, f)
    key = f.messages if fmt == "messages" else f.conversations
    try:
        turns = parse_turns(obj, fmt, key=key, roles=roles, open_end=open_output is not None)
    except _BadTurn as bad:
        raise _Bad(bad.reason, bad.field, bad.message) from None
    first_user = next(text for role, text in turns if role == "user")
    base_id = str(rid) if rid is not None else default_id or src.rsplit("/", 1)[-1]
    output = turns[-1][1]
    if open_output is not None:
        reference = split_reference(turns)[1]
        require, allow_empty = open_output
        if obj.get(f.output) is not None or reference is None:
            output = _text(obj, f.output, required=require)
        if require and not allow_empty and not output.strip():
            raise _Bad("empty_output", f.output, "output is empty")
    return Record(base_id, first_user, "", output, src, turns)


def _one(obj: Mapping[str, Any], f: Fields, output_rule: tuple[bool, bool]) -> tuple[str, str]:
    require, allow_empty = output_rule
    inp = _text(obj, f.input, required=False)
    output = _text(obj, f.output, required=require)
    if require and not allow_empty and not output.strip():
        raise _Bad("empty_output", f.output, "output is empty")
    return inp, output
