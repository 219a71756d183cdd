"""A model's own special tokens: the EOS and pad of a model given by path, and the BOS its tokenizer adds — once, at
the start of every prompt trained on, generated from and served."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from console_scripts import run_script
from helpers import ROOT
from transformers import AutoTokenizer

from kullm.chat_template import bos_text, to_chat_template
from kullm.config import compose
from kullm.data.preprocess import load_processed
from kullm.data.sft import IGNORE_INDEX
from kullm.data.sft_chat import encode_conversations, render_with_prompter, render_with_tokenizer
from kullm.modeling import load_tokenizer
from kullm.special_tokens import bos_ids, with_bos
from kullm.templates import Prompter
from kullm.tiny import FAMILIES, build_tiny

SAMPLE = ROOT / "data" / "sample"
QUESTION = "광합성이 무엇인지 초등학생도 이해할 수 있게 설명해 주세요."  # sample-v2-001: an instruction without input
CONV = (("user", "고려대학교는 어디에 있나요?"), ("assistant", "서울 성북구에 있습니다."), ("user", "언제 세워졌나요?"),
        ("assistant", "1905년입니다."))  # fmt: skip


def own_model(tmp_path: Path, arch: str) -> Path:
    """A user's own model folder: the tiny model of ``arch``'s family, copied out of kullm's cache."""
    return Path(shutil.copytree(build_tiny(shape={"arch": arch}), tmp_path / f"my-{arch}"))


def train_by_path(tmp_path: Path, folder: Path, *overrides: str) -> tuple[Path, object]:
    """README's way to bring a model: ``kullm-train model.name_or_path=<folder>``, as a console script from a folder
    outside the checkout, with a cache of its own; the adapter folder and the processed data it trained on."""
    cache = tmp_path / "cache"
    proc = run_script(
        "kullm-train", "experiment=smoke", f"model.name_or_path={folder}", "run_name=mine", "trainer.max_steps=1",
        "data.val_set_size=0", "callbacks.samples.num=0", "logger=none", *overrides,
        cwd=tmp_path, env={"KULLM_CACHE": str(cache)}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (processed,) = (cache / "processed").glob("*/dataset")
    return tmp_path / "outputs" / "train" / "mine" / "adapter", load_processed(processed)["train"]


def trained_runs_end(labels: list[int]) -> int:
    return [x for x in labels if x != IGNORE_INDEX][-1]


def test_a_chatml_model_given_by_path_trains_every_answer_to_end_in_its_own_eos(tmp_path):
    """The default model group (tiny) names no EOS: a Qwen-style folder keeps <|im_end|> as EOS, <|endoftext|> pads."""
    folder = own_model(tmp_path, "qwen2")
    own = AutoTokenizer.from_pretrained(folder)
    assert (own.eos_token, own.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert own.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]) == [0, 2]
    adapter, train = train_by_path(tmp_path, folder)
    served = AutoTokenizer.from_pretrained(adapter)
    assert (served.eos_token, served.pad_token) == ("<|im_end|>", "<|endoftext|>")
    whole = [row for row in train if len(row["input_ids"]) < 256]  # data.cutoff_len: a cut answer keeps no EOS
    assert len(whole) > 50
    assert all(row["input_ids"][-1] == 2 and trained_runs_end(row["labels"]) == 2 for row in whole)
    assert not any(0 in row["input_ids"] for row in train)  # the pad token is never trained as an answer's end
    assert all(row["input_ids"][0] != 0 for row in train)  # a Qwen tokenizer adds no BOS: none is put there


