"""kullm-generate on the tiny model: batching, streaming, extraction, resumable file runs, bad rows, chat."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from console_scripts import run_script, script
from helpers import ITEMS, SHARED_EVAL_SET, gen_cfg, write_jsonl

from kullm.config import compose
from kullm.data.records import read_records
from kullm.data.sources import DataError
from kullm.generate import quote_text_args, run
from kullm.inference.files import check_settings, run_file
from kullm.inference.generator import Generator


@pytest.fixture(scope="module")
def generator(adapter) -> Generator:
    return Generator.from_config(gen_cfg(adapter))


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_greedy_equals_one_at_a_time_token_for_token(generator, attn):
    generator.model.base_model.model.set_attn_implementation(attn)
    try:
        assert generator.model.config._attn_implementation == attn
        ids = [generator.encode(generator.render(x)) for x in ITEMS]
        assert len({len(x) for x in ids}) == len(ids)  # every row of the batch is padded differently
        alone = [generator.complete([x])[0] for x in ids]
        batched = generator.complete(ids)  # input order, one batch: the longest row pads all the others
        assert batched == alone
        assert all(len(x) == 16 for x in alone)  # no early EOS: every token position was compared
        assert len({tuple(x) for x in alone}) > 1
        assert generator.generate(ITEMS, batch_size=2) == [generator.generate([x])[0] for x in ITEMS]
    finally:
        generator.model.base_model.model.set_attn_implementation("sdpa")


def test_adapter_changes_answers(generator):
    with generator.model.disable_adapter():
        plain = generator.generate(ITEMS[:3])
    assert generator.generate(ITEMS[:3]) != plain


def test_budget_follows_max_length_per_prompt(generator, adapter):
    ids = [generator.encode(generator.render(x)) for x in ITEMS]
    limit = sorted(len(x) for x in ids)[-2] + 8  # the longest prompt has no room left
    g = Generator(generator.model, generator.tokenizer, generator.prompter, {"max_length": limit, "num_beams": 1})
    out = g.complete(ids)
    assert sorted(len(x) + len(p) for x, p in zip(out, ids, strict=True))[:-1] == [limit] * 4
    assert out[1] == [] and len(ids[1]) > limit
    assert out == [g.complete([x])[0] for x in ids]


def test_eos_and_pad_come_from_the_tokenizer(generator):
    """With a pad distinct from EOS (the tiny tokenizer's are both id 2, which would hide a mix-up)."""
    import copy

    tok = copy.deepcopy(generator.tokenizer)
    tok.pad_token = tok.convert_ids_to_tokens(5)
    assert (tok.pad_token_id, tok.eos_token_id) == (5, 2)
    g = Generator(generator.model, tok, generator.prompter, {"max_new_tokens": 16, "num_beams": 1})
    assert g.config.eos_token_id == 2 and g.config.pad_token_id == 5 and g.pad_id == 5
    assert g.config.num_beams == 1 and g.config.do_sample is False
    ids = [g.encode(g.render(x)) for x in ITEMS[:3]]
    assert g.complete(ids) == [g.complete([x])[0] for x in ids]  # left padding with id 5 changes no answer


def test_default_settings_are_the_seeds():
    cfg = compose("generate", ["output_dir=/nonexistent"])
    g = cfg.generation
    assert (g.temperature, g.num_beams, g.max_length, g.max_new_tokens) == (0.2, 5, 512, None)


def test_stream_yields_the_same_text_as_generate(generator):
    for item in ITEMS[:3]:
        pieces = list(generator.stream(item))
        assert len(pieces) > 1
        assert "".join(pieces).strip() == generator.generate([item])[0]


def test_stream_falls_back_to_one_beam(generator):
    g = Generator(generator.model, generator.tokenizer, generator.prompter, {"max_new_tokens": 8, "num_beams": 3})
    assert g.config.num_beams == 3
    assert "".join(g.stream(ITEMS[0])).strip()


def test_extraction_keeps_a_marker_inside_the_response(generator, monkeypatch):
    import torch

    answer = "첫째 ### 응답: 둘째"
    tok = generator.tokenizer
    tail = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.eos_token_id]

    def fake_generate(input_ids, attention_mask, generation_config, **_):
        return torch.cat([input_ids, torch.tensor([tail] * len(input_ids))], dim=1)

    monkeypatch.setattr(generator.model, "generate", fake_generate)
    item = ("### 응답: 이라는 표시가 명령어에도 있습니다", "입력에도 ### 응답: 이 있습니다")
    assert generator.generate([item, "짧은 명령"]) == [answer, answer]


