"""kullm-translate as users run it (the installed script, from outside the checkout) against fake DeepL and
OpenAI-compatible servers on 127.0.0.1: a mixed source translated once per field across a kill and a rerun, every
protected span byte for byte, each planted bad translation a named reject, reruns served from the cache, the quota
stopping cleanly, and the result read (and trained on) by kullm as it is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from chat_server import ChatServer
from console_scripts import one_line_error, run_script, script
from deepl_server import DeepLServer, fake_korean

from kullm.config import compose
from kullm.data.records import ReadOptions, read_records
from kullm.translation.recipes import prepare_recipe
from kullm.translation.spans import TAG, mask

ENV = "KULLM_TEST_DEEPL_KEY"
KEY = "test-key-7731:fx"

FLAT = [
    {
        "id": "code-1",
        "instruction": "Write a Python function `add(a, b)` that returns the sum of two numbers.",
        "input": "",
        "output": "Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```\nCall add(2, 3) to get 5.",
    },
    {
        "id": "tmpl-1",
        "instruction": "Fill in the greeting template for the user.",
        "input": "Hello {name}, you have %d new messages. See https://example.com/inbox or write to help@example.com.",
        "output": "Hello {name}, welcome back to <b>your</b> inbox.",
    },
    {
        "instruction": "Solve $x^2 = 4$ and explain each step briefly.",
        "input": "",
        "output": "Take roots: $x = \\pm 2$.",
    },
    # the planted bad translations (see ``planted``)
    {"id": "plant-answer", "instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {
        "id": "plant-refusal",
        "instruction": "Explain how lock picking works in general terms.",
        "output": "It uses pins.",
    },
    {
        "id": "plant-code",
        "instruction": "Show a sorting call.",
        "output": "Use this:\n```python\nsorted(xs)\n```\nDone.",
    },
    {
        "id": "plant-cut",
        "instruction": "Summarize the history of Rome.",
        "output": "Rome began as a small town on the Tiber and grew into an empire that ruled the Mediterranean.",
    },
    {"id": "bad-row", "instruction": 5, "output": "not a string instruction"},
]
CHAT = [
    {
        "id": "chat-1",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "How do I print text in Python?"},
            {"role": "assistant", "content": "Use `print('hi')` to print text."},
            {"role": "user", "content": "And with a variable?"},
            {"role": "assistant", "content": 'Use an f-string such as `print(f"{x}")` with your variable.'},
        ],
    },
    {
        "id": "chat-2",
        "messages": [
            {"role": "user", "content": "Give me 3 tips for sleeping well."},
            {"role": "assistant", "content": "Keep a schedule, avoid screens at night, and keep your room cool."},
        ],
    },
]
SHAREGPT = [
    {
        "id": "share-1",
        "conversations": [
            {"from": "human", "value": "Tell me a fun fact about octopuses."},
            {"from": "gpt", "value": "An octopus has 3 hearts and blue blood."},
        ],
    }
]
PLANTED = {
    "plant-answer": "not_korean",
    "plant-refusal": "refusal",
    "plant-code": "code_changed",
    "plant-cut": "truncated",
}


def planted(text: str) -> str:
    """The fake translator: Hangul for every word, except the planted faults (keyed by words of their sources)."""
    if text.startswith("What is the capital of France"):
        return "The capital of France is Paris, a large city famous for its museums and its long history."
    if "lock picking" in text:
        return "죄송하지만 이 요청은 도와드릴 수 없습니다."
    if text.startswith("Use this:"):
        return TAG.sub("", fake_korean(text))  # the code block dropped
    if "Tiber" in text:
        k = fake_korean(text)
        return k[: len(k) // 2].rstrip(". ")  # cut off mid-sentence
    return fake_korean(text)


def write_source(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FLAT), encoding="utf-8")
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT), encoding="utf-8")
    (folder / "share.json").write_text(json.dumps(SHAREGPT, indent=1), encoding="utf-8")
    return folder


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_source(tmp_path / "src")


def translate(tmp_path: Path, url: str, *args: str, out: str = "out", timeout: int = 120):
    return run_script(
        "kullm-translate",
        f"output={tmp_path / out}",
        f"cache={tmp_path / 'cache.sqlite'}",
        f"backend.base_url={url}",
        f"backend.api_key_env={ENV}",
        "backend.backoff_base=0.01",
        "backend.backoff_max=0.05",
        "progress=false",
        *args,
        cwd=tmp_path,
        timeout=timeout,
        env={ENV: KEY},
    )


def rows(folder: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(folder.rglob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            out[row["id"]] = row
    return out


def source_texts(row: dict) -> list[tuple[tuple, str]]:
    if "messages" in row:
        return [(("messages", k, "content"), t["content"]) for k, t in enumerate(row["messages"])]
    if "conversations" in row:
        return [(("conversations", k, "value"), t["value"]) for k, t in enumerate(row["conversations"])]
    return [((f,), row[f]) for f in ("instruction", "input", "output") if f in row]


def get(obj, path):
    for part in path:
        obj = obj[part]
    return obj


def distinct_texts() -> set[str]:
    """The masked texts of the valid source rows that hold words: what a translator gets, each once."""
    masked = [mask(t).text for r in FLAT + CHAT + SHAREGPT if r.get("id") != "bad-row" for _, t in source_texts(r)]
    return {m for m in masked if any(c.isalpha() for c in TAG.sub("", m))}


def assert_spans_kept(source: Path, out: dict[str, dict]) -> int:
    """Every protected span of every translated field is in its translation byte for byte; return spans checked."""
    checked = 0
    originals = {}
    for r in FLAT + CHAT + SHAREGPT:
        originals[r.get("id") or "flat.jsonl:3"] = r
    for rid, row in out.items():
        for path, text in source_texts(originals[rid]):
            got = get(row, path)
            for span in mask(text).spans:
                assert got.count(span.text) >= text.count(span.text), (rid, path, span, got)
                checked += 1
    return checked


def test_a_mixed_source_is_translated_with_spans_kept_and_each_plant_a_named_reject(tmp_path, source) -> None:
    with DeepLServer(translate=planted, auth_key=KEY) as server:
        proc = translate(tmp_path, server.url, f"data.path={source}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        requests, texts = len(server.requests), list(server.texts)
    assert requests == 1 and len(texts) == len(set(texts))  # one batch of 50 at most; each distinct text once
    out = tmp_path / "out"
    data = rows(out / "data")
    assert sorted(p.name for p in (out / "data").iterdir()) == ["chat.jsonl", "flat.jsonl", "share.jsonl"]
    assert set(data) == {"code-1", "tmpl-1", "flat.jsonl:3", "chat-1", "chat-2", "share-1"}
    assert assert_spans_kept(source, data) >= 15
    row = data["code-1"]
    assert row["translation"]["source_id"] == "code-1" and len(row["translation"]["source_sha256"]) == 64
    assert row["translation"]["backend"] == "deepl" and row["translation"]["qc"] == {}
    assert "```python\ndef add(a, b):\n    return a + b\n```" in row["output"] and "Here" not in row["output"]
    assert data["chat-1"]["messages"][0]["role"] == "system"  # the layout kept, roles untouched
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: {x["reason"] for x in r["reasons"]} for r in rejects}
    assert set(by_id) == {*PLANTED, "bad-row"}
    for rid, reason in PLANTED.items():
        assert reason in by_id[rid], (rid, by_id[rid])
    assert by_id["bad-row"] == {"not_a_string"}
    assert all(r["source"].startswith(str(source)) and ":" in r["source"] for r in rejects)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["rows"] == {"read": 11, "written": 6, "rejected": 5, "pending": 0}
    assert stats["requests"] == 1 and stats["characters"]["sent"] > 500 and stats["cost_usd_estimate"] > 0
    assert stats["rejected_by_reason"]["code_changed"] == 1
    # the output is a data set kullm reads as it is: every row, every layout
    records, report = read_records(out / "data", ReadOptions(source="files"))
    assert report.n_rejected == 0 and len(records) == 6 and report.conversations == 3


def test_a_rerun_and_a_second_set_sharing_text_are_served_from_the_cache(tmp_path, source) -> None:
    with DeepLServer(translate=planted) as server:
        assert translate(tmp_path, server.url, f"data.path={source}").returncode == 0
        first = len(server.requests)
        again = translate(tmp_path, server.url, f"data.path={source}")  # same output: everything in the log
        other = translate(tmp_path, server.url, f"data.path={source}", out="out2")  # a fresh output: the cache
        assert again.returncode == 0 and other.returncode == 0, other.stderr[-2000:]
        assert first == 1 and len(server.requests) == 1
    stats = json.loads((tmp_path / "out2" / "stats.json").read_text(encoding="utf-8"))
    assert stats["requests"] == 0 and stats["texts_cached"] > 20 and stats["characters"]["sent"] == 0
    assert rows(tmp_path / "out" / "data") == rows(tmp_path / "out2" / "data")


def test_a_killed_run_resumes_and_every_field_is_logged_exactly_once(tmp_path) -> None:
    src = tmp_path / "many.jsonl"
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    things = ["apple", "river", "mountain", "garden", "window"]
    lines = [
        {"id": f"r{i}", "instruction": f"Describe the {c} {t} in a short sentence.", "output": f"The {t} looks {c}."}
        for i, (c, t) in enumerate((c, t) for c in colours for t in things)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    out = tmp_path / "out"
    log = out / "translations.jsonl"
    args = [f"data.path={src}", "window=4", "backend.batch_size=2", "backend.concurrency=1"]
    with DeepLServer(delay_s=0.15) as server:
        cmd = [script("kullm-translate"), f"output={out}", f"cache={tmp_path / 'c.sqlite'}",
               f"backend.base_url={server.url}", f"backend.api_key_env={ENV}", "progress=false", *args]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {ENV: KEY}
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.exists() or len(log.read_bytes().splitlines()) < 12):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        killed_at = len(log.read_bytes().splitlines())
        assert 12 <= killed_at < 60, killed_at
        assert not (out / "data").exists()  # nothing assembled yet: the run was killed mid-way
        sent_before = len(server.texts)
        done = translate(tmp_path, server.url, *args, out="out")
        assert done.returncode == 0, done.stderr[-3000:]
        resent = Counter(server.texts)
    keys = [json.loads(line)["key"] for line in log.read_text(encoding="utf-8").splitlines()]
    assert len(keys) == len(set(keys)) == 60  # each field once, across the kill and the rerun
    assert len(server.texts) - sent_before <= 60 - killed_at + 2  # the rerun sent only what was missing
    assert max(resent.values()) <= 2  # at most the batch in flight at the kill went twice
    data = rows(out / "data")
    assert sorted(data) == sorted(r["id"] for r in lines)
    for r in lines:  # each field is the translation of its own source, whichever run made it
        assert data[r["id"]]["instruction"] == fake_korean(r["instruction"])
        assert data[r["id"]]["output"] == fake_korean(r["output"])


def test_the_quota_stops_the_run_cleanly_and_a_rerun_finishes_it(tmp_path, source) -> None:
    with DeepLServer(translate=planted, quota_chars=400) as server:
        proc = translate(tmp_path, server.url, f"data.path={source}", "backend.batch_size=4")
        line = one_line_error(proc, "kullm-translate")
        assert "456" in line and "run the same command again" in line, line
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["stopped"] and stats["rows"]["pending"] > 0
    logged = len((out / "translations.jsonl").read_text(encoding="utf-8").splitlines())
    assert logged > 0
    with DeepLServer(translate=planted) as server:
        proc = translate(tmp_path, server.url, f"data.path={source}", "backend.batch_size=4")
        assert proc.returncode == 0, proc.stderr[-3000:]
        resent = len(server.texts)
    total = len((out / "translations.jsonl").read_text(encoding="utf-8").splitlines())
    assert resent == total - logged  # exactly the fields the quota left
    assert len(rows(out / "data")) == 6


def test_an_unreachable_backend_fails_with_the_reason_and_nothing_written(tmp_path, source) -> None:
    proc = translate(tmp_path, "http://127.0.0.1:9", f"data.path={source}", "backend.max_retries=1")
    line = one_line_error(proc, "kullm-translate")
    assert "no row translated" in line and "backend_error" in line, line
    assert rows(tmp_path / "out" / "data") == {}


@pytest.mark.parametrize(("fault", "named"), [("wrongcount", "for 1 texts"), ("badjson", "not JSON")])
def test_a_batch_the_backend_garbles_is_split_and_only_the_bad_text_fails(tmp_path, source, fault, named) -> None:
    first = CHAT[0]["messages"][0]["content"]  # the first text of the first batch (chat.jsonl is read first)
    with DeepLServer(translate=planted, faults=lambda key, n: fault if key == first else "ok") as server:
        proc = translate(tmp_path, server.url, f"data.path={source}", "backend.max_retries=1")
        assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert stats["rows"]["pending"] == 1 and stats["rows"]["written"] == 5
    assert stats["pending_rows"][0]["id"] == "chat-1" and named in str(stats["pending_rows"])


def test_the_dry_run_prints_the_cost_and_sends_nothing(tmp_path, source) -> None:
    with DeepLServer() as server:
        proc = run_script(
            "kullm-translate", f"data.path={source}", f"output={tmp_path / 'out'}", "dry_run=true",
            f"cache={tmp_path / 'c.sqlite'}", cwd=tmp_path, env={"DEEPL_AUTH_KEY": ""},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert server.requests == []
    assert "nothing was sent" in proc.stdout and "characters" in proc.stdout and "$" in proc.stdout
    assert not (tmp_path / "out" / "data").exists()


def test_an_openai_compatible_translator_runs_the_same_pipeline(tmp_path, source) -> None:
    with ChatServer(reply=planted) as server:
        proc = translate(tmp_path, server.url, f"data.path={source}", "backend=openai", "backend.model=ko-mt")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(server.requests) == len(distinct_texts())  # one request per distinct text
    data = rows(tmp_path / "out" / "data")
    assert data["tmpl-1"]["translation"]["model"] == "ko-mt"
    assert assert_spans_kept(tmp_path / "src", data) >= 15


def test_csv_parquet_and_unknown_layouts(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.csv").write_text('id,instruction,input,output\nc1,"Name {x}, please.",,"It is 42."\n', encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"id": "p1", "instruction": "Say hello.", "output": "Hello there!"}]),
                   src / "b.parquet")  # fmt: skip
    (src / "c.jsonl").write_text('{"question": "What?", "answer": "That."}\n', encoding="utf-8")
    with DeepLServer() as server:
        proc = translate(tmp_path, server.url, f"data.path={src}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    data = rows(tmp_path / "out" / "data")
    assert set(data) == {"c1", "p1"} and "{x}" in data["c1"]["instruction"] and "42" in data["c1"]["output"]
    assert data["c1"]["input"] == ""  # an empty CSV cell stays an empty text
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text(encoding="utf-8")
    assert '"unknown_layout"' in rejects and "c.jsonl:1" in rejects


def test_the_kullm_v2_recipe_merges_sources_into_its_ids_and_fields(tmp_path) -> None:
    d = tmp_path / "kullm-v2-sources"
    d.mkdir()
    (d / "gpt4all.jsonl").write_text(
        json.dumps({"prompt": "Name a color.", "response": "Blue.", "source": "x"}) + "\n"
        + json.dumps({"prompt": "", "response": "empty prompt: skipped"}) + "\n", encoding="utf-8",
    )  # fmt: skip
    (d / "dolly.jsonl").write_text(
        json.dumps({"instruction": "Summarize.", "context": "A long text.", "response": "Short.", "category": "s"})
        + "\n", encoding="utf-8",
    )  # fmt: skip
    turns = [("human", "Hi?"), ("gpt", "Hello."), ("human", "Bye?"), ("gpt", "Bye.")]
    conv = {"id": "v9", "conversations": [{"from": f, "value": v} for f, v in turns]}
    (d / "vicuna.jsonl").write_text(json.dumps(conv) + "\n", encoding="utf-8")
    recipe = compose("translate", ["recipe=kullm-v2", f"recipe.data_dir={tmp_path}", "output=x"]).recipe
    merged = prepare_recipe(recipe, tmp_path / "merged")
    got = [json.loads(line) for line in merged.read_text(encoding="utf-8").splitlines()]
    assert got == [
        {"id": "gpt4all_0", "instruction": "Name a color.", "input": "", "output": "Blue."},
        {"id": "dolly_0", "instruction": "Summarize.", "input": "A long text.", "output": "Short."},
        {"id": "vicuna_v9_0", "instruction": "Hi?", "input": "", "output": "Hello."},
        {"id": "vicuna_v9_1", "instruction": "Bye?", "input": "", "output": "Bye."},
    ]
    with DeepLServer() as server:
        proc = translate(tmp_path, server.url, "recipe=kullm-v2", f"recipe.data_dir={tmp_path}", out="v2")
        assert proc.returncode == 0, proc.stderr[-3000:]
    records, report = read_records(tmp_path / "v2" / "data", ReadOptions(source="files"))
    assert [r.id for r in records] == ["gpt4all_0", "dolly_0", "vicuna_v9_0", "vicuna_v9_1"]


def test_a_missing_recipe_source_offline_names_the_fetch_command(tmp_path) -> None:
    proc = run_script(
        "kullm-translate", "recipe=kullm-v2", f"recipe.data_dir={tmp_path}", "recipe.fetch=false",
        f"output={tmp_path / 'o'}", cwd=tmp_path,
    )  # fmt: skip
    line = one_line_error(proc, "kullm-translate")
    assert "download_data.py --only gpt4all" in line, line


@pytest.mark.slow
def test_the_translated_set_trains(tmp_path, source) -> None:
    with DeepLServer(translate=planted) as server:
        assert translate(tmp_path, server.url, f"data.path={source}").returncode == 0
    proc = run_script(
        "kullm-train", "experiment=smoke", f"data.path={tmp_path / 'out' / 'data'}", "data.val_set_size=1",
        "logger=none", "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def test_a_save_to_disk_set_keeps_its_layout_and_names_its_split(tmp_path) -> None:
    import datasets

    from kullm.translation.pipeline import read_items

    rows_in = [{"messages": [{"role": "user", "content": "Hi there?"}, {"role": "assistant", "content": "Hello!"}]}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_in)}).save_to_disk(str(tmp_path / "saved"))
    data = dict(compose("translate", [f"data.path={tmp_path / 'saved'}", "output=x"]).data)
    items, _ = read_items(data)
    (item,) = items
    assert item.bad is None and item.file == "train.jsonl" and item.id == "train:1"
    assert [(path, text) for path, text in item.fields] == [
        (("messages", 0, "content"), "Hi there?"),
        (("messages", 1, "content"), "Hello!"),
    ]


def test_resuming_with_other_backend_options_is_refused_in_one_line(tmp_path, source) -> None:
    with DeepLServer(translate=planted) as server:
        assert translate(tmp_path, server.url, f"data.path={source}").returncode == 0
        proc = translate(tmp_path, server.url, f"data.path={source}", "backend.formality=more")
        line = one_line_error(proc, "kullm-translate")
        assert "other options" in line and "output=" in line, line
        assert len(server.requests) == 1


def test_self_instruct_rows_translate_each_instance_and_bad_shapes_are_named(tmp_path) -> None:
    from kullm.translation.pipeline import path_str, read_items

    src = tmp_path / "si.jsonl"
    good = {"id": "si-1", "instruction": "Classify it.", "instances": [{"input": "A cat.", "output": "Animal"},
                                                                       {"input": "", "output": "Nothing"}]}  # fmt: skip
    src.write_text(json.dumps(good) + "\n" + json.dumps({"id": "si-2", "instruction": "x", "instances": []}) + "\n")
    data = dict(compose("translate", [f"data.path={src}", "output=x"]).data)
    first, second = read_items(data)[0]
    assert [path_str(p) for p, _ in first.fields] == [
        "instruction", "instances[0].input", "instances[0].output", "instances[1].input", "instances[1].output"
    ]  # fmt: skip
    assert second.bad is not None and second.bad.reason == "bad_instances"


def test_a_back_translated_sample_names_the_inadequate_translation_and_reruns_ask_nothing(tmp_path, source) -> None:
    back: dict[str, str] = {}

    def two_way(text: str) -> str:
        """English -> fake Korean, remembering the way back; Korean -> the English it came from (the octopus fact
        comes back as something else: fluent, passing every other gate, and wrong)."""
        if text in back:
            return back[text]
        korean = fake_korean(text)
        back[korean] = "A car has four wheels and a red roof." if "octopus has" in text else text
        return korean

    args = [f"data.path={source}", "qc.adequacy.sample=100", "qc.adequacy.action=reject"]
    with DeepLServer(translate=two_way) as server:
        proc = translate(tmp_path, server.url, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reverse = [r for r in server.requests if r.get("target_lang") == "EN-US"]
        assert reverse and all(r["source_lang"] == "KO" for r in reverse)
        stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
        logged = [json.loads(x) for x in (tmp_path / "out" / "translations.jsonl").read_text("utf-8").splitlines()]
        assert stats["adequacy"]["scored"] == sum(x["status"] == "ok" for x in logged) > 20
        assert stats["adequacy"]["requests"] == len(reverse) and stats["adequacy"]["mean_similarity"] > 0.9
        rejects = (tmp_path / "out" / "rejects.jsonl").read_text(encoding="utf-8")
        assert '"inadequate"' in rejects and "share-1" in rejects and "share-1" not in rows(tmp_path / "out" / "data")
        before = len(server.requests)
        assert translate(tmp_path, server.url, *args).returncode == 0
        assert len(server.requests) == before  # both directions come from the cache now
