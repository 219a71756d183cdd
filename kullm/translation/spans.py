"""Protected spans: the parts of a text a translator must not touch, masked before sending and restored after.

Fenced and inline code, LaTeX, URLs, e-mail addresses, placeholders (``{name}``, ``{{var}}``, ``%s``, ``%(n)d``,
``<tag>``) and numbers are each replaced by a mask tag ``<x id="N"/>`` (the form every backend carries through:
DeepL's XML tag handling ignores ``x``, an LLM is told to keep the tags). :func:`restore` puts each span back; a
translation that lost, repeated or invented a tag is a :class:`SpanError` whose ``reason`` names the kind of span
(``code_changed``, ``placeholder_lost``, ``url_changed``, …), so the row is a named reject and never a text whose
code or placeholders differ from the source's. The restored text holds every span byte for byte.

Spans are found kind by kind in priority order (code before URLs before numbers, …); a later match that overlaps an
earlier one is left inside it. A ``<`` in the source is only masked as part of a ``<tag>``; a source that holds a
literal mask tag has it masked as a tag like any other, so it can never be taken for one of ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kullm.errors import KullmError

TAG = re.compile(r"<\s*x\s+id\s*=\s*[\"'](\d+)[\"']\s*/\s*>")  # a mask tag as a translator may hand it back
# (kind, pattern) in priority order: the first kind to claim a stretch of text keeps it
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("code", re.compile(r"(?m)^[ \t]*(```|~~~)[^\n]*\n[\s\S]*?(?:^[ \t]*\1[ \t]*$|\Z)")),  # fenced (to the end if open)
    ("code", re.compile(r"(`+)(?!`)[^\n]*?[^`]\1(?!`)|`[^`\n]`")),  # inline, any number of backticks
    ("latex", re.compile(r"\$\$[\s\S]+?\$\$|\\\[[\s\S]+?\\\]|\\\([\s\S]+?\\\)")),
    ("latex", re.compile(r"\\begin\{([A-Za-z*]+)\}[\s\S]*?\\end\{\1\}")),
    ("latex", re.compile(r"(?<![\\$\w])\$(?=[^\s$])[^$\n]*?[^\s$\\]\$(?![\w$])|(?<![\\$\w])\$[^\s$\d]\$(?![\w$])")),
    ("url", re.compile(r"\b(?:https?|ftp)://[^\s<>\"'`]+|\bwww\.[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+[^\s<>\"'`]*")),
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    ("placeholder", re.compile(r"\{\{[^{}\n]{0,80}\}\}|\{[A-Za-z_0-9.\[\]]{0,40}(?:![rsa])?(?::[^{}\n]{0,20})?\}")),
    ("placeholder", re.compile(r"%(?:\([A-Za-z_]\w*\))?[-+#0]*(?:\d+|\*)?(?:\.\d+)?[sdifeEgGxXoc]\b")),
    ("placeholder", TAG),  # a mask tag look-alike in the source: masked, never taken for ours
    ("placeholder", re.compile(r"</?[A-Za-z][\w:.-]*(?:\s+[^<>]*?)?\s*/?>")),
    ("number", re.compile(r"(?<![\w.,])[-+]?\d+(?:[.,:]\d+)*(?![\w])")),
)
# what a lost or altered span of each kind is called
REASONS = {
    "code": "code_changed",
    "latex": "latex_changed",
    "url": "url_changed",
    "email": "email_changed",
    "placeholder": "placeholder_lost",
    "number": "number_changed",
}
URL_TAIL = ".,;:!?)]}'\""  # punctuation that ends a sentence after a URL, not the URL


class SpanError(KullmError, ValueError):
    """A translation whose protected spans cannot be restored exactly: ``reason`` names the kind of span."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Span:
    kind: str
    text: str


@dataclass(frozen=True)
class Masked:
    """A text with its spans replaced by mask tags: ``text`` is what is sent, ``spans`` what tag ``N`` stands for."""

    text: str
    spans: tuple[Span, ...]

    @property
    def kinds(self) -> dict[str, int]:
        """How many spans of each kind were masked."""
        out: dict[str, int] = {}
        for s in self.spans:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out


def tag(n: int) -> str:
    """Mask tag number ``n``, exactly as sent."""
    return f'<x id="{n}"/>'


def find_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, kind)`` of every protected span of ``text``, in order, never overlapping."""
    taken: list[tuple[int, int, str]] = []
    for kind, pattern in PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span()
            if kind == "url":
                while end > start and text[end - 1] in URL_TAIL and not _balanced(text[start:end]):
                    end -= 1
            if end <= start or any(start < e and s < end for s, e, _ in taken):
                continue
            taken.append((start, end, kind))
    return sorted(taken)


def _balanced(url: str) -> bool:
    """Whether a URL's last character closes a bracket opened inside it (``…/Foo_(bar)``): then it belongs to it."""
    last = url[-1]
    pairs = {")": "(", "]": "[", "}": "{"}
    return last in pairs and url.count(pairs[last]) >= url.count(last)


def mask(text: str) -> Masked:
    """``text`` with each protected span replaced by ``<x id="N"/>`` (N counting from 0 in order)."""
    parts, spans, pos = [], [], 0
    for start, end, kind in find_spans(text):
        parts += [text[pos:start], tag(len(spans))]
        spans.append(Span(kind, text[start:end]))
        pos = end
    parts.append(text[pos:])
    return Masked("".join(parts), tuple(spans))


def restore(translated: str, masked: Masked) -> str:
    """The translation with every mask tag replaced by its span; :class:`SpanError` when a tag is missing, repeated
    or unknown (``reason`` from the span's kind: ``code_changed``, ``placeholder_lost``, …)."""
    seen: dict[int, int] = {}
    for m in TAG.finditer(translated):
        n = int(m.group(1))
        seen[n] = seen.get(n, 0) + 1
    for n, count in sorted(seen.items()):
        if n >= len(masked.spans):
            raise SpanError("tag_invented", f'the translation holds a mask tag <x id="{n}"/> the source never had')
        if count > 1:
            span = masked.spans[n]
            raise SpanError(REASONS[span.kind], f"{span.kind} {_show(span.text)} appears {count} times")
    for n, span in enumerate(masked.spans):
        if n not in seen:
            raise SpanError(REASONS[span.kind], f"{span.kind} {_show(span.text)} is missing from the translation")
    out = TAG.sub(lambda m: masked.spans[int(m.group(1))].text, translated)
    for span in masked.spans:  # the guarantee itself, whatever the tags did
        if span.text not in out:  # pragma: no cover - follows from the substitution above
            raise SpanError(REASONS[span.kind], f"{span.kind} {_show(span.text)} did not survive")
    return out


def unmasked_text(masked: Masked) -> str:
    """The words a translator sees: the masked text without its tags (what language and length checks measure)."""
    return TAG.sub(" ", masked.text)


def _show(text: str, limit: int = 40) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")
