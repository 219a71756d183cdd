"""Exact per-turn masks for conversations: kullm templates and tokenizers' own chat templates."""

import functools
from types import SimpleNamespace

import pytest
from helpers import prompter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conversations
from tokenizers import AddedToken

from kullm.config import compose
from kullm.data.sft import IGNORE_INDEX, encode_batch
from kullm.data.sft_chat import (
    Piece,
    Unrenderable,
    check_conversation,
    encode_conversations,
    render_with_prompter,
    render_with_tokenizer,
)
from kullm.modeling import load_tokenizer
from kullm.templates import Prompter

# Two chat templates written for these tests, in the shapes real models use.
CHATML = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
LLAMA3 = (
    "{{- bos_token -}}{%- for m in messages -%}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
# like templates that drop earlier assistant turns' reasoning: the past renders otherwise than the present
UNSTABLE = (
    "{%- for m in messages -%}{%- if m['role'] == 'assistant' and not loop.last -%}{{- '[past]<|im_end|>' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
NO_EOT = (
    "{%- for m in messages -%}{{- m['role'] + ': ' + m['content'] + '\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@functools.cache
def tokenizer(chat_template: str | None = None):
    tok = load_tokenizer(compose("prepare", ["output_dir=/tmp/unused"]).model)
    if chat_template is not None:
        tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS], special_tokens=True)
        tok.bos_token = "<|begin_of_text|>"
        tok.chat_template = chat_template
    return tok


def rec(*turns, **kw):
    return SimpleNamespace(turns=tuple(turns), instruction="", input="", output="", **kw)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def decoded_runs(tok, enc):
    return [tok.decode(r, skip_special_tokens=False) for r in trained_runs(enc)]


CONV = (
    ("system", "너는 친절한 비서야."),
    ("user", "고려대학교는 어디에 있어?"),
    ("assistant", "서울 성북구에 있습니다."),
    ("user", "설립 연도는?"),
    ("assistant", "1905년입니다. 🙂"),
)


def trained_runs(enc, n=0):
    runs, prev = [], IGNORE_INDEX
    for t, lab in zip(enc["input_ids"][n], enc["labels"][n], strict=True):
        if lab != IGNORE_INDEX:
            runs.append([t]) if prev == IGNORE_INDEX else runs[-1].append(t)
        prev = lab
    return runs


def test_kullm_multi_turn_exact_ids_and_labels():
    tok, p = tokenizer(), prompter("kullm")
    enc = encode_conversations(tok, [render_with_prompter(p, tok, rec(*CONV))], cutoff_len=512)
    first = "너는 친절한 비서야.\n\n### 명령어:\n고려대학교는 어디에 있어?\n\n### 응답:\n"
    later = "\n\n### 명령어:\n설립 연도는?\n\n### 응답:\n"
    a1, a2 = ids(tok, "서울 성북구에 있습니다."), ids(tok, "1905년입니다. 🙂")
    eos = [tok.eos_token_id]
    assert enc["input_ids"][0] == ids(tok, first) + a1 + eos + ids(tok, later) + a2 + eos
    mask = [IGNORE_INDEX]
    assert enc["labels"][0] == mask * len(ids(tok, first)) + a1 + eos + mask * len(ids(tok, later)) + a2 + eos
    assert decoded_runs(tok, enc) == ["서울 성북구에 있습니다.<|endoftext|>", "1905년입니다. 🙂<|endoftext|>"]
    assert enc["prompt_len"][0] == len(ids(tok, first)) + len(ids(tok, later))
    assert enc["response_len"][0] == len(a1) + len(a2) + 2


def test_train_on_last_and_all():
    tok, p = tokenizer(), prompter("kullm")
    pieces = [render_with_prompter(p, tok, rec(*CONV))]
    last = encode_conversations(tok, pieces, cutoff_len=512, train_on="last")
    assert decoded_runs(tok, last) == ["1905년입니다. 🙂<|endoftext|>"]
    assert check_conversation(tok, last["input_ids"][0], last["labels"][0], last["spans"][0]) == ""
    full = encode_conversations(tok, pieces, cutoff_len=512, train_on="all")
    assert full["labels"][0] == full["input_ids"][0] == last["input_ids"][0]
    args = (full["input_ids"][0], full["labels"][0], [])
    assert check_conversation(tok, *args, train_on="all", text=full["text"][0]) == ""


@pytest.mark.parametrize("name", ["kullm", "kullm_system", "alpaca"])
def test_one_turn_is_exactly_the_single_turn_example(name):
    tok, p = tokenizer(), prompter(name)
    conv = rec(("user", "다음 문장을 번역하세요."), ("assistant", "Good morning!"))
    enc = encode_conversations(tok, [render_with_prompter(p, tok, conv)], cutoff_len=512)
    single = encode_batch(tok, [p.render("다음 문장을 번역하세요.")], ["Good morning!"], cutoff_len=512)
    assert (enc["input_ids"], enc["labels"]) == (single["input_ids"], single["labels"])


def test_single_turn_templates_refuse_more_turns_by_name():
    tok = tokenizer()
    with pytest.raises(Unrenderable, match="template_single_turn: template 'alpaca' has no prompt_turn"):
        render_with_prompter(prompter("alpaca"), tok, rec(*CONV[1:]))
    with pytest.raises(Unrenderable, match="has no prompt_system"):
        render_with_prompter(prompter("alpaca"), tok, rec(*CONV[:3]))


def test_chatml_spans_are_content_plus_end_of_turn():
    tok = tokenizer(CHATML)
    pieces = render_with_tokenizer(tok, rec(*CONV))
    assert [p for p in pieces if p.assistant] == [
        Piece("서울 성북구에 있습니다.", True, "<|im_end|>"),
        Piece("1905년입니다. 🙂", True, "<|im_end|>"),
    ]
    assert pieces[2].text == "\n<|im_start|>user\n설립 연도는?<|im_end|>\n<|im_start|>assistant\n"
    enc = encode_conversations(tok, [pieces], cutoff_len=512)
    assert decoded_runs(tok, enc) == ["서울 성북구에 있습니다.<|im_end|>", "1905년입니다. 🙂<|im_end|>"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [r[-1] for r in trained_runs(enc)] == [im_end, im_end]  # one special token, not its characters
    # the trailing newline after the last turn is not trained, nor kept
    assert tok.decode(enc["input_ids"][0]) == tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in CONV], tokenize=False
    ).removesuffix("\n")


