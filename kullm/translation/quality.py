"""Quality gates over one translated field: each a named verdict with its threshold in ``conf/translate.yaml``
(``qc.<gate>``), acting as a reject (the row goes to ``rejects.jsonl``), a flag (kept, the verdict recorded on the
row) or off.

* ``not_korean``: the output's letters are less than ``min_hangul`` Hangul, or the language-ID verdict
  (:func:`kullm.language.purity`, lingua) is not Korean — an English answer, a text left untranslated in part.
* ``untranslated``: the output is the source, unchanged.
* ``refusal``: the output refuses ("죄송하지만…", "I can't help with that") where the source does not.
* ``answered``: an LLM that answered the text instead of translating it: a question whose translation is no
  question, or an output ``max_ratio`` times longer than the source.
* ``truncated``: the output stops short: it is empty, shorter than ``min_ratio`` of the source, or the source ends a
  sentence and the output ends mid-word.

Lengths and languages are measured on the words a translator saw (spans masked out: code is neither Korean nor
English), and only where there are enough of them to judge (``min_chars``, ``min_letters``). A sixth verdict,
``inadequate``, comes from back-translating a sample (:mod:`kullm.translation.adequacy`, ``qc.adequacy``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kullm.language import purity, script_of

GATES = ("not_korean", "untranslated", "refusal", "answered", "truncated")
ACTIONS = ("reject", "flag", "off")
# The qc.* knobs (kullm.config.validate collects these tables).
SCHEMA: dict[str, Any] = {
    **{f"qc.{g}.action": ACTIONS for g in GATES},
    "qc.not_korean.min_hangul": float,
    "qc.not_korean.min_letters": int,
    "qc.not_korean.language_id": bool,
    "qc.answered.max_ratio": float,
    "qc.truncated.min_ratio": float,
    "qc.min_chars": int,
    "qc.adequacy.action": ACTIONS,
    "qc.adequacy.sample": int,
    "qc.adequacy.min_similarity": float,
    "qc.adequacy.seed": int,
}
MINIMUM: dict[str, float] = {
    "qc.answered.max_ratio": 1.0,
    "qc.not_korean.min_letters": 1,
    "qc.min_chars": 0,
    "qc.adequacy.sample": 0,
}
RANGE: dict[str, str] = {
    "qc.not_korean.min_hangul": "[0, 1]",
    "qc.truncated.min_ratio": "[0, 1)",
    "qc.adequacy.min_similarity": "[0, 1]",
}

# Refusals and meta-replies of an LLM translator, English and Korean (lower-cased substrings).
REFUSALS = (
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "i can not",
    "i won't",
    "as an ai",
    "as a language model",
    "i'm unable",
    "i am unable",
    "죄송하지만",
    "죄송합니다",
    "번역할 수 없",
    "번역해 드릴 수 없",
    "도와드릴 수 없",
    "제공할 수 없",
    "ai 언어 모델",
    "언어 모델로서",
    "ai로서",
)
# How a source text refuses, in English (a refusal translated is a translation).
SOURCE_REFUSALS = ("sorry", "cannot", "can't", "can not", "unable", "won't", "as an ai", "language model")
SENTENCE_END = re.compile(r"[.!?。？！…]\s*$")
KOREAN_END = re.compile(r"(?:[.!?。？！…:;)\]\"'”’」』>*`~]|[다요죠까네오라음임함됨]|\d)\s*$")
QUESTION = re.compile(r"\?\s*[\"'”’)\]]*\s*$")


@dataclass(frozen=True)
class Verdict:
    """One gate's finding on one field: ``gate`` (the reason name), what it measured, and its action."""

    gate: str
    action: str  # reject | flag
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"gate": self.gate, "action": self.action, "detail": self.detail}


def check(source: str, output: str, qc: Mapping[str, Any]) -> list[Verdict]:
    """The verdicts of every gate that is not off and finds a fault in ``output`` (a field's translation, spans
    masked out) against ``source`` (the same, in the source); empty when the field passes."""
    found: list[Verdict] = []

    def add(gate: str, detail: str) -> None:
        action = qc[gate]["action"]
        if action != "off":
            found.append(Verdict(gate, action, detail))

    src, out = source.strip(), output.strip()
    if not _letters(src):
        return found  # nothing to translate (numbers, code, symbols): nothing to judge
    long_enough = len(src) >= int(qc["min_chars"])
    if not out:  # never a silent empty translation
        add("truncated", "the output is empty")
        return found
    if out == src:
        add("untranslated", "the output is the source unchanged")
        return found
    lowered = out.lower()
    refusal = next((p for p in REFUSALS if p in lowered), None)
    if refusal is not None and not any(p in src.lower() for p in SOURCE_REFUSALS):
        add("refusal", f"the output says {refusal!r}, the source does not refuse")
    ratio = len(out) / max(len(src), 1)
    if long_enough and ratio > float(qc["answered"]["max_ratio"]):
        add("answered", f"the output is {ratio:.1f}x the source's length (an answer, not a translation?)")
    elif QUESTION.search(src) and not QUESTION.search(out) and ("?" not in out):
        add("answered", "the source asks a question, the output does not")
    if long_enough and ratio < float(qc["truncated"]["min_ratio"]):
        add("truncated", f"the output is {ratio:.2f}x the source's length")
    elif SENTENCE_END.search(src) and out and not KOREAN_END.search(out) and _letters(out[-1:]):
        add("truncated", f"the source ends a sentence, the output ends mid-word ({out[-12:]!r})")
    nk = qc["not_korean"]
    letters = _letters(out)
    if letters >= int(nk["min_letters"]):
        p = purity(out)
        if p.hangul < float(nk["min_hangul"]):
            add("not_korean", f"{p.hangul:.0%} of its letters are Hangul (language: {p.language})")
        elif bool(nk["language_id"]) and p.language != "ko":
            add("not_korean", f"language ID says {p.language}, not ko")
    elif letters == 0 and _letters(src) >= int(nk["min_letters"]):
        add("not_korean", "the output has no letters")
    return found


def _letters(text: str) -> int:
    return sum(1 for ch in text if script_of(ch) is not None)


def rejections(verdicts: list[Verdict]) -> list[Verdict]:
    """The verdicts that reject their row."""
    return [v for v in verdicts if v.action == "reject"]