@pytest.mark.slow
def test_a_bos_adding_model_given_by_path_gets_one_bos_in_training_generation_and_serving(tmp_path):
    """A Llama-style tokenizer adds <|begin_of_text|> (id 0) to every call: each training example, generation prompt
    and served chat-template rendering (adapter and merged checkpoint) starts with it exactly once."""
    folder = own_model(tmp_path, "llama")
    own = AutoTokenizer.from_pretrained(folder)
    assert own(QUESTION)["input_ids"][0] == 0 and own.convert_ids_to_tokens(0) == "<|begin_of_text|>"
    assert own.convert_tokens_to_ids("<|eot_id|>") == 4
    adapter, train = train_by_path(tmp_path, folder)
    assert len(train) > 50
    for row in train:
        assert row["input_ids"][0] == 0 and row["input_ids"].count(0) == 1, row["id"]
        assert row["labels"][0] == IGNORE_INDEX  # BOS is part of the prompt
        if len(row["input_ids"]) < 256:
            assert trained_runs_end(row["labels"]) == 4  # the model's own EOS, not Polyglot's <|endoftext|>
    (example,) = [row for row in train if row["id"] == "sample-v2-001"]
    trained_prompt = example["input_ids"][: example["prompt_len"]]
    assert trained_prompt[:1] == [0] and trained_prompt.count(0) == 1

    user = [{"role": "user", "content": QUESTION}]
    proc = run_script("kullm-merge", f"adapter={adapter}", f"out={tmp_path / 'merged'}", cwd=tmp_path,
                      env={"KULLM_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for served in (AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(tmp_path / "merged")):
        ids = served.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ids["input_ids"] == trained_prompt  # one BOS, rendered by the template as training put it there

    from kullm.inference.generator import Generator

    generator = Generator.from_config(compose("generate", [f"adapter={adapter}"]))
    assert generator.encode(generator.render(QUESTION)) == trained_prompt
    assert generator.encode(generator.render(user)) == trained_prompt  # the chat template rendered it: not twice


@pytest.mark.parametrize(("arch", "bos"), [("gpt_neox", []), ("qwen2", []), ("llama", [0])])
def test_bos_ids_are_what_the_tokenizers_own_call_puts_before_a_text(arch, bos):
    tok = load_tokenizer({"name_or_path": "kullm:tiny", "tiny_shape": {"arch": arch}})
    assert bos_ids(tok) == bos
    text = tok("안녕하세요", add_special_tokens=False)["input_ids"]
    assert with_bos(bos, text) == tok("안녕하세요")["input_ids"] == with_bos(bos, with_bos(bos, text))
    assert bos_text(tok) == ("<|begin_of_text|>" if bos else "")


@pytest.mark.parametrize("renderer", ["template", "tokenizer"])
def test_a_conversation_starts_with_one_bos_whether_kullm_or_the_models_template_renders_it(renderer):
    """The kullm template gets the BOS from kullm; Llama's own template renders ``bos_token`` itself: never two. Every
    answer's served prompt (the exported or own template, tokenized as servers do) is the trained prefix."""
    tok = load_tokenizer(compose("train", ["model=tiny-llama", "output_dir=/tmp/unused"]).model)
    prompter = Prompter.from_config(compose("train", ["output_dir=/tmp/unused"]).template)
    if renderer == "template":
        tok.chat_template = to_chat_template(prompter, bos_text(tok))
    assert tok.chat_template.count("bos_token") + tok.chat_template.count("<|begin_of_text|>") == 1
    rec = SimpleNamespace(turns=CONV, instruction="", input="", output="")
    pieces = render_with_tokenizer(tok, rec) if renderer == "tokenizer" else render_with_prompter(prompter, tok, rec)
    enc = encode_conversations(tok, [pieces], cutoff_len=1024)
    x, labels = enc["input_ids"][0], enc["labels"][0]
    assert x[0] == 0 and x.count(0) == 1 and labels[0] == IGNORE_INDEX
    assert enc["served_differs"] == [False] and enc["text"][0].startswith("<|begin_of_text|>")
    starts = [i for i in range(1, len(x)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    messages = [{"role": r, "content": c} for r, c in CONV]
    for k, start in zip((1, 3), starts, strict=True):  # each answer's served prompt is the trained prefix
        served = tok.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert served["input_ids"] == x[:start]
    whole = encode_conversations(tok, [pieces], cutoff_len=1024, train_on="all")
    assert whole["input_ids"][0][0] == 0 and whole["labels"][0][0] == 0  # train_on=all trains the BOS too


def test_the_tiny_families_add_bos_as_their_real_tokenizers_do():
    assert {a for a, f in FAMILIES.items() if f.get("add_bos")} == {"llama", "mistral", "gemma2"}
    config = json.loads((build_tiny(shape={"arch": "llama"}) / "tokenizer.json").read_text())["post_processor"]
    assert config["single"][0] == {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
