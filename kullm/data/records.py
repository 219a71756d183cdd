"""Read instruction data and validate every row.

Four layouts are understood, each with configurable field names:

* flat (KULLM v2): ``{"id"?, "instruction", "input"?, "output"}``
* self-instruct (KULLM v1, the evaluation set): ``{"id", "instruction", "instances": [{"input", "output"}, ...]}``,
  one record per instance.
* OpenAI ``messages`` and ShareGPT ``conversations`` (see :mod:`kullm.data.conversations`): one record per
  conversation.

The layout is detected per file from its first row (``format="auto"``) or given; the rows come from
:mod:`kullm.data.sources`. How to read (field names, policy, what a usable row is) is one :class:`ReadOptions`, with a
preset per reader: training data, prompts to answer, responses to judge.
Under ``policy="skip"`` bad rows are counted by reason and written to a rejects file with ``file:line``;
under ``policy="strict"`` the first bad row raises :class:`DataError` naming ``file:line: field: reason``.
Rejects files are written user-only (0600), never through a link.

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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kullm.data.conversations import FORMATS, Turn, detect_format, parse_turns, split_reference, unencodable
from kullm.data.sources import BOM, SOURCES, DataError, Reject, Row, SourceReport, read_rows

log = logging.getLogger(__name__)

POLICIES = ("skip", "strict")
# The knobs of reading data users type most (kullm.config.validate collects this table).
SCHEMA: dict[str, Any] = {"data.policy": POLICIES, "data.source": SOURCES, "data.format": FORMATS}


@dataclass(frozen=True)
class Record:
    """One instruction example or one conversation, ready for a prompt template.

    A conversation keeps its checked ``turns`` ((role, content) pairs); its ``instruction`` is the first user turn
    and its ``output`` the last assistant turn (what overlap checks and previews look at) — for an open
    conversation (``ReadOptions.open_conversations``) the answer given beside the turns, if any.
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
    prompt: str = "prompt"  # preference rows (kullm.data.preference): the prompt, a text or turns
    chosen: str = "chosen"  # the preferred answer (a text, or a conversation ending with it)
    rejected: str = "rejected"  # the other answer
    completion: str = "completion"  # KTO rows: one answer
    label: str = "label"  # KTO rows: whether the answer is desirable