def test_file_run_killed_then_resumed_has_every_id_once_in_input_order(generator, tmp_path):
    """Rows are written window by window (4 batches), each in input order: a kill keeps the windows done."""
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": f"r{i}", "instruction": f"{i}번째 {'아주 ' * (i % 5)}긴 질문입니다", "output": "-"} for i in range(20)],
    )
    out = tmp_path / "responses.jsonl"
    full = run_file(generator, src, tmp_path / "reference.jsonl", batch_size=2, progress=False)
    reference = {r["id"]: r["response"] for r in lines(full)}
    assert [r["id"] for r in lines(full)] == [f"r{i}" for i in range(20)]

    class Killed(Exception):
        pass

    original = generator.generate
    calls = []

    def dies_in_the_sixth_batch(items, batch_size=None, on_batch=None):
        def cb(idx, answers):
            on_batch(idx, answers)
            calls.append(idx)
            if len(calls) == 6:  # the second window of 4 batches × 2 rows
                raise Killed

        return original(items, batch_size, cb)

    generator.generate = dies_in_the_sixth_batch
    try:
        with pytest.raises(Killed):
            run_file(generator, src, out, batch_size=2, progress=False)
    finally:
        del generator.generate
    assert [r["id"] for r in lines(out)] == [f"r{i}" for i in range(8)]
    with out.open("a") as f:  # a write torn by the kill
        f.write('{"id": "r8", "instruction": "8번째')
    run_file(generator, src, out, batch_size=3, progress=False)
    rows = lines(out)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(20)]
    assert {r["id"]: r["response"] for r in rows} == reference
    assert set(rows[0]) == {"id", "instruction", "input", "response", "generation"}
    assert rows[0]["generation"]["max_new_tokens"] == 16


def test_resuming_with_other_settings_is_refused(tmp_path):
    done = {"a": {"id": "a", "generation": {"num_beams": 5, "batch_size": 8}}}
    check_settings(tmp_path, done, {"num_beams": 5, "batch_size": 2})  # batch size may change
    with pytest.raises(ValueError, match="num_beams"):
        check_settings(tmp_path, done, {"num_beams": 1, "batch_size": 8})


def test_bad_rows_are_reported_with_file_and_line_and_the_rest_run(generator, tmp_path, caplog):
    src = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"id": "ok1", "instruction": "첫 질문", "output": "-"},
            '{"id": "broken", "instruction": ',
            {"id": "noinst", "output": "-"},
            {"id": "ok2", "instruction": "둘째 질문", "instances": [{"input": "맥락", "output": "-"}]},
        ],
    )
    out = run_file(generator, src, tmp_path / "o.jsonl", progress=False)
    assert sorted(r["id"] for r in lines(out)) == ["ok1", "ok2"]
    assert {r["id"]: r["input"] for r in lines(out)}["ok2"] == "맥락"
    assert f"{src}:2" in caplog.text and f"{src}:3" in caplog.text
    assert (tmp_path / "o.rejects.jsonl").is_file()
    with pytest.raises(DataError, match=rf"{src}:2"):
        run_file(generator, src, tmp_path / "strict.jsonl", policy="strict", progress=False)
    with pytest.raises(DataError, match="no such file"):
        run_file(generator, tmp_path / "missing.jsonl", tmp_path / "x.jsonl", progress=False)


def test_prompt_mode_prints_the_answer(adapter, generator, capsys):
    answer = run(gen_cfg(adapter, *quote_text_args(["prompt=고려대학교에 대해서 알려줘"])))
    assert answer == generator.generate(["고려대학교에 대해서 알려줘"])[0]
    assert answer in capsys.readouterr().out


