"""File runs: an answer for every record of a JSONL file, resumable.

A run goes through the file in windows of ``WINDOW_BATCHES`` batches and appends one JSON line per record, in input
order, as each window finishes; a re-run with the same ``output_file`` skips the ids already there, so a killed run
resumes (with the same generation settings: :func:`check_settings`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.data.conversations import as_messages, split_reference
from kullm.data.records import ReadOptions, Record, read_records, write_rejects
from kullm.data.sources import DataError, Reject, check_source
from kullm.inference.generator import Generator, seed_everything
from kullm.resumable import AppendLog, read_done
from kullm.untrusted import TemplateBoundError

log = logging.getLogger(__name__)

# settings that may change between a run and its resumption without changing the answers
RESUMABLE_KEYS = ("batch_size",)
# a file run generates this many batches at a time (sorted by length among themselves) and then appends their rows
# in input order: the output file follows the input file, and a kill loses at most the window in progress
WINDOW_BATCHES = 4


def check_settings(path: Path, done: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]) -> None:
    """Refuse to resume a file that was written with other generation settings (one file, one set of settings)."""

    def key(s: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in s.items() if k not in RESUMABLE_KEYS}

    for rid, row in done.items():
        old = row.get("generation") or {}
        if key(old) != key(settings):
            diff = {k: (old.get(k), settings.get(k)) for k in key({**old, **settings}) if old.get(k) != settings.get(k)}
            raise ValueError(
                f"{path}: id {rid} was generated with other settings {diff} (old, new): "
                "resume with the same settings, or write to another output_file"
            )


def run_file(
    generator: Generator,
    input_file: str | Path,
    output_file: str | Path,
    *,
    fields: Mapping[str, str] | None = None,
    policy: str = "skip",
    batch_size: int | None = None,
    progress: bool = True,
    roles: Mapping[str, str] | None = None,
) -> Path:
    """Generate an answer for every record of ``input_file`` not yet in ``output_file``, appending in input order as
    each window of ``WINDOW_BATCHES`` batches finishes.

    Flat and self-instruct rows give ``{id, instruction, input, response}`` rows; conversations (OpenAI
    ``messages`` / ShareGPT, ``roles`` naming extra ShareGPT roles) give ``{id, messages, response}`` with
    ``messages`` the history the answer follows (system and turns up to the last user turn) and ``reference`` the
    conversation's own last assistant turn, when it has one. A conversation the template cannot render (a
    single-turn template, no ``chat_template``) is a reject like a malformed row.
    """
    from tqdm.auto import tqdm

    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    rejects = output_file.with_name(output_file.stem + ".rejects.jsonl")
    check_source(input_file, "files")
    records, report = read_records(input_file, ReadOptions.prompts(fields, policy, roles))
    records = _renderable(generator, records, report, policy)
    if report.rejects:
        write_rejects(report.rejects, rejects)
    if not records:
        raise DataError(
            f"{input_file}: no usable row ({report.n_rejected} rejected: {dict(report.rejected)}; see {rejects})"
        )
    for reject in report.rejects:
        log.warning("skipped %s", reject)
    settings = {**generator.settings, "model": generator.label}
    done = read_done(output_file, "response")
    check_settings(output_file, done, settings)
    todo = [r for r in records if r.id not in done]
    n_done = len(records) - len(todo)
    log.info("%s: %d records, %d already in %s, %d to go", input_file, len(records), n_done, output_file, len(todo))
    bar = tqdm(total=len(records), initial=n_done, unit="rec", disable=not progress)
    window = max(int(batch_size or generator.settings["batch_size"] or 1), 1) * WINDOW_BATCHES
    with AppendLog(output_file) as out:
        for start in range(0, len(todo), window):  # input order between windows, length order inside each
            part = todo[start : start + window]
            answers = generator.generate(part, batch_size=batch_size, on_batch=lambda i, _: bar.update(len(i)))
            for rec, answer in zip(part, answers, strict=True):
                out.write({**response_row(rec, answer), "generation": settings})
    bar.close()
    if report.rejects:
        log.warning("%d bad row(s) skipped; see %s", report.n_rejected, rejects)
    return output_file


def response_row(rec: Record, answer: str) -> dict[str, Any]:
    """What a file run writes for one record (without the settings): the id, what was asked, the answer."""
    if not rec.turns:
        return {"id": rec.id, "instruction": rec.instruction, "input": rec.input, "response": answer}
    history, reference = split_reference(rec.turns)
    row = {"id": rec.id, "messages": as_messages(history), "response": answer}
    return row if reference is None else {**row, "reference": reference}


def _renderable(generator: Generator, records: list[Record], report, policy: str) -> list[Record]:
    """The records whose prompt the generator can render; the others become rejects (``unrenderable``)."""
    from jinja2 import TemplateError

    kept = []
    for rec in records:
        try:
            generator.render(rec)
        except TemplateBoundError:  # the template's fault, not the row's: every row would hit it
            raise
        except (TemplateError, ValueError) as e:
            field = "messages" if rec.turns else "instruction"
            if policy == "strict":
                raise DataError(f"{rec.source}: {field}: unrenderable: {e}") from None
            report.rejected["unrenderable"] += 1
            report.rejects.append(Reject("unrenderable", field, str(e), rec.source, json.dumps(rec.id)))
            continue
        kept.append(rec)
    return kept


def generate_file(cfg: DictConfig) -> Path:
    """Answer every record of ``cfg.input_file`` into ``cfg.output_file`` (resuming it); return the output path."""
    if not cfg.input_file:
        raise ValueError("generate_file needs input_file=<jsonl>")
    output = Path(cfg.output_file or Path(cfg.output_dir) / "responses.jsonl")
    check_source(cfg.input_file, "files")  # before the model loads
    generator = Generator.from_config(cfg)
    seed_everything(cfg.generation.seed)
    fields = OmegaConf.to_container(cfg.fields, resolve=True) if cfg.fields else None
    roles = OmegaConf.to_container(cfg.roles, resolve=True) if cfg.roles else None
    return run_file(generator, cfg.input_file, output, fields=fields, policy=cfg.policy or "skip", roles=roles)
