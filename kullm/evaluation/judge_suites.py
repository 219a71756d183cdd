"""Judge-scored chat suites for ``kullm-bench``: LogicKor, KoMT-Bench, K2-Eval and KULLM's G-Eval set.

Each suite reads its questions, reference answers and judge prompt from the files ``scripts/download_data.py``
fetched (pinned commits, sha256-checked; nothing of them is in this repository), generates the model's answers
turn by turn through its served chat template (turn 2's prompt holds the model's own turn-1 answer), has one or
several judges score every turn on the suite's own scale, and reports the scores with bootstrap intervals, the
agreement between judges, and the language purity of the answers.

Files in ``out_dir`` (both append-only, one JSON line per finished item, so a kill loses at most what was in
flight and a rerun continues):

* ``<task>.answers.jsonl``: each question's answers, keyed by the model and generation settings that made them;
* ``<task>.<judge>.judgments.jsonl``: one line per judged turn, keyed by a hash of the exact judge messages and
  the judge. A reply that cannot be parsed is re-asked up to ``max_parse_retries`` times, then written as
  ``status: "failed"`` (counted, never scored, asked again by the next run); a request that fails for good is
  not written (counted as pending), so the next run asks again. A judgment once parsed is never asked again.

The settings of a suite are its entry in ``conf/suite/<suite>.yaml`` (``kind: judge``); which judges score it is
the entry's ``judges`` (``pinned``: the judge its authors ran) unless the run's ``judges`` replaces it.
"""

from __future__ import annotations

import ast
import asyncio
import csv
import hashlib
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.config import defaults
from kullm.errors import KullmError
from kullm.evaluation.agreement import agreement, paired
from kullm.evaluation.geval import JudgePrompt, normalize, parse_scores
from kullm.evaluation.judges import Judge, JudgeError, Reply, build_judge
from kullm.language import SCRIPTS, purity
from kullm.resumable import AppendLog, read_done

log = logging.getLogger(__name__)

DOWNLOAD = "python scripts/download_data.py --only {target}"
Messages = list[dict[str, str]]


class SuiteDataMissing(KullmError, FileNotFoundError):
    """A suite's downloaded files are not there; the message names the command that fetches them."""


class SuiteDataError(KullmError, ValueError):
    """A suite's downloaded file is there but not in the shape the suite reads."""


@dataclass
class Item:
    """One question: its user turns, a reference answer per turn (or None), and the suite's other fields."""

    id: str
    category: str
    turns: list[str]
    references: list[str | None]
    fields: dict[str, Any] = field(default_factory=dict)


# --- the suites -------------------------------------------------------------------------------------------------


