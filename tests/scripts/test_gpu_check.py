"""scripts/gpu_check.py and scripts/gpu_wheels.py, on the CPU: the dry run composes every command the GPU run would
start (and fails on a broken override), a step past its limit is killed with its children, the carried wheels become
the right offline installs, and the summary's targets are computed from the steps' results."""

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
# by name: a git-ignored gpu_wheels/ folder at the top of a checkout would make ruff sort a plain import differently
gpu_check = importlib.import_module("gpu_check")
gpu_wheels = importlib.import_module("gpu_wheels")


def dry_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--work", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_the_dry_run_composes_every_command_of_the_gpu_run(tmp_path):  # ~20 s on 2 cores: kept in the fast suite
    proc = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "dry-run: ok" in out
    for name in ("strategy:fsdp", "strategy:deepspeed_zero2", "strategy:deepspeed_zero3", f"preset:{gpu_check.PRESET}"):
        assert f"dry-run: {name} (run): kullm-train --cfg job ok" in out
    for variant in ("kullm_head", "kullm_packed_head", "kullm_head_compiled"):
        assert f"dry-run: polyglot-ko-1.3b {variant}: kullm config composed and validated" in out
    for variant in gpu_check.QUANT:
        assert f"dry-run: polyglot-ko-12.8b {variant}: kullm config composed and validated" in out
    assert "dry-run: polyglot-ko-12.8b: 12.89 B parameters (meta device)" in out
    assert "dry-run: preset:kullm-v2-polyglot-12.8b: quant int8, precision 16-mixed, gradient_checkpointing True" in out


@pytest.mark.slow
def test_a_broken_override_fails_the_dry_run(tmp_path):
    proc = dry_run(tmp_path, "--override", "trainer.max_stepz=4")
    assert proc.returncode == 1
    assert "dry-run: failed" in proc.stdout
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("dry-run: PROBLEM")]
    assert any("strategy:fsdp (run)" in p and "max_stepz" in p for p in problems), proc.stderr[-3000:]
    assert any("kullm_head:" in p for p in problems)  # the benchmark's kullm runs get the override too


def test_every_step_has_a_limit_inside_one_device_call_and_known_needs():
    steps = gpu_check.plan()
    names = [s.name for s in steps]
    assert len(names) == len(set(names))
    assert names[:2] == ["install", "env"]
    assert all(0 < s.limit_s <= 120 for s in steps)
    assert gpu_check.BUDGET_S + 10 <= 8 * 60  # the summary is written inside the 8 minutes
    assert {g for s in steps for g in s.needs} <= set(gpu_check.GROUP_MODULE)
    assert {"quant"} == set(next(s for s in steps if s.name == "speed:seed_as_ran").needs)


def test_only_adds_the_steps_a_selection_depends_on():
    steps = gpu_check.select(gpu_check.plan(), "quant:kullm_nf4")
    assert [s.name for s in steps] == [
        "install",
        "env",
        "setup:polyglot-ko-12.8b",
        "checkpoint:polyglot-ko-12.8b",
        "quant:kullm_nf4",
    ]
    with pytest.raises(SystemExit, match="unknown steps"):
        gpu_check.select(gpu_check.plan(), "quant:kullm_nf5")


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed here may wait for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    with open(tmp_path / "log", "w") as log:
        t0 = time.monotonic()
        rc = gpu_check.run_limited([sys.executable, "-c", script], 2, log)
    assert rc == 124 and time.monotonic() - t0 < 15
    child = int(pid_file.read_text())
    for _ in range(50):
        if not running(child):
            break
        time.sleep(0.1)
    assert not running(child), "the step's own child (a kullm-train) outlived the kill"


