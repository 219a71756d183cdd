"""Conversations → token ids and labels with exact per-turn masks.

A conversation is first rendered into pieces — prompt text, and each assistant turn's content followed by its
end-of-turn token — by one of two renderers:

* :func:`render_with_prompter`: a kullm template (``template=kullm``'s multi-turn form, ``kullm_system``) for base
  models; the end of an assistant turn is the tokenizer's EOS.
* :func:`render_with_tokenizer`: the tokenizer's own ``chat_template`` (``apply_chat_template``). Each assistant
  turn is found by rendering the conversation up to it with the generation prompt: that text must be a prefix of
  the whole conversation's rendering (what a server renders at that turn is what was trained on), the turn's content
  must follow verbatim, then one of the tokenizer's special tokens (the end of turn). A template that breaks any of
  these is named in the reason (``template_not_prefix_stable``, ``template_alters_content``, ``no_end_of_turn``).

Every piece is tokenized on its own and the ids concatenated, so no BPE merge crosses a mask boundary; the first
begins with the BOS the tokenizer's own call would add, unless the template rendered it (one BOS, never two). Labels
are -100 except on trained assistant turns (``train_on``: ``all_assistant``, ``last`` or ``all`` tokens). The invariant
(:func:`check_conversation`): the trained tokens form one run per trained turn, each decoding exactly to that
turn's content plus its end-of-turn token (the last one, when the example was cut at ``cutoff_len``, to a prefix).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kullm.config import defaults
from kullm.data.conversations import ASSISTANT, USER, Turn, as_messages
from kullm.data.sft import COLUMNS, IGNORE_INDEX, MAX_CHARS_PER_TOKEN
from kullm.data.sources import DataError
from kullm.errors import KullmError
from kullm.special_tokens import bos_ids, with_bos
from kullm.untrusted import TemplateBoundError, render_chat

log = logging.getLogger(__name__)

TRAIN_ON = ("all_assistant", "last", "all")
RENDERERS = ("template", "tokenizer")
# The knobs of encoding conversations users type most (kullm.config.validate collects this table).
SCHEMA: dict[str, Any] = {"data.train_on": TRAIN_ON, "data.chat_template": RENDERERS}


class Unrenderable(KullmError, ValueError):
    """A conversation the chosen template cannot render with exact masks; ``reason`` names why.

    Not a :class:`~kullm.data.sources.Reject`: the row was read and is valid, it is this template that cannot render
    it (another could). It is dropped at encoding and counted with the split's invariant drops, by record id.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Piece:
    """Rendered text: a prompt piece (``eot == ""``) or an assistant turn's content and its end-of-turn text."""

    text: str
    assistant: bool = False
    eot: str = ""


def record_turns(record: Any) -> tuple[Turn, ...]:
    """A record's conversation; an instruction row is one user turn (instruction, then its input) and its output."""
    if record.turns:
        return tuple(record.turns)
    user = record.instruction + (f"\n\n{record.input}" if record.input else "")
    return ((USER, user), (ASSISTANT, record.output))


def render_with_prompter(prompter, tokenizer, record: Any) -> list[Piece]:
    """A record rendered by a kullm template: an instruction row exactly as the single-turn path renders it."""
    eos = tokenizer.eos_token
    if not record.turns:
        return [Piece(prompter.render(record.instruction, record.input)), Piece(record.output, True, eos)]
    try:
        raw = prompter.render_turns(record.turns)
    except ValueError as e:
        raise Unrenderable("template_single_turn", str(e)) from None
    return [Piece(text, True, eos) if kind == "assistant" else Piece(text) for kind, text in raw]


def render_with_tokenizer(tokenizer, record: Any) -> list[Piece]:
    """A record rendered by the tokenizer's own chat template, each assistant span found and verified."""
    if not getattr(tokenizer, "chat_template", None):
        raise Unrenderable("no_chat_template", "the tokenizer has no chat_template (use data.chat_template=template)")
    turns = record_turns(record)
    messages = as_messages(turns)
    full = _apply(tokenizer, messages, False)
    specials = sorted(_special_texts(tokenizer), key=len, reverse=True)
    pieces: list[Piece] = []
    pos = 0
    for i, (role, content) in enumerate(turns):
        if role != ASSISTANT:
            continue
        prefix = _apply(tokenizer, messages[:i], True)
        if not full.startswith(prefix) or len(prefix) < pos:
            raise Unrenderable(
                "template_not_prefix_stable",
                f"the prompt for turn {i} (rendered with the generation prompt) is not how the whole conversation "
                "renders it: what a server renders at that turn would differ from what was trained",
            )
        start, end = len(prefix), len(prefix) + len(content)
        if full[start:end] != content:
            raise Unrenderable(
                "template_alters_content",
                f"turn {i}'s content is not rendered verbatim (the template changes it, e.g. strips spaces)",
            )
        eot = next((s for s in specials if full.startswith(s, end)), None)
        if eot is None:
            raise Unrenderable(
                "no_end_of_turn", f"no special token follows turn {i}'s content: {full[end : end + 20]!r}"
            )
        pieces += [Piece(full[pos:start]), Piece(content, True, eot)]
        pos = end + len(eot)
    return pieces


