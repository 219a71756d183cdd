"""Where rows come from: ``.jsonl`` / ``.json`` (one array) / ``.csv`` / ``.parquet`` files, a folder of them, a
``datasets`` ``save_to_disk`` folder, or a hub dataset id (through ``datasets``).

Each source yields raw rows (:class:`Row`) with their ``file:line``: the parsed object, or the :class:`Reject`
that says why the line could not be parsed. Harmless encoding quirks (a byte-order mark, CRLF line ends) are
repaired and counted, never rejected. A folder's hidden files and folders are skipped and counted, and its links are
read only when they resolve inside it: a shared data folder cannot get another file's lines copied out. A source
that cannot be read at all is one :class:`DataError` naming it.

The two ways reading goes wrong are defined here, at the start of the pipeline: a :class:`Reject` is a row we
cannot use (counted, or the first one stops a strict run), a :class:`DataError` stops the run.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kullm.errors import KullmError

log = logging.getLogger(__name__)

BOM = "\ufeff"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SOURCES = ("auto", "files", "hub")  # data.source: a local path if it exists, else the hub | local only | hub only
SAVED_DATASET = ("dataset_dict.json", "state.json")  # a folder holding either is a ``save_to_disk`` dataset


class DataError(KullmError, ValueError):
    """A bad input row (strict policy) or an unreadable source, with ``file:line: field: reason``."""


@dataclass(eq=False)
class Reject(KullmError):
    """A row we cannot use: ``reason`` (a short name), ``field`` (where in the row) and a message.

    Raised where the row breaks a rule (reading it, parsing its turns, checking its fields), then placed
    (``source``: ``file:line``, ``raw``: the row as read) and counted (``policy=skip``) or turned into a
    :class:`DataError` (``policy=strict``).
    """

    reason: str
    field: str
    message: str
    source: str = ""
    raw: str = ""

    def __post_init__(self) -> None:
        self.args = (self.reason, self.field, self.message, self.source, self.raw)  # what a copy is made from

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.reason} ({self.message})"


@dataclass
class SourceReport:
    """What reading a source's files repaired or left unread (the readers' part of a ``ReadReport``)."""

    repaired: Counter = field(default_factory=Counter)
    hidden_files: int = 0  # files under hidden folders (or hidden themselves) not read
    links_skipped: int = 0  # links under the data folder that lead out of it, not read


@dataclass
class Row:
    """A raw row from a source: parsed object (or the reason it could not be parsed)."""

    source: str
    raw: str
    obj: Any = None
    bad: Reject | None = None
    default_id: str = ""  # for rows without an id: ``<path relative to the data root>:<line>``
    empty: tuple[str, ...] = ()  # a CSV row's empty cells (left out of ``obj``)


def _too_deep() -> Reject:
    return Reject("nested_too_deep", "<row>", "JSON nested too deeply to read")


def read_rows(path: str | Path, split: str, revision: str | None, source: str, report: SourceReport) -> Iterator[Row]:
    """Every raw row of ``path`` (a local file or folder, a ``save_to_disk`` folder, or a hub dataset id), in order."""
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


def _jsonl_rows(f: Path, report: SourceReport) -> Iterator[Row]:
    with f.open("rb") as fh:
        for lineno, raw_bytes in enumerate(fh, start=1):
            src = f"{f}:{lineno}"
            if raw_bytes.endswith(b"\r\n"):
                report.repaired["crlf"] += 1
            try:
                line = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raw = raw_bytes.decode("utf-8", errors="replace").rstrip("\r\n")
                yield Row(src, raw, bad=Reject("invalid_utf8", "<row>", f"byte {e.start}: {e.reason}"))
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
                yield Row(src, line, bad=Reject("malformed_json", "<row>", f"column {e.colno}: {e.msg}"))
                continue
            except RecursionError:
                yield Row(src, line, bad=_too_deep())
                continue
            yield Row(src, line, obj)


def _whole_text(f: Path, report: SourceReport) -> str:
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


def _json_array_rows(f: Path, report: SourceReport) -> Iterator[Row]:
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
            row = Row(f"{f}:{line}", text[i:end], obj)
        except json.JSONDecodeError as e:
            # a broken element leaves nothing reliable to resynchronise on: stop here, naming the place
            raise DataError(f"{f}:{line}: <row>: malformed_json: {e.msg} at line {e.lineno} column {e.colno}") from None
        except RecursionError:  # well-formed but too deep to decode: skip it by its brackets
            end = _container_end(text, i)
            if end < 0:
                raise DataError(f"{f}:{line}: <row>: malformed_json: the element is never closed") from None
            row = Row(f"{f}:{line}", text[i:end], bad=_too_deep())
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


def _csv_rows(f: Path, report: SourceReport) -> Iterator[Row]:
    """One row per CSV record, keyed by its first line (a quoted cell may span lines); empty cells are absent from
    the row and named in ``Row.empty``; a rejected row is shown as its lines in the file."""
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
            yield Row(src, raw, bad=Reject("malformed_csv", "<row>", message))
            continue
        obj = {k: v.replace("\r\n", "\n") for k, v in zip(header, cells, strict=True) if v != ""}
        empty = tuple(k for k, v in zip(header, cells, strict=True) if v == "")
        yield Row(src, raw, obj, empty=empty)


def _parquet_rows(f: Path) -> Iterator[Row]:
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
            yield Row(f"{f}:{i}", json.dumps(obj, ensure_ascii=False, default=str), obj)


def _saved_rows(p: Path, split: str) -> Iterator[Row]:
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
        yield Row(f"{name}:{i}", json.dumps(obj, ensure_ascii=False, default=str), obj, default_id=f"{split}:{i}")


def _hub_rows(name: str, split: str, revision: str | None) -> Iterator[Row]:
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
        yield Row(f"{name}[{split}]:{i}", raw, obj, default_id=f"{split}:{i}")
