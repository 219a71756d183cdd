"""The judge prompt, the score parser and G-Eval weighted-score math."""

import math

import pytest

from kullm.config import compose
from kullm.evaluation.geval import (
    Criterion,
    JudgePrompt,
    Parsed,
    parse_scores,
    softmax_over,
    weighted_from_logprobs,
    weighted_mean,
)


@pytest.fixture(scope="module")
def prompt() -> JudgePrompt:
    return JudgePrompt.from_config(compose("eval", ["output_dir=/tmp/unused"]).judge_prompt)


@pytest.fixture(scope="module")
def crits(prompt):
    return prompt.criteria


SEED_USER = (
    "Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:\n{response}\n\n\nResult\n- 이해 가능성 (0 - 1):\n"
    "- 자연스러움 (1 - 3):\n- 맥락 유지 (1 - 3):\n- 흥미롭기 (1 - 3):\n- Instruction 사용 (0 - 1):\n"
    "- 전반적인 품질 (1 - 5):\n"
)


def test_seed_prompt_is_verbatim(prompt):
    assert prompt.user == SEED_USER
    assert prompt.system.startswith("두 사람 간의 대화가 주어집니다.")
    assert prompt.system.endswith("2. 위의 평가 기준에 따라 Response을 평가합니다.")
    assert "- 자연스러움 (1 - 3): 사람이 자연스럽게 말할 법한 Instruction 인가요?" in prompt.system
    assert [(c.name, c.min, c.max) for c in prompt.criteria] == [
        ("이해 가능성", 0, 1),
        ("자연스러움", 1, 3),
        ("맥락 유지", 1, 3),
        ("흥미롭기", 1, 3),
        ("Instruction 사용", 0, 1),
        ("전반적인 품질", 1, 5),
    ]
    msgs = prompt.messages("지시 {x}", "", "응답")
    assert msgs[0] == {"role": "system", "content": prompt.system}
    assert msgs[1]["content"].startswith("Instruction:\n지시 {x}\n\nInput:\n\n\nResponse:\n응답\n\n\nResult\n")


def test_fixed_variant_changes_only_naturalness(prompt):
    fixed = JudgePrompt.from_config(
        compose("eval", ["output_dir=/tmp/unused", "judge_prompt=kullm_fixed"]).judge_prompt
    )
    diff = [(a, b) for a, b in zip(prompt.system.splitlines(), fixed.system.splitlines(), strict=True) if a != b]
    assert diff == [
        (
            "- 자연스러움 (1 - 3): 사람이 자연스럽게 말할 법한 Instruction 인가요?",
            "- 자연스러움 (1 - 3): 사람이 자연스럽게 말할 법한 Response 인가요?",
        )
    ]
    assert fixed.user == prompt.user and fixed.criteria == prompt.criteria
    assert fixed.hash() != prompt.hash() and len(prompt.hash()) == 12


FULL = "- 이해 가능성 (0 - 1): 1\n- 자연스러움 (1 - 3): 2\n- 맥락 유지 (1 - 3): 3\n- 흥미롭기 (1 - 3): 1\n- Instruction 사용 (0 - 1): 0\n- 전반적인 품질 (1 - 5): 4\n"  # noqa: E501
EXPECTED = {"이해 가능성": 1, "자연스러움": 2, "맥락 유지": 3, "흥미롭기": 1, "Instruction 사용": 0, "전반적인 품질": 4}


@pytest.mark.parametrize(
    "reply",
    [
        FULL,
        FULL.replace(" (0 - 1)", "")
        .replace(" (1 - 3)", "")
        .replace(" (1 - 5)", "")
        .replace("- ", ""),  # 이해 가능성: 1
        "\n".join(f"**{k}**: {v}" for k, v in EXPECTED.items()),
        "\n".join(f"- **{k} (x - y)**: **{v}**" for k, v in EXPECTED.items()),
        FULL.translate(str.maketrans("0123456789:", "０１２３４５６７８９：")),  # full-width digits and colon
        "\n".join(f"- {k}: {v}점 - 이유: 응답이 2개의 문장으로 명확합니다." for k, v in EXPECTED.items()),
        "| 항목 | 점수 |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in EXPECTED.items()),
        "평가:\n" + FULL.replace("이해 가능성", "이해가능성"),  # spacing inside the name
        "Result\n" + FULL.replace("(0 - 1): 1", "(0 - 1): 1.0"),
    ],
)
def test_parser_accepts_judge_formats(reply, crits):
    parsed = parse_scores(reply, crits)
    assert parsed.ok, parsed.error
    assert parsed.scores == EXPECTED


