import json

from kullm.resumable import AppendLog, read_done


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_read_done_drops_a_torn_last_line(tmp_path):
    out = write_jsonl(tmp_path / "o.jsonl", [{"id": "a", "response": "x"}])
    with out.open("a") as f:
        f.write('{"id": "b", "resp')
    assert set(read_done(out)) == {"a"}
    assert out.read_text() == '{"id": "a", "response": "x"}\n'


def test_duplicate_ids_keep_the_first_and_appends_start_on_a_fresh_line(tmp_path):
    out = write_jsonl(tmp_path / "o.jsonl", [{"id": "a", "v": 1}, {"id": "a", "v": 2}])
    with out.open("a") as f:
        f.write('{"id": "b"')
    with AppendLog(out) as log:
        log.write({"id": "c", "v": 3})
    assert read_done(out) == {"a": {"id": "a", "v": 1}, "c": {"id": "c", "v": 3}}
