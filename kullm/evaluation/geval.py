"""G-Eval scoring: the judge prompt, its criteria, a robust score parser and probability-weighted scores.

The prompt (system message, user template, criteria) comes from the ``judge_prompt`` config group, so the seed's
prompt and a corrected variant are one override apart; :func:`JudgePrompt.hash` names the exact prompt a judgment
was made with. G-Eval scores a criterion as the expected value of the judge's distribution over the allowed scores,
``sum_v v * p(v) / sum_v p(v)``, next to the plain score parsed from the reply.

A multi-turn answer is judged with the same prompt: the Instruction is the last user turn and the Input the
conversation before it (system prompt and earlier turns, one ``turn`` block each), so the criteria about the Input
(이해 가능성, 맥락 유지) judge whether the answer keeps the conversation's context. A one-turn conversation gets
exactly the prompt of a flat row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# how an earlier turn of a conversation is shown in the Input slot (judge_prompt.turn), and the role names it shows
DEFAULT_TURN = "{role}: {content}"
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

# full-width ASCII (U+FF01..U+FF5E) and the ideographic space, mapped one character to one, so offsets survive
_WIDE = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


@dataclass(frozen=True)
class Criterion:
    """One scored aspect: its Korean name as the judge writes it, an ASCII label for charts, and its score range."""

    name: str
    min: float
    max: float
    label: str = ""

    @property
    def values(self) -> list[int]:
        """The allowed integer scores (what a probability-weighted score averages over)."""
        if self.min != int(self.min) or self.max != int(self.max):
            raise ValueError(f"criterion {self.name!r}: weighted scores need integer bounds, got {self.min}-{self.max}")
        return list(range(int(self.min), int(self.max) + 1))


@dataclass(frozen=True)
class JudgePrompt:
    """The system message, the user-message template (``{instruction}``, ``{input}``, ``{response}``), criteria,
    and how an earlier turn of a conversation is written into the Input (``turn``: ``{role}``, ``{content}``)."""

    name: str
    system: str
    user: str
    criteria: tuple[Criterion, ...]
    turn: str = DEFAULT_TURN

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> JudgePrompt:
        """Build from a ``judge_prompt`` node; criteria are ``{name, min, max, label}`` mappings."""
        crits = tuple(
            Criterion(str(c["name"]), float(c["min"]), float(c["max"]), str(c.get("label") or c["name"]))
            for c in cfg["criteria"]
        )
        if not crits:
            raise ValueError("judge_prompt.criteria is empty")
        for c in crits:
            if c.min >= c.max:
                raise ValueError(f"judge_prompt.criteria: {c.name!r} has min {c.min} >= max {c.max}")
        turn = str(cfg.get("turn") or DEFAULT_TURN)
        return cls(str(cfg.get("name", "")), str(cfg["system"]), str(cfg["user"]), crits, turn)

    def messages(self, instruction: str, input: str, response: str) -> list[dict[str, str]]:
        """The chat messages for one item (values are inserted verbatim, braces in them included)."""
        user = self.user.format_map({"instruction": instruction, "input": input, "response": response})
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def conversation_messages(self, history: Sequence[tuple[str, str]], response: str) -> list[dict[str, str]]:
        """The chat messages for the answer to a conversation: ``history`` is its ``(role, content)`` turns up to
        the last user turn (the Instruction); the turns before that turn are the Input, one block each."""
        *before, (role, last) = history
        if role != "user":
            raise ValueError(f"a conversation to judge ends with the user turn answered, not a {role} turn")
        blocks = [self.turn.format_map({"role": ROLE_NAMES.get(r, r), "content": c}) for r, c in before]
        return self.messages(last, "\n\n".join(blocks), response)

    def hash(self) -> str:
        """A short hash of everything that changes what the judge sees or how replies are scored (the default
        ``turn`` layout is left out, so a prompt hashes as it did before conversations were judged)."""
        crits = [[c.name, c.min, c.max] for c in self.criteria]
        parts = [self.system, self.user, crits] + ([self.turn] if self.turn != DEFAULT_TURN else [])
        body = json.dumps(parts, ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


@dataclass
class Parsed:
    """Scores parsed from a reply, with the character span of each score; ``error`` set when unusable."""

    scores: dict[str, float] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# a score token: everything number-like after the separator, so that it is read whole or not at all ("1e308" is
# not 1, "4.5.6" not 4.5); Korean text right after it ("4점") ends it
_NUM = r"(?P<score>[-+]?[0-9][0-9A-Za-z.,/_+-]*(?:[ \t]*/[ \t]*[0-9A-Za-z.,_+-]+)?)"
_PLAIN = re.compile(r"[-+]?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_MARK = r"(?:\*\*|__|\*)?"  # bold / italic around the name or the number


def _pattern(name: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in name.split()]
    name_re = r"\s*".join(words)
    return re.compile(
        rf"{_MARK}[ \t]*{name_re}[ \t]*{_MARK}[ \t]*(?:\([^)\n]*\))?[ \t]*{_MARK}[ \t]*[:=|][ \t]*{_MARK}[ \t]*{_NUM}",
        re.IGNORECASE,
    )


def normalize(text: str) -> str:
    """Full-width digits, letters and punctuation to ASCII, one character for one (offsets are kept)."""
    return text.translate(_WIDE)


def parse_scores(reply: str, criteria: Sequence[Criterion]) -> Parsed:
    """Find each criterion's score in a judge's reply.

    Accepts ``- 이해 가능성 (0 - 1): 1``, ``이해 가능성: 0.5``, ``**이해 가능성**: 1``, ``| 이해 가능성 | 1 |``,
    full-width digits, ``3/5`` on a scale up to 5 (the judge restating the scale) and text after the number
    (``4점 - 이유: …``, ``1.`` at a sentence's end). When a criterion is scored more than once the last one wins
    (judges reason first and conclude last). A missing criterion, a score outside its range, and a number that does
    not read whole (``4.5.6``, ``3-4``, ``3/10`` on a 1-5 scale; ``1e308`` is read whole, and is out of range) are
    errors, never 0 and never a prefix of the number.
    """
    text = normalize(reply)
    out = Parsed()
    problems = []
    for c in criteria:
        matches = list(_pattern(c.name).finditer(text))
        if not matches:
            problems.append(f"{c.name}: missing")
            continue
        m = matches[-1]
        written = m.group("score").rstrip(".,;:")  # "1." ends a sentence
        try:
            out.scores[c.name] = _score("".join(written.split()), c)  # "3 / 5" is "3/5"
        except ValueError as e:
            problems.append(f"{c.name}: {e}")
            continue
        start = m.start("score")
        out.spans[c.name] = (start, start + len(written.partition("/")[0].rstrip()))
    if problems:
        out.error = "; ".join(problems)
    return out


def _score(token: str, c: Criterion) -> float:
    """A score token read whole: a plain number (``4``, ``0.5``) or ``N/max``, within ``c``'s range; else
    :class:`ValueError` saying why."""
    num, slash, den = token.partition("/")
    scale = f"{_fmt(c.min)}-{_fmt(c.max)}"
    if not _PLAIN.fullmatch(num) or (slash and not _PLAIN.fullmatch(den)):
        raise ValueError(f"{token} is not a number")
    if slash and float(den) != c.max:
        raise ValueError(f"{token} is not a score on {scale}")
    value = float(num)
    if not c.min <= value <= c.max:
        raise ValueError(f"{token} outside {scale}")
    return value


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def weighted_mean(probs: Mapping[int, float]) -> float:
    """The expected score ``sum v p(v) / sum p(v)`` over the allowed values (renormalised)."""
    total = sum(probs.values())
    if total <= 0:
        raise ValueError("no probability mass on the allowed scores")
    return sum(v * p for v, p in probs.items()) / total


def softmax_over(logprobs: Mapping[int, float]) -> dict[int, float]:
    """Probabilities of the allowed values from their (log-)scores, renormalised among themselves."""
    top = max(logprobs.values())
    exp = {v: math.exp(lp - top) for v, lp in logprobs.items()}
    total = sum(exp.values())
    return {v: e / total for v, e in exp.items()}


TokenLogprobs = Sequence[tuple[str, Sequence[tuple[str, float]]]]  # (token, [(alternative, logprob), ...])


def weighted_from_logprobs(reply: str, tokens: TokenLogprobs, parsed: Parsed, criteria: Sequence[Criterion]) -> dict:
    """G-Eval scores from an API judge's ``top_logprobs``: at the token holding each parsed score, the softmax
    over the alternatives that spell an allowed value. A criterion whose score token cannot be located, or whose
    alternatives hold no allowed value, gets ``None`` (its plain score still stands).
    """
    starts, pos = [], 0
    for tok, _ in tokens:
        starts.append(pos)
        pos += len(tok)
    joined = "".join(t for t, _ in tokens)
    out: dict[str, float | None] = {}
    for c in criteria:
        out[c.name] = None
        if c.name not in parsed.spans or joined != reply:
            continue
        at = parsed.spans[c.name][0]
        k = max(i for i, s in enumerate(starts) if s <= at)
        allowed = {}
        for alt, lp in tokens[k][1]:
            s = normalize(alt).strip().strip("*:").strip()
            if s.lstrip("+-").isdigit() and int(s) in c.values:
                allowed.setdefault(int(s), lp)  # the first (most likely) spelling of a value counts
        if allowed:
            out[c.name] = weighted_mean(softmax_over(allowed))
    return out
