import json
import re
import subprocess
import sys

import datasets
from transformers import AutoTokenizer

from kullm.data.records import read_records
from kullm.data.sft import check_example


def run_prepare(tmp_path, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "kullm.prepare",
        f"hydra.run.dir={tmp_path}/run",
        f"data.cache_dir={tmp_path}/cache",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_prepare_on_unseen_data_writes_dataset_stats_tokenizer_and_rejects(tmp_path):
    rows = [
        {"id": f"x{i}", "instruction": f"{i}번째 질문은 무엇인가요?", "input": "", "output": f"{i}번째 답입니다. 🙂"}
        for i in range(30)
    ]
    rows.append({"id": "x0", "instruction": "중복", "output": "중복"})  # a colliding id: kept under a new id
    rows.append(
        {"id": "x1", "instruction": f"{1}번째 질문은 무엇인가요?", "output": "1번째 답입니다. 🙂"}
    )  # exact copy
    rows.append({"id": "bad", "instruction": "빈 답", "output": ""})  # rejected
    path = tmp_path / "unseen.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    res = run_prepare(tmp_path, "model=tiny", f"data.path={path}", "data.val_set_size=5", "micro_batch_size=2")
    assert res.returncode == 0, res.stderr
    assert re.search(r"colliding ids renamed \(rows kept\) +1\n", res.stdout), res.stdout
    assert re.search(r"exact duplicates dropped +1\n", res.stdout) and "length-grouped" in res.stdout
    run = tmp_path / "run"
    stats = json.loads((run / "data_stats.json").read_text(encoding="utf-8"))
    assert stats["read"] == {
        "rows": 33,
        "records": 31,
        "conversations": 0,
        "rejected": {"empty_output": 1},
        "repaired": {},
        "duplicates_dropped": 1,
        "ids_renamed": 1,
        "hidden_files_skipped": 0,
        "links_skipped": 0,
    }
    assert stats["encoded"]["train"]["kept"] == 26 and stats["encoded"]["validation"]["kept"] == 5
    assert (
        stats["tokens"]["train"]["padding_fraction"]["length_grouped"]
        <= stats["tokens"]["train"]["padding_fraction"]["random"]
    )
    assert json.loads((run / "rejects.jsonl").read_text(encoding="utf-8").splitlines()[0])["source"] == f"{path}:33"
    ds = datasets.load_from_disk(str(run / "dataset"))
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    outputs = {r.id: r.output for r in read_records(path)[0]}
    assert len(outputs) == 32 and sum(i.startswith("x0#") for i in outputs) == 1
    for ex in ds["train"]:
        assert check_example(tok, ex["input_ids"], ex["labels"], outputs[ex["id"]]) == ""
    second = run_prepare(tmp_path, "model=tiny", f"data.path={path}", "data.val_set_size=5", "micro_batch_size=2")
    assert "cache hit" in second.stdout


def test_prepare_strict_error_is_one_clear_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 5, "output": "b"}\n', encoding="utf-8")
    res = run_prepare(tmp_path, f"data.path={path}", "data.val_set_size=0", "data.policy=strict")
    assert res.returncode != 0
    assert f"kullm-prepare: {path}:2: instruction: not_a_string" in res.stderr
    assert "Traceback" not in res.stderr
