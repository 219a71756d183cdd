"""Inputs users produce in several spellings, each variant pinned: ShareGPT role names, colliding ids across row and
file orders, the dtype a merge writes by default, and the signals that requeue a cluster job."""

from __future__ import annotations

import hashlib
import itertools
import json
import signal
from types import SimpleNamespace

import pytest
from helpers import write_jsonl

from kullm.data.conversations import OPENAI_ROLES, SHAREGPT_ROLES
from kullm.data.records import ReadOptions, read_records

# --- role names -------------------------------------------------------------------------------------------------

# What each spelling seen in ShareGPT dumps means (written out here, not read from kullm)
SHAREGPT = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}  # fmt: skip
OPENAI = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def test_the_known_role_spellings_are_exactly_these():
    assert SHAREGPT_ROLES == SHAREGPT and OPENAI_ROLES == OPENAI


def test_every_sharegpt_role_spelling_in_any_case_reads_as_its_role(tmp_path):
    systems = [n for n, r in SHAREGPT.items() if r == "system"]
    users = [n for n, r in SHAREGPT.items() if r == "user"]
    assistants = [n for n, r in SHAREGPT.items() if r == "assistant"]
    rows, want = [], []
    for k, (user, assistant) in enumerate(itertools.product(users, assistants)):
        for spell in (str.lower, str.upper, str.title):
            turns = [{"from": spell(systems[0]), "value": "시스템"}, {"from": spell(user), "value": f"질문 {k}"},
                     {"from": spell(assistant), "value": f"답 {k}"}]  # fmt: skip
            rows.append({"id": f"{k}-{spell.__name__}", "conversations": turns})
            want.append((("system", "시스템"), ("user", f"질문 {k}"), ("assistant", f"답 {k}")))
    records, report = read_records(write_jsonl(tmp_path / "share.jsonl", rows))
    assert report.n_rejected == 0 and [r.turns for r in records] == want


def test_an_unknown_role_is_a_named_reject_unless_data_roles_maps_it(tmp_path):
    rows = [{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}]
    path = write_jsonl(tmp_path / "share.jsonl", rows)
    records, report = read_records(path)
    (rej,) = report.rejects
    assert not records and (rej.reason, rej.field) == ("unknown_role", "conversations[1].from")
    assert rej.message.startswith("role 'bot' is none of assistant, bard, bing, chatgpt, gpt, human, system, user")
    records, _ = read_records(path, ReadOptions(roles={"bot": "assistant"}))
    assert records[0].turns == (("user", "q"), ("assistant", "a"))


