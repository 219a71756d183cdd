import functools
from pathlib import Path

import pytest
from helpers import ROOT, SHARED_EVAL_SET, prompter
from hypothesis import HealthCheck, given, settings
from strategies import user_text

from kullm.config import compose
from kullm.data.records import read_records
from kullm.data.sft import IGNORE_INDEX, Collator, check_example, encode_batch
from kullm.modeling import load_tokenizer

TEMPLATES = ["kullm", "alpaca", "alpaca_legacy", "alpaca_short"]
SAMPLE = ROOT / "data" / "sample"


@functools.cache
def tokenizer():
    return load_tokenizer(compose("prepare", ["output_dir=/tmp/unused"]).model)


def ids(text: str) -> list[int]:
    return tokenizer()(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("inp", ["", "영어로: 좋은 아침"])
def test_exact_ids_and_labels(name, inp):
    tok, p = tokenizer(), prompter(name)
    prompt = p.render("다음 문장을 번역하세요.", inp)
    out = encode_batch(tok, [prompt], ["Good morning!"], cutoff_len=512)
    prompt_ids, response_ids = ids(prompt), ids("Good morning!")
    assert out["input_ids"][0] == prompt_ids + response_ids + [tok.eos_token_id]
    assert out["labels"][0] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2  # Polyglot-ko's layout: pad and EOS share an id
    assert out["keep"] == [True] and out["truncated"] == [False]


def test_boundary_is_exact_where_bpe_would_merge_across_it():
    """Tokenizing prompt+response together can merge tokens across the boundary; separate tokenization cannot."""
    tok = tokenizer()
    prompt, response = "안녕", "하세요"  # "안녕하세요" is one token when tokenized together
    joint = ids(prompt + response)
    split = ids(prompt) + ids(response)
    enc = encode_batch(tok, [prompt], [response], cutoff_len=64, add_eos=False)
    assert enc["input_ids"][0] == split
    trained = [t for t, lab in zip(enc["input_ids"][0], enc["labels"][0], strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == response
    assert joint != split and tok.decode(joint) == tok.decode(split)  # same text, different boundary


def test_train_on_inputs_and_no_eos():
    tok = tokenizer()
    enc = encode_batch(tok, ["질문"], ["답"], cutoff_len=64, train_on_inputs=True, add_eos=False)
    assert enc["labels"][0] == enc["input_ids"][0] == ids("질문") + ids("답")


def test_truncation_keeps_no_eos_and_prompt_only_rows_are_dropped():
    tok = tokenizer()
    prompt, response = "짧은 질문", "아주 긴 답변입니다. " * 20
    n_prompt = len(ids(prompt))
    enc = encode_batch(tok, [prompt, prompt * 30], [response, "답"], cutoff_len=n_prompt + 5)
    assert len(enc["input_ids"][0]) == n_prompt + 5 and enc["truncated"][0]
    assert tok.eos_token_id not in enc["input_ids"][0]
    assert check_example(tok, enc["input_ids"][0], enc["labels"][0], response) == ""
    assert enc["keep"] == [True, False]


def test_check_example_catches_a_wrong_mask():
    tok = tokenizer()
    enc = encode_batch(tok, ["질문입니다"], ["답입니다"], cutoff_len=64)
    labels = list(enc["labels"][0])
    first = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    labels[first - 1] = enc["input_ids"][0][first - 1]  # one prompt token leaks into the loss
    assert "decode" in check_example(tok, enc["input_ids"][0], labels, "답입니다")
    labels = [IGNORE_INDEX] * len(labels)
    assert check_example(tok, enc["input_ids"][0], labels, "답입니다") == "no token is trained"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instruction=user_text, inp=user_text, output=user_text.filter(lambda s: s.strip()))
def test_invariant_holds_for_random_text(instruction, inp, output):
    tok = tokenizer()
    for name in TEMPLATES:
        prompt = prompter(name).render(instruction or "x", inp)
        for cutoff in (8, 40, 1024):
            enc = encode_batch(tok, [prompt], [output], cutoff_len=cutoff)
            if enc["keep"][0]:
                assert check_example(tok, enc["input_ids"][0], enc["labels"][0], output) == ""


def _assert_invariant_over(path: Path) -> int:
    tok = tokenizer()
    records, report = read_records(path)
    assert report.n_rejected == 0
    for name in TEMPLATES:
        p = prompter(name)
        for cutoff in (64, 512):
            enc = encode_batch(
                tok, [p.render(r.instruction, r.input) for r in records], [r.output for r in records], cutoff_len=cutoff
            )
            for i, r in enumerate(records):
                if enc["keep"][i]:
                    assert check_example(tok, enc["input_ids"][i], enc["labels"][i], r.output) == "", r.id
    return len(records)


@pytest.mark.skipif(
    not SHARED_EVAL_SET.exists(), reason=f"needs the shared evaluation set at {SHARED_EVAL_SET} (not in a user's clone)"
)
def test_invariant_over_the_whole_shared_evaluation_set():
    assert _assert_invariant_over(SHARED_EVAL_SET) == 252


def test_invariant_over_the_bundled_sample():
    assert _assert_invariant_over(SAMPLE) >= 60


def test_collator_pads_right_to_multiple_of_8():
    batch = Collator(pad_id=2)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": list(range(10, 20)), "labels": list(range(10, 20))},
        ]
    )
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [2] * 13
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 13
    assert batch["attention_mask"][1].sum() == 10 and batch["labels"][1, 10:].eq(-100).all()
    assert Collator(pad_id=0, pad_to_multiple_of=1)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])[
        "input_ids"
    ].shape == (1, 3)