def _apply(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return render_chat(tokenizer, messages, generation_prompt)
    except TemplateBoundError:  # the template's fault, not the row's: every row would hit it
        raise
    except Exception as e:  # jinja raises TemplateError, templates call raise_exception with their own messages
        raise Unrenderable("template_error", f"{type(e).__name__}: {e}") from None


def _special_texts(tokenizer) -> set[str]:
    texts = set(tokenizer.all_special_tokens)
    texts |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return {t for t in texts if t}


def encode_conversations(
    tokenizer, rendered: Sequence[Sequence[Piece]], *, cutoff_len: int, train_on: str = "all_assistant"
) -> dict[str, list]:
    """Token ids, labels and per-example facts for rendered conversations (pieces tokenized one by one).

    ``spans`` holds, per example, the texts the trained assistant runs must decode to (empty for ``all``); ``text``
    the whole rendering (with the BOS kullm put before it); ``keep`` is False when no assistant token survives the
    cut; ``served_differs`` is True when tokenizing the text before the last answer in one piece (as a server does)
    gives other ids than the pieces did (a tokenizer merging across a turn boundary: the example still trains, on
    slightly other ids).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be at least 2, got {cutoff_len}")
    budget = cutoff_len * MAX_CHARS_PER_TOKEN
    texts = [p.text[:budget] for pieces in rendered for p in pieces]
    eots = sorted({p.eot for pieces in rendered for p in pieces if p.assistant})
    flat = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = bos_ids(tokenizer)
    eot_ids = dict(zip(eots, tokenizer(eots, add_special_tokens=False)["input_ids"], strict=True)) if eots else {}
    out: dict[str, list] = {
        k: []
        for k in ("input_ids", "labels", "prompt_len", "response_len", "truncated", "keep", "spans", "text")
    }
    contexts: list[tuple[int, str, int]] = []  # (example, text before the last answer, its token count)
    k = 0
    for pieces in rendered:
        last = max(j for j, p in enumerate(pieces) if p.assistant)
        lead = [] if with_bos(bos, flat[k]) == flat[k] else list(bos)  # none when the template rendered the BOS
        ids: list[int] = list(lead)
        labels: list[int] = list(lead) if train_on == "all" else [IGNORE_INDEX] * len(lead)
        spans: list[str] = []
        n_response = 0
        first_assistant = None
        for j, p in enumerate(pieces):
            t = flat[k] + (eot_ids[p.eot] if p.assistant else [])
            k += 1
            if p.assistant and first_assistant is None:
                first_assistant = len(ids)
            if j == last and first_assistant != len(ids):  # an earlier answer sits inside this turn's context
                contexts.append((len(out["input_ids"]), "".join(q.text + q.eot for q in pieces[:j]), len(ids)))
            trained = train_on == "all" or (p.assistant and (train_on == "all_assistant" or j == last))
            if p.assistant and trained:
                n_response += len(t)
                if train_on != "all":
                    spans.append(p.text + p.eot)
            ids += t
            labels += t if trained else [IGNORE_INDEX] * len(t)
        out["input_ids"].append(ids[:cutoff_len])
        out["labels"].append(labels[:cutoff_len])
        out["prompt_len"].append(len(ids) - n_response)
        out["response_len"].append(n_response)
        out["truncated"].append(len(ids) > cutoff_len)
        trained_kept = any(lab != IGNORE_INDEX for lab in labels[:cutoff_len])
        out["keep"].append(trained_kept and first_assistant is not None and first_assistant < cutoff_len)
        out["spans"].append(spans)
        out["text"].append(_decode(tokenizer, lead) + "".join(p.text + p.eot for p in pieces))
    out["served_differs"] = [False] * len(rendered)
    if contexts:
        whole = tokenizer([c[1][:budget] for c in contexts], add_special_tokens=False)["input_ids"]
        for (n, _, length), served in zip(contexts, whole, strict=True):
            full = out["input_ids"][n] if length <= cutoff_len else None
            out["served_differs"][n] = full is not None and with_bos(bos, served) != full[:length]
    return out


def check_conversation(
    tokenizer,
    input_ids: Sequence[int],
    labels: Sequence[int],
    spans: Sequence[str],
    *,
    train_on: str = "all_assistant",
    text: str = "",
    truncated: bool = False,
) -> str:
    """Check the per-turn masking invariant on one example; ``""`` when it holds, else what is wrong."""
    if len(input_ids) != len(labels):
        return f"{len(input_ids)} input ids but {len(labels)} labels"
    if train_on == "all":
        if list(labels) != list(input_ids):
            return "train_on=all: some position is not trained, or a label differs from its input id"
        got = _decode(tokenizer, input_ids)
        ok = got == text or (truncated and text.startswith(got.rstrip("\ufffd")))
        return "" if ok else f"the example decodes to {got[:60]!r}…, not the rendered conversation {text[:60]!r}…"
    runs: list[list[int]] = []
    prev = IGNORE_INDEX
    for tok_id, lab in zip(input_ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            if lab != tok_id:
                return "a label differs from its input id"
            if prev == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(tok_id)
        prev = lab
    if not runs:
        return "no token is trained"
    if len(runs) > len(spans) or (not truncated and len(runs) != len(spans)):
        return f"{len(runs)} trained span(s), but {len(spans)} trained turn(s)"
    for n, (run, want) in enumerate(zip(runs, spans, strict=False)):
        got = _decode(tokenizer, run)
        if got == want:
            continue
        if truncated and n == len(runs) - 1 and want.startswith(got.rstrip("\ufffd")):
            continue
        return f"trained span {n} decodes to {got[:60]!r}…, not the turn {want[:60]!r}…"
    return ""


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def chat_settings(data: Mapping[str, Any], tokenizer) -> dict[str, Any]:
    """The settings that change how conversations are encoded (for the cache key), from a composed ``data`` node."""
    renderer = data["chat_template"] or "template"
    return {
        "format": data["format"] or "auto",
        "roles": dict(data["roles"] or {}),
        "train_on": data["train_on"] or "all_assistant",
        "chat_template": renderer,
        "tokenizer_chat_template": getattr(tokenizer, "chat_template", None) if renderer == "tokenizer" else None,
    }


def encode_split(records: list, data: Mapping[str, Any], tokenizer, prompter, name: str):
    """Encode one split of conversation records (instruction rows among them as one-turn conversations).

    Same contract as the flat path (:func:`kullm.data.sft.encode_split`): ``(dataset, counts, violations)``; an
    example the template cannot render or whose masks break the invariant is dropped and named (``policy=strict``:
    the first stops the run). The keys a partial ``data`` leaves out are ``conf/data/sample.yaml``'s.
    """
    import datasets

    data = defaults("data/sample", data)
    cutoff = int(data.cutoff_len)
    train_on = data.train_on or "all_assistant"
    if train_on not in TRAIN_ON:
        raise ValueError(f"data.train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if data.train_on_inputs:
        train_on = "all"
    renderer = data.chat_template or "template"
    if renderer not in RENDERERS:
        raise ValueError(f"data.chat_template must be one of {', '.join(RENDERERS)}, got {renderer!r}")
    verify = bool(data.verify)
    strict = data.policy == "strict"

    rendered, ids, bad = [], [], []
    for rec in records:
        try:
            pieces = (
                render_with_tokenizer(tokenizer, rec)
                if renderer == "tokenizer"
                else render_with_prompter(prompter, tokenizer, rec)
            )
        except Unrenderable as e:
            if strict:
                raise DataError(f"{rec.source}: id {rec.id}: {e}") from None
            bad.append(f"{rec.id}: {e}")
            continue
        rendered.append(pieces)
        ids.append(rec.id)
    zero = {"records": len(records), "kept": 0, "truncated": 0, "dropped_prompt_too_long": 0}
    empty = datasets.Dataset.from_dict({c: [] for c in COLUMNS})
    if not rendered:
        return empty, {**zero, "dropped_invariant": len(bad)}, bad
    enc = encode_conversations(tokenizer, rendered, cutoff_len=cutoff, train_on=train_on)
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    truncated = dropped = 0
    differs = [rid for rid, d in zip(ids, enc["served_differs"], strict=True) if d]
    if differs:
        log.warning(
            "%s: %d conversation(s) tokenize differently as one string (as served) than turn by turn (as trained): "
            "the tokenizer merges across a turn boundary, e.g. id %s",
            name,
            len(differs),
            differs[0],
        )
    for n, rid in enumerate(ids):
        if not enc["keep"][n]:
            dropped += 1
            continue
        args = (enc["input_ids"][n], enc["labels"][n], enc["spans"][n])
        problem = verify and check_conversation(
            tokenizer, *args, train_on=train_on, text=enc["text"][n], truncated=enc["truncated"][n]
        )
        if problem:
            if strict:
                raise DataError(f"{name}: the masking invariant fails for id {rid}: {problem}")
            bad.append(f"{rid}: {problem}")
            continue
        truncated += enc["truncated"][n]
        rows["id"].append(rid)
        rows["input_ids"].append(enc["input_ids"][n])
        rows["labels"].append(enc["labels"][n])
        rows["attention_mask"].append([1] * len(enc["input_ids"][n]))
        rows["length"].append(len(enc["input_ids"][n]))
        rows["prompt_len"].append(enc["prompt_len"][n])
        rows["response_len"].append(enc["response_len"][n])
    if dropped:
        log.warning("%s: %d conversations dropped: no assistant token fits in cutoff_len=%d", name, dropped, cutoff)
    counts = {
        "records": len(records),
        "kept": len(rows["id"]),
        "truncated": int(truncated),
        "dropped_prompt_too_long": dropped,
        "dropped_invariant": len(bad),
        "served_context_differs": len(differs),
    }
    ds = datasets.Dataset.from_dict(rows) if rows["id"] else empty
    return ds, counts, bad