def test_parser_fractional_score(crits):
    reply = FULL.replace("- 이해 가능성 (0 - 1): 1", "이해 가능성: 0.5")
    assert parse_scores(reply, crits).scores["이해 가능성"] == 0.5


def test_parser_spans_point_at_the_number(crits):
    reply = "설명 먼저.\n" + FULL
    parsed = parse_scores(reply, crits)
    for name, (a, b) in parsed.spans.items():
        assert reply[a:b] == str(EXPECTED[name])


def test_parser_last_score_wins(crits):
    reply = "이해 가능성: 0 (처음 생각)\n" + FULL
    assert parse_scores(reply, crits).scores["이해 가능성"] == 1


@pytest.mark.parametrize(
    "reply, error",
    [
        (FULL.replace("(1 - 5): 4", "(1 - 5): 7"), "전반적인 품질: 7 outside 1-5"),
        (FULL.replace("(1 - 3): 2", "(1 - 3): 0"), "자연스러움: 0 outside 1-3"),
        (FULL.replace("(0 - 1): 1", "(0 - 1): -1"), "이해 가능성: -1 outside 0-1"),
        (FULL.replace("- 맥락 유지 (1 - 3): 3\n", ""), "맥락 유지: missing"),
        (FULL.replace("(1 - 3): 1", "(1 - 3):"), "흥미롭기: missing"),  # blank score; the next line's '-' is no score
        ("I cannot evaluate this response.", "이해 가능성: missing; 자연스러움: missing"),
    ],
)
def test_parser_failures_are_errors_not_zero(reply, error, crits):
    parsed = parse_scores(reply, crits)
    assert not parsed.ok
    assert parsed.error.startswith(error)
    assert error.split(":")[0] not in parsed.scores  # the bad criterion has no score at all (not a 0)


@pytest.mark.parametrize(
    "written, score, error",
    [
        ("1e308", None, "1e308 outside 1-5"),  # read whole: a huge number, not 1
        ("4.5.6", None, "4.5.6 is not a number"),  # not 4.5
        ("10", None, "10 outside 1-5"),  # not 1
        ("3-4", None, "3-4 is not a number"),  # a range is no score (not 3)
        ("1,000", None, "1,000 is not a number"),
        ("0x3", None, "0x3 is not a number"),
        ("3/10", None, "3/10 is not a score on 1-5"),  # another scale: not 3
        ("3 / 10", None, "3/10 is not a score on 1-5"),
        ("3/5", 3, None),  # the judge restating the scale
        ("3 / 5점", 3, None),
        ("３", 3, None),  # full-width
        ("３／５", 3, None),
        ("4.5", 4.5, None),  # fractional scores are in range
        ("3.", 3, None),  # the end of a sentence
        ("3, 이유: 명확함", 3, None),
        ("3점", 3, None),
    ],
)
def test_a_score_is_read_whole_or_not_at_all(written, score, error):
    crit = Criterion("전반적인 품질", 1, 5)
    reply = f"- 전반적인 품질 (1 - 5): {written}\n"
    parsed = parse_scores(reply, [crit])
    assert parsed.error == (None if error is None else f"전반적인 품질: {error}")
    assert parsed.scores == ({} if score is None else {"전반적인 품질": score})
    if score is not None:  # the span holds the score itself (what weighted scores read the token at)
        a, b = parsed.spans["전반적인 품질"]
        assert reply[a:b] in ("3", "4.5", "３")


def test_weighted_mean_math():
    assert weighted_mean({1: 0.2, 2: 0.3, 3: 0.5}) == pytest.approx(0.2 + 0.6 + 1.5)
    assert weighted_mean({0: 0.3, 1: 0.6}) == pytest.approx(0.6 / 0.9)  # renormalised over the allowed values
    probs = softmax_over({0: math.log(0.25), 1: math.log(0.5)})
    assert probs == pytest.approx({0: 1 / 3, 1: 2 / 3})
    with pytest.raises(ValueError):
        weighted_mean({1: 0.0})