@pytest.mark.parametrize("name", sorted(OPENAI))
def test_every_openai_role_name_reads_as_its_role(tmp_path, name):
    turns = [{"role": name, "content": "지시"}] if OPENAI[name] == "system" else []
    if OPENAI[name] != "system":
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        turns[0 if OPENAI[name] == "user" else 1]["role"] = name
    turns += [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    records, report = read_records(write_jsonl(tmp_path / "m.jsonl", [{"id": "x", "messages": turns}]))
    assert report.n_rejected == 0
    assert [role for role, _ in records[0].turns] == [OPENAI.get(t["role"], t["role"]) for t in turns]


# --- colliding ids ----------------------------------------------------------------------------------------------


def renamed(content: tuple[str, str, str]) -> str:
    """``<id>#`` + 8 hex of the content hash: what a later row reusing an id with other content is called."""
    return "x#" + hashlib.sha256("\x00".join(content).encode()).hexdigest()[:8]


def test_a_reused_id_gets_the_same_new_name_whatever_the_order_of_rows_and_files(tmp_path):
    """The first row with id ``x`` (in sorted file order, then row order) keeps it; every later row with other
    content gets a name from its own content, so reordering the later rows or creating the files in another order
    renames nothing differently (a counter would)."""
    first = {"id": "x", "instruction": "처음", "input": "", "output": "하나"}
    later = [{"id": "x", "instruction": f"나중 {k}", "input": "입력" if k % 2 else "", "output": f"답 {k}"}
             for k in range(3)]  # fmt: skip
    want = {("처음", "", "하나"): "x"} | {
        (r["instruction"], r["input"], r["output"]): renamed((r["instruction"], r["input"], r["output"])) for r in later
    }
    for n, order in enumerate(itertools.permutations(later)):
        for files_first in ("a", "b"):  # which file is created first on disk
            folder = tmp_path / f"{n}{files_first}"
            folder.mkdir()
            files = {"a.jsonl": [first, order[0]], "b.jsonl": list(order[1:])}
            for name in sorted(files, reverse=files_first == "b"):
                write_jsonl(folder / name, files[name])
            records, report = read_records(folder)
            assert {(r.instruction, r.input, r.output): r.id for r in records} == want, (order, files_first)
            assert len(report.renamed) == 3


def test_the_very_same_row_under_a_reused_id_gets_a_counter_after_the_content_name(tmp_path):
    row = {"id": "x", "instruction": "같은", "input": "", "output": "행"}
    other = {"id": "x", "instruction": "다른", "input": "", "output": "행"}
    records, _ = read_records(write_jsonl(tmp_path / "d.jsonl", [other, row, row, row]))
    name = renamed(("같은", "", "행"))
    assert [r.id for r in records] == ["x", name, f"{name}~2", f"{name}~3"]


# --- the dtype a merge writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trained", "asked", "written"),
    [(None, None, "float32"), ("float32", None, "float32"), ("bfloat16", None, "bfloat16"),
     ("float16", None, "float16"), ("bfloat16", "float32", "float32"), ("float32", "bfloat16", "bfloat16")],
)  # fmt: skip
def test_a_merge_writes_the_dtype_the_base_was_trained_in_unless_told(adapter, tmp_path, trained, asked, written):
    """``dtype=null`` (the default): the dtype in the adapter's config (``model.dtype``), float32 when it names none;
    ``dtype=<name>`` wins."""
    import shutil

    import torch
    import yaml
    from helpers import merge_cfg
    from safetensors import safe_open

    from kullm.inference.merging import merge

    mine = shutil.copytree(adapter, tmp_path / "adapter")
    cfg = yaml.safe_load((mine / "kullm_config.yaml").read_text(encoding="utf-8"))
    cfg["model"].pop("dtype", None)
    if trained is not None:
        cfg["model"]["dtype"] = trained
    (mine / "kullm_config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    out = merge(merge_cfg(mine, tmp_path / "merged", *([f"dtype={asked}"] if asked else [])))
    dtypes = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[written]}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == written
    assert getattr(torch, written).is_floating_point


# --- signals that requeue a cluster job -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "requeued"),
    [(signal.SIGUSR1, True), (signal.SIGUSR2, True), (signal.SIGTERM, False), (signal.SIGINT, False), (None, False)],
    ids=["SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "none"],
)
@pytest.mark.parametrize("array", [False, True], ids=["job", "array-task"])
def test_only_a_pre_timeout_signal_requeues_a_slurm_job(tmp_path, monkeypatch, sig, requeued, array):
    """SLURM sends SIGUSR1 (``--signal=USR1@s``) or SIGUSR2 (submitit) before the time limit: that job goes back in
    the queue (array tasks by ``<array>_<task>``). SIGTERM (scancel, preemption) and Ctrl-C stop it for good."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from kullm.training.preemption import GracefulStop, requeue

    calls = tmp_path / "scontrol.calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if array:
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    else:
        monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    env = SLURMEnvironment(auto_requeue=True)
    trainer = SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=env), is_global_zero=True)
    job = "77_3" if array else "4242"
    assert requeue(trainer, sig) == (job if requeued else None)
    assert (calls.read_text() if calls.exists() else "") == (f"requeue {job}\n" if requeued else "")
    assert sig is None or sig in GracefulStop.SIGNALS  # every one of them saves `last` first

    trainer.is_global_zero = False  # the other ranks never requeue (one scontrol per job)
    assert requeue(trainer, sig) is None
    trainer._accelerator_connector.cluster_environment = SLURMEnvironment(auto_requeue=False)
    trainer.is_global_zero = True
    assert requeue(trainer, sig) is None  # the user turned requeueing off
