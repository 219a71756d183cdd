"""Conversation records (OpenAI messages, ShareGPT) from every kind of source, and the reasons bad ones get."""

import csv
import json
import re

import pytest
from helpers import write_jsonl

from kullm.data.records import ReadOptions, read_records
from kullm.data.sources import DataError

CONV = [
    {"role": "system", "content": "너는 친절한 비서야."},
    {"role": "user", "content": "고려대학교는 어디에 있어?"},
    {"role": "assistant", "content": "서울 성북구에 있습니다."},
    {"role": "user", "content": "설립 연도는?"},
    {"role": "assistant", "content": "1905년입니다. 🙂"},
]
TURNS = tuple((m["role"], m["content"]) for m in CONV)
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(conv):
    return [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"]} for m in conv]


def test_messages_and_sharegpt_give_the_same_turns(tmp_path):
    a, _ = read_records(write_jsonl(tmp_path / "m.jsonl", [{"id": "k1", "messages": CONV}]))
    b, _ = read_records(write_jsonl(tmp_path / "s.jsonl", [{"id": "k1", "conversations": sharegpt(CONV)}]))
    assert a[0].turns == b[0].turns == TURNS
    assert (a[0].id, a[0].instruction, a[0].output) == ("k1", CONV[1]["content"], CONV[-1]["content"])
    assert a[0].source == f"{tmp_path / 'm.jsonl'}:1"


def test_configurable_role_names(tmp_path):
    rows = [{"conversations": [{"from": "사용자", "value": "안녕"}, {"from": "봇", "value": "네, 안녕하세요"}]}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    recs, report = read_records(path)
    assert not recs and report.rejects[0].reason == "unknown_role"
    assert report.rejects[0].field == "conversations[0].from"
    recs, _ = read_records(path, ReadOptions(roles={"사용자": "user", "봇": "assistant"}))
    assert recs[0].turns == (("user", "안녕"), ("assistant", "네, 안녕하세요"))


BAD = [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "unknown_role", "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}], "empty_turn", "messages[1].content"),
    ([{"role": "user", "content": "a"}], "not_ending_in_assistant", "messages[0]"),
    ([{"role": "system", "content": "s"}], "not_ending_in_assistant", "messages"),
    ([{"role": "assistant", "content": "a"}], "alternation", "messages[0]"),
    (
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
        "alternation",
        "messages[1]",
    ),
    (
        [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}],
        "system_not_first",
        "messages[1]",
    ),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "c"}], "not_a_string", "messages[0].content"),
    ([], "empty_conversation", "messages"),
    ("not a list", "malformed_json", "messages"),
]


@pytest.mark.parametrize(("messages", "reason", "field"), BAD)
def test_bad_conversations_are_named_and_counted(tmp_path, messages, reason, field):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "ok", "messages": CONV}, {"id": "bad", "messages": messages}])
    recs, report = read_records(path)
    assert [r.id for r in recs] == ["ok"]
    assert report.rejected == {reason: 1}
    (reject,) = report.rejects
    assert (reject.source, reject.field, reject.reason) == (f"{path}:2", field, reason)
    with pytest.raises(DataError, match=re.escape(f"m.jsonl:2: {field}: {reason}")):
        read_records(path, ReadOptions(policy="strict"))


def test_layout_is_detected_per_file(tmp_path):
    """A flat row in a messages file is a missing `messages` field; each file of a folder keeps its own layout."""
    write_jsonl(tmp_path / "a.jsonl", [{"messages": CONV}, {"instruction": "x", "output": "y"}])
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "질문", "output": "답"}])
    recs, report = read_records(tmp_path)
    assert [bool(r.turns) for r in recs] == [True, False]
    assert [(r.field, r.reason) for r in report.rejects] == [("messages", "missing_field")]
    # forced: the conversation has no instruction
    recs, report = read_records(tmp_path, ReadOptions(format="instruction"))
    assert report.rejected == {"missing_field": 1} and [r.instruction for r in recs] == ["x", "질문"]


def test_json_array_csv_parquet_and_save_to_disk(tmp_path):
    import datasets

    rows = [{"id": f"r{i}", "messages": CONV[: 3 + 2 * (i % 2)]} for i in range(4)]
    want = [(r["id"], tuple((m["role"], m["content"]) for m in r["messages"])) for r in rows]
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    with (tmp_path / "c.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "messages"])
        w.writerows([[r["id"], json.dumps(r["messages"], ensure_ascii=False, indent=1)] for r in rows])
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("a.json", "c.csv", "p.parquet", "saved"):
        recs, report = read_records(tmp_path / name)
        assert [(r.id, r.turns) for r in recs] == want, name
        assert report.n_rejected == 0
    csv_recs, _ = read_records(tmp_path / "c.csv")
    assert [r.source.rsplit(":", 1)[1] for r in csv_recs] == ["2", "16", "38", "52"]  # first lines
    recs, _ = read_records(tmp_path / "saved_dict", ReadOptions(split="test"))
    assert [(r.id, r.turns) for r in recs] == want[:1] and recs[0].source.endswith("saved_dict[test]:1")
    with pytest.raises(DataError, match=r"no split 'validation'.*train, test"):
        read_records(tmp_path / "saved_dict", ReadOptions(split="validation"))


def test_flat_rows_from_csv_and_parquet(tmp_path):
    """CSV and Parquet rows are rows, not malformed JSON or invalid UTF-8."""
    import datasets

    with (tmp_path / "f.csv").open("w", newline="", encoding="utf-8") as f:
        f.write('id,instruction,input,output\r\n1,번역하세요,"좋은 아침,\n친구",Good morning\r\n2,요약,,짧게\r\n')
    recs, report = read_records(tmp_path / "f.csv")
    assert [(r.id, r.instruction, r.input, r.output) for r in recs] == [
        ("1", "번역하세요", "좋은 아침,\n친구", "Good morning"),
        ("2", "요약", "", "짧게"),
    ]
    assert [r.source.rsplit(":", 1)[1] for r in recs] == ["2", "4"] and report.n_rejected == 0
    datasets.Dataset.from_list([{"instruction": "질문", "output": "답"}]).to_parquet(str(tmp_path / "f.parquet"))
    recs, _ = read_records(tmp_path / "f.parquet")
    assert [(r.instruction, r.output) for r in recs] == [("질문", "답")]


def test_a_ragged_csv_row_and_a_broken_parquet_file_are_named(tmp_path):
    (tmp_path / "r.csv").write_text("instruction,output\na,b\nc,d,e\n", encoding="utf-8")
    recs, report = read_records(tmp_path / "r.csv")
    assert len(recs) == 1 and [(r.source, r.reason) for r in report.rejects] == [
        (f"{tmp_path / 'r.csv'}:3", "malformed_csv")
    ]
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"x\.parquet: <file>: not_parquet"):
        read_records(tmp_path / "x.parquet")