def test_weighted_from_logprobs_reads_the_score_token():
    crits = [Criterion("이해 가능성", 0, 1), Criterion("전반적인 품질", 1, 5)]
    reply = "- 이해 가능성 (0 - 1): 1\n- 전반적인 품질 (1 - 5): 4"
    lp = math.log
    tokens = [
        ("- 이해 가능성 (0 - 1):", [("- 이해 가능성 (0 - 1):", 0.0)]),
        (" 1", [(" 1", lp(0.7)), (" 0", lp(0.1)), (" 점", lp(0.2))]),
        ("\n- 전반적인 품질 (1 - 5):", [("\n", 0.0)]),
        (" 4", [(" 4", lp(0.5)), (" 5", lp(0.25)), (" 3", lp(0.125)), ("４", lp(0.125)), (" 9", lp(0.01))]),
    ]
    parsed = parse_scores(reply, crits)
    got = weighted_from_logprobs(reply, tokens, parsed, crits)
    assert got["이해 가능성"] == pytest.approx(0.7 / 0.8)
    # " 4" is counted once (the first spelling), " 9" is outside 1-5
    assert got["전반적인 품질"] == pytest.approx((4 * 0.5 + 5 * 0.25 + 3 * 0.125) / 0.875)
    # tokens that do not spell the reply: no weighted scores, never wrong ones
    assert weighted_from_logprobs(reply + "x", tokens, parse_scores(reply + "x", crits), crits) == {
        "이해 가능성": None,
        "전반적인 품질": None,
    }
    assert weighted_from_logprobs(reply, tokens, Parsed(), crits) == {"이해 가능성": None, "전반적인 품질": None}


def test_bad_prompt_config_is_rejected():
    with pytest.raises(ValueError, match="min 3.0 >= max 1.0"):
        JudgePrompt.from_config({"system": "", "user": "", "criteria": [{"name": "x", "min": 3, "max": 1}]})
    with pytest.raises(ValueError, match="integer bounds"):
        _ = Criterion("x", 0.5, 1).values
    with pytest.raises(ValueError, match="min 2.0 >= max 2.0"):  # a one-value range scales by zero
        JudgePrompt.from_config({"system": "", "user": "", "criteria": [{"name": "x", "min": 2, "max": 2}]})
    with pytest.raises(ValueError, match="judge_prompt.criteria is empty"):
        JudgePrompt.from_config({"system": "", "user": "", "criteria": []})


def test_prompt_names_labels_and_a_stable_hash(prompt):
    """Judgments record the prompt's hash to refuse mixing prompts: it must not drift between kullm versions."""
    assert prompt.name == "kullm" and prompt.hash() == "cf1c10db4bd1"
    p = JudgePrompt.from_config({"system": "s", "user": "u", "criteria": [{"name": "맛", "min": 1, "max": 3}]})
    assert p.name == "" and p.criteria[0].label == "맛"  # the label defaults to the name
    labelled = JudgePrompt.from_config(
        {"name": "n", "system": "s", "user": "u", "criteria": [{"name": "맛", "label": "Taste", "min": 1, "max": 3}]}
    )
    assert (labelled.name, labelled.criteria[0].label) == ("n", "Taste")


def test_a_conversation_is_judged_with_its_history_as_the_input(prompt):
    """The last user turn is the Instruction and the turns before it the Input, so 맥락 유지 judges the answer
    against the conversation; a one-turn conversation gets exactly a flat row's prompt."""
    assert prompt.conversation_messages([("user", "질문 {x}")], "답") == prompt.messages("질문 {x}", "", "답")
    history = [("system", "너는 친절한 도우미야."), ("user", "한국의 수도는?"), ("assistant", "서울입니다."),
               ("user", "그곳의 인구는?")]  # fmt: skip
    msgs = prompt.conversation_messages(history, "약 940만 명입니다.")
    assert msgs[0] == {"role": "system", "content": prompt.system}
    assert msgs[1]["content"].startswith(
        "Instruction:\n그곳의 인구는?\n\nInput:\nSystem: 너는 친절한 도우미야.\n\nUser: 한국의 수도는?\n\n"
        "Assistant: 서울입니다.\n\nResponse:\n약 940만 명입니다.\n\n\nResult\n"
    )
    with pytest.raises(ValueError, match="ends with the user turn answered, not a assistant turn"):
        prompt.conversation_messages(history[:3], "답")
    # the default turn layout leaves the prompt's hash as it was; another layout is another prompt
    cfg = compose("eval", ["output_dir=/tmp/unused", "judge_prompt.turn='[{role}] {content}'"]).judge_prompt
    other = JudgePrompt.from_config(cfg)
    assert prompt.hash() == "cf1c10db4bd1" and other.hash() != prompt.hash()
    shown = other.conversation_messages(history, "답")[1]["content"]
    assert "Input:\n[System] 너는 친절한 도우미야.\n\n[User] 한국의 수도는?\n\n[Assistant] 서울입니다.\n\n" in shown