@pytest.mark.parametrize(
    "text",
    [
        "고려대학교에 대해서 알려줘",
        'it\'s "quoted"',
        "a=b,c [1] {k: v}",
        "${x} 보간 \\${y}",
        "끝\\",
        "'a' 와 'b'",
        "null",
    ],
)
def test_free_text_arguments_arrive_verbatim(text):
    (prompt,) = quote_text_args([f"prompt={text}"])
    assert compose("generate", ["output_dir=/nonexistent", prompt]).prompt == text
    assert quote_text_args(["prompt='이미 따옴표'", "generation.top_k=5"]) == [
        "prompt='이미 따옴표'",
        "generation.top_k=5",
    ]


def test_adapter_and_base_together_is_an_error(adapter):
    with pytest.raises(ValueError, match="not both"):
        Generator.from_config(gen_cfg(adapter, f"base={adapter}"))


def test_missing_cuda_is_a_clear_error(adapter):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Generator.from_config(gen_cfg(adapter, "device=cuda"))


def test_eval_set_gives_252_responses(generator, tmp_path):
    if not SHARED_EVAL_SET.is_file():
        pytest.skip(f"the evaluation set is not at {SHARED_EVAL_SET.parent}")
    records, _ = read_records(SHARED_EVAL_SET)
    g = Generator(generator.model, generator.tokenizer, generator.prompter, {"max_new_tokens": 4, "num_beams": 1})
    out = run_file(g, SHARED_EVAL_SET, tmp_path / "eval.jsonl", batch_size=32, progress=False)
    rows = lines(out)
    assert len(rows) == len(records) == 252
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)
    assert all(r["response"] for r in rows)


