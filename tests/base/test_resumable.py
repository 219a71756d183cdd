import pytest
from helpers import write_jsonl

from kullm.resumable import AppendLog, read_done


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


def test_a_result_file_planted_as_a_link_is_never_read_cut_or_appended_through(tmp_path):
    target = tmp_path / "elsewhere" / "authorized_keys"
    target.parent.mkdir()
    target.write_text("ssh-ed25519 AAAA user@host")  # no newline: a "half-written line" a cut would remove
    out = tmp_path / "run" / "o.judgments.jsonl"
    out.parent.mkdir()
    out.symlink_to(target)
    with pytest.raises(OSError, match=f"^{out}: a symbolic link \\(to {target}\\): results are never written"):
        read_done(out)
    with pytest.raises(OSError, match="a symbolic link"), AppendLog(out) as log:
        log.write({"id": "a"})
    assert target.read_text() == "ssh-ed25519 AAAA user@host"
