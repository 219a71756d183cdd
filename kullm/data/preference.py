"""Preference data: paired ``prompt/chosen/rejected`` rows and KTO's ``prompt/completion/label`` rows, read and checked.

Two row layouts, each in every file format :mod:`kullm.data.sources` reads (field names from ``data.fields``):

* **pairs** (``data.kind=pairs``: DPO, IPO, ORPO, SimPO): ``prompt``, ``chosen`` and ``rejected`` as strings, or
  ``chosen``/``rejected`` as conversations (OpenAI ``messages`` or ShareGPT turns; in CSV, a cell of JSON) that share
  every turn but the last answer, UltraFeedback-binarized style: the shared turns are the prompt. A conversation may
  also hold only the answer (``[{"role": "assistant", ...}]``) beside a ``prompt`` (a string, or its own turns).
* **kto** (``data.kind=kto``): ``prompt`` (a string or turns ending with a user turn), ``completion`` (a string, or one
  assistant turn) and ``label`` (a boolean: True for a desirable answer; in CSV ``true``/``false``/``1``/``0``).
  A paired file trains KTO only with ``data.kto_from_pairs=true``: each pair becomes a desirable and an undesirable
  row (:func:`kto_rows`, applied after the validation split, so both halves of a pair land in the same split).

Each file's layout is read from its first row. A file whose layout cannot serve ``data.kind`` (KTO rows for pairs,
pairs for KTO without ``kto_from_pairs``, preference rows without ``rejected``) is one :class:`DataError`
(:func:`check_layout` finds it before any model loads); bad rows are :class:`Reject` rows with ``file:line`` as
everywhere else, among them ``prompt_mismatch`` (the two conversations differ before the last answer) and
``identical_completions``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kullm.config import ConfigError
from kullm.data.conversations import (
    ASSISTANT,
    OPENAI_ROLES,
    SHAREGPT_ROLES,
    USER,
    Turn,
    check_turns,
    parse_turns,
    unencodable,
)
from kullm.data.records import Fields, ReadOptions, ReadReport, write_rejects
from kullm.data.sources import BOM, DataError, Reject, SourceReport, data_files, is_saved_dataset, read_rows

log = logging.getLogger(__name__)

KINDS = ("sft", "pairs", "kto")  # data.kind: what the encoded rows are (the objective's data)
PAIRS, KTO = "pairs", "kto"
# The knobs of preference data users type (kullm.config.validate collects this table).
SCHEMA: dict[str, Any] = {"data.kind": KINDS, "data.kto_from_pairs": bool}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")  # a KTO label written as text (a CSV cell)


def check_config(cfg: Any) -> None:
    """Preference rows (``data.kind``, or in kullm-train the objective's ``objective.data``) are neither packed nor
    trained on their prompt: refuse both, naming the key."""
    from omegaconf import OmegaConf

    kind = OmegaConf.select(cfg, "objective.data", default=None) or OmegaConf.select(cfg, "data.kind", default=None)
    if kind not in (PAIRS, KTO):
        return
    if OmegaConf.select(cfg, "data.packing", default=False):
        raise ConfigError(f"data.packing=true: {kind} rows are not packed; set data.packing=false")
    if OmegaConf.select(cfg, "data.train_on_inputs", default=False):
        raise ConfigError(f"data.train_on_inputs=true: {kind} rows train only the answers, never the prompt")


@dataclass(frozen=True)
class PairRecord:
    """A preference pair: the prompt's turns (ending with a user turn), the preferred and the other answer.

    ``flat``: the prompt was one string (rendered as the single-turn SFT prompt, exactly as a flat SFT row).
    """

    id: str
    prompt: tuple[Turn, ...]
    chosen: str
    rejected: str
    source: str = ""
    flat: bool = True

    @property
    def instruction(self) -> str:
        """The first user turn (what the evaluation-set overlap check compares)."""
        return next(text for role, text in self.prompt if role == USER)

    @property
    def content(self) -> tuple:
        return (self.prompt, self.chosen, self.rejected)


@dataclass(frozen=True)
class KtoRecord:
    """An unpaired example for KTO: the prompt's turns, one answer, and whether it is desirable."""

    id: str
    prompt: tuple[Turn, ...]
    completion: str
    label: bool
    source: str = ""
    flat: bool = True

    @property
    def instruction(self) -> str:
        return next(text for role, text in self.prompt if role == USER)

    @property
    def content(self) -> tuple:
        return (self.prompt, self.completion, self.label)


PrefRecord = PairRecord | KtoRecord


def layout_of(obj: Any, f: Fields) -> str:
    """``pairs``, ``kto`` or ``other``: which preference layout a row is in, by its fields."""
    if isinstance(obj, Mapping):
        if f.chosen in obj or f.rejected in obj:
            return PAIRS
        if f.completion in obj or f.label in obj:
            return KTO
    return "other"


def _check_file_layout(layout: str, obj: Any, file: str, data: Mapping[str, Any], f: Fields) -> None:
    """One error line when a file's first row shows it cannot serve ``data.kind``."""
    kind = data["kind"]
    if layout == "other":
        want = f"{f.prompt}/{f.chosen}/{f.rejected}" if kind == PAIRS else f"{f.prompt}/{f.completion}/{f.label}"
        keys = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, Mapping) else type(obj).__name__
        raise DataError(
            f"{file}: data.kind={kind} needs {want} rows; the first row has {keys} (data.fields names them)"
        )
    if layout == PAIRS and f.rejected not in obj:
        raise DataError(
            f"{file}: {f.rejected}: preference rows need a {f.rejected!r} field beside {f.chosen!r}; the first row has "
            f"none (name it with data.fields.rejected=...)"
        )
    if layout == PAIRS and f.chosen not in obj:
        raise DataError(f"{file}: {f.chosen}: preference rows need a {f.chosen!r} field; the first row has none")
    if kind == PAIRS and layout == KTO:
        raise DataError(
            f"{file}: unpaired {f.prompt}/{f.completion}/{f.label} rows cannot make preference pairs: "
            "train them with objective=kto"
        )
    if kind == KTO and layout == PAIRS and not data["kto_from_pairs"]:
        raise DataError(
            f"{file}: paired {f.prompt}/{f.chosen}/{f.rejected} rows, but data.kind=kto (objective=kto) trains on "
            "unpaired rows: set data.kto_from_pairs=true to split each pair into a desirable and an undesirable row"
        )


