"""Script shares and the offline language verdict on short texts a Korean model's answers look like."""

import pytest

from kullm.language import LANGUAGES, detect, purity, script_shares


def test_shares_count_letters_only():
    assert script_shares("한국어 abc 123 !!") == {"hangul": 0.5, "cjk": 0.0, "latin": 0.5, "other": 0.0}
    assert script_shares("123 ... ") == {"hangul": 0.0, "cjk": 0.0, "latin": 0.0, "other": 0.0}
    assert script_shares("漢字와 かな")["cjk"] == pytest.approx(4 / 5)
    assert script_shares("Привет")["other"] == 1.0


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("안녕하세요, 만나서 반갑습니다.", "ko"),
        ("이 코드는 print('hello') 를 출력합니다.", "ko"),
        ("The capital of Korea is Seoul.", "en"),
        ("こんにちは、元気ですか", "ja"),
        ("你好，世界", "zh"),
        ("42 + 17 = 59", None),
        ("", None),
    ],
)
def test_verdict_on_short_text(text, lang):
    assert detect(text) == lang


def test_purity_record():
    p = purity("정답은 서울입니다.")
    assert p.korean and p.hangul == 1.0 and p.as_dict()["language"] == "ko"
    assert not purity("Seoul is the answer.").korean
    assert set(LANGUAGES) >= {"ko", "en", "ja", "zh"}