def test_the_carried_wheels_become_offline_installs(tmp_path):
    ctx = gpu_check.Context(work=tmp_path, data=[], wheels=tmp_path / "gpu_wheels", overrides=[])
    groups = {
        "base": ["hydra_core-1.3.8-py3-none-any.whl", "antlr4_python3_runtime-4.9.3-py3-none-any.whl"],
        "quant": ["bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"],
        "deepspeed": ["deepspeed-0.19.8.tar.gz", "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl"],
    }
    cmds = {what: (cmd, env) for what, cmd, env in gpu_check.install_commands(ctx, groups)}
    assert list(cmds) == ["base", "quant", "kullm", "deepspeed"]  # trl not carried: not installed
    for cmd, _ in cmds.values():
        assert cmd[3:7] == ["install", "--no-index", "--find-links", str(ctx.wheels)]
    assert cmds["base"][0][-2:] == ["antlr4-python3-runtime", "hydra-core"]
    assert cmds["kullm"][0][-4:] == ["--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    assert cmds["deepspeed"][0][-3:] == ["--no-build-isolation", "deepspeed", "pydantic-core"]
    assert cmds["deepspeed"][1] == {"DS_BUILD_OPS": "0"}


def test_wheel_pins_come_from_the_lock_for_python_3_12():
    pins = gpu_wheels.pins()
    lock = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert f"numpy=={pins['numpy']} ; python_full_version >= '3.12'" in lock
    for names in gpu_wheels.GROUPS.values():
        for name in names:
            assert gpu_wheels.normalize(name) in pins, name
    assert gpu_wheels.owner("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl") == "pydantic-core"
    assert gpu_wheels.owner("deepspeed-0.19.8.tar.gz") == "deepspeed"
    ignored = subprocess.run(["git", "check-ignore", "-q", "gpu_wheels/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0, "gpu_wheels/ must stay out of git"


def speed(variant: str, tok_s: float, alloc: float = 1000.0) -> dict:
    return {
        "trained_tok_s": tok_s,
        "nonpad_tok_s": tok_s,
        "pad_frac": 0.0,
        "peak_rss_mib": 4000.0,
        "rss_before_train_mib": 3000.0,
        "cuda_max_alloc_mib": alloc,
        "steps": 20,
    }


def test_the_summary_checks_the_issue_targets(tmp_path):
    steps = {s.name: s for s in gpu_check.plan()}
    for name, result in {
        "speed:seed_as_ran": speed("seed_as_ran", 100.0),
        "speed:seed_grouped": speed("seed_grouped", 200.0),
        "speed:trl_packed": speed("trl_packed", 150.0),
        "speed:kullm_head": speed("kullm_head", 300.0),
        "quant:kullm_nf4": speed("kullm_nf4", 50.0, alloc=20 * 1024),
    }.items():
        steps[name].status, steps[name].result = "pass", result
    steps["setup:polyglot-ko-1.3b"].result = {"flops_per_token": 1e-3}  # 4·N ÷ peak: MFU = tok/s × this
    steps["setup:polyglot-ko-12.8b"].result = {"flops_per_token": None}
    steps["strategy:fsdp"].status = "skipped: budget (12 s left)"
    ctx = gpu_check.Context(work=tmp_path, data=[], wheels=tmp_path, overrides=[])
    text = gpu_check.summarize_run(ctx, list(steps.values()), 400.0)
    assert "- ÷ `seed_as_ran`: 3.00× (target ≥ 2.0×: met)" in text
    assert "- ÷ `seed_grouped`: 1.50× (target ≥ 1.3×: met)" in text
    assert "- ÷ TRL's best: 2.00× (target > 1×: met)" in text
    assert "- MFU: 30.0% (target ≥ 45%: missed)" in text
    assert "- 12.8b + nf4 peak: 20.0 GiB (target ≤ 16 GiB: missed by 4.0 GiB)" in text
    assert "| kullm_head | 300 | 300 | 0.0% | 1000 | 1.50 (1.50–1.50) |" in text
    assert "--only strategy:fsdp`" in text
    json.dumps([vars(s) for s in steps.values()])  # what gpu_check.json holds
