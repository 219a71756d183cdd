"""The QC gates: each planted bad translation is its named verdict, a good one passes, thresholds come from conf/."""

from __future__ import annotations

import pytest

from kullm.config import defaults
from kullm.translation.quality import check

QC = defaults("translate.qc")

SOURCE = "Explain how photosynthesis turns sunlight into chemical energy in plants."
GOOD = "광합성이 식물에서 햇빛을 화학 에너지로 바꾸는 방법을 설명하세요."


def gates(source: str, output: str, qc=QC) -> list[str]:
    return [v.gate for v in check(source, output, qc)]


def test_a_good_translation_passes() -> None:
    assert gates(SOURCE, GOOD) == []
    assert gates("What is the capital of France?", "프랑스의 수도는 어디인가요?") == []


@pytest.mark.parametrize(
    ("source", "output", "gate"),
    [
        (SOURCE, SOURCE, "untranslated"),
        (SOURCE, "Photosynthesis converts light energy into chemical energy stored in glucose.", "not_korean"),
        (SOURCE, "죄송하지만 이 요청은 도와드릴 수 없습니다.", "refusal"),
        (SOURCE, "I'm sorry, but I can't help with that request today.", "refusal"),
        ("What is the capital of France?", "프랑스의 수도는 파리입니다.", "answered"),
        (SOURCE, GOOD + " " + "광합성은 엽록체에서 일어나며 빛 에너지를 포도당으로 저장합니다. " * 4, "answered"),
        (SOURCE, "광합성이 식물에서 햇빛을", "truncated"),
        (SOURCE, "광합", "truncated"),
        ("Hi.", "", "truncated"),  # never a silent empty translation, however short the source
    ],
)
def test_each_planted_fault_is_its_named_gate(source: str, output: str, gate: str) -> None:
    assert gate in gates(source, output)


def test_a_refusal_in_the_source_translated_is_a_translation() -> None:
    src = "I'm sorry, but I cannot share personal information about other people."
    assert gates(src, "죄송하지만 다른 사람의 개인 정보는 공유할 수 없습니다.") == []


def test_text_without_words_is_not_judged() -> None:
    assert gates("42", "42") == []
    assert gates("   ", "") == []


def test_actions_and_thresholds_come_from_the_config() -> None:
    off = defaults("translate.qc", {"untranslated": {"action": "off"}})
    assert gates(SOURCE, SOURCE, off) == []
    flag = defaults("translate.qc", {"not_korean": {**QC.not_korean, "action": "flag"}})
    verdicts = check(SOURCE, "Photosynthesis converts light into sugar inside the leaves.", flag)
    assert [(v.gate, v.action) for v in verdicts] == [("not_korean", "flag")]
    loose = defaults("translate.qc", {"answered": {**QC.answered, "max_ratio": 100.0}})
    assert "answered" not in gates(SOURCE, GOOD + " 추가 설명입니다." * 8, loose)


def test_mixed_script_output_below_the_hangul_share_is_not_korean() -> None:
    out = "광합성 photosynthesis converts sunlight into chemical energy in the plant cells"
    assert "not_korean" in gates(SOURCE, out)


def test_back_translation_similarity_and_a_stable_sample() -> None:
    from kullm.translation.adequacy import sample_keys, similarity

    assert similarity("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    assert similarity("The cat sat on the mat.", "A car has four wheels.") == 0.0
    assert 0.3 < similarity("The cat sat on the mat.", "A cat was sitting on the mat.") < 0.9
    keys = [f"k{i}" for i in range(50)]
    assert sample_keys(keys, 5, 0) == sample_keys(list(reversed(keys)), 5, 0) != sample_keys(keys, 5, 1)
    assert len(sample_keys(keys, 5, 0)) == 5 and sample_keys(keys, 0, 0) == []
