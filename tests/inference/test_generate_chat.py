"""kullm-generate on conversation files (OpenAI messages, ShareGPT) with tiny Llama and Qwen2 models: the history
rendered by the model's chat template, the next assistant turn generated, batched equal to one at a time."""

import copy
import json
from pathlib import Path

import pytest
from helpers import CHAT, write_jsonl

from kullm.config import compose
from kullm.data.sources import DataError
from kullm.inference.files import run_file
from kullm.inference.generator import Generator

FAMILY_STOPS = {"llama": ["<|eot_id|>", "<|end_of_text|>"], "qwen2": ["<|im_end|>", "<|endoftext|>"]}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def generator(request) -> Generator:
    """A purely random tiny model of the family under a random LoRA (a tied random model only repeats the last
    prompt token; with the LoRA its greedy answers are long and differ from prompt to prompt)."""
    import peft
    import torch

    arch = request.param
    overrides = ["+model.tiny_shape.warmup_steps=0", "generation=greedy", "generation.max_new_tokens=8"]
    cfg = compose("generate", [f"model=tiny-{arch}", *overrides, "output_dir=/nonexistent"])
    g = Generator.from_config(cfg)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(g.model, lora).eval()
    g = Generator(model, g.tokenizer, g.prompter, g.settings, label=f"tiny-{arch}")
    g.arch = arch
    return g


def conversations() -> list[dict]:
    return rows(CHAT / "messages.jsonl")


def history_of(messages: list[dict]) -> list[dict]:
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


@pytest.fixture(scope="module")
def alone(generator) -> dict[str, list[int]]:
    """Each sample conversation's answer ids, generated alone from apply_chat_template's prompt of its history."""
    tok, out = generator.tokenizer, {}
    for conv in conversations():
        prompt = tok.apply_chat_template(history_of(conv["messages"]), add_generation_prompt=True, tokenize=False)
        out[conv["id"]] = generator.complete([tok(prompt, add_special_tokens=False)["input_ids"]])[0]
    assert sum(len(x) == 8 for x in out.values()) >= 9  # most run to max_new_tokens: every position is compared
    assert len({tuple(x) for x in out.values()}) > 5
    return out


def test_a_conversation_file_answers_the_last_user_turn_through_the_chat_template(generator, alone, tmp_path):
    convs = conversations()
    open_row = {"id": "open", "messages": [*convs[3]["messages"], {"role": "user", "content": "한 번 더요?"}]}
    src = write_jsonl(tmp_path / "chat.jsonl", [*convs, open_row])
    out = run_file(generator, src, tmp_path / "responses.jsonl", batch_size=4, progress=False)
    got = {r["id"]: r for r in rows(out)}
    assert sorted(got) == sorted([c["id"] for c in convs] + ["open"])
    tok = generator.tokenizer
    prompt = tok.apply_chat_template(open_row["messages"], add_generation_prompt=True, tokenize=False)
    answers = {**alone, "open": generator.complete([tok(prompt, add_special_tokens=False)["input_ids"]])[0]}
    for conv in [*convs, open_row]:
        row, msgs = got[conv["id"]], conv["messages"]
        # the id, the history answered (system + turns up to the last user turn), the reference and the answer
        assert row["messages"] == history_of(msgs)
        if msgs[-1]["role"] == "assistant":
            assert set(row) == {"id", "messages", "reference", "response", "generation"}
            assert row["reference"] == msgs[-1]["content"]
        else:
            assert set(row) == {"id", "messages", "response", "generation"}
        assert row["response"] == tok.decode(answers[conv["id"]], skip_special_tokens=True).strip()
    assert sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in got.values()) >= 5


def test_batched_multi_turn_prompts_equal_one_at_a_time_token_for_token(generator, alone):
    from kullm.data.records import ReadOptions, read_records

    records, _ = read_records(CHAT / "messages.jsonl", ReadOptions(open_conversations=True, require_output=False))
    ids = [generator.encode(generator.render(r)) for r in records]
    assert max(map(len, ids)) > 4 * min(map(len, ids))  # the short prompts carry hundreds of pad tokens
    assert generator.complete(ids) == [alone[r.id] for r in records]
    decoded = [generator.tokenizer.decode(alone[r.id], skip_special_tokens=True).strip() for r in records]
    assert generator.generate(records, batch_size=5) == decoded


def test_sharegpt_json_gives_the_answers_of_the_messages_file(generator, tmp_path):
    a = run_file(generator, CHAT / "messages.jsonl", tmp_path / "a.jsonl", batch_size=8, progress=False)
    b = run_file(generator, CHAT / "sharegpt.json", tmp_path / "b.jsonl", batch_size=3, progress=False)
    strip = [{k: v for k, v in r.items() if k != "generation"} for r in rows(a)]
    assert sorted(strip, key=lambda r: r["id"]) == sorted(
        ({k: v for k, v in r.items() if k != "generation"} for r in rows(b)), key=lambda r: r["id"]
    )


