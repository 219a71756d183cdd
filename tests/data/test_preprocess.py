import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from kullm.config import compose
from kullm.data.preprocess import preprocess, split_records
from kullm.data.records import Record
from kullm.data.sft import check_example
from kullm.data.sources import DataError
from kullm.modeling import load_tokenizer
from kullm.templates import Prompter


def write_rows(path, n: int, long_output_every: int = 0) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            out = f"답변 {i}입니다." + (
                " 길게 이어지는 설명." * 80 if long_output_every and i % long_output_every == 0 else ""
            )
            f.write(
                json.dumps(
                    {"id": f"r{i}", "instruction": f"질문 {i}번", "input": "" if i % 2 else "맥락", "output": out},
                    ensure_ascii=False,
                )
                + "\n"
            )
        f.write('{"id": "broken", "instruction": \n')
    return str(path)


def setup(tmp_path, *overrides):
    cfg = compose("prepare", [f"output_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/cache", *overrides])
    return cfg, load_tokenizer(cfg.model), Prompter.from_config(cfg.template)


def test_processed_columns_counts_and_invariant(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", 40, long_output_every=10)
    cfg, tok, p = setup(tmp_path, f"data.path={path}", "data.val_set_size=5", "data.cutoff_len=96")
    res = preprocess(cfg.data, tok, p)
    assert not res.cache_hit
    assert set(res.dataset) == {"train", "validation"}
    assert {"id", "input_ids", "labels", "attention_mask"} <= set(res.dataset["train"].column_names)
    assert len(res.dataset["train"]) + len(res.dataset["validation"]) == 40 and len(res.dataset["validation"]) == 5
    assert res.stats["read"]["rejected"] == {"malformed_json": 1}
    assert sum(c["truncated"] for c in res.stats["encoded"].values()) == 4
    rejects = [json.loads(x) for x in res.rejects_path.read_text(encoding="utf-8").splitlines()]
    assert rejects[0]["source"] == f"{path}:41"
    outputs = {f"r{i}": None for i in range(40)}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            outputs[row["id"]] = row["output"]
    for split in res.dataset.values():
        for ex in split:
            assert check_example(tok, ex["input_ids"], ex["labels"], outputs[ex["id"]]) == ""
            assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_cache_hit_and_invalidation(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", 30)
    cfg, tok, p = setup(tmp_path, f"data.path={path}", "data.val_set_size=3")
    first = preprocess(cfg.data, tok, p)
    t0 = time.perf_counter()
    second = preprocess(cfg.data, tok, p)
    assert second.cache_hit and second.cache_dir == first.cache_dir
    assert time.perf_counter() - t0 < 5
    assert second.dataset["train"]["input_ids"] == first.dataset["train"]["input_ids"]
    changes = [
        ["data.cutoff_len=64"],
        ["data.train_on_inputs=true"],
        ["data.add_eos=false"],
        ["data.val_set_size=4"],
        ["data.seed=7"],
        ["template=alpaca"],
    ]
    dirs = {first.cache_dir}
    for change in changes:
        c, t, pr = setup(tmp_path, f"data.path={path}", "data.val_set_size=3", *change)
        res = preprocess(c.data, t, pr)
        assert not res.cache_hit, change
        dirs.add(res.cache_dir)
    assert len(dirs) == len(changes) + 1
    with open(path, "a", encoding="utf-8") as f:  # the data itself changes
        f.write(json.dumps({"id": "new", "instruction": "새 질문", "output": "새 답"}, ensure_ascii=False) + "\n")
    assert not preprocess(cfg.data, tok, p).cache_hit
    tok.add_tokens(["새토큰"])  # the tokenizer changes
    assert not preprocess(cfg.data, tok, p).cache_hit


def test_split_is_deterministic_and_seeded():
    recs = [Record(str(i), "q", "", "a") for i in range(100)]
    a = split_records(recs, 10, seed=42)
    assert [r.id for r in a[1]] == [r.id for r in split_records(recs, 10, seed=42)[1]]
    assert [r.id for r in a[1]] != [r.id for r in split_records(recs, 10, seed=1)[1]]
    assert len(a[0]) == 90 and {r.id for r in a[0]}.isdisjoint(r.id for r in a[1])
    with pytest.raises(DataError, match="val_set_size=100 leaves no training rows"):
        split_records(recs, 100, seed=0)


def test_strict_policy_fails_with_file_and_line(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", 5)
    cfg, tok, p = setup(tmp_path, f"data.path={path}", "data.val_set_size=0", "data.policy=strict")
    with pytest.raises(DataError, match=r"d.jsonl:6: <row>: malformed_json"):
        preprocess(cfg.data, tok, p)


def test_all_prompts_too_long_are_dropped_and_counted(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", 6)
    cfg, tok, p = setup(tmp_path, f"data.path={path}", "data.val_set_size=0", "data.cutoff_len=8")
    res = preprocess(cfg.data, tok, p)
    assert res.stats["encoded"]["train"]["dropped_prompt_too_long"] == 6
    assert len(res.dataset["train"]) == 0


def test_training_rows_from_the_evaluation_set_are_refused_unless_allowed(tmp_path, caplog):
    """KULLM's data/kullm-v1.jsonl *is* the evaluation set: training on it would score a model on its own data."""
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(
        json.dumps(
            {"id": "user_oriented_task_7", "instruction": "다른 지시문", "instances": [{"input": "", "output": "x"}]}
        )
        + "\n"
        + json.dumps({"id": "e1", "instruction": "  질문   3번 ", "instances": [{"input": "", "output": "y"}]})
        + "\n",
        encoding="utf-8",
    )
    path = write_rows(tmp_path / "d.jsonl", 20)
    with open(path, "a", encoding="utf-8") as f:  # same id as an eval item, other instruction
        f.write(json.dumps({"id": "user_oriented_task_7", "instruction": "Rewrite this.", "output": "ok"}) + "\n")
    common = [f"data.path={path}", "data.val_set_size=2", f"data.eval_set={eval_set}"]
    cfg, tok, p = setup(tmp_path, *common)
    with pytest.raises(DataError, match=r"2 training row\(s\) share an instruction or id with the evaluation set"):
        preprocess(cfg.data, tok, p)
    cfg, tok, p = setup(tmp_path, *common, "data.allow_eval_overlap=true")
    res = preprocess(cfg.data, tok, p)
    assert sorted(res.stats["eval_overlap_ids"]) == ["r3", "user_oriented_task_7"]
    assert "CONTAMINATION" in caplog.text
    cfg, tok, p = setup(tmp_path, *common)  # a cache hit is gated too
    with pytest.raises(DataError, match="allow_eval_overlap=true"):
        preprocess(cfg.data, tok, p)
    cfg, tok, p = setup(tmp_path, f"data.path={path}", "data.val_set_size=2", f"data.eval_set={tmp_path}/absent.jsonl")
    assert preprocess(cfg.data, tok, p).stats["eval_overlap_ids"] == []


def test_stale_cache_temporaries_are_removed_and_the_printed_rejects_path_exists(tmp_path, caplog):
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / "cache" / f"0123456789abcdef0123.tmp-{proc.pid}"
    stale.mkdir(parents=True)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    path = write_rows(tmp_path / "d.jsonl", 12)  # ends with a broken row
    cfg, tok, p = setup(tmp_path, f"data.path={path}", "data.val_set_size=2")
    res = preprocess(cfg.data, tok, p)
    assert not stale.exists()
    printed = [r.getMessage().rsplit(": ", 1)[1] for r in caplog.records if "rejected rows" in r.getMessage()]
    assert printed == [str(res.rejects_path)] and res.rejects_path.is_file()


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_the_mask_invariant_holds_on_every_example_and_a_broken_mask_is_stopped(tmp_path, monkeypatch, train_on_inputs):
    import kullm.data.sft as sft

    path = write_rows(tmp_path / "d.jsonl", 30, long_output_every=7)
    Path(path).write_text("".join(Path(path).read_text(encoding="utf-8").splitlines(True)[:-1]), encoding="utf-8")
    common = [
        f"data.path={path}",
        "data.val_set_size=4",
        "data.cutoff_len=64",
        f"data.train_on_inputs={train_on_inputs}",
    ]
    cfg, tok, p = setup(tmp_path, *common)
    res = preprocess(cfg.data, tok, p)
    assert res.stats["invariant_violations"] == 0 and res.stats["encoded"]["train"]["truncated"] > 0
    assert res.stats["encoded"]["train"]["dropped_invariant"] == 0

    real = sft.encode_batch

    def off_by_one(*args, **kwargs):  # the planted bug: the prompt mask one token short
        enc = real(*args, **kwargs)
        for labels, ids, n in zip(enc["labels"], enc["input_ids"], enc["prompt_len"], strict=True):
            if n < len(labels):
                labels[n - 1] = ids[n - 1] if not kwargs.get("train_on_inputs") else -100
        return enc

    monkeypatch.setattr(sft, "encode_batch", off_by_one)
    cfg, tok, p = setup(tmp_path, *common, "data.policy=strict", f"data.cache_dir={tmp_path}/cache2")
    with pytest.raises(DataError, match=r"train: the masking invariant fails for id r\d+"):
        preprocess(cfg.data, tok, p)
    cfg, tok, p = setup(tmp_path, *common, f"data.cache_dir={tmp_path}/cache3")
    res = preprocess(cfg.data, tok, p)
    assert res.stats["invariant_violations"] == 30 and len(res.dataset["train"]) == 0  # never trained on


@pytest.mark.timeout(300)
def test_num_proc_processes_give_the_same_dataset_with_the_cached_types(tmp_path):
    """2,000 rows (``data.num_proc=2`` starts processes from 1,000 rows each; every 50th row is long and cut): the
    same rows, values, column types and counts as one process; ``attention_mask`` and ``length`` follow the ids."""
    path = write_rows(tmp_path / "d.jsonl", 2000, long_output_every=50)
    common = [f"data.path={path}", "data.val_set_size=0", "data.cutoff_len=128"]
    cfg, tok, p = setup(tmp_path, *common, f"data.cache_dir={tmp_path}/one")
    one = preprocess(cfg.data, tok, p)
    cfg, tok, p = setup(tmp_path, *common, "data.num_proc=2", f"data.cache_dir={tmp_path}/two")
    two = preprocess(cfg.data, tok, p)
    assert one.stats["encoded"] == two.stats["encoded"]
    assert one.stats["encoded"]["train"] == {
        "records": 2000,
        "kept": 2000,
        "truncated": 40,
        "dropped_prompt_too_long": 0,
        "dropped_invariant": 0,
    }
    a, b = one.dataset["train"], two.dataset["train"]
    assert a.column_names == ["id", "input_ids", "labels", "prompt_len", "response_len", "attention_mask", "length"]
    assert a.features == b.features and a.to_dict() == b.to_dict()
    assert {k: str(v) for k, v in a.features.items() if k != "id"} == {
        "input_ids": "List(Value('int32'))",
        "labels": "List(Value('int64'))",
        "prompt_len": "Value('int64')",
        "response_len": "Value('int64')",
        "attention_mask": "List(Value('int8'))",
        "length": "Value('int64')",
    }
    rows = a.to_list()
    assert all(r["attention_mask"] == [1] * len(r["input_ids"]) == [1] * r["length"] for r in rows)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(2000)]


def _alter_a_token_id(arrow_file) -> None:
    """Rewrite the file as a valid Arrow stream whose first token id is another one."""
    import pyarrow as pa

    table = pa.ipc.open_stream(arrow_file.read_bytes()).read_all()  # in memory: the file is rewritten below
    ids = table.column("input_ids").to_pylist()
    ids[0][0] += 1
    i = table.schema.get_field_index("input_ids")
    table = table.set_column(i, table.schema.field(i), pa.array(ids, table.schema.field(i).type))
    with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _truncate(arrow_file) -> None:
    size = arrow_file.stat().st_size
    with open(arrow_file, "r+b") as f:
        f.truncate(size // 2)


DAMAGE = {
    "a token id altered": lambda entry: _alter_a_token_id(next((entry / "dataset" / "train").glob("*.arrow"))),
    "an arrow file truncated": lambda entry: _truncate(next((entry / "dataset" / "train").glob("*.arrow"))),
    "a split folder deleted": lambda entry: shutil.rmtree(entry / "dataset" / "validation"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_is_rebuilt_with_one_warning_line(tmp_path, caplog, damage):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(Path(write_rows(tmp_path / "raw.jsonl", 20)).read_text().splitlines(True)[:-1]))
    cfg, tok, p = setup(tmp_path, f"data.path={path}", "data.val_set_size=4")
    first = preprocess(cfg.data, tok, p)
    want = {name: split.to_dict() for name, split in first.dataset.items()}
    entry = first.cache_dir
    del first  # its files are memory-mapped
    DAMAGE[damage](entry)
    with caplog.at_level(logging.WARNING, logger="kullm.data.preprocess"):
        rebuilt = preprocess(cfg.data, tok, p)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"processed-data cache {entry} failed its check ("), warnings
    assert warnings[0].endswith("): rebuilding it")
    assert not rebuilt.cache_hit and rebuilt.cache_dir == entry
    assert {name: split.to_dict() for name, split in rebuilt.dataset.items()} == want
    caplog.clear()
    again = preprocess(cfg.data, tok, p)
    assert again.cache_hit and not [r for r in caplog.records if r.levelno >= logging.WARNING]