def test_token_ids_from_the_rust_tokenizer_equal_the_tokenizers_own():
    """The fast path (``encode_batch_fast``) gives exactly ``tokenizer(...)``'s ids; a backend left truncating by
    an earlier call is not trusted (the slow path honours ``add_special_tokens=False`` and no truncation)."""
    from kullm.data.sft import _plain_backend, token_ids

    tok = tokenizer()
    texts = ["고려대학교에 대해서 알려줘", "Hello, 世界! 123", "", "  두 칸  공백\n줄바꿈", "아주 긴 답변입니다. " * 50]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert _plain_backend(tok, tok._tokenizer) and token_ids(tok, texts) == want
    tok._tokenizer.enable_truncation(max_length=3)
    try:
        assert not _plain_backend(tok, tok._tokenizer)
        assert token_ids(tok, texts) == want
    finally:
        tok._tokenizer.no_truncation()


def test_collator_counts_trained_positions_on_the_cpu():
    """Flat indices (row × width + t) of positions whose next-token label is trained, and the two counts the
    training step reads without waiting for the device."""
    batch = Collator(pad_id=2)(
        [
            {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},  # targets at t = 1, 2
            {"input_ids": [9, 10, 11], "labels": [9, -100, 11]},  # a gap: only t = 1 (label 11)
        ]
    )
    assert batch["input_ids"].shape == (2, 8)
    assert batch["trained_positions"].tolist() == [1, 2, 9]
    assert batch["n_trained"].dim() == 0 and int(batch["n_trained"]) == 3
    assert batch["n_tokens"].dim() == 0 and int(batch["n_tokens"]) == 7
    shifted = batch["labels"][:, 1:] != -100
    assert int(batch["n_trained"]) == int(shifted.sum())
    flat = batch["labels"].reshape(-1)[batch["trained_positions"] + 1].tolist()
    assert flat == [7, 8, 11]


def test_an_over_long_row_is_cut_before_tokenizing_with_the_same_tokens():
    tok = tokenizer()
    """A huge answer is cut to cutoff_len × MAX_CHARS_PER_TOKEN characters first: same ids, bounded cost."""
    from kullm.data.sft import MAX_CHARS_PER_TOKEN, encode_batch

    long_answer = "아주 긴 답변입니다. Very long answer! " * 20_000  # ~600k characters
    seen: list[int] = []

    class Spy:
        eos_token_id = tok.eos_token_id

        def __call__(self, texts, **kw):
            seen.extend(len(t) for t in texts)
            return tok(texts, **kw)

    cut = encode_batch(Spy(), ["### 명령어:\n질문\n\n### 응답:\n"], [long_answer], cutoff_len=64)
    full = encode_batch(tok, ["### 명령어:\n질문\n\n### 응답:\n"], [long_answer], cutoff_len=64)
    assert cut["input_ids"] == full["input_ids"] and cut["labels"] == full["labels"]
    assert cut["truncated"] == [True] and max(seen) == 64 * MAX_CHARS_PER_TOKEN