class Suite:
    """What differs between judge suites: how questions and prompts are read, the judge messages, the parser, the
    scale and any adjustment of a score (KoMT-Bench's language penalty)."""

    scale: tuple[float, float] = (0.0, 10.0)

    def __init__(self, name: str, cfg: DictConfig) -> None:
        self.name, self.cfg = name, cfg
        self.prompt_texts: list[Any] = []

    def files(self) -> dict[str, Path]:
        return {k: Path(str(v)) for k, v in self.cfg.files.items()}

    def check(self) -> None:
        """Raise :class:`SuiteDataMissing` naming the download command when a file is missing."""
        for path in self.files().values():
            if not path.is_file():
                cmd = DOWNLOAD.format(target=self.cfg.download)
                raise SuiteDataMissing(f"{self.name}: {path} is missing; fetch it with `{cmd}`")

    def load(self) -> list[Item]:
        raise NotImplementedError

    def generation_input(self, item: Item, turn: int, answers: Sequence[str]) -> Messages | tuple[str, str]:
        """The conversation the model answers at ``turn`` (1-based): the user turns so far with its own answers."""
        messages: Messages = []
        for k in range(turn):
            messages.append({"role": "user", "content": item.turns[k]})
            if k < turn - 1:
                messages.append({"role": "assistant", "content": answers[k]})
        return messages

    def judge_messages(self, item: Item, turn: int, answers: Sequence[str]) -> Messages:
        raise NotImplementedError

    def parse(self, reply: str) -> tuple[float, dict[str, float] | None]:
        """The score in a judge's reply (and per-criterion scores, where the suite has them); ``ValueError``."""
        raise NotImplementedError

    def adjust(self, item: Item, turn: int, answer: str, score: float, language: str | None) -> tuple[float, str]:
        """The score as the suite reports it, and a note on what was changed (``""``: nothing)."""
        return score, ""

    def prompt_hash(self) -> str:
        body = json.dumps(self.prompt_texts, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    def in_scale(self, value: float, what: str) -> float:
        lo, hi = self.scale
        if not lo <= value <= hi:
            raise ValueError(f"{what} {value:g} outside {lo:g}-{hi:g}")
        return value


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise SuiteDataError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise SuiteDataError(f"{path}:{lineno}: a row must be a JSON object")
            rows.append(row)
    return rows


def _need(row: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise SuiteDataError(f"{where}: no field {key!r}")
    return row[key]


def _optional(row: Mapping[str, Any], key: str) -> Any:
    """A data row's optional field (``""`` when absent)."""
    return row[key] if key in row else ""


def _turns(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise SuiteDataError(f"{where}: turns must be a non-empty list of strings")
    return value


class LogicKor(Suite):
    """instructkr/LogicKor: 6 categories × 2 turns; the judge's system prompt is ``JUDGE_TEMPLATE`` of the
    downloaded ``templates.py`` and its user message is laid out as the downloaded ``evaluator.py`` builds it (both
    read with ``ast``, never run); turn 1 is judged alone and turn 2 after the whole conversation; the reply's
    ``점수: N`` (0–10) is the score."""

    scale = (0.0, 10.0)
    _SCORE = re.compile(r"점수\s*[:：]\s*([0-9]+(?:\.[0-9]+)?)")

    def load(self) -> list[Item]:
        files = self.files()
        self.system = judge_template(files["template"])
        for key in ("single_turn", "multi_turn"):
            if not isinstance(self.system.get(key), str):
                raise SuiteDataError(f"{files['template']}: JUDGE_TEMPLATE has no {key!r} string")
        self.layout = user_layout(files["evaluator"])
        self.prompt_texts = [self.system, self.layout]
        items = []
        for k, row in enumerate(_read_jsonl(files["questions"]), start=1):
            where = f"{files['questions']}:{k}"
            turns = _turns(_need(row, "questions", where), where)
            refs = list(row.get("references") or [None] * len(turns))
            items.append(Item(str(_need(row, "id", where)), str(_optional(row, "category")), turns, refs))
        return items

    def judge_messages(self, item: Item, turn: int, answers: Sequence[str]) -> Messages:
        lay = self.layout
        blocks = []
        for k in range(turn):
            blocks.append(lay["question" if k == 0 else "follow_up"].format(question=item.turns[k]))
            ref = item.references[k] if k < len(item.references) else None
            if ref:
                blocks.append(lay["reference"].format(reference=ref))
            blocks.append(lay["answer"].format(answer=answers[k]))
        user = "".join(blocks) + lay["tail"].format()
        system = self.system["single_turn" if turn == 1 else "multi_turn"]
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def parse(self, reply: str) -> tuple[float, None]:
        m = self._SCORE.search(normalize(reply).replace("*", ""))
        if not m:
            raise ValueError("no '점수: N' in the reply")
        return self.in_scale(float(m.group(1)), "score"), None


# evaluator.py's names for what goes into its judge message -> the layout's slot names
_SLOTS = {"model_questions": "question", "model_references": "reference", "model_outputs": "answer"}


def user_layout(path: Path) -> dict[str, str]:
    """LogicKor's judge user message, as ``create_answers`` in its ``evaluator.py`` builds it: the f-strings
    assigned or added to ``prompt``, in source order, as format strings with ``{question}``, ``{reference}`` and
    ``{answer}``. Returns the pieces ``question`` (with the text before it), ``reference``, ``answer``,
    ``follow_up`` and ``tail``; the file is parsed with ``ast``, never run."""
    fn = next(
        (n for n in ast.walk(_parse(path)) if isinstance(n, ast.FunctionDef) and n.name == "create_answers"), None
    )
    if fn is None:
        raise SuiteDataError(f"{path}: no function create_answers")
    nodes = [
        n
        for n in ast.walk(fn)
        if isinstance(n, (ast.Assign, ast.AugAssign))
        and any(
            isinstance(t, ast.Name) and t.id == "prompt" for t in getattr(n, "targets", [getattr(n, "target", None)])
        )
    ]
    pieces = [_format_string(n.value, path) for n in sorted(nodes, key=lambda n: (n.lineno, n.col_offset))]
    # the order create_answers writes them: Q1, [ref 1], answer 1, [follow-up Q2, [ref 2], answer 2], the end
    want = ["question:0", "reference:0", "answer:0", "question:1", "reference:1", "answer:1", ""]
    if [slot for _, slot in pieces] != want:
        raise SuiteDataError(f"{path}: create_answers builds its prompt in an unexpected order: {pieces}")
    text = [t for t, _ in pieces]
    if text[1] != text[4] or text[2] != text[5]:
        raise SuiteDataError(f"{path}: create_answers lays out the two turns differently")
    return {"question": text[0], "reference": text[1], "answer": text[2], "follow_up": text[3], "tail": text[6]}


def _format_string(node: ast.expr, path: Path) -> tuple[str, str]:
    """An f-string (or plain string) as a format string with one generic slot, and ``"<slot>:<turn index>"``."""
    parts = node.values if isinstance(node, ast.JoinedStr) else [node]
    out, slot = [], ""
    for part in parts:
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            out.append(part.value.replace("{", "{{").replace("}", "}}"))
            continue
        expr = part.value if isinstance(part, ast.FormattedValue) else None
        if (
            isinstance(expr, ast.Subscript)
            and isinstance(expr.value, ast.Name)
            and expr.value.id in _SLOTS
            and isinstance(expr.slice, ast.Constant)
            and not slot
        ):
            name = _SLOTS[expr.value.id]
            out.append("{" + name + "}")
            slot = f"{name}:{expr.slice.value}"
            continue
        raise SuiteDataError(
            f"{path}:{node.lineno}: a part of the judge prompt kullm cannot read: {ast.dump(part)[:80]}"
        )
    return "".join(out), slot


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, ValueError) as e:
        raise SuiteDataError(f"{path}: not Python ({e})") from None


def judge_template(path: Path) -> dict[str, Any]:
    """The ``JUDGE_TEMPLATE = {...}`` dict literal of a Python file, read with ``ast`` (the file is never run)."""
    for node in _parse(path).body:
        named = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "JUDGE_TEMPLATE" for t in node.targets
        )
        if named:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                break
            if isinstance(value, dict):
                return value
    raise SuiteDataError(f"{path}: no JUDGE_TEMPLATE dict literal")


class KoMTBench(Suite):
    """LG-AI-EXAONE/KoMT-Bench: 80 questions × 2 turns, MT-Bench's single-answer grading (1–10, ``[[N]]``) with
    its Korean judge prompts; categories that need a reference (math, reasoning, coding) get the reference answer;
    a non-Korean answer's score becomes its square root (except the ids whose answer is meant to be non-Korean)."""

    scale = (1.0, 10.0)
    _RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
    _BACKUP = re.compile(r"\[(\d+\.?\d*)\]")

    def load(self) -> list[Item]:
        files = self.files()
        prompts = {str(r.get("name")): r for r in _read_jsonl(files["judge_prompts"])}
        self.prompts = {}
        for role, name in self.cfg.prompts.items():
            row = prompts.get(str(name))
            if row is None or not all(isinstance(row.get(k), str) for k in ("system_prompt", "prompt_template")):
                raise SuiteDataError(f"{files['judge_prompts']}: no judge prompt named {name!r} (for {role})")
            self.prompts[str(role)] = {"system": row["system_prompt"], "user": row["prompt_template"]}
        refs: dict[str, list[str]] = {}
        for k, row in enumerate(_read_jsonl(files["references"]), start=1):
            where = f"{files['references']}:{k}"
            try:
                refs[str(row["question_id"])] = list(row["choices"][0]["turns"])
            except (KeyError, IndexError, TypeError):
                raise SuiteDataError(f"{where}: needs question_id and choices[0].turns") from None
        self.need_ref = {str(c) for c in self.cfg.reference_categories}
        self.exempt = {str(i) for i in self.cfg.penalty_exempt}
        self.prompt_texts = [self.prompts, sorted(self.need_ref)]
        items = []
        for k, row in enumerate(_read_jsonl(files["questions"]), start=1):
            where = f"{files['questions']}:{k}"
            qid = str(_need(row, "question_id", where))
            turns = _turns(_need(row, "turns", where), where)
            category = str(_optional(row, "category"))
            ref = refs.get(qid)
            if category in self.need_ref and ref is None:
                raise SuiteDataError(f"{files['references']}: no reference answer for question {qid} ({category})")
            items.append(Item(qid, category, turns, list(ref or [None] * len(turns))))
        return items

    def judge_messages(self, item: Item, turn: int, answers: Sequence[str]) -> Messages:
        ref = item.category in self.need_ref
        role = ("math" if ref else "general") + ("_multi" if turn > 1 else "")
        p = self.prompts[role]
        if turn == 1:
            slots = {"question": item.turns[0], "answer": answers[0]}
            if ref:
                slots["ref_answer_1"] = item.references[0] or ""
        else:
            slots = {"question_1": item.turns[0], "question_2": item.turns[1]}
            slots |= {"answer_1": answers[0], "answer_2": answers[1]}
            if ref:
                slots |= {"ref_answer_1": item.references[0] or "", "ref_answer_2": item.references[1] or ""}
        try:
            user = p["user"].format(**slots)
        except (KeyError, IndexError, ValueError) as e:
            raise SuiteDataError(f"judge prompt {self.cfg.prompts[role]!r}: cannot fill its template ({e!r})") from None
        return [{"role": "system", "content": p["system"]}, {"role": "user", "content": user}]

    def parse(self, reply: str) -> tuple[float, None]:
        m = self._RATING.search(reply) or self._BACKUP.search(reply)
        if not m:
            raise ValueError("no '[[rating]]' in the reply")
        return self.in_scale(float(m.group(1)), "rating"), None

    def adjust(self, item: Item, turn: int, answer: str, score: float, language: str | None) -> tuple[float, str]:
        if language != "ko" and item.id not in self.exempt:
            return math.sqrt(score), f"sqrt: answer in {language or 'no language'}"
        return score, ""


class K2Eval(Suite):
    """HAERAE-HUB/K2-Eval: Korean-knowledge instructions, each with its own rubric (criteria and the meaning of
    scores 1–5) and a gold reference answer; kullm's rubric prompt (``prompt`` in the suite config) asks for
    ``[RESULT] N``."""

    scale = (1.0, 5.0)
    _RESULT = re.compile(r"\[RESULT\]\s*\**\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)

    def load(self) -> list[Item]:
        path = self.files()["questions"]
        cols = OmegaConf.to_container(self.cfg.columns, resolve=True)
        self.prompt = OmegaConf.to_container(self.cfg.prompt, resolve=True)
        self.prompt_texts = [self.prompt, cols]
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        items = []
        for k, row in enumerate(rows, start=2):  # line 1 is the header
            where = f"{path}:{k}"
            fields = {}
            for slot, col in cols.items():
                if col not in row or row[col] is None:
                    raise SuiteDataError(f"{where}: no column {col!r} (suite columns.{slot})")
                fields[slot] = row[col]
            category = str(_optional(fields, "category"))
            items.append(Item(str(k - 1), category, [fields["instruction"]], [fields["reference"]], fields))
        return items

    def judge_messages(self, item: Item, turn: int, answers: Sequence[str]) -> Messages:
        user = self.prompt["user"].format_map({**item.fields, "response": answers[0]})
        return [{"role": "system", "content": self.prompt["system"]}, {"role": "user", "content": user}]

    def parse(self, reply: str) -> tuple[float, None]:
        m = self._RESULT.search(normalize(reply))
        if not m:
            raise ValueError("no '[RESULT] N' in the reply")
        return self.in_scale(float(m.group(1)), "score"), None


class GEval(Suite):
    """KULLM's 252 user-oriented instructions judged with kullm's G-Eval prompt and parser
    (:mod:`kullm.evaluation.geval`); a turn's score is the mean of its criteria scaled to 0–100 (the report's
    overall score), and each criterion's mean is reported too."""

    scale = (0.0, 100.0)

    def load(self) -> list[Item]:
        from kullm.data.records import ReadOptions, read_records

        self.geval = JudgePrompt.from_config(defaults(f"judge_prompt/{self.cfg.judge_prompt}"))
        self.prompt_texts = [self.geval.hash()]
        records, _ = read_records(self.files()["questions"], ReadOptions.prompts())
        return [Item(r.id, "", [r.instruction], [None], {"input": r.input}) for r in records]

    def generation_input(self, item: Item, turn: int, answers: Sequence[str]) -> tuple[str, str]:
        return item.turns[0], item.fields["input"]  # rendered as kullm-eval renders it

    def judge_messages(self, item: Item, turn: int, answers: Sequence[str]) -> Messages:
        return self.geval.messages(item.turns[0], item.fields["input"], answers[0])

    def parse(self, reply: str) -> tuple[float, dict[str, float]]:
        parsed = parse_scores(reply, self.geval.criteria)
        if not parsed.ok:
            raise ValueError(parsed.error)
        crits = self.geval.criteria
        overall = sum((parsed.scores[c.name] - c.min) / (c.max - c.min) for c in crits) / len(crits) * 100
        return overall, {c.label: parsed.scores[c.name] for c in crits}


SUITES: dict[str, type[Suite]] = {"logickor": LogicKor, "komt_bench": KoMTBench, "k2_eval": K2Eval, "geval": GEval}


def make_suite(task_cfg: DictConfig) -> Suite:
    fmt = str(task_cfg.format)
    if fmt not in SUITES:
        raise KullmError(f"judge suite format {fmt!r}: choose one of {', '.join(SUITES)}")
    return SUITES[fmt](str(task_cfg.name), task_cfg)


def check_judge_suite(task_cfg: DictConfig) -> None:
    """Before any model loads: the suite's files are downloaded and readable (one ``KullmError`` line if not)."""
    suite = make_suite(task_cfg)
    suite.check()
    suite.load()


# --- generation -------------------------------------------------------------------------------------------------


def generation_settings(task_cfg: DictConfig, cfg: DictConfig | None) -> dict[str, Any]:
    """The run's ``generation`` node (greedy for kullm-bench) with the suite entry's own ``generation`` over it."""
    base = cfg.generation if cfg is not None and cfg.get("generation") is not None else defaults("generation/greedy")
    return OmegaConf.to_container(OmegaConf.merge(base, task_cfg.generation), resolve=True)


def generate_answers(
    suite: Suite, items: Sequence[Item], model: Any, task_cfg: DictConfig, cfg: DictConfig | None, out_dir: Path
) -> dict:
    """Each item's answers (one per turn) by id, generated where the answers file lacks them for this model and
    these settings. Turn ``k`` is generated for every item in batches before turn ``k+1``, whose prompts hold the
    model's own earlier answers."""
    settings = generation_settings(task_cfg, cfg)
    ident = {"model": model.name, "hashes": getattr(model, "hashes", {}), "generation": settings}
    gen_key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = out_dir / f"{suite.name}.answers.jsonl"
    asked = {it.id: _questions_hash(it) for it in items}  # an answer to an edited question is not reused
    done = read_done(path, "answer", key=lambda r: (str(r["id"]), r.get("gen"), r.get("questions")))
    answers = {rid: row["turns"] for (rid, g, q), row in done.items() if g == gen_key and asked.get(rid) == q}
    todo = [it for it in items if it.id not in answers]
    if not todo:
        return answers
    from kullm.chat_template import serving

    log.info("%s: generating %d of %d answers", suite.name, len(todo), len(items))
    generator = model.generator(settings)
    tokenizer = model.tokenizer
    # the model's served template: the tokenizer's own (an adapter's carries the one it was trained on), else the
    # training template made a chat_template for the duration
    prompter = None if getattr(tokenizer, "chat_template", None) else generator.prompter
    partial: dict[str, list[str]] = {it.id: [] for it in todo}
    n_turns = max(len(it.turns) for it in todo)
    with serving(tokenizer, prompter), AppendLog(path) as out:
        for turn in range(1, n_turns + 1):
            batch = [it for it in todo if len(it.turns) >= turn]
            inputs = [suite.generation_input(it, turn, partial[it.id]) for it in batch]

            def finished(idx: list[int], texts: list[str], batch=batch, turn=turn) -> None:
                for i, text in zip(idx, texts, strict=True):
                    it = batch[i]
                    partial[it.id].append(text)
                    if len(it.turns) == turn:  # its last turn: the row is complete
                        out.write({"id": it.id, "gen": gen_key, "questions": asked[it.id], "turns": partial[it.id]})
                        answers[it.id] = partial[it.id]

            generator.generate(inputs, on_batch=finished)
    return answers


def _questions_hash(item: Item) -> str:
    return hashlib.sha256(json.dumps(item.turns, ensure_ascii=False).encode()).hexdigest()[:12]


# --- judging ----------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One judgment to make: an item's turn, the judge messages, and the hash that names what was judged."""

    id: str
    item: Item
    turn: int
    messages: Messages


def judge_identity(judge_cfg: Mapping[str, Any]) -> tuple[str, str]:
    name = str(judge_cfg["name"])
    model = judge_cfg["model"]
    if isinstance(model, Mapping):
        model = model["name_or_path"]
    return name, str(model)


def judge_label(identity: tuple[str, str]) -> str:
    """A file-name-safe label of a judge: its model's last path part."""
    return re.sub(r"[^\w.-]", "_", identity[1].rstrip("/").rsplit("/", 1)[-1]).lstrip(".") or identity[0]


def judge_labels(judges: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each judge's label, made unique (``-2``, ``-3`` after a repeated one): it names files and metrics."""
    labels: list[str] = []
    for j in judges:
        label = base = judge_label(judge_identity(j))
        n = 1
        while label in labels:
            n += 1
            label = f"{base}-{n}"
        labels.append(label)
    return labels


def unit_key(unit: Unit, identity: tuple[str, str]) -> str:
    body = json.dumps([unit.messages, *identity], ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def resolve_judges(task_cfg: DictConfig, cfg: DictConfig) -> list[DictConfig]:
    """The judge nodes to run: ``judges`` of the run (``kullm-bench judges=[...]``) or else the suite's; each entry
    is ``pinned`` (the suite's own judge, as its authors ran it) or a ``judge=`` node (``name: openai | hf``)."""
    chosen = cfg.get("judges") if cfg is not None else None
    entries = chosen if chosen is not None else task_cfg.judges
    if isinstance(entries, (str, DictConfig, Mapping)):
        entries = [entries]
    out = []
    for e in entries:
        if isinstance(e, str):
            if e == "pinned":
                out.append(OmegaConf.create(OmegaConf.to_container(task_cfg.judge, resolve=True)))
            elif e in ("openai", "hf"):
                out.append(defaults(f"judge/{e}"))
            else:
                raise KullmError(f"judges: {e!r} is not 'pinned', 'openai', 'hf' or a judge node")
        else:
            node = OmegaConf.create(OmegaConf.to_container(e, resolve=True) if not isinstance(e, dict) else e)
            if node.get("name") not in ("openai", "hf"):
                raise KullmError(f"judges: a judge node needs name: openai or hf, got {node.get('name')!r}")
            out.append(node)
    if len({judge_identity(j) for j in out}) != len(out):
        raise KullmError("judges: the same judge (name and model) is listed twice")
    return out


class ChatHFJudge:
    """A local causal LM that answers a judge prompt in free text (greedy), for suites whose judges write a
    verdict and a score: the reply is parsed like an API judge's."""

    name = "hf"

    def __init__(self, cfg: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
        from kullm.inference.generator import Generator
        from kullm.modeling import load_model, load_tokenizer
        from kullm.templates import Prompter

        cfg = defaults("judge/hf", cfg)
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        self.model = str(model_cfg["name_or_path"])
        tokenizer = load_tokenizer(model_cfg)
        lm = load_model(model_cfg).to(cfg.device or "cpu").eval()
        prompter = Prompter.from_config(defaults("template/kullm"))  # the prompt of a tokenizer without a template
        self.generator = Generator(lm, tokenizer, prompter, settings, self.model)
        self._lock = asyncio.Lock()

    async def reply(self, messages: Messages) -> Reply:
        if not getattr(self.generator.tokenizer, "chat_template", None):  # no template: one prompt of it all
            messages = [{"role": "user", "content": "\n\n".join(m["content"] for m in messages)}]
        async with self._lock:
            text = await asyncio.to_thread(lambda: self.generator.generate([messages])[0])
        return Reply(text)

    async def aclose(self) -> None:
        return None


def build_suite_judge(suite: Suite, judge_cfg: DictConfig, task_cfg: DictConfig) -> Judge:
    if judge_cfg.name == "hf" and not isinstance(suite, GEval):
        settings = OmegaConf.merge(defaults("generation/greedy"), task_cfg.judge_generation)  # greedy, as temperature 0
        return ChatHFJudge(judge_cfg, OmegaConf.to_container(settings, resolve=True))
    prompt = suite.geval if isinstance(suite, GEval) else None
    return build_judge(judge_cfg, prompt)  # the G-Eval hf judge scores its criteria exactly (kullm.evaluation.judges)


async def judge_units(
    suite: Suite, units: Sequence[Unit], judge_cfg: DictConfig, task_cfg: DictConfig, path: Path
) -> tuple[dict[str, dict], dict[str, str]]:
    """The judgments of ``units`` by one judge: those in ``path`` already, and the rest asked now (each appended as
    it arrives). Returns ``(judgments by unit id, pending: unit id -> why it is not judged yet)``."""
    identity = judge_identity(judge_cfg)
    keys = {u.id: unit_key(u, identity) for u in units}
    have = read_judgments(path, keys)
    todo = [u for u in units if have.get(u.id, {}).get("status") != "ok"]  # failed parses are asked again
    pending: dict[str, str] = {}
    if not todo:
        return have, pending
    judge = build_suite_judge(suite, judge_cfg, task_cfg)
    retries = int(task_cfg.max_parse_retries)
    tasks = [asyncio.ensure_future(_judge_one(suite, judge, u, keys[u.id], retries)) for u in todo]
    try:
        with AppendLog(path) as out:
            for fut in asyncio.as_completed(tasks):
                uid, result = await fut
                if isinstance(result, JudgeError):
                    if result.fatal:
                        raise result
                    pending[uid] = str(result)
                    log.warning("%s: %s: not judged: %s", suite.name, uid, result)
                    continue
                out.write(result)
                have[uid] = result
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await judge.aclose()
    return have, pending


def read_judgments(path: Path, keys: Mapping[str, str]) -> dict[str, dict]:
    """The judgment of each unit id in ``path`` whose key is the unit's current one: an ok one if any (a unit is
    never asked again once judged), else the last failed one."""
    rows = read_done(path, "judgment", key=lambda j, n=itertools.count(): next(n))  # every line, in file order
    have: dict[str, dict] = {}
    for j in rows.values():
        uid = str(j.get("id"))
        if keys.get(uid) is None or j.get("key") != keys[uid]:
            continue
        if have.get(uid, {}).get("status") != "ok":
            have[uid] = j
    return have


async def _judge_one(suite: Suite, judge: Judge, unit: Unit, key: str, retries: int) -> tuple[str, dict | JudgeError]:
    attempts, errors = 0, []
    score, detail, reply = None, None, None
    for _ in range(retries + 1):
        try:
            reply = await judge.reply(unit.messages)
        except JudgeError as e:
            e.attempts += attempts
            return unit.id, e
        attempts += reply.attempts
        try:
            score, detail = suite.parse(reply.text)
            break
        except ValueError as e:
            errors.append(str(e))
    ok = score is not None
    return unit.id, {
        "id": unit.id,
        "item": unit.item.id,
        "turn": unit.turn,
        "status": "ok" if ok else "failed",
        "score": score,
        "scores": detail,
        "error": None if ok else errors[-1],
        "parse_errors": errors,
        "raw": reply.text if reply is not None else None,
        "judge": judge.name,
        "model": judge.model,
        "prompt_hash": suite.prompt_hash(),
        "key": key,
        "attempts": attempts,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- the whole suite --------------------------------------------------------------------------------------------


def run_judge_suite(task_cfg: DictConfig, model: Any, cfg: DictConfig | None, out_dir: Path) -> dict[str, Any]:
    """Generate, judge and score one judge suite (resuming from ``out_dir``) for a loaded ``BenchModel``.

    Returns ``{"name", "metrics", "ci", "n", "meta", "failed", "pending", "agreement", "purity"}``: the first
    judge's metrics by name (``score``, ``turn1``, ``turn2``, ``category/<c>``, G-Eval's criteria), every other
    judge's as ``<judge>/<metric>``, percentile-bootstrap intervals over questions, the judgments that could not
    be parsed (``failed``) or were not made (``pending``) summed over judges.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = make_suite(task_cfg)
    suite.check()
    items = suite.load()
    if task_cfg.limit is not None:
        items = items[: int(task_cfg.limit)]
    judges = resolve_judges(task_cfg, cfg)
    answers = generate_answers(suite, items, model, task_cfg, cfg, out_dir)

    units = [
        Unit(f"{it.id}:{t}", it, t, suite.judge_messages(it, t, answers[it.id]))
        for it in items
        for t in range(1, len(it.turns) + 1)
    ]
    languages, pure = answer_purity(items, answers)

    labels = judge_labels(judges)

    async def judge_all() -> list[tuple[dict, dict]]:
        out = []
        for j in judges:
            path = out_dir / f"{suite.name}.{labels[len(out)]}.judgments.jsonl"
            out.append(await judge_units(suite, units, j, task_cfg, path))
        return out

    results = asyncio.run(judge_all())
    metrics: dict[str, float] = {}
    ci: dict[str, list[float]] = {}
    per_judge: dict[str, dict[str, float]] = {}
    meta_judges, failed, pending = [], 0, 0
    for k, (j, (judged, why)) in enumerate(zip(judges, results, strict=True)):
        identity = judge_identity(j)
        label = labels[k]
        scores, notes, n_failed = final_scores(suite, units, judged, answers, languages)
        m, c = summarize(units, scores, task_cfg.bootstrap)
        prefix = "" if k == 0 else f"{label}/"
        metrics |= {prefix + key: v for key, v in m.items()}
        ci |= {prefix + key: v for key, v in c.items()}
        per_judge[label] = scores
        failed += n_failed
        pending += len(why)
        meta_judges.append(
            {
                "judge": identity[0],
                "model": identity[1],
                "label": label,
                "pinned": _same_judge(j, task_cfg.judge),
                "temperature": defaults(f"judge/{identity[0]}", j).get("temperature"),  # hf: greedy (None)
                "judged": len(scores),
                "failed": n_failed,
                "pending": len(why),
                "penalised": notes,
            }
        )
    agree = {
        f"{a} vs {b}": agreement(*paired(per_judge[a], per_judge[b]))
        for i, a in enumerate(labels)
        for b in labels[i + 1 :]
    }
    n_answers = sum(len(answers[it.id]) for it in items)
    return {
        "name": suite.name,
        "metrics": metrics,
        "ci": ci,
        "n": len(items),
        "meta": {
            "format": str(task_cfg.format),
            "scale": list(suite.scale),
            "judges": meta_judges,
            "prompt_hash": suite.prompt_hash(),
            "files": {k: {"path": str(p), "sha256": _sha256(p)} for k, p in suite.files().items()},
            "generation": generation_settings(task_cfg, cfg),
            "turns": n_answers,
        },
        "failed": failed,
        "pending": pending,
        "agreement": agree,
        "purity": pure,
    }


def _same_judge(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return judge_identity(a) == judge_identity(b)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def answer_purity(items: Sequence[Item], answers: Mapping[str, list[str]]) -> tuple[dict[str, str | None], dict]:
    """Each answer's language verdict (by unit id) and the suite's purity: the mean share of each script over the
    answers, and the share of answers whose verdict is Korean."""
    languages: dict[str, str | None] = {}
    sums = dict.fromkeys(SCRIPTS, 0.0)
    korean = n = 0
    for it in items:
        for t, text in enumerate(answers[it.id], start=1):
            p = purity(text)
            languages[f"{it.id}:{t}"] = p.language
            for s in SCRIPTS:
                sums[s] += getattr(p, s)
            korean += p.korean
            n += 1
    shares = {s: (v / n if n else float("nan")) for s, v in sums.items()}
    return languages, {**shares, "korean": korean / n if n else float("nan"), "n": n}


def final_scores(
    suite: Suite,
    units: Sequence[Unit],
    judged: Mapping[str, dict],
    answers: Mapping[str, list[str]],
    languages: Mapping[str, str | None],
) -> tuple[dict[str, float], dict[str, str], int]:
    """Each parsed judgment's score as the suite reports it (KoMT-Bench's penalty applied), the notes of changed
    ones, and how many judgments failed to parse."""
    scores, notes, n_failed = {}, {}, 0
    for u in units:
        j = judged.get(u.id)
        if j is None:
            continue
        if j["status"] != "ok":
            n_failed += 1
            continue
        answer = answers[u.item.id][u.turn - 1]
        value, note = suite.adjust(u.item, u.turn, answer, float(j["score"]), languages.get(u.id))
        scores[u.id] = value
        if note:
            notes[u.id] = note
    return scores, notes, n_failed


def summarize(units: Sequence[Unit], scores: Mapping[str, float], boot: Mapping[str, Any]) -> tuple[dict, dict]:
    """Means over the scored turns: ``score`` (all), ``turn<k>``, ``category/<c>``; and bootstrap intervals of the
    first two kinds, resampling whole questions (fixed seed)."""
    import numpy as np

    groups: dict[str, list[Unit]] = {"score": list(units)}
    for u in units:
        groups.setdefault(f"turn{u.turn}", []).append(u)
        if u.item.category:
            groups.setdefault(f"category/{u.item.category}", []).append(u)
    metrics = {}
    for name, us in groups.items():
        vals = [scores[u.id] for u in us if u.id in scores]
        if vals:
            metrics[name] = float(sum(vals) / len(vals))
    ci = {}
    rng = np.random.default_rng(int(boot["seed"]))
    samples, conf = int(boot["samples"]), float(boot["confidence"])
    for name in [g for g in groups if g == "score" or g.startswith("turn")]:
        per_item: dict[str, list[float]] = {}
        for u in groups[name]:
            if u.id in scores:
                per_item.setdefault(u.item.id, []).append(scores[u.id])
        if not per_item:
            continue
        sums = np.array([sum(v) for v in per_item.values()])
        counts = np.array([len(v) for v in per_item.values()])
        idx = rng.integers(0, len(sums), size=(samples, len(sums)))
        means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
        lo, hi = (1 - conf) / 2 * 100, (1 + conf) / 2 * 100
        ci[name] = [float(np.percentile(means, lo)), float(np.percentile(means, hi))]
    return metrics, ci
