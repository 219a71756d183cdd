"""Protected spans: masked before sending, restored byte for byte after, a lost or altered span a named reason."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kullm.translation.spans import TAG, SpanError, mask, restore, tag, unmasked_text

PIECES = [
    "```python\nprint('hi')  # {x} 42\n```",
    "~~~\nrm -rf /tmp/x\n~~~",
    "`x = {y}`",
    "``a ` b``",
    "$$\\int_0^1 x^2 dx$$",
    "$E = mc^2$",
    "\\(a+b\\)",
    "\\begin{align}a&=b\\end{align}",
    "https://example.com/a_(b)?q=1&r=2",
    "www.korea.ac.kr",
    "kim.minsu+tag@korea.ac.kr",
    "{name}",
    "{0}",
    "{}",
    "{{ user }}",
    "%s",
    "%(count)d",
    "%.2f",
    "<br/>",
    '<a href="x">',
    "</a>",
    '<x id="0"/>',
    "< x id = '3' />",
    "3.14",
    "1,000",
    "-42",
    "2023",
]
WORDS = ["Translate", "this", "please", "the", "value", "is", "and", "then", "?", ".", ",", "!", "<", ">", "&", "$5",
         "50%", "e.g.", "(", ")", "\n", "\n\n", " ", "  ", "에", "값은", "`", "$", "{", "}", "%"]  # fmt: skip


@st.composite
def texts(draw) -> str:
    parts = draw(st.lists(st.sampled_from(PIECES + WORDS) | st.text(max_size=6), max_size=14))
    seps = draw(st.lists(st.sampled_from(["", " ", "\n"]), min_size=len(parts), max_size=len(parts)))
    return "".join(p + s for p, s in zip(parts, seps, strict=True))


@settings(max_examples=400, deadline=None)
@given(texts())
@example("```\nunclosed fence {x}")
@example('a literal mask tag <x id="0"/> and <x id="1"/> in the source')
def test_mask_then_restore_gives_back_the_text_byte_for_byte(text: str) -> None:
    m = mask(text)
    assert restore(m.text, m) == text
    # every span is masked by exactly one tag of its number, and the words around them are untouched
    assert [int(n) for n in TAG.findall(m.text)] == list(range(len(m.spans)))
    rebuilt = TAG.sub(lambda x: m.spans[int(x.group(1))].text, m.text)
    assert rebuilt == text


@settings(max_examples=200, deadline=None)
@given(texts(), st.randoms(use_true_random=False))
def test_a_translation_that_moves_tags_still_restores_every_span(text: str, rnd) -> None:
    m = mask(text)
    tags = [tag(n) for n in range(len(m.spans))]
    rnd.shuffle(tags)  # a translator reorders the sentence: the spans follow their tags
    translated = "번역: " + " 그리고 ".join(tags) + " 끝."
    out = restore(translated, m)
    for span in m.spans:
        assert span.text in out


def test_each_kind_is_masked() -> None:
    text = (
        "Run `ls -la` then see https://x.io/doc. Mail a@b.co about {name} and %s, <b>bold</b>, "
        "$x^2$ costs 3.5 dollars.\n```sh\necho hi\n```"
    )
    m = mask(text)
    assert m.kinds == {"code": 2, "url": 1, "email": 1, "placeholder": 4, "latex": 1, "number": 1}
    assert "https" not in m.text and "{name}" not in m.text and "echo hi" not in m.text
    assert unmasked_text(m).split()[:2] == ["Run", "then"]


def test_a_url_leaves_the_sentence_full_stop_outside() -> None:
    m = mask("See https://en.wikipedia.org/wiki/Seoul_(city). Then go.")
    assert [s.text for s in m.spans] == ["https://en.wikipedia.org/wiki/Seoul_(city)"]


def test_money_and_percentages_are_not_latex_or_placeholders() -> None:
    m = mask("It costs $5 and $10, about 50% of the price")
    assert {s.kind for s in m.spans} == {"number"}


@pytest.mark.parametrize(
    ("source", "bad", "reason"),
    [
        ("Use `pip install x` now", "지금 사용하세요", "code_changed"),
        ("Hello {name}, welcome", "안녕하세요, 환영합니다", "placeholder_lost"),
        ("See https://x.io for more", "자세한 내용은 참조", "url_changed"),
        ("Write to a@b.co today", "오늘 편지를 쓰세요", "email_changed"),
        ("Solve $x+1=2$ for x", "x에 대해 풀어라", "latex_changed"),
        ("I have 3 apples", "사과가 있다", "number_changed"),
    ],
)
def test_a_lost_span_is_a_named_reason(source: str, bad: str, reason: str) -> None:
    m = mask(source)
    with pytest.raises(SpanError) as e:
        restore(bad, m)
    assert e.value.reason == reason


def test_a_repeated_or_invented_tag_is_refused() -> None:
    m = mask("Print {x} now")
    with pytest.raises(SpanError, match="placeholder_lost"):
        restore(f"{tag(0)} {tag(0)} 출력", m)
    with pytest.raises(SpanError, match="tag_invented"):
        restore(f"{tag(0)} {tag(7)} 출력", m)


def test_a_tag_handed_back_with_other_spacing_or_quotes_is_still_ours() -> None:
    m = mask("Print {x} and {y}")
    assert restore("<x id='1' /> 와 < x id=\"0\"/> 출력", m) == "{y} 와 {x} 출력"


def test_a_literal_tag_in_the_source_is_a_span_not_a_mask() -> None:
    m = mask('Keep <x id="5"/> as is')
    assert m.spans[0].text == '<x id="5"/>'
    assert re.findall(r'id="(\d+)"', m.text) == ["0"]
