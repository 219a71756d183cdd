import functools

import pytest
from hypothesis import given
from strategies import user_text

from kullm.config import compose
from kullm.templates import Prompter

KULLM_IN = (
    "아래는 작업을 설명하는 명령어와 추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. "
    "요청을 적절히 완료하는 응답을 작성하세요.\n\n### 명령어:\n{instruction}\n\n### 입력:\n{input}\n\n### 응답:\n"
)
KULLM_NO = (
    "아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
    "### 명령어:\n{instruction}\n\n### 응답:\n"
)
ALPACA_IN = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
EXPECTED = {
    "kullm": (KULLM_IN, KULLM_NO, "### 응답:"),
    "alpaca": (ALPACA_IN, ALPACA_NO, "### Response:"),
    "alpaca_legacy": (ALPACA_IN[:-1], ALPACA_NO[:-1], "### Response:"),
    "alpaca_short": (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
        "### Response:",
    ),
}


@functools.cache
def load(name: str) -> Prompter:
    return Prompter.from_config(compose("prepare", [f"template={name}", "output_dir=/tmp/x"]).template)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_strings_are_exact(name):
    p = load(name)
    assert (p.prompt_input, p.prompt_no_input, p.response_marker) == EXPECTED[name]
    assert p.name == name


def test_render_with_and_without_input():
    p = load("kullm")
    assert p.render("한국의 수도는?") == KULLM_NO.replace("{instruction}", "한국의 수도는?")
    assert p.render("번역", "") == p.render("번역", None) == p.render("번역")
    assert p.render("번역", "hello") == KULLM_IN.replace("{instruction}", "번역").replace("{input}", "hello")


@pytest.mark.parametrize("name", sorted(EXPECTED))
@given(instruction=user_text, inp=user_text, response=user_text)
def test_user_text_renders_verbatim_and_response_extracts(name, instruction, inp, response):
    p = load(name)
    prompt = p.render(instruction, inp)
    template = p.prompt_input if inp else p.prompt_no_input
    head, _, rest = template.partition("{instruction}")
    assert prompt.startswith(head) and prompt[len(head) :].startswith(instruction)
    if inp:
        mid, _, tail = rest.partition("{input}")
        assert prompt == head + instruction + mid + inp + tail
    else:
        assert prompt == head + instruction + rest
    # with the known prompt, the response comes back whatever it contains (modulo surrounding whitespace)
    assert p.extract(prompt + response, prompt=prompt) == response.strip()


def test_extract_falls_back_to_last_marker():
    p = load("kullm")
    prompt = p.render("'### 응답:' 뒤에 무엇이 오나요?", "### 응답: 함정")
    generated = prompt + "정답입니다."
    assert p.extract(generated) == "정답입니다."  # the seed split on the first marker and returned the input
    assert p.extract("marker 없는 텍스트") == "marker 없는 텍스트"


def test_extract_by_prompt_keeps_a_marker_inside_the_response():
    p = load("kullm")
    prompt = p.render("마크다운 예시를 보여줘")
    response = "예시:\n### 응답:\n이렇게 씁니다."
    assert p.extract(prompt + response, prompt=prompt) == response


def test_bad_template_is_refused():
    with pytest.raises(ValueError, match="slots"):
        Prompter("x", "{instruction} only", "{instruction}\n### R:", "### R:")
    with pytest.raises(ValueError, match="response_marker"):
        Prompter("x", "{instruction}{input}", "{instruction}", "### R:")


def test_save_and_reload(tmp_path):
    p = load("alpaca_legacy")
    p.save(tmp_path / "template.yaml")
    assert Prompter.from_file(tmp_path / "template.yaml") == p
