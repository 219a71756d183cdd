"""One bad row never sinks a run, and a data folder or result file cannot make kullm read or write elsewhere: the
console scripts as users run them, from a folder outside the checkout."""

import json

from chat_server import ChatServer, script
from console_scripts import run_script

SURROGATE = '{"id": "s", "instruction": "깨진 \\ud800 글자", "output": "답"}'  # a valid JSON escape, but no text
DEEP = "[" * 100_000 + "]" * 100_000


def rows(n: int, **extra: str) -> list[str]:
    return [json.dumps({"id": f"g{i}", "instruction": f"질문 {i}", "output": f"답 {i}", **extra}) for i in range(n)]


def rejects_of(path) -> list[tuple[str, str, str]]:
    return [(r["source"], r["field"], r["reason"]) for r in map(json.loads, path.read_text().splitlines())]


def test_prepare_reads_the_good_rows_around_bad_ones_and_no_file_a_link_points_at(tmp_path):
    secret = tmp_path / "etc" / "passwd"  # stands in for /etc/passwd
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    data = tmp_path / "data"
    data.mkdir()
    good = rows(6)
    train = data / "train.jsonl"
    train.write_text("\n".join([*good[:2], SURROGATE, *good[2:4], DEEP, *good[4:]]) + "\n")
    (data / "users.jsonl").symlink_to(secret)
    res = run_script(
        "kullm-prepare",
        f"data.path={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_set_size=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["read"]["records"] == 6 and stats["split"] == {"train": 5, "validation": 1}
    assert stats["read"]["rejected"] == {"lone_surrogate": 1, "nested_too_deep": 1}
    assert stats["read"]["links_skipped"] == 1
    assert f"{data}/users.jsonl -> {secret}" in res.stderr + res.stdout
    rejects = tmp_path / "run" / "rejects.jsonl"
    assert rejects_of(rejects) == [
        (f"{train}:3", "instruction", "lone_surrogate"),
        (f"{train}:6", "<row>", "nested_too_deep"),
    ]
    assert "root:" not in rejects.read_text() and rejects.stat().st_mode & 0o777 == 0o600


def test_eval_judges_the_good_rows_retries_a_reply_too_deep_and_never_appends_through_a_link(tmp_path):
    responses = tmp_path / "run.jsonl"
    good = rows(2, input="", response="응답")
    bad = '{"id": "s", "instruction": "질문", "input": "", "response": "깨진 \\udfff 답"}'
    responses.write_text("\n".join([good[0], bad, good[1]]) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    out.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("not judgments\n")
    (out / "run.judgments.jsonl").symlink_to(target)

    def kullm_eval(server: ChatServer):
        return run_script(
            "kullm-eval",
            f"responses={responses}",
            f"judge.base_url={server.url}",
            f"output_dir={out}",
            "references=null",
            "judge.backoff_base=0.01",
            "judge.backoff_max=0.05",
            "bootstrap.samples=100",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            cwd=tmp_path,
            timeout=180,
        )

    with ChatServer(faults=script({"응답": ["deep"]})) as s:
        res = kullm_eval(s)
        assert res.returncode != 0 and s.counts == {}
        assert f"{out / 'run.judgments.jsonl'}: a symbolic link (to {target})" in res.stderr
        assert "Traceback" not in res.stderr and target.read_text() == "not judgments\n"
        (out / "run.judgments.jsonl").unlink()
        res = kullm_eval(s)
        assert res.returncode == 0, res.stderr
        assert s.served["deep"] == 1 and s.counts["응답"] == 3  # the reply too deep to decode was asked again
    judged = [json.loads(x) for x in (out / "run.judgments.jsonl").read_text().splitlines()]
    assert sorted((j["id"], j["status"]) for j in judged) == [("g0", "ok"), ("g1", "ok")]
    rejects = out / "run.rejects.jsonl"
    assert rejects_of(rejects) == [(f"{responses}:2", "response", "lone_surrogate")]
    assert rejects.stat().st_mode & 0o777 == 0o600