def test_the_truncated_branch_rejects_a_wrong_span():
    tok = tokenizer()
    output = "고려대학교는 서울에 있습니다. 아주 긴 설명이 이어집니다."
    enc = encode_batch(tok, ["### 명령어:\n질문\n\n### 응답:\n"], [output], cutoff_len=14)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    assert enc["truncated"] == [True] and ids[-1] != tok.eos_token_id
    assert check_example(tok, ids, labels, output) == ""  # a prefix of the output
    assert "not a prefix of the output" in check_example(tok, ids, labels, "전혀 다른 답변입니다. " * 3)
    # the span appears in this output, but not at its start: the model would learn to skip its beginning
    assert "not a prefix of the output" in check_example(tok, ids, labels, "앞부분이 먼저 옵니다. " + output)
    shifted = labels[:]  # the last trained token replaced: still contiguous, but the text is no prefix any more
    shifted[-1] = ids[-1] = (ids[-1] + 7) % len(tok)
    assert "not a prefix of the output" in check_example(tok, ids, shifted, output)


def test_train_on_inputs_checks_every_position_and_the_response_span():
    tok = tokenizer()
    enc = encode_batch(tok, ["### 명령어:\n질문\n\n### 응답:\n"], ["답변입니다."], cutoff_len=64, train_on_inputs=True)
    ids, labels, n = enc["input_ids"][0], enc["labels"][0], enc["prompt_len"][0]
    assert check_example(tok, ids, labels, "답변입니다.", train_on_inputs=True, prompt_len=n) == ""
    assert "not trained" in check_example(
        tok, ids, [-100] + labels[1:], "답변입니다.", train_on_inputs=True, prompt_len=n
    )
    assert "decode to" in check_example(tok, ids, labels, "다른 답", train_on_inputs=True, prompt_len=n)


def test_cutoff_boundaries_and_lengths_are_exact():
    tok = tokenizer()
    prompt, answer = "### 명령어:\n질문\n\n### 응답:\n", "답변입니다."
    n_p = len(tok(prompt, add_special_tokens=False)["input_ids"])
    n_r = len(tok(answer, add_special_tokens=False)["input_ids"])
    exact = encode_batch(tok, [prompt], [answer], cutoff_len=n_p + n_r + 1)  # room for EOS, nothing more
    assert exact["truncated"] == [False] and exact["input_ids"][0][-1] == tok.eos_token_id
    assert (exact["prompt_len"], exact["response_len"]) == ([n_p], [n_r + 1])
    cut = encode_batch(tok, [prompt], [answer], cutoff_len=n_p + n_r)
    assert cut["truncated"] == [True] and cut["input_ids"][0][-1] != tok.eos_token_id
    assert encode_batch(tok, [prompt], [answer], cutoff_len=n_p + n_r + 1, add_eos=False)["response_len"] == [n_r]
    assert encode_batch(tok, ["a"], ["b"], cutoff_len=2)["keep"] == [True]
    with pytest.raises(ValueError, match="cutoff_len must be at least 2, got 1"):
        encode_batch(tok, ["a"], ["b"], cutoff_len=1)


def test_a_tokenizer_that_adds_bos_gets_it_once_at_the_start_of_the_prompt_and_none_inside():
    """Llama-style tokenizers add BOS to every call: an example starts with it, as the tokenizer's own call would,
    masked with the prompt; prompt and response are still encoded without special tokens."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer())
    bos = tok.convert_ids_to_tokens(3)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 3)])
    assert tok("안녕")["input_ids"][0] == 3
    enc = encode_batch(tok, ["질문", f"{bos}질문"], ["답", "답"], cutoff_len=64)
    expected = [3, *ids("질문"), *ids("답"), tok.eos_token_id]
    assert enc["input_ids"] == [expected, expected]  # a prompt that already starts with BOS gets no second one
    n_prompt = 1 + len(ids("질문"))
    assert enc["prompt_len"] == [n_prompt, n_prompt]
    assert enc["labels"][0] == [IGNORE_INDEX] * n_prompt + expected[n_prompt:]
    assert check_example(tok, enc["input_ids"][0], enc["labels"][0], "답") == ""
    whole = encode_batch(tok, ["질문"], ["답"], cutoff_len=64, train_on_inputs=True)
    assert whole["labels"][0] == expected
    assert check_example(tok, expected, expected, "답", train_on_inputs=True, prompt_len=n_prompt) == ""
    assert encode_batch(tokenizer(), ["질문"], ["답"], cutoff_len=64)["input_ids"][0] == expected[1:]  # none added


def test_the_invariant_decodes_specials_and_spacing_verbatim():
    """Outputs holding a special token's text or spaces before punctuation must check as they are."""
    tok = tokenizer()
    for output in ["끝에 <|endoftext|> 가 들어간 답", "Hello , world ! 띄어 쓴 문장 ."]:
        enc = encode_batch(tok, ["### 응답:\n"], [output], cutoff_len=256)
        assert check_example(tok, enc["input_ids"][0], enc["labels"][0], output) == ""
        cut = encode_batch(tok, ["### 응답:\n"], [output], cutoff_len=len(enc["input_ids"][0]) - 2)
        assert check_example(tok, cut["input_ids"][0], cut["labels"][0], output) == ""