def test_duplicate_conversations_are_dropped_and_colliding_ids_renamed(tmp_path):
    other = CONV[:3]
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"id": "a", "messages": CONV}, {"id": "b", "messages": CONV}, {"id": "a", "messages": other}],
    )
    recs, report = read_records(path, ReadOptions(drop_duplicates=True))
    assert report.duplicates == 1
    assert recs[0].id == "a" and recs[1].id.startswith("a#") and recs[1].turns == tuple(TURNS[:3])


def test_a_hub_style_load_reads_conversations_and_a_nested_saved_dataset_is_refused(tmp_path):
    """source=hub goes through datasets.load_dataset (here on a local folder: no network in tests)."""
    import datasets

    folder = tmp_path / "hubby"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"id": "h1", "conversations": sharegpt(CONV)}])
    recs, _ = read_records(folder, ReadOptions(source="hub"))
    assert [(r.id, r.turns) for r in recs] == [("h1", TURNS)] and recs[0].source.endswith("[train]:1")
    datasets.Dataset.from_list([{"messages": CONV}]).save_to_disk(str(tmp_path / "mixed" / "saved"))
    write_jsonl(tmp_path / "mixed" / "a.jsonl", [{"messages": CONV}])
    with pytest.raises(DataError, match=r"saved: a save_to_disk dataset inside the data folder .*point data\.path"):
        read_records(tmp_path / "mixed")


def test_open_conversations_end_with_the_user_turn_to_answer(tmp_path):
    """Generation input and judged answers: a conversation may end with a user turn (only when asked for); its
    output is the answer beside the turns, else its trailing assistant turn; id-less rows are keyed by the history."""
    rows = [
        {"messages": CONV[:-1]},  # to answer
        {"messages": CONV},  # to answer again; its last turn is the reference
        {"id": "r", "messages": CONV[:-1], "response": "1905년에 세워졌습니다."},
        {"id": "late", "messages": [CONV[0], CONV[2]]},
    ]
    path = write_jsonl(tmp_path / "open.jsonl", rows)
    closed, report = read_records(path)
    assert [r.id for r in closed] == ["open.jsonl:2"]
    assert report.rejected == {"not_ending_in_assistant": 2, "alternation": 1}
    recs, report = read_records(
        path,
        ReadOptions(fields={"output": "response"}, require_output=False, open_conversations=True, content_ids=True),
    )
    assert report.rejected == {"alternation": 1}  # the turn rules still hold: an assistant turn cannot come first
    assert [r.turns for r in recs] == [TURNS[:-1], TURNS, TURNS[:-1]]
    assert [r.output for r in recs] == ["", CONV[-1]["content"], "1905년에 세워졌습니다."]
    # the same history asked twice: one id from it, the other kept under a content-hash suffix
    assert recs[0].id.startswith("sha:") and recs[1].id.startswith(recs[0].id + "#")
    judged, report = read_records(path, ReadOptions(fields={"output": "response"}, open_conversations=True))
    assert [(r.id, r.output) for r in judged] == [("open.jsonl:2", CONV[-1]["content"]), ("r", rows[2]["response"])]
    assert report.rejected == {"missing_field": 1, "alternation": 1}  # row 1: nothing to judge


def test_a_lone_surrogate_or_a_turns_cell_too_deep_is_a_named_reject(tmp_path):
    """``\\ud800`` is a valid JSON escape but no text (tokenizers and file writers fail on it)."""
    bad = [{"role": "user", "content": "안녕\ud800"}, {"role": "assistant", "content": "네"}]
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps({"messages": bad}) + "\n", encoding="utf-8")
    recs, report = read_records(path)
    assert len(recs) == 1
    assert [(r.field, r.reason) for r in report.rejects] == [("messages[0].content", "lone_surrogate")]
    with (tmp_path / "c.csv").open("w", newline="", encoding="utf-8") as f:
        deep = "[" * 50_000 + "]" * 50_000  # under csv's cell limit, far past any recursion limit
        csv.writer(f).writerows([["messages"], [json.dumps(CONV)], [json.dumps(bad)], [deep]])
    recs, report = read_records(tmp_path / "c.csv")
    assert len(recs) == 1
    assert [(r.source.rsplit(":", 1)[1], r.field, r.reason) for r in report.rejects] == [
        ("3", "messages[0].content", "lone_surrogate"),
        ("4", "messages", "nested_too_deep"),
    ]