def test_llama3_style_with_bos():
    tok = tokenizer(LLAMA3)
    pieces = render_with_tokenizer(tok, rec(*CONV))
    assert pieces[0].text.startswith("<|begin_of_text|><|start_header_id|>system")
    enc = encode_conversations(tok, [pieces], cutoff_len=512)
    assert enc["input_ids"][0][0] == tok.bos_token_id and enc["input_ids"][0].count(tok.bos_token_id) == 1
    assert decoded_runs(tok, enc) == ["서울 성북구에 있습니다.<|eot_id|>", "1905년입니다. 🙂<|eot_id|>"]


@pytest.mark.parametrize(
    ("template", "turns", "reason"),
    [
        (LLAMA3, (("user", "질문"), ("assistant", "답 ")), "template_alters_content"),
        (UNSTABLE, CONV, "template_not_prefix_stable"),
        (NO_EOT, CONV, "no_end_of_turn"),
        ("{{ raise_exception('roles must alternate') }}", CONV, "template_error"),
    ],
)
def test_templates_without_exact_masks_are_refused_with_the_reason(template, turns, reason):
    with pytest.raises(Unrenderable, match=reason):
        render_with_tokenizer(tokenizer(template), rec(*turns))


def test_no_chat_template_is_named():
    with pytest.raises(Unrenderable, match="no_chat_template"):
        render_with_tokenizer(tokenizer(), rec(*CONV))


def test_truncation_inside_a_later_turn_keeps_a_prefix_and_a_cut_before_any_answer_drops():
    tok, p = tokenizer(), prompter("kullm")
    pieces = [render_with_prompter(p, tok, rec(*CONV))]
    whole = encode_conversations(tok, pieces, cutoff_len=512)
    n = len(whole["input_ids"][0])
    cut = encode_conversations(tok, pieces, cutoff_len=n - 3)
    assert cut["truncated"] == [True] and cut["keep"] == [True]
    args = (cut["input_ids"][0], cut["labels"][0], cut["spans"][0])
    assert check_conversation(tok, *args, truncated=True) == ""
    assert check_conversation(tok, *args, truncated=False).startswith("trained span 1 decodes to '1905")
    assert decoded_runs(tok, cut)[0] == "서울 성북구에 있습니다.<|endoftext|>"
    first_prompt = len(ids(tok, "너는 친절한 비서야.\n\n### 명령어:\n고려대학교는 어디에 있어?\n\n### 응답:\n"))
    assert encode_conversations(tok, pieces, cutoff_len=first_prompt)["keep"] == [False]