def test_each_broken_mask_is_named():
    tok = tokenizer()
    enc = encode_batch(tok, ["### 응답:\n"], ["답변"], cutoff_len=64)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    assert check_example(tok, ids, labels[:-1], "답변") == f"{len(ids)} input ids but {len(ids) - 1} labels"
    assert check_example(tok, ids, [IGNORE_INDEX] * len(ids), "답변") == "no token is trained"
    gap = labels[:]
    gap[-2] = IGNORE_INDEX
    assert check_example(tok, ids, gap, "답변") == "trained positions are not one contiguous span ending the example"
    wrong = labels[:]
    wrong[-1] = ids[-1] + 1
    assert check_example(tok, ids, wrong, "답변") == "a label differs from its input id"
    assert check_example(tok, ids, ids[:1] + [IGNORE_INDEX] + ids[2:], "답변", train_on_inputs=True, prompt_len=2) == (
        "train_on_inputs: some position is not trained, or a label differs from its input id"
    )
    with pytest.raises(ValueError, match="check_example with train_on_inputs needs prompt_len"):
        check_example(tok, ids, ids, "답변", train_on_inputs=True)


def test_collator_pads_position_ids_and_rounds_widths():
    import torch

    features = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 0]},
        {"input_ids": [8], "labels": [8], "position_ids": [0]},
    ]
    batch = Collator(pad_id=2, pad_to_multiple_of=0)(features)
    assert batch["input_ids"].shape == (2, 3) and batch["input_ids"].dtype == torch.long
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]] and batch["position_ids"].dtype == torch.long
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]] and batch["attention_mask"].tolist() == [
        [1, 1, 1],
        [1, 0, 0],
    ]
    assert "position_ids" not in Collator(pad_id=2)([{"input_ids": [1], "labels": [1]}])
    with pytest.raises(ValueError, match="cannot collate an empty batch"):
        Collator(pad_id=2)([])


def test_one_batched_check_names_each_broken_row_as_the_single_check_does():
    """``check_batch`` decodes every trained span in one call; each row's verdict is ``check_example``'s."""
    from kullm.data.sft import check_batch

    tok = tokenizer()
    outputs = ["첫 번째 답변입니다.", "두 번째 답변", "세 번째 답변입니다. " * 30, "네 번째", "다섯 번째 답"]
    enc = encode_batch(tok, ["### 응답:\n"] * len(outputs), outputs, cutoff_len=48)
    ids, labels = enc["input_ids"], [list(x) for x in enc["labels"]]
    labels[1][-2] = IGNORE_INDEX  # a gap in the trained span
    labels[3][enc["prompt_len"][3] - 1] = ids[3][enc["prompt_len"][3] - 1]  # the mask one token short
    given = [outputs[0], outputs[1], outputs[2], outputs[3], "다른 답"]  # row 4: the text is not its output
    found = check_batch(tok, ids, labels, given, enc["prompt_len"])
    assert found == [check_example(tok, i, lab, out) for i, lab, out in zip(ids, labels, given, strict=True)]
    assert found[0] == "" and found[2] == "" and enc["truncated"][2]
    assert found[1] == "trained positions are not one contiguous span ending the example"
    assert "decode to" in found[3] and "decode to" in found[4]


def test_decode_texts_equals_the_tokenizers_decode():
    """The one-call Rust path gives ``tokenizer.decode``'s text, specials and spacing verbatim; a tokenizer whose
    ``decode`` is overridden in Python is asked itself."""
    from kullm.data.sft import _plain_backend, decode_texts

    tok = tokenizer()
    seqs = [ids("고려대학교에 대해서  알려줘\n"), ids(" 앞 공백, 뒤 공백 ") + [tok.eos_token_id], [], ids("한")[:1]]
    want = [tok.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in seqs]
    assert _plain_backend(tok, tok._tokenizer, ("decode", "_decode", "batch_decode"))
    assert decode_texts(tok, seqs) == want

    class Shouting(type(tok)):
        def decode(self, token_ids, **kwargs):
            return super().decode(token_ids, **kwargs).upper() + "!"

    loud = Shouting.from_pretrained(tok.name_or_path)
    assert decode_texts(loud, seqs) == [w.upper() + "!" for w in want]