def test_answers_stop_at_every_end_of_turn_token_of_the_family(generator, monkeypatch):
    """The model's generation config names two stops (Llama: <|eot_id|> and <|end_of_text|>); an answer ends at the
    first of either, in a batch too, whatever follows it."""
    import torch

    tok = generator.tokenizer
    stops = [tok.convert_tokens_to_ids(t) for t in FAMILY_STOPS[generator.arch]]
    assert generator.eos_ids == stops
    assert generator.config.eos_token_id == stops
    words = tok("안녕하세요 반갑습니다", add_special_tokens=False)["input_ids"]
    tails = [words + [stops[0]] + words, words[:1] + [stops[1]] + words + words[1:]]

    def fake_generate(input_ids, attention_mask, generation_config, **_):
        return torch.cat([input_ids, torch.tensor(tails[: len(input_ids)])], dim=1)

    monkeypatch.setattr(generator.model, "generate", fake_generate)
    first = [{"role": "user", "content": "인사해 주세요"}]
    second = [*first, {"role": "assistant", "content": "안녕하세요"}, {"role": "user", "content": "한 번 더"}]
    prompts = [generator.encode(generator.render(first)), generator.encode(generator.render(second))]
    assert generator.complete(prompts) == [words, words[:1]]


def test_bad_conversation_rows_are_named_with_file_and_line_and_the_rest_run(generator, tmp_path, caplog):
    good = conversations()[0]
    src = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            {"id": "twice", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            {"id": "who", "messages": [{"role": "robot", "content": "삐"}]},
            {"id": "empty", "messages": [{"role": "user", "content": " "}]},
            {"id": "sys", "messages": [{"role": "system", "content": "도우미"}]},
        ],
    )
    out = run_file(generator, src, tmp_path / "o.jsonl", progress=False)
    assert [r["id"] for r in rows(out)] == [good["id"]]
    rejects = {r["source"]: (r["field"], r["reason"]) for r in rows(tmp_path / "o.rejects.jsonl")}
    assert rejects == {
        f"{src}:2": ("messages[1]", "alternation"),
        f"{src}:3": ("messages[0].role", "unknown_role"),
        f"{src}:4": ("messages[0].content", "empty_turn"),
        f"{src}:5": ("messages", "not_ending_in_assistant"),
    }
    assert f"{src}:2" in caplog.text
    with pytest.raises(DataError, match=rf"{src}:2: messages\[1\]: alternation"):
        run_file(generator, src, tmp_path / "strict.jsonl", policy="strict", progress=False)


def test_a_conversation_the_template_cannot_render_is_a_reject(generator, tmp_path):
    """Without a chat_template only a one-turn conversation can be rendered (as the single-turn prompt)."""
    g = Generator(generator.model, copy.deepcopy(generator.tokenizer), generator.prompter, generator.settings)
    g.tokenizer.chat_template = None
    one = {"id": "one", "messages": [{"role": "user", "content": "한국의 수도는?"}]}
    multi = next(c for c in conversations() if sum(m["role"] == "user" for m in c["messages"]) > 1)
    src = write_jsonl(tmp_path / "in.jsonl", [one, multi])
    out = run_file(g, src, tmp_path / "o.jsonl", progress=False)
    assert [r["id"] for r in rows(out)] == ["one"]
    assert rows(out)[0]["response"] == g.generate([("한국의 수도는?", "")])[0]
    (reject,) = rows(tmp_path / "o.rejects.jsonl")
    assert (reject["source"], reject["reason"]) == (f"{src}:2", "unrenderable")
    assert "no chat_template" in reject["message"]
    with pytest.raises(DataError, match=rf"{src}:2: messages: unrenderable: the tokenizer has no chat_template"):
        run_file(g, src, tmp_path / "strict.jsonl", policy="strict", progress=False)


@pytest.mark.parametrize("renderer", ["tokenizer", "template"])
def test_an_instruction_is_rendered_as_the_adapter_was_trained(tmp_path, renderer):
    """Trained on the tokenizer's own chat template, an instruction row was one user turn through it: generation
    renders it the same way; trained on a kullm template, with that template."""
    import peft
    from omegaconf import OmegaConf

    from kullm.adapter import save_adapter
    from kullm.modeling import load_model, load_tokenizer
    from kullm.templates import Prompter

    cfg = compose("prepare", [f"output_dir={tmp_path}", "model=tiny-llama", "+model.tiny_shape.warmup_steps=0",
                              f"data.chat_template={renderer}"])  # fmt: skip
    model = peft.get_peft_model(load_model(OmegaConf.to_container(cfg.model, resolve=True)),
                                peft.LoraConfig(r=4, target_modules="all-linear"))  # fmt: skip
    prompter = Prompter.from_config(cfg.template)
    folder = save_adapter(model, tmp_path / "adapter", tokenizer=load_tokenizer(cfg.model), prompter=prompter,
                          config=cfg)  # fmt: skip
    g = Generator.from_config(compose("generate", [f"adapter={folder}", "output_dir=/nonexistent"]))
    assert g.chat_only == (renderer == "tokenizer")
    turn = [{"role": "user", "content": "다음 글을 요약하세요.\n\n한국어는 아름답다."}]
    want = (
        g.tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        if renderer == "tokenizer"
        else prompter.render("다음 글을 요약하세요.", "한국어는 아름답다.")
    )
    assert g.render(("다음 글을 요약하세요.", "한국어는 아름답다.")) == want
    assert g.render({"instruction": "다음 글을 요약하세요.", "input": "한국어는 아름답다."}) == want
