import json

import pytest

from kullm.data.records import Fields, ReadOptions, read_records
from kullm.data.sources import DataError


def write_lines(path, lines: list[bytes | str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")
    return str(path)


def row(**kw) -> str:
    return json.dumps(kw, ensure_ascii=False)


def test_flat_layout_with_and_without_input(tmp_path):
    p = write_lines(
        tmp_path / "d.jsonl",
        [row(id="a", instruction="번역하세요", input="hello", output="안녕"), row(instruction="질문", output="답")],
    )
    recs, rep = read_records(p)
    assert [(r.id, r.input, r.output) for r in recs] == [("a", "hello", "안녕"), ("d.jsonl:2", "", "답")]
    assert recs[0].source.endswith("d.jsonl:1")
    assert rep.rows == 2 and rep.records == 2 and rep.n_rejected == 0


def test_self_instruct_layout_one_record_per_instance(tmp_path):
    p = write_lines(
        tmp_path / "si.jsonl",
        [
            row(id="one", instruction="요약", instances=[{"input": "긴 글", "output": "짧은 글"}]),
            row(id="two", instruction="분류", instances=[{"input": "x", "output": "A"}, {"input": "", "output": "B"}]),
        ],
    )
    recs, _ = read_records(p)
    assert [(r.id, r.input, r.output) for r in recs] == [
        ("one", "긴 글", "짧은 글"),
        ("two_0", "x", "A"),
        ("two_1", "", "B"),
    ]
    assert recs[2].source.endswith("si.jsonl:2#1")


def test_configurable_field_names(tmp_path):
    p = write_lines(tmp_path / "qa.jsonl", [row(qid=7, question="한국의 수도는?", answer="서울")])
    recs, _ = read_records(p, ReadOptions(fields={"id": "qid", "instruction": "question", "output": "answer"}))
    assert (recs[0].id, recs[0].instruction, recs[0].output) == ("7", "한국의 수도는?", "서울")
    with pytest.raises(ValueError, match="unknown field-name keys"):
        read_records(p, ReadOptions(fields={"questoin": "q"}))


BAD_ROWS = [
    ('{"instruction": "a", "output": ', "malformed_json", "<row>"),
    ('["a", "b"]', "not_an_object", "<row>"),
    (row(output="x"), "missing_field", "instruction"),
    (row(instruction="a"), "missing_field", "output"),
    (row(instruction=3, output="x"), "not_a_string", "instruction"),
    (row(instruction="a", input=["x"], output="x"), "not_a_string", "input"),
    (row(instruction="  ", output="x"), "empty_instruction", "instruction"),
    (row(instruction="a", output=""), "empty_output", "output"),
    (row(instruction="a", instances=[]), "bad_instances", "instances"),
    (row(instruction="a", instances=[{"input": "x", "output": ""}]), "empty_output", "instances[0].output"),
    (b'{"instruction": "\xed\x95", "output": "x"}', "invalid_utf8", "<row>"),
    # a lone surrogate is a valid JSON escape but no text: tokenizers and every file writer fail on it
    ('{"instruction": "a\\ud800", "output": "x"}', "lone_surrogate", "instruction"),
    ('{"instruction": "a", "input": "\\udfff", "output": "x"}', "lone_surrogate", "input"),
    ('{"instruction": "a", "output": "x\\ud800y"}', "lone_surrogate", "output"),
    ('{"id": "\\ud800", "instruction": "a", "output": "x"}', "lone_surrogate", "id"),
    ('{"instruction": "a", "instances": [{"input": "\\ud800"}]}', "lone_surrogate", "instances[0].input"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nested_too_deep", "<row>", id="deep-array"),  # past any limit
    pytest.param('{"output": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested_too_deep", "<row>", id="deep-field"),
]


@pytest.mark.parametrize(("line", "reason", "field"), BAD_ROWS)
def test_bad_row_is_counted_and_written_with_file_and_line(tmp_path, line, reason, field):
    good = row(id="g", instruction="좋은 행", output="네")
    p = write_lines(tmp_path / "bad.jsonl", [good, line, row(id="h", instruction="또", output="네")])
    rejects = tmp_path / "rejects.jsonl"
    recs, rep = read_records(p, rejects_path=rejects)
    assert [r.id for r in recs] == ["g", "h"]  # the rest still read
    assert rep.rejected == {reason: 1}
    written = [json.loads(x) for x in rejects.read_text(encoding="utf-8").splitlines()]
    assert written[0]["source"] == f"{p}:2" and written[0]["reason"] == reason and written[0]["field"] == field
    assert written[0]["raw"]  # the row itself is kept, so nothing is lost


@pytest.mark.parametrize(("line", "reason", "field"), BAD_ROWS)
def test_strict_policy_stops_at_first_bad_row_naming_it(tmp_path, line, reason, field):
    p = write_lines(tmp_path / "bad.jsonl", [row(id="g", instruction="좋은 행", output="네"), line])
    with pytest.raises(DataError) as e:
        read_records(p, ReadOptions(policy="strict"))
    assert str(e.value).startswith(f"{p}:2: {field}: {reason}")


def test_a_colliding_id_never_costs_a_distinct_row(tmp_path):
    """KULLM v2's ids (``alpaca_{idx}``…) are not guaranteed unique across its sources."""
    rows = [row(id="x", instruction="a", output="b"), row(id="x", instruction="c", output="d")]
    p = write_lines(tmp_path / "d.jsonl", rows)
    for policy in ("skip", "strict"):
        recs, rep = read_records(p, ReadOptions(policy=policy))
        assert [r.instruction for r in recs] == ["a", "c"]
        assert recs[0].id == "x" and recs[1].id.startswith("x#") and len(recs[1].id) == 10
        assert rep.renamed == [(f"{p}:2", "x", recs[1].id)] and rep.as_dict()["ids_renamed"] == 1
        assert not rep.rejects
    # deterministic: the same row gets the same new id on every read, whatever comes before it
    q = write_lines(tmp_path / "e.jsonl", [row(id="x", instruction="z", output="z"), *rows[::-1]])
    again, _ = read_records(q)
    assert {r.instruction: r.id for r in again}["c"] == recs[1].id


def test_exact_duplicates_are_dropped_and_counted_only_when_asked(tmp_path):
    same = row(id="y", instruction="같은 질문", input="입력", output="같은 답")
    p = write_lines(
        tmp_path / "d.jsonl", [same, row(id="z", instruction="같은 질문", input="입력", output="같은 답"), same]
    )
    recs, rep = read_records(p, ReadOptions(drop_duplicates=True))
    assert [r.id for r in recs] == ["y"] and rep.duplicates == 2 and rep.as_dict()["duplicates_dropped"] == 2
    kept, rep = read_records(p)  # generation input or responses: every id is its own item
    assert [r.id for r in kept][:2] == ["y", "z"] and len(kept) == 3 and rep.duplicates == 0


def test_id_less_rows_are_keyed_by_path_under_the_data_root(tmp_path):
    for sub in ("a", "b"):
        write_lines(tmp_path / sub / "train.jsonl", [row(instruction=f"{sub} 질문", output="답")])
    recs, rep = read_records(tmp_path)
    assert [r.id for r in recs] == ["a/train.jsonl:1", "b/train.jsonl:1"] and not rep.renamed


def test_bom_and_crlf_are_repaired_and_counted(tmp_path):
    p = tmp_path / "win.jsonl"
    p.write_bytes(
        "\ufeff".encode()
        + row(id="a", instruction="첫 줄", output="줄1\r\n줄2").encode()
        + b"\r\n"
        + row(id="b", instruction="둘", output="y").encode()
        + b"\r\n"
    )
    recs, rep = read_records(p)
    assert [r.id for r in recs] == ["a", "b"]
    assert recs[0].output == "줄1\n줄2"
    assert rep.repaired == {"bom": 1, "crlf": 2} and rep.n_rejected == 0


def test_json_array_file_reports_element_lines(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(
        '[\n  {"id": "a", "instruction": "x", "output": "y"},\n  {"id": "b", "instruction": "", "output": "y"}\n]'
    )
    recs, rep = read_records(p)
    assert [r.id for r in recs] == ["a"]
    assert rep.rejects[0].source == f"{p}:3" and rep.rejects[0].reason == "empty_instruction"
    p.write_text('[\n {"id": "a", "instruction": "x", "output": "y"},\n {"id": \n')
    with pytest.raises(DataError, match=r"d.json:3: <row>: malformed_json"):
        read_records(p)


def test_folder_reads_every_json_file(tmp_path):
    write_lines(tmp_path / "a.jsonl", [row(id="1", instruction="a", output="b")])
    write_lines(tmp_path / "b.jsonl", [row(id="2", instruction="c", instances=[{"input": "", "output": "d"}])])
    recs, _ = read_records(tmp_path)
    assert [r.id for r in recs] == ["1", "2"]


def test_missing_local_file_and_unreachable_hub_id_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match="could not load as a hub dataset"):
        read_records("nlpai-lab/definitely-not-cached")


def test_hub_code_path_on_a_local_dataset_folder(tmp_path, monkeypatch):
    """``source=hub`` goes through ``datasets.load_dataset``, which also accepts a local folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "ds"
    folder.mkdir()
    write_lines(
        folder / "train.jsonl",
        [row(id="a", instruction="질문", input="", output="답"), row(id="b", instruction="", output="x")],
    )
    recs, rep = read_records(folder, ReadOptions(source="hub", split="train"))
    assert [r.id for r in recs] == ["a"]
    assert rep.rejects[0].source == f"{folder}[train]:2"


def test_default_fields():
    assert Fields().instances == "instances"


def test_prompts_without_output_for_generation_and_empty_answers_for_judging(tmp_path):
    p = write_lines(tmp_path / "q.jsonl", [row(id="a", instruction="질문"), row(id="b", instruction="또", output="")])
    recs, rep = read_records(p, ReadOptions(require_output=False, allow_empty_output=True))
    assert [(r.id, r.output) for r in recs] == [("a", ""), ("b", "")] and rep.n_rejected == 0
    recs, rep = read_records(p, ReadOptions(allow_empty_output=True))
    assert [r.id for r in recs] == ["b"] and rep.rejected == {"missing_field": 1}


def test_hidden_files_and_folders_are_skipped_and_counted(tmp_path):
    write_lines(tmp_path / "train.jsonl", [row(id="a", instruction="질문", output="답")])
    write_lines(
        tmp_path / ".ipynb_checkpoints" / "train-checkpoint.jsonl", [row(id="a", instruction="옛", output="것")]
    )
    write_lines(tmp_path / "sub" / ".backup.jsonl", [row(id="b", instruction="숨은", output="파일")])
    recs, rep = read_records(tmp_path)
    assert [r.instruction for r in recs] == ["질문"] and rep.hidden_files == 2
    assert rep.as_dict()["hidden_files_skipped"] == 2 and not rep.renamed


def test_content_ids_survive_an_inserted_row(tmp_path):
    """Generation keys its resumption on ids: an id-less row keeps its id when a row is inserted above it."""
    rows = [row(instruction=f"질문 {i}") for i in range(3)]
    before, _ = read_records(
        write_lines(tmp_path / "a.jsonl", rows), ReadOptions(require_output=False, content_ids=True)
    )
    after, _ = read_records(
        write_lines(tmp_path / "b.jsonl", [row(instruction="새 질문"), *rows]),
        ReadOptions(require_output=False, content_ids=True),
    )
    assert [r.id for r in after[1:]] == [r.id for r in before] and all(r.id.startswith("sha:") for r in after)
    assert len({r.id for r in after}) == 4
    same, rep = read_records(
        write_lines(tmp_path / "c.jsonl", rows[:1] * 3), ReadOptions(require_output=False, content_ids=True)
    )
    assert len({r.id for r in same}) == 3 and len(rep.renamed) == 2  # the same prompt three times: three answers


def test_int_and_str_ids_never_cost_a_row(tmp_path):
    p = write_lines(
        tmp_path / "d.jsonl", ['{"id": 1, "instruction": "a", "output": "b"}', row(id="1", instruction="c", output="d")]
    )
    recs, rep = read_records(p)
    assert len(recs) == 2 and len({r.id for r in recs}) == 2 and not rep.rejects


def test_an_unreadable_file_is_one_error_naming_it(tmp_path, monkeypatch):
    from pathlib import Path

    p = write_lines(tmp_path / "locked.jsonl", [row(id="a", instruction="q", output="a")])
    real_open = Path.open

    def deny(self, *args, **kwargs):
        if self.name == "locked.jsonl":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(DataError, match=r"locked.jsonl: cannot read it \(Permission denied\)"):
        read_records(p)


def test_an_element_too_deep_in_a_json_array_is_a_reject_and_the_next_ones_are_read(tmp_path):
    deep = "[" * 50_000 + '"a ] \\" [ string"' + "]" * 50_000  # brackets inside a string do not count
    p = tmp_path / "d.json"
    good = [row(id="a", instruction="x", output="y"), row(id="b", instruction="z", output="w")]
    p.write_text(f"[\n{good[0]},\n{deep},\n{good[1]}\n]")
    recs, rep = read_records(p)
    assert [r.id for r in recs] == ["a", "b"]
    assert [(r.source, r.field, r.reason) for r in rep.rejects] == [(f"{p}:3", "<row>", "nested_too_deep")]
    assert rep.rejects[0].raw == deep


def test_an_empty_instruction_with_an_input_is_a_prompt_as_in_kullms_readme(tmp_path):
    p = write_lines(
        tmp_path / "q.jsonl",
        [row(id="a", instruction="", input="고려대학교에 대해서 알려줘"), row(id="b", instruction=" ", input="")],
    )
    recs, rep = read_records(p, ReadOptions(require_output=False))
    assert [(r.id, r.instruction, r.input) for r in recs] == [("a", "", "고려대학교에 대해서 알려줘")]
    assert [(r.source, r.field, r.reason) for r in rep.rejects] == [(f"{p}:2", "instruction", "empty_instruction")]


def test_an_empty_csv_cell_is_an_empty_field_shown_as_its_csv_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(
        'instruction,input,output\n질문,,답\n"여러 줄\n질문",,\n,,답\n,맥락만 있는 질문,답\n', encoding="utf-8"
    )
    rejects = tmp_path / "rejects.jsonl"
    recs, rep = read_records(p, rejects_path=rejects)
    assert [(r.instruction, r.input) for r in recs] == [("질문", ""), ("", "맥락만 있는 질문")]
    assert [str(r) for r in rep.rejects] == [
        f"{p}:3: output: empty_field (the 'output' cell is empty in '\"여러 줄\\n질문\",,')",
        f"{p}:5: instruction: empty_field (the 'instruction' cell is empty in ',,답')",
    ]
    with pytest.raises(DataError, match=f"^{p}:3: output: empty_field: the 'output' cell is empty in"):
        read_records(p, ReadOptions(policy="strict"))
    raws = [json.loads(x)["raw"] for x in rejects.read_text(encoding="utf-8").splitlines()]
    assert raws == ['"여러 줄\n질문",,', ",,답"]  # the lines as in the file
    recs, rep = read_records(p, ReadOptions(require_output=False))  # prompts to answer: no output needed
    assert len(recs) == 3 and rep.rejected == {"empty_field": 1}


def test_a_link_out_of_the_data_folder_is_not_read_and_rejects_are_user_only(tmp_path, caplog):
    secret = tmp_path / "etc" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    data = tmp_path / "data"
    write_lines(data / "train.jsonl", [row(id="a", instruction="질문", output="답"), '{"broken'])
    (data / "passwd.jsonl").symlink_to(secret)
    (data / "sub").mkdir()
    (data / "sub" / "again.jsonl").symlink_to(data / "train.jsonl")  # a link that stays inside: read
    rejects = tmp_path / "out" / "rejects.jsonl"
    recs, rep = read_records(data, rejects_path=rejects)
    assert [r.source for r in recs] == [f"{data}/sub/again.jsonl:1", f"{data}/train.jsonl:1"]
    assert rep.links_skipped == 1 and rep.as_dict()["links_skipped"] == 1
    warning = f"1 link(s) under {data} lead out of it and were not read, e.g. {data}/passwd.jsonl -> {secret}"
    assert warning in caplog.text
    assert "root:" not in rejects.read_text() and rejects.stat().st_mode & 0o777 == 0o600
    rejects.chmod(0o644)  # a rejects file written before: made user-only again
    read_records(data, rejects_path=rejects)
    assert rejects.stat().st_mode & 0o777 == 0o600


def test_rejects_are_never_written_through_a_link(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    p = write_lines(tmp_path / "d.jsonl", [row(id="a", instruction="x", output="y"), '{"broken'])
    (tmp_path / "rejects.jsonl").symlink_to(target)
    with pytest.raises(DataError, match="rejects.jsonl: a symbolic link: refusing to write rejected rows through it"):
        read_records(p, rejects_path=tmp_path / "rejects.jsonl")
    assert target.read_text() == "keep me"
