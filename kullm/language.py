"""Which language a text is in: the share of each script among its letters and an offline language-ID verdict.

Used wherever kullm must know whether an answer is Korean: benchmark purity, KoMT-Bench's penalty, translation QC.
The verdict comes from lingua (``lingua-language-detector``: bundled models, no download, accurate on short text),
restricted to the languages a Korean model's answer is plausibly in, so one call stays fast and small.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

# ISO 639-1 codes lingua chooses among: Korean, the languages a Korean model drifts into, and common others
LANGUAGES = ("ko", "en", "ja", "zh", "es", "fr", "de", "ru", "vi", "th")
SCRIPTS = ("hangul", "cjk", "latin", "other")


@dataclass(frozen=True)
class Purity:
    """Script shares over a text's letters (summing to 1, or all 0 for a text without letters) and the verdict."""

    hangul: float
    cjk: float  # Hanja / Chinese characters, kana
    latin: float
    other: float
    language: str | None  # an ISO 639-1 code from LANGUAGES; None when the text has no letters

    @property
    def korean(self) -> bool:
        return self.language == "ko"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"korean": self.korean}


def script_of(ch: str) -> str | None:
    """``hangul``, ``cjk``, ``latin`` or ``other`` for a letter; None for digits, punctuation, spaces, symbols."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    code = ord(ch)
    if 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F or 0xA960 <= code <= 0xA97F:
        return "hangul"
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x3040 <= code <= 0x30FF or 0xF900 <= code <= 0xFAFF:
        return "cjk"
    if code < 0x250 or 0x1E00 <= code <= 0x1EFF or 0xFF21 <= code <= 0xFF5A:
        return "latin"
    return "other"


def script_shares(text: str) -> dict[str, float]:
    """The share of each of SCRIPTS among the letters of ``text`` (all 0.0 when it has none)."""
    counts = dict.fromkeys(SCRIPTS, 0)
    for ch in text:
        if (s := script_of(ch)) is not None:
            counts[s] += 1
    total = sum(counts.values())
    return {s: (n / total if total else 0.0) for s, n in counts.items()}


@lru_cache(maxsize=1)
def _detector():
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in LANGUAGES]
    return LanguageDetectorBuilder.from_languages(*langs).build()


def detect(text: str) -> str | None:
    """The ISO 639-1 code of the language ``text`` is mostly in, or None when it has no letters to judge by."""
    if not any(script_of(ch) for ch in text):
        return None
    found = _detector().detect_language_of(text)
    return found.iso_code_639_1.name.lower() if found is not None else None


def purity(text: str) -> Purity:
    """Script shares and language verdict of one text."""
    return Purity(**script_shares(text), language=detect(text))