def test_check_conversation_names_broken_masks():
    tok, p = tokenizer(), prompter("kullm")
    enc = encode_conversations(tok, [render_with_prompter(p, tok, rec(*CONV))], cutoff_len=512)
    x, labels, spans = enc["input_ids"][0], enc["labels"][0], enc["spans"][0]
    assert check_conversation(tok, x, labels, spans) == ""
    shifted = [IGNORE_INDEX] + labels[:-1]
    assert "a label differs" in check_conversation(tok, x, shifted, spans)
    no_eos = list(labels)
    no_eos[-1] = IGNORE_INDEX
    assert check_conversation(tok, x, no_eos, spans).startswith("trained span 1 decodes to '1905년입니다. 🙂'")
    pairs = enumerate(zip(x, labels, strict=True))
    user_trained = [t if lab == IGNORE_INDEX and i > 20 else lab for i, (t, lab) in pairs]
    assert "trained span" in check_conversation(tok, x, user_trained, spans)
    assert check_conversation(tok, x, [IGNORE_INDEX] * len(x), spans) == "no token is trained"


RENDERERS = {
    "kullm": lambda r: render_with_prompter(prompter("kullm"), tokenizer(), r),
    "kullm_system": lambda r: render_with_prompter(prompter("kullm_system"), tokenizer(), r),
    "chatml": lambda r: render_with_tokenizer(tokenizer(CHATML), r),
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    turns=conversations(),
    renderer=st.sampled_from(sorted(RENDERERS)),
    train_on=st.sampled_from(["all_assistant", "last", "all"]),
)
def test_invariant_holds_for_random_conversations(turns, renderer, train_on):
    """Korean, emoji, control characters, template markers and EOS inside content, system prompts, 1–8 exchanges."""
    tok = tokenizer(CHATML) if renderer == "chatml" else tokenizer()
    pieces = RENDERERS[renderer](rec(*turns))
    enc = encode_conversations(tok, [pieces], cutoff_len=100_000, train_on=train_on)
    x, labels = enc["input_ids"][0], enc["labels"][0]
    assert check_conversation(tok, x, labels, enc["spans"][0], train_on=train_on, text=enc["text"][0]) == ""
    eot = "<|im_end|>" if renderer == "chatml" else "<|endoftext|>"
    answers = [c + eot for r, c in turns if r == "assistant"]
    if train_on == "all":
        assert labels == x
    else:  # independent of check_conversation: each trained run is one answer, verbatim
        want = answers if train_on == "all_assistant" else answers[-1:]
        assert decoded_runs(tok, enc) == want


def test_a_split_rendered_by_the_tokenizer_template_drops_and_names_what_it_cannot_render():
    from kullm.data.records import Record
    from kullm.data.sft_chat import encode_split
    from kullm.data.sources import DataError

    tok = tokenizer(LLAMA3)
    records = [
        Record("conv", "", "", "", "f.jsonl:1", CONV),
        Record("flat", "번역하세요", "좋은 아침", "Good morning", "f.jsonl:2"),
        Record("spaces", "", "", "", "f.jsonl:3", (("user", "질문"), ("assistant", " 답 "))),
    ]
    data = {"cutoff_len": 512, "chat_template": "tokenizer", "policy": "skip"}
    ds, counts, bad = encode_split(records, data, tok, prompter("kullm"), "train")
    assert ds["id"] == ["conv", "flat"] and counts["kept"] == 2 and counts["dropped_invariant"] == 1
    assert bad == [
        "spaces: template_alters_content: turn 1's content is not rendered verbatim "
        "(the template changes it, e.g. strips spaces)"
    ]
    flat = ds[1]
    assert decoded_runs(tok, {"input_ids": [flat["input_ids"]], "labels": [flat["labels"]]}) == [
        "Good morning<|eot_id|>"
    ]
    user = tok.decode(flat["input_ids"], skip_special_tokens=False)
    assert "<|start_header_id|>user<|end_header_id|>\n\n번역하세요\n\n좋은 아침<|eot_id|>" in user
    with pytest.raises(DataError, match=r"f\.jsonl:3: id spaces: template_alters_content"):
        encode_split(records, {**data, "policy": "strict"}, tok, prompter("kullm"), "train")


def test_a_tokenizer_merging_across_a_turn_boundary_is_reported():
    """Turn-by-turn pieces keep masks exact; a server tokenizing the history whole would merge '안녕'+'하세요'."""
    tok = tokenizer()
    p = Prompter(
        "merge", "{instruction} {input}\n안녕", "{instruction}\n안녕", "안녕", prompt_turn="\n{instruction}\n안녕"
    )
    two = rec(("user", "a"), ("assistant", "하세요"), ("user", "b"), ("assistant", "하세요"))
    one = rec(("user", "a"), ("assistant", "하세요"))
    calm = rec(*CONV)
    rendered = [render_with_prompter(q, tok, r) for q, r in ((p, two), (p, one), (prompter("kullm"), calm))]
    enc = encode_conversations(tok, rendered, cutoff_len=512)
    assert enc["served_differs"] == [True, False, False]
    assert all(
        check_conversation(tok, x, y, s) == ""
        for x, y, s in zip(*(enc[k] for k in ("input_ids", "labels", "spans")), strict=True)
    )
