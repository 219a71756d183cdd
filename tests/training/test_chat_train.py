"""Conversations end to end: kullm-train on OpenAI messages and ShareGPT files, exact masks, the served template."""

import json

import pytest
from helpers import CHAT, FAST, assert_exact_masks, sample_conversations, trained_runs
from transformers import AutoTokenizer

from kullm.config import compose
from kullm.inference.merging import merge
from kullm.prepare import prepare
from kullm.train import train


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["messages.jsonl", "sharegpt.json"])
def test_smoke_trains_on_a_multi_turn_file(tmp_path, name):
    out = tmp_path / "run"
    cfg = compose(
        "train",
        [
            *FAST,
            f"output_dir={out}",
            f"data.cache_dir={tmp_path}/cache",
            f"data.path={CHAT / name}",
            "data.val_set_size=4",
            "data.cutoff_len=1024",
            "trainer.max_epochs=1",
        ],
    )
    result = train(cfg)
    assert result["metrics"]["train/loss"] > 0 and result["metrics"]["val/loss"] > 0
    processed = result["trainer"].datamodule.processed
    assert processed.stats["read"]["records"] == 17 and processed.stats["invariant_violations"] == 0
    assert processed.stats["encoded"]["train"]["kept"] == 13 and processed.stats["encoded"]["train"]["truncated"] == 0
    # the adapter's tokenizer serves the kullm multi-turn template the model was trained on
    served = AutoTokenizer.from_pretrained(result["adapter"])
    assert "kullm template kullm" in served.chat_template
    for split in ("train", "validation"):
        assert_exact_masks(processed.dataset[split], served, sample_conversations())
    if name == "messages.jsonl":  # and so does a merged checkpoint's
        merged = merge(compose("merge", [f"adapter={result['adapter']}", f"out={tmp_path / 'merged'}"]))
        assert AutoTokenizer.from_pretrained(str(merged)).chat_template == served.chat_template


@pytest.mark.timeout(300)
def test_prepare_reads_both_layouts_to_the_same_examples_and_names_bad_turns(tmp_path, capsys):
    rows = (CHAT / "messages.jsonl").read_text(encoding="utf-8").splitlines()
    bad = {"id": "bad", "messages": [{"role": "user", "content": "질문"}, {"role": "user", "content": "또 질문"}]}
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "chat.jsonl").write_text("\n".join([*rows, json.dumps(bad, ensure_ascii=False)]) + "\n", encoding="utf-8")

    def run(path, out, *extra):
        overrides = [f"output_dir={out}", f"data.path={path}", f"data.cache_dir={tmp_path}/cache", *extra]
        return prepare(compose("prepare", [*overrides, "data.val_set_size=8"]))  # the cut answer held out

    stats = run(folder, tmp_path / "a", "data.train_on=last")
    assert stats["read"]["rejected"] == {"alternation": 1}
    reject = json.loads((tmp_path / "a" / "rejects.jsonl").read_text(encoding="utf-8"))
    assert (reject["source"], reject["field"]) == (f"{folder / 'chat.jsonl'}:18", "messages[1]")
    share = run(CHAT / "sharegpt.json", tmp_path / "b", "data.train_on=last")
    import datasets

    a = datasets.load_from_disk(str(tmp_path / "a" / "dataset"))
    b = datasets.load_from_disk(str(tmp_path / "b" / "dataset"))
    for split in ("train", "validation"):
        assert a[split]["input_ids"] == b[split]["input_ids"] and a[split]["labels"] == b[split]["labels"]
    assert share["read"]["records"] == share["read"]["conversations"] == 17
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "b" / "tokenizer"))
    convs = sample_conversations()
    for ex in b["train"]:  # train_on=last: only the last answer is trained
        got = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ex["input_ids"], ex["labels"])]
        assert got == [convs[ex["id"]][-1][1] + tok.eos_token]


@pytest.mark.timeout(300)
def test_role_names_and_train_on_are_set_from_the_command_line(tmp_path):
    conv = [{"from": "Q", "value": "안녕?"}, {"from": "A", "value": "네, 안녕하세요!"}]
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"id": "x", "conversations": conv}, ensure_ascii=False) + "\n", encoding="utf-8")
    args = [f"output_dir={tmp_path / 'out'}", f"data.path={path}", f"data.cache_dir={tmp_path}/cache"]
    stats = prepare(compose("prepare", [*args, "data.val_set_size=0", "data.roles={Q: user, A: assistant}"]))
    assert stats["read"]["conversations"] == 1 and stats["encoded"]["train"]["kept"] == 1
    with pytest.raises(Exception, match=r"data\.train_on='everything': must be one of all_assistant, last, all"):
        prepare(compose("prepare", [*args, "data.train_on=everything"]))
