"""The five CLIs tell the truth: their version, one-line errors before anything heavy loads, and a non-zero exit
for a run that produced nothing."""

import json
import os
import subprocess
import sys

import pytest
from chat_server import ChatServer
from console_scripts import one_line_error, run_script

from kullm import __version__

CLIS = {"train": "kullm-train", "prepare": "kullm-prepare", "generate": "kullm-generate", "merge": "kullm-merge",
        "evaluate": "kullm-eval", "translate": "kullm-translate", "bench": "kullm-bench"}  # fmt: skip


def cli(module: str, *args: str, tmp_path, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"kullm.{module}", *args, f"hydra.run.dir={tmp_path}/run"]
    if module == "evaluate":
        cmd[-1] = f"output_dir={tmp_path}/run"
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


@pytest.mark.parametrize("module", sorted(CLIS))
def test_version_is_kullms(module):
    proc = subprocess.run([sys.executable, "-m", f"kullm.{module}", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{CLIS[module]} (kullm {__version__})"


# each console script with a real key of its own misspelled, and the key its hint must name
TYPOS = {
    "kullm-train": (["experiment=smoke", "optim.lrr=1"], "optim.lr"),
    "kullm-prepare": (["data.cutof_len=5"], "data.cutoff_len"),
    "kullm-generate": (["prompt=안녕 하세요", "generation.max_new_tokenz=4"], "generation.max_new_tokens"),
    "kullm-merge": (["adapter=a", "out=b", "tolerence=0.1"], "tolerance"),  # adapter and out are required (???)
    "kullm-eval": (["judge=openai", "judge.timout=2"], "judge.timeout"),
    "kullm-translate": (["data.path=x.jsonl", "qc.min_chrs=5"], "qc.min_chars"),
    "kullm-bench": (["suite=ko_quick", "batch_sise=4"], "batch_size"),
}
HEAVY = ("torch", "lightning", "transformers", "datasets", "peft")
# runs an installed console script's entry point in this process, then lists the heavy packages it imported
PROBE = """
import sys
from importlib.metadata import entry_points

(entry,) = entry_points(group="console_scripts", name=sys.argv[1])
main = entry.load()
sys.argv = sys.argv[1:]
try:
    main()
except SystemExit as e:
    assert e.code in (None, 0), e.code
print(sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[2].split(","))))
"""


@pytest.mark.parametrize("script", sorted(TYPOS))
def test_every_cli_refuses_a_misspelled_key_in_one_line_naming_the_nearest(script, tmp_path):
    args, key = TYPOS[script]
    proc = run_script(script, *args, cwd=tmp_path, timeout=120)
    line = one_line_error(proc, script)
    assert proc.stderr.strip() == line and line.startswith(f"{script}: unknown config key '")
    assert f"(did you mean '{key}'?)" in line


@pytest.mark.parametrize("flag", ["--version", "--help"])
@pytest.mark.parametrize("script", sorted(TYPOS))
def test_version_and_help_import_neither_torch_nor_lightning(script, flag, tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PROBE, script, flag, ",".join(HEAVY)], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, *_, loaded = proc.stdout.splitlines()
    assert loaded == "[]", f"{script} {flag} imported {loaded}"
    assert first == f"{script} (kullm {__version__})" if flag == "--version" else first.startswith(f"{script}: ")


RUNNER = """
import sys

from kullm.cli import run_cli
from kullm.errors import KullmError


def task(cfg):
    raise {error}


sys.argv = ["kullm-x", "adapter=a", "out=b", "hydra.run.dir=run"]
run_cli("kullm-x", "merge", task, catch=(OSError,))
"""


@pytest.mark.parametrize(
    ("error", "one_line", "shown"),
    [
        ("KullmError('no adapter folder at a')", True, "kullm-x: no adapter folder at a"),
        ("FileNotFoundError('b: no such file')", True, "kullm-x: b: no such file"),  # a type this command catches
        ("KeyError('a bug')", False, "KeyError: 'a bug'"),
        ("ValueError('a bug')", False, "ValueError: a bug"),  # a type another command catches, not this one
    ],
)
def test_the_runner_shows_a_users_mistake_in_one_line_and_a_bug_with_its_traceback(tmp_path, error, one_line, shown):
    proc = subprocess.run([sys.executable, "-c", RUNNER.format(error=error)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    if one_line:
        assert one_line_error(proc, "kullm-x") == shown
    else:
        assert proc.returncode != 0 and "Traceback" in proc.stderr and shown in proc.stderr.splitlines()


def test_a_cli_run_keeps_its_log_named_after_the_command(tmp_path):
    """Hydra names a job, and its log file, after the module defining the task: ``merge.log``, not ``cli.log``."""
    proc = run_script("kullm-merge", f"adapter={tmp_path}/absent", f"out={tmp_path}/merged",
                      f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)  # fmt: skip
    assert one_line_error(proc, "kullm-merge") == f"kullm-merge: {tmp_path}/absent: no such adapter folder"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "merge.log"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.path=/nope.jsonl"], "kullm-train: /nope.jsonl: no such file or folder"),
        (["data=kullm-v1"], "KULLM v1 (GPT4ALL in Korean) is not public: pass data.path=<your copy>"),
        (["data.cutoff_len=-1"], "kullm-train: data.cutoff_len=-1: must be at least 2"),
        (["trainer.max_epochs=abc"], "kullm-train: trainer.max_epochs='abc': expected int, got str"),
        (["micro_batch_size=0"], "kullm-train: micro_batch_size=0: must be at least 1"),
    ],
)
def test_train_refuses_bad_input_in_one_line_before_loading_a_model(tmp_path, overrides, message):
    proc = cli("train", "experiment=smoke", "logger=none", *overrides, tmp_path=tmp_path)
    assert message in one_line_error(proc, "kullm-train")
    assert "warmed up" not in proc.stdout + proc.stderr  # no model was built


def test_a_fifo_as_data_is_refused_not_read_forever(tmp_path):
    import os

    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    proc = cli("prepare", f"data.path={fifo}", tmp_path=tmp_path, timeout=60)
    assert "not a regular file or folder" in one_line_error(proc, "kullm-prepare")


def test_a_wrong_lora_target_is_one_line_naming_the_layers(tmp_path):
    proc = cli("train", "experiment=smoke", "logger=none", "lora.target_modules=[nope]", tmp_path=tmp_path)
    line = one_line_error(proc, "kullm-train")
    assert "lora.target_modules=['nope']" in line and "Linear layers here:" in line and "query_key_value" in line


def test_generate_over_a_file_with_no_usable_row_fails(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{"broken": \n', encoding="utf-8")
    proc = cli("generate", f"input_file={bad}", f"output_file={tmp_path}/out.jsonl", tmp_path=tmp_path)
    assert f"{bad}: no usable row (2 rejected" in one_line_error(proc, "kullm-generate")
    missing = cli("generate", f"input_file={tmp_path}/missing.jsonl", tmp_path=tmp_path)
    assert "missing.jsonl: no such file or folder" in one_line_error(missing, "kullm-generate")


def test_eval_that_judged_nothing_fails_with_the_reason(tmp_path):
    rows = [{"id": f"q{i}", "instruction": f"질문 {i}", "input": "", "response": "답"} for i in range(3)]
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    args = [f"responses={resp}", "judge.base_url=http://127.0.0.1:9/v1", "judge.max_retries=0", "judge.timeout=2",
            "progress=false", "references=null"]  # fmt: skip
    proc = cli("evaluate", *args, tmp_path=tmp_path)
    line = one_line_error(proc, "kullm-eval")
    assert "0 of 3 judged" in line and "report.md" in line
    proc = cli("evaluate", f"responses={tmp_path}/absent.jsonl", tmp_path=tmp_path)
    assert "absent.jsonl: no such file or folder" in one_line_error(proc, "kullm-eval")
    proc = cli("evaluate", *args[:1], "judge.concurrency=0", tmp_path=tmp_path)
    assert "judge.concurrency=0: must be at least 1" in one_line_error(proc, "kullm-eval")


def test_eval_with_another_judge_model_is_refused_before_any_request(tmp_path):
    from helpers import eval_cfg

    from kullm.evaluation import pipeline as ev

    rows = [{"id": f"q{i}", "instruction": f"질문 {i}", "input": "", "response": f"답 {i}"} for i in range(2)]
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with ChatServer() as s:
        summary = ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses={resp}", "references=null"))
        asked = sum(s.counts.values())
        report = (tmp_path / "o" / "report.md").read_text(encoding="utf-8")
        assert f"judge: openai / {summary['judge_model']} · prompt: kullm (" in report
        with pytest.raises(ValueError, match="pass another output_dir"):  # every id is judged already
            ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses={resp}", "references=null", "judge.model=other"))
        assert sum(s.counts.values()) == asked


def test_eval_without_responses_or_with_a_bad_key_is_one_line(tmp_path):
    proc = cli("evaluate", tmp_path=tmp_path)
    assert "give exactly one of responses=" in one_line_error(proc, "kullm-eval")
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"id": "a", "instruction": "q", "response": "r"}) + "\n", encoding="utf-8")
    with ChatServer(faults=lambda key, n: "401") as s:
        proc = cli("evaluate", f"responses={resp}", f"judge.base_url={s.url}", "references=null", tmp_path=tmp_path)
    assert "HTTP 401" in one_line_error(proc, "kullm-eval")


def test_generate_refuses_a_batch_size_that_would_write_nothing(tmp_path):
    proc = cli("generate", "prompt=안녕", "generation.batch_size=-1", tmp_path=tmp_path)
    assert "generation.batch_size=-1: must be at least 1" in one_line_error(proc, "kullm-generate")


def test_each_cli_help_lists_its_own_groups_with_one_line_descriptions():
    import subprocess
    import sys

    def help_of(module: str) -> str:
        res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    train = help_of("kullm.train")
    assert train.startswith("kullm-train: LoRA instruction tuning with Lightning.\n")
    for line in (
        "  hparams_search=\n",
        "    lora_optuna                     A TPE search (Optuna) over learning rate",
        "    lora_sweep                      A grid over LoRA rank and learning rate",
        "    smoke                           A tiny model on the bundled sample, on CPU, in well under a minute;",
        "    slurm                           SLURM through Hydra's submitit launcher",
        "    submitit_local                  each job a separate local process",
        "    wandb                         * Weights & Biases.",
        "  run_name=null                   a stable run folder",
    ):
        assert line in train, line
    assert "judge=" not in train and "generation=" not in train  # groups kullm-train does not use
    evaluate = help_of("kullm.evaluate")
    assert "  judge=\n" in evaluate and "    openai                        * Any OpenAI-compatible" in evaluate
    assert "hparams_search" not in evaluate and "lora=" not in evaluate