def _fields(fields: Fields | Mapping[str, str] | None) -> Fields:
    if fields is None:
        return Fields()
    if isinstance(fields, Fields):
        return fields
    unknown = set(fields) - set(Fields.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown field-name keys {sorted(unknown)}; known: {sorted(Fields.__dataclass_fields__)}")
    return Fields(**{k: v for k, v in fields.items() if v is not None})


@dataclass(frozen=True)
class ReadOptions:
    """How to read a source and which rows are usable; a preset per reader (:meth:`training`, :meth:`prompts`,
    :meth:`responses`), or the fields given directly.

    ``fields`` may be given as a mapping of field names (``{"output": "answer"}``).
    """

    fields: Fields = Fields()
    policy: str = "skip"  # "skip" (count and write rejects) or "strict" (raise on the first bad row)
    source: str = "auto"  # "auto" (local path if it exists, else hub), "files" or "hub"
    split: str = "train"  # the split to load for a hub or save_to_disk dataset
    revision: str | None = None  # the hub revision (commit, tag or branch) to pin
    format: str = "auto"  # each file's layout from its first row, or "instruction", "messages", "sharegpt"
    roles: Mapping[str, str] | None = None  # extra role names for conversations, e.g. {"Bot": "assistant"}
    drop_duplicates: bool = False  # drop (and count) records whose content repeats an earlier one
    require_output: bool = True  # rows must have the output field (not so for prompts to answer)
    allow_empty_output: bool = False  # an empty output is kept (a model's empty answer is still an answer)
    # rows without an id get ``sha:<hash of instruction and input>`` instead of ``<file>:<line>`` (generation keys
    # its resumption on ids: inserting a row above must not shift the others' ids)
    content_ids: bool = False
    # a conversation may end with a user turn (the turn to answer), and its ``output`` is the output field beside
    # its turns when the row has one (a generated ``response``), else its trailing assistant turn, else empty
    open_conversations: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be 'skip' or 'strict', got {self.policy!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        object.__setattr__(self, "fields", _fields(self.fields))

    @classmethod
    def training(cls, data: Mapping[str, Any]) -> ReadOptions:
        """Training data, as a (composed) ``data=`` config node describes it."""
        return cls(
            fields=Fields(**{k: v for k, v in dict(data["fields"] or {}).items() if v}),
            policy=data["policy"],
            source=data["source"],
            split=data["split"],
            revision=data["revision"],
            format=data["format"] or "auto",
            roles=dict(data["roles"] or {}),
            drop_duplicates=bool(data["drop_duplicates"]),
        )

    @classmethod
    def prompts(
        cls,
        fields: Fields | Mapping[str, str] | None = None,
        policy: str = "skip",
        roles: Mapping[str, str] | None = None,
    ) -> ReadOptions:
        """Prompts to answer (generation input): no output needed, a conversation may end with the user turn to
        answer, and a row without an id is named by its content."""
        return cls(
            fields=fields,
            policy=policy,
            roles=roles,
            require_output=False,
            allow_empty_output=True,
            content_ids=True,
            open_conversations=True,
        )

    @classmethod
    def responses(cls, output: str = "output") -> ReadOptions:
        """Answers to judge, from local files: the answer in field ``output`` (an empty one is judged too), beside
        the instruction or after a conversation's turns."""
        return cls(fields={"output": output}, source="files", allow_empty_output=True, open_conversations=True)


@dataclass
class ReadReport(SourceReport):
    """What reading a source did: rows seen, records made, rows rejected by reason, repairs made."""

    rows: int = 0
    records: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejects: list[Reject] = field(default_factory=list)
    duplicates: int = 0  # exact duplicate rows dropped (drop_duplicates)
    conversations: int = 0  # records that are conversations (messages / ShareGPT)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)  # (source, id, new id) for colliding ids

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    def reject(self, bad: Reject, row: Row, policy: str) -> None:
        """Count and keep a row that cannot be used (``policy=strict``: stop, naming it, instead)."""
        reject = replace(bad, source=row.source, raw=row.raw)
        if policy == "strict":
            raise DataError(f"{reject.source}: {bad.field}: {bad.reason}: {bad.message}") from None
        self.rejected[bad.reason] += 1
        self.rejects.append(reject)

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


def read_records(
    path: str | Path, options: ReadOptions = ReadOptions(), rejects_path: str | Path | None = None
) -> tuple[list[Record], ReadReport]:
    """Read and validate every row of ``path``; return the good records and a report.

    :param path: a data file, a folder of them, a ``save_to_disk`` folder or a hub dataset id
        (:mod:`kullm.data.sources`).
    :param options: how to read it and which rows are usable (:class:`ReadOptions`).
    :param rejects_path: where to write rejected rows as JSONL (only written when some are rejected).
    """
    o = options
    fields = o.fields
    output_rule = (o.require_output, o.allow_empty_output)
    report = ReadReport()
    records: list[Record] = []
    ids: dict[str, str] = {}  # id -> where it was first used
    contents: set[tuple] = set()
    formats: dict[str, str] = {}  # file -> the layout its first row showed
    for row in read_rows(path, o.split, o.revision, o.source, report):
        report.rows += 1
        try:
            if row.bad is not None:
                raise row.bad
            obj = row.obj
            if row.empty:  # an empty instruction or input cell is an empty text, not a missing field
                obj = {**obj, **{k: "" for k in (fields.instruction, fields.input) if k in row.empty}}
            fmt = o.format
            if fmt == "auto":
                file = row.source.rsplit(":", 1)[0]
                fmt = formats.setdefault(file, detect_format(obj, fields.messages, fields.conversations))
            default_id = "" if o.content_ids else row.default_id
            if fmt == "instruction":
                made = _to_records(obj, row.source, fields, output_rule, default_id)
            else:
                opened = output_rule if o.open_conversations else None
                made = [_to_conversation(obj, row.source, fields, fmt, o.roles, default_id, opened)]
            if o.content_ids and isinstance(obj, dict) and obj.get(fields.id) is None:
                made = [replace(r, id=f"sha:{_prompt_digest(r)[:12]}") for r in made]
        except Reject as bad:
            if bad.field in row.empty:
                line = row.raw if len(row.raw) <= 80 else row.raw[:79] + "…"
                bad = Reject("empty_field", bad.field, f"the {bad.field!r} cell is empty in {line!r}")
            report.reject(bad, row, o.policy)
            continue
        for rec in made:
            content = rec.content
            if o.drop_duplicates and content in contents:
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
            row = {"source": r.source, "reason": r.reason, "field": r.field, "message": r.message, "raw": r.raw}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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


# --- validation -----------------------------------------------------------------------------------------------


def _text(obj: Mapping[str, Any], key: str, *, required: bool) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise Reject("missing_field", key, f"no {key!r} field")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise Reject("not_a_string", key, f"expected a string, got {type(value).__name__}")
    _check_encodable(value, key)
    return value.replace("\r\n", "\n").removeprefix(BOM)


def _check_encodable(text: str, key: str) -> None:
    if (why := unencodable(text)) is not None:
        raise Reject("lone_surrogate", key, why)


def _id(obj: Mapping[str, Any], f: Fields) -> str | int | None:
    rid = obj.get(f.id)
    if rid is not None and not isinstance(rid, (str, int)):
        raise Reject("not_a_string", f.id, f"expected a string or integer id, got {type(rid).__name__}")
    if isinstance(rid, str):
        _check_encodable(rid, f.id)
    return rid


def _check_prompt(instruction: str, inp: str, f: Fields) -> None:
    """A row asks something: an instruction, or (KULLM's own example) an empty instruction and an input."""
    if not instruction.strip() and not inp.strip():
        raise Reject("empty_instruction", f.instruction, "instruction is empty (and there is no input)")


def _to_records(
    obj: Any, src: str, f: Fields, output_rule: tuple[bool, bool] = (True, False), default_id: str = ""
) -> list[Record]:
    if not isinstance(obj, dict):
        raise Reject("not_an_object", "<row>", f"expected a JSON object, got {type(obj).__name__}")
    rid = _id(obj, f)
    instruction = _text(obj, f.instruction, required=True)
    base_id = str(rid) if rid is not None else default_id or src.rsplit("/", 1)[-1]

    if obj.get(f.instances) is not None and obj.get(f.output) is None:
        instances = obj[f.instances]
        if not isinstance(instances, list) or not instances:
            raise Reject("bad_instances", f.instances, "expected a non-empty list of {input, output} objects")
        out = []
        for k, inst in enumerate(instances):
            where = f"{f.instances}[{k}]"
            if not isinstance(inst, dict):
                raise Reject("bad_instances", where, f"expected an object, got {type(inst).__name__}")
            try:
                rec = _one(inst, f, output_rule)
            except Reject as bad:
                raise Reject(bad.reason, f"{where}.{bad.field}", bad.message) from None
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
    user turn and take its output from the output field beside the turns (see :class:`ReadOptions`)."""
    if not isinstance(obj, dict):
        raise Reject("not_an_object", "<row>", f"expected a JSON object, got {type(obj).__name__}")
    rid = _id(obj, f)
    key = f.messages if fmt == "messages" else f.conversations
    turns = parse_turns(obj, fmt, key=key, roles=roles, open_end=open_output is not None)
    first_user = next(text for role, text in turns if role == "user")
    base_id = str(rid) if rid is not None else default_id or src.rsplit("/", 1)[-1]
    output = turns[-1][1]
    if open_output is not None:
        reference = split_reference(turns)[1]
        require, allow_empty = open_output
        if obj.get(f.output) is not None or reference is None:
            output = _text(obj, f.output, required=require)
        if require and not allow_empty and not output.strip():
            raise Reject("empty_output", f.output, "output is empty")
    return Record(base_id, first_user, "", output, src, turns)


def _one(obj: Mapping[str, Any], f: Fields, output_rule: tuple[bool, bool]) -> tuple[str, str]:
    require, allow_empty = output_rule
    inp = _text(obj, f.input, required=False)
    output = _text(obj, f.output, required=require)
    if require and not allow_empty and not output.strip():
        raise Reject("empty_output", f.output, "output is empty")
    return inp, output