def check_layout(data: Mapping[str, Any]) -> None:
    """Fail fast, before any model loads, on a local source whose first row cannot serve ``data.kind`` (and on
    preference pairs given to an SFT run).

    Each file's first readable row is looked at. A hub dataset is checked when it is read (:func:`read_preference`),
    not here: this never downloads.
    """
    p = Path(str(data["path"])).expanduser()
    if data["source"] == "hub" or not p.exists():
        return
    f = ReadOptions.training(data).fields
    for file in [p] if is_saved_dataset(p) else data_files(p):
        rows = read_rows(file, data["split"], data["revision"], "files", SourceReport())
        row = next((r for r in rows if r.bad is None), None)
        if row is None:
            continue
        where = row.source.rsplit(":", 1)[0]
        if data["kind"] in (PAIRS, KTO):
            _check_file_layout(layout_of(row.obj, f), row.obj, where, data, f)
        elif _only_pairs(row.obj, f):
            raise DataError(
                f"{where}: preference pairs ({f.prompt}/{f.chosen}/{f.rejected}) are not instruction rows: train them "
                "with objective=dpo|ipo|orpo|simpo (data.kind=pairs), or kullm-prepare data.kind=pairs"
            )


def _only_pairs(obj: Any, f: Fields) -> bool:
    """A paired row with nothing SFT reads (UltraFeedback's rows also carry ``messages``: those are SFT rows too)."""
    sft_keys = (f.instruction, f.messages, f.conversations)
    return layout_of(obj, f) == PAIRS and not any(k in obj for k in sft_keys)