def test_chat_streams_and_exits(adapter, generator, tmp_path):
    cmd = [sys.executable, "-m", "kullm.generate", f"adapter={adapter}", "generation=greedy",
           "generation.max_new_tokens=16", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, input="고려대학교에 대해서 알려줘\n/exit\n어긋난 줄\n", capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(">>> ") == 2  # one answer, then /exit quits before the third line
    assert generator.generate(["고려대학교에 대해서 알려줘"])[0] in proc.stdout


@pytest.mark.slow
def test_cli_prompt_in_korean(adapter, generator, tmp_path):
    cmd = [sys.executable, "-m", "kullm.generate", f"adapter={adapter}", "prompt=고려대학교에 대해서 알려줘",
           "generation=greedy", "generation.max_new_tokens=16", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(generator.generate(["고려대학교에 대해서 알려줘"])[0])


@pytest.mark.slow
def test_cli_file_run_survives_sigkill(adapter, tmp_path):
    rows = [{"id": f"r{i}", "instruction": f"{i}번째 질문에 길게 답하세요", "output": "-"} for i in range(40)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "kullm.generate", f"adapter={adapter}", f"input_file={src}", f"output_file={out}",
           "generation=greedy", "generation.max_new_tokens=48", "generation.batch_size=1",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = out.read_text().count("\n")
    assert 3 <= killed_at < len(rows)
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == sorted(r["id"] for r in rows)


def test_beam_search_answers_equal_one_prompt_at_a_time(generator):
    """A batched beam search runs to the batch's longest budget and gives other answers (11 of these 24 differ
    with batch_beams=true); by default beams go one prompt at a time, so batch_size changes nothing."""
    items = [
        f"{'아주 ' * (i % 7)}긴 질문 {i}번: 한국의 {['역사', '음식', '날씨', '대학'][i % 4]}에 대해 설명해 주세요"
        for i in range(24)
    ]
    settings = {"max_length": 60, "num_beams": 4}
    g = Generator(generator.model, generator.tokenizer, generator.prompter, settings)
    alone = [g.generate([x], batch_size=1)[0] for x in items]
    assert g.generate(items, batch_size=8) == alone
    fast = Generator(generator.model, generator.tokenizer, generator.prompter, {**settings, "batch_beams": True})
    assert fast.generate(items, batch_size=8) != alone  # what the default avoids
    with pytest.raises(ValueError, match="batch_size=-1"):
        g.generate(items, batch_size=-1)


def test_an_empty_instruction_with_an_input_as_in_kullms_readme(adapter, generator, capsys):
    answer = run(gen_cfg(adapter, *quote_text_args(["input=고려대학교에 대해서 알려줘"])))
    assert answer == generator.generate([("", "고려대학교에 대해서 알려줘")])[0]
    assert answer in capsys.readouterr().out


def test_an_input_file_row_with_an_empty_instruction_is_answered_as_input_is_and_a_broken_row_is_named(
    generator, tmp_path
):
    questions = tmp_path / "q.jsonl"
    readme = json.dumps({"id": "kullm", "instruction": "", "input": "고려대학교에 대해서 알려줘"}, ensure_ascii=False)
    surrogate = '{"id": "s", "instruction": "깨진 \\ud800 글자"}'  # a valid JSON escape, but no text
    questions.write_text("\n".join([readme, surrogate, "[" * 100_000 + "]" * 100_000]) + "\n", encoding="utf-8")
    out = run_file(generator, questions, tmp_path / "r.jsonl")
    answered = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["response"]) for r in answered] == [
        ("kullm", generator.generate([("", "고려대학교에 대해서 알려줘")])[0])  # what input= answers
    ]
    rejects = tmp_path / "r.rejects.jsonl"
    written = [json.loads(x) for x in rejects.read_text(encoding="utf-8").splitlines()]
    assert [(r["source"], r["field"], r["reason"]) for r in written] == [
        (f"{questions}:2", "instruction", "lone_surrogate"),
        (f"{questions}:3", "<row>", "nested_too_deep"),
    ]
    assert rejects.stat().st_mode & 0o777 == 0o600  # the rows copied are the user's


def test_unquoted_words_after_prompt_are_one_text():
    """``kullm-generate prompt=고려대학교에 대해서 알려줘`` as typed in a shell reaches argv as three words."""
    args = [
        "adapter=x",
        "prompt=고려대학교에",
        "대해서",
        "알려줘",
        "generation=greedy",
        "input=맥락",
        "두",
        "--cfg",
        "job",
    ]
    assert quote_text_args(args) == [
        "adapter=x",
        "prompt='고려대학교에 대해서 알려줘'",
        "generation=greedy",
        "input='맥락 두'",
        "--cfg",
        "job",
    ]


def test_inserting_an_id_less_row_then_resuming_answers_it_and_no_other_twice(generator, tmp_path):
    g = Generator(generator.model, generator.tokenizer, generator.prompter, {"max_new_tokens": 2, "num_beams": 1})
    rows = [{"instruction": f"{i}번째 질문"} for i in range(3)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    run_file(g, write_jsonl(src, rows), out, progress=False)
    run_file(g, write_jsonl(src, [{"instruction": "새로 넣은 질문"}, *rows]), out, progress=False)
    answered = lines(out)
    assert len(answered) == 4 and len({r["id"] for r in answered}) == 4
    assert sorted(r["instruction"] for r in answered) == sorted(["새로 넣은 질문", *(r["instruction"] for r in rows)])


def test_the_console_script_writes_a_file_run_in_input_order(adapter, tmp_path):
    """Batches go by prompt length; the output file still follows the input file, row for row."""
    ids = [f"q{i}" for i in range(9)]
    rows = [{"id": rid, "instruction": f"{'아주 ' * (i * 5 % 9)}긴 질문", "output": "-"} for i, rid in enumerate(ids)]
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    proc = run_script("kullm-generate", f"adapter={adapter}", f"input_file={src}", f"output_file={out}",
                      "generation=greedy", "generation.max_new_tokens=2", "generation.batch_size=3",
                      cwd=tmp_path, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["id"] for r in lines(out)] == ids


@pytest.mark.parametrize(("key", "code"), [("ctrl-c", 130), ("ctrl-d", 0)])
def test_leaving_the_chat_with_ctrl_c_or_ctrl_d_says_goodbye_without_a_traceback(adapter, tmp_path, key, code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([script("kullm-generate"), f"adapter={adapter}", "generation=greedy"], cwd=tmp_path,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        shown = ""
        while not shown.endswith(">>> ") and proc.poll() is None:
            shown += proc.stdout.read(1)
        if key == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        out, err = proc.communicate(timeout=60)  # closes stdin: end of input, as Ctrl-D at a terminal
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert (shown + out).endswith(">>> \nbye\n")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
