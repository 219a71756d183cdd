"""What is trained is what is served: a kullm template as a tokenizer chat_template, token for token."""

import functools
from types import SimpleNamespace

import pytest
from helpers import prompter
from hypothesis import HealthCheck, given, settings
from strategies import conversations, turn_text

from kullm.chat_template import generation_prompt, serving, to_chat_template
from kullm.config import compose
from kullm.data.sft import IGNORE_INDEX, encode_batch
from kullm.data.sft_chat import encode_conversations, render_with_prompter
from kullm.modeling import load_tokenizer
from kullm.templates import Prompter

TEMPLATES = ["kullm", "kullm_system", "alpaca", "alpaca_short", "alpaca_legacy"]


@functools.cache
def served(name: str):
    tok = load_tokenizer(compose("prepare", ["output_dir=/tmp/unused"]).model)
    tok.chat_template = to_chat_template(prompter(name))
    return tok


def messages(turns):
    return [{"role": r, "content": c} for r, c in turns]


def prompt_ids(tok, msgs):
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_single_turn_prompt_is_served_token_for_token(name):
    tok, p = served(name), prompter(name)
    question = "고려대학교에 대해서 알려줘 {instruction} ### 응답: 🙂"
    train = encode_batch(tok, [p.render(question)], ["답"], cutoff_len=512)
    n_prompt = train["labels"][0].index(train["input_ids"][0][-2])  # the first trained token
    assert prompt_ids(tok, messages([("user", question)])) == train["input_ids"][0][:n_prompt]
    assert tok.apply_chat_template(messages([("user", question)]), add_generation_prompt=True, tokenize=False) == (
        p.render(question)
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turns=conversations(max_turns=4))
@pytest.mark.parametrize("name", ["kullm", "kullm_system"])
def test_every_turn_of_a_conversation_is_served_as_trained(name, turns):
    """At each assistant turn, the served prompt is the training example's tokens up to that turn's first token."""
    tok, p = served(name), prompter(name)
    rec = SimpleNamespace(turns=turns, instruction="", input="", output="")
    enc = encode_conversations(tok, [render_with_prompter(p, tok, rec)], cutoff_len=100_000)
    x, labels = enc["input_ids"][0], enc["labels"][0]
    starts = [i for i in range(len(x)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    answers = [k for k, (r, _) in enumerate(turns) if r == "assistant"]
    assert len(starts) == len(answers)
    for k, start in zip(answers, starts, strict=True):
        assert prompt_ids(tok, messages(turns[:k])) == x[:start]
    whole = tok.apply_chat_template(messages(turns), tokenize=False)
    assert whole == tok.decode(x, skip_special_tokens=False)


@given(question=turn_text)
@settings(max_examples=30, deadline=None)
def test_default_system_prompt_is_served_when_a_conversation_has_none(question):
    tok, p = served("kullm_system"), prompter("kullm_system")
    rendered = tok.apply_chat_template(messages([("user", question)]), add_generation_prompt=True, tokenize=False)
    assert rendered == p.render(question) and rendered.startswith("### System:\n당신은 고려대학교")


def test_generation_prompt_and_refusals():
    assert generation_prompt(prompter("kullm")) == "### 응답:\n"
    assert generation_prompt(prompter("alpaca_legacy")) == "### Response:"
    tok = served("alpaca")
    conv = messages([("user", "a"), ("assistant", "b"), ("user", "c")])
    with pytest.raises(Exception, match="template alpaca renders one user turn only"):
        tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    with pytest.raises(Exception, match="cannot render a system turn"):
        tok.apply_chat_template(messages([("system", "s"), ("user", "a")]), tokenize=False)
    odd = Prompter(
        "odd", "{instruction} {input} ### A:\n", "{instruction} ### A:\n", "### A:", prompt_turn="### A:{instruction}"
    )
    with pytest.raises(ValueError, match="prompt_turn does not end with the generation prompt"):
        to_chat_template(odd)


def test_serving_sets_the_template_only_while_saving(tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(compose("prepare", ["output_dir=/tmp/unused"]).model)
    before = tok.chat_template
    with serving(tok, prompter("kullm")):
        tok.save_pretrained(str(tmp_path))
    assert tok.chat_template == before
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = messages([("user", "안녕")])
    rendered = again.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == prompter("kullm").render("안녕")