def read_preference(
    data: Mapping[str, Any], rejects_path: str | Path | None = None
) -> tuple[list[PrefRecord], ReadReport]:
    """Read and check every row of ``data.path`` as ``data.kind`` (``pairs`` or ``kto``) rows.

    Pairs under ``kind=kto`` (with ``kto_from_pairs``) stay pairs here: :func:`kto_rows` splits them. Bad rows are
    counted by reason (``policy=skip``, written to ``rejects_path``) or stop the run (``policy=strict``).
    """
    o = ReadOptions.training(data)
    f = o.fields
    report = ReadReport()
    records: list[PrefRecord] = []
    ids: set[str] = set()
    contents: set[tuple] = set()
    layouts: dict[str, str] = {}
    for row in read_rows(data["path"], o.split, o.revision, o.source, report):
        report.rows += 1
        file = row.source.rsplit(":", 1)[0]
        try:
            if row.bad is not None:
                raise row.bad
            if file not in layouts:
                layouts[file] = layout_of(row.obj, f)
                _check_file_layout(layouts[file], row.obj, file, data, f)
            csv = file.endswith(".csv")
            rid = _row_id(row.obj, f) or row.default_id or row.source.rsplit("/", 1)[-1]
            if layouts[file] == PAIRS:
                prompt, chosen, rejected, flat = parse_pair(row.obj, f, o.roles, csv=csv)
                rec: PrefRecord = PairRecord(rid, prompt, chosen, rejected, row.source, flat)
            else:
                prompt, completion, label, flat = parse_kto(row.obj, f, o.roles, csv=csv)
                rec = KtoRecord(rid, prompt, completion, label, row.source, flat)
        except Reject as bad:
            report.reject(bad, row, o.policy)
            continue
        if o.drop_duplicates and rec.content in contents:
            report.duplicates += 1
            continue
        contents.add(rec.content)
        if rec.id in ids:
            new = f"{rec.id}#{_digest(rec.content)[:8]}"
            k = 1
            while (candidate := new if k == 1 else f"{new}~{k}") in ids:
                k += 1
            report.renamed.append((rec.source, rec.id, candidate))
            rec = replace(rec, id=candidate)
        ids.add(rec.id)
        records.append(rec)
    report.records = len(records)
    report.conversations = sum(1 for r in records if not r.flat)
    if report.rejects:
        log.warning(
            "%d of %d preference rows rejected (%s)",
            report.n_rejected,
            report.rows,
            ", ".join(f"{k}={v}" for k, v in sorted(report.rejected.items())),
        )
        if rejects_path is not None:
            write_rejects(report.rejects, rejects_path)
    return records, report


def kto_rows(records: Sequence[PrefRecord]) -> list[KtoRecord]:
    """KTO rows: a pair becomes its chosen answer (desirable, id ``<id>:chosen``) and its rejected one
    (undesirable, ``<id>:rejected``); KTO rows stay as they are."""
    out: list[KtoRecord] = []
    for r in records:
        if isinstance(r, KtoRecord):
            out.append(r)
            continue
        out.append(KtoRecord(f"{r.id}:chosen", r.prompt, r.chosen, True, r.source, r.flat))
        out.append(KtoRecord(f"{r.id}:rejected", r.prompt, r.rejected, False, r.source, r.flat))
    return out


# --- rows -----------------------------------------------------------------------------------------------------


def _digest(content: tuple) -> str:
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def _row_id(obj: Any, f: Fields) -> str:
    if not isinstance(obj, Mapping):
        raise Reject("not_an_object", "<row>", f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get(f.id)
    if rid is None:
        return ""
    if not isinstance(rid, (str, int)):
        raise Reject("not_a_string", f.id, f"expected a string or integer id, got {type(rid).__name__}")
    return str(rid)


def _string(value: Any, key: str) -> str:
    """A text field: a non-empty string that UTF-8 can hold (CRLF and a leading BOM repaired)."""
    if not isinstance(value, str):
        raise Reject("not_a_string", key, f"expected a string, got {type(value).__name__}")
    if (why := unencodable(value)) is not None:
        raise Reject("lone_surrogate", key, why)
    if not value.strip():
        raise Reject("empty_field", key, f"{key!r} is empty")
    return value.replace("\r\n", "\n").removeprefix(BOM)


def _turn_list(value: Any, csv: bool) -> list | None:
    """``value`` as a list of turns, or ``None`` when it is a plain text (in CSV, a JSON list of turn objects)."""
    if isinstance(value, list):
        return value
    if csv and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return None
        if isinstance(parsed, list) and parsed and all(isinstance(t, Mapping) for t in parsed):
            return parsed
    return None


def _format(turns: list) -> str:
    """``messages`` (role/content) or ``sharegpt`` (from/value), by the first turn's keys."""
    first = turns[0] if turns and isinstance(turns[0], Mapping) else {}
    return "sharegpt" if "from" in first and "role" not in first else "messages"


def _role(item: Any, fmt: str, roles: Mapping[str, str] | None) -> str | None:
    names = {**(SHAREGPT_ROLES if fmt == "sharegpt" else OPENAI_ROLES), **(roles or {})}
    name = item.get("from" if fmt == "sharegpt" else "role") if isinstance(item, Mapping) else None
    return names.get(name, names.get(name.lower())) if isinstance(name, str) else None


def _prompt_turns(obj: Mapping[str, Any], f: Fields, roles, csv: bool) -> tuple[tuple[Turn, ...], bool]:
    """The prompt field as turns ending with a user turn, and whether it was one string."""
    if obj.get(f.prompt) is None:
        raise Reject("missing_field", f.prompt, f"no {f.prompt!r} field")
    turns = _turn_list(obj[f.prompt], csv)
    if turns is None:
        return ((USER, _string(obj[f.prompt], f.prompt)),), True
    fmt = _format(turns)
    parsed = parse_turns({f.prompt: turns}, fmt, key=f.prompt, roles=roles, open_end=True)
    if parsed[-1][0] != USER:
        raise Reject(
            "not_ending_in_user", f"{f.prompt}[{len(parsed) - 1}]", "a prompt ends with the user turn to answer"
        )
    return parsed, False


def _answer_turns(obj: Mapping[str, Any], key: str, f: Fields, roles, csv: bool) -> tuple[Turn, ...] | str:
    """A completion field: its text, or the whole conversation it holds (the prompt's turns put before an answer
    given alone)."""
    value = obj.get(key)
    if value is None:
        raise Reject("missing_field", key, f"no {key!r} field")
    turns = _turn_list(value, csv)
    if turns is None:
        return _string(value, key)
    if not turns:
        raise Reject("empty_conversation", key, "the conversation has no turn")
    fmt = _format(turns)
    if _role(turns[0], fmt, roles) == ASSISTANT:  # only the answer: the prompt field holds what it answers
        if len(turns) != 1:
            raise Reject("bad_turns", f"{key}[1]", "an answer given apart from its prompt is one assistant turn")
        prompt, _ = _prompt_turns(obj, f, roles, csv)
        content_key = "value" if fmt == "sharegpt" else "content"
        text = _string(turns[0].get(content_key), f"{key}[0].{content_key}")
        full = (*prompt, (ASSISTANT, text))
        check_turns(full, key)
        return full
    return parse_turns({key: turns}, fmt, key=key, roles=roles)


def parse_pair(
    obj: Any, f: Fields = Fields(), roles: Mapping[str, str] | None = None, *, csv: bool = False
) -> tuple[tuple[Turn, ...], str, str, bool]:
    """``(prompt turns, chosen, rejected, flat)`` of one paired row; :class:`Reject` naming the field otherwise."""
    _row_id(obj, f)
    chosen = _answer_turns(obj, f.chosen, f, roles, csv)
    rejected = _answer_turns(obj, f.rejected, f, roles, csv)
    if isinstance(chosen, str) != isinstance(rejected, str):
        text, turns = (f.chosen, f.rejected) if isinstance(chosen, str) else (f.rejected, f.chosen)
        raise Reject("mixed_pair", text, f"{text!r} is a text but {turns!r} is a conversation: give both alike")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, flat = _prompt_turns(obj, f, roles, csv)
        chosen_text, rejected_text = chosen, rejected
    else:
        assert not isinstance(chosen, str) and not isinstance(rejected, str)
        if chosen[:-1] != rejected[:-1]:
            k = next(
                (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)) if a != b),
                min(len(chosen), len(rejected)) - 1,
            )
            raise Reject(
                "prompt_mismatch",
                f"{f.rejected}[{k}]",
                f"turn {k} differs from {f.chosen}[{k}]: both conversations must share all but the last answer",
            )
        prompt, flat = tuple(chosen[:-1]), False
        chosen_text, rejected_text = chosen[-1][1], rejected[-1][1]
    if chosen_text.strip() == rejected_text.strip():
        raise Reject("identical_completions", f.rejected, f"{f.rejected!r} is the same answer as {f.chosen!r}")
    return prompt, chosen_text, rejected_text, flat


def parse_kto(
    obj: Any, f: Fields = Fields(), roles: Mapping[str, str] | None = None, *, csv: bool = False
) -> tuple[tuple[Turn, ...], str, bool, bool]:
    """``(prompt turns, completion, label, flat)`` of one KTO row; :class:`Reject` naming the field otherwise."""
    _row_id(obj, f)
    prompt, flat = _prompt_turns(obj, f, roles, csv)
    value = obj.get(f.completion)
    if value is None:
        raise Reject("missing_field", f.completion, f"no {f.completion!r} field")
    turns = _turn_list(value, csv)
    if turns is None:
        completion = _string(value, f.completion)
    else:
        fmt = _format(turns)
        if len(turns) != 1 or _role(turns[0], fmt, roles) != ASSISTANT:
            raise Reject("bad_turns", f.completion, "a completion is a text or one assistant turn")
        key = "value" if fmt == "sharegpt" else "content"
        completion = _string(turns[0].get(key), f"{f.completion}[0].{key}")
    return prompt, completion, _label(obj, f), flat


def _label(obj: Mapping[str, Any], f: Fields) -> bool:
    value = obj.get(f.label)
    if value is None:
        raise Reject("missing_field", f.label, f"no {f.label!r} field")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise Reject("not_a_bool", f.label, f"expected true or false, got {value!r}")
