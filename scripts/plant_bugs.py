"""Plant each one-line bug of issues #16 and #23 (and the classic SFT ones) in a scratch copy, run its tests, report.

Each bug is a one-line change that the first release's tests let through (or that every SFT framework must catch);
each is planted alone in a fresh copy of the tracked files, the named (fast) tests are run there, and the copy is
deleted. A bug no test catches is a hole in the suite: the script then exits 1.

    python scripts/plant_bugs.py            # all of them (a few minutes on 2 cores)
    python scripts/plant_bugs.py 3 7        # only those numbers

The old line must occur exactly once in its file: when the code moves on, the script says which bug went stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = [
    Bug(
        "DDP gradients halved: the gradient scale drops × world_size",
        "kullm/training/module.py",
        "scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / window[1]",
        "scale = self.trainer.accumulate_grad_batches / window[1]",
        ("tests/training/test_gradient_scaling.py",),
    ),
    Bug(
        "the gradient scale drops × accumulate_grad_batches",
        "kullm/training/module.py",
        "scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / window[1]",
        "scale = self.trainer.world_size / window[1]",
        ("tests/training/test_gradient_scaling.py",),
    ),
    Bug(
        "the quant config is dropped: int8/nf4 runs train a full-precision base",
        "kullm/modeling.py",
        "            quantization_config=qc,\n",
        "            quantization_config=None,\n",
        (
            "tests/training/test_train.py::test_int8_lora_trains_on_cpu",
            "tests/training/test_train.py::test_nf4_lora_trains_on_cpu_after_an_eval_forward",
        ),
    ),
    Bug(
        "W&B `auto` without a key goes online",
        "kullm/wandb_mode.py",
        '        pass\n    return "offline"\n',
        '        pass\n    return "online"\n',
        ("tests/base/test_configs.py",),
    ),
    Bug(
        "the mask invariant never runs when train_on_inputs=false",
        "kullm/data/sft.py",
        'checked = [i for i, k in enumerate(enc["keep"]) if k] if verify else []',
        'checked = [i for i, k in enumerate(enc["keep"]) if k] if verify and train_on_inputs else []',
        ("tests/data/test_preprocess.py",),
    ),
    Bug(
        "the invariant's truncated branch accepts any substring of the output",
        "kullm/data/sft.py",
        "if not output.startswith(text):",
        "if text not in output:",
        ("tests/data/test_sft.py",),
    ),
    Bug(
        "the cosine schedule becomes linear",
        "kullm/training/module.py",
        "return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))",
        "return floor + (1 - floor) * (1 - progress)",
        ("tests/training/test_schedule.py",),
    ),
    Bug(
        "G-Eval's probability-weighted score becomes the most likely value",
        "kullm/evaluation/geval.py",
        "return sum(v * p for v, p in probs.items()) / total",
        "return max(probs, key=probs.get)",
        ("tests/evaluation/test_geval.py",),
    ),
    Bug(
        "the report's weighted mean uses max over items",
        "kullm/evaluation/report.py",
        "float(np.mean(w)) if len(w) == len(ok) else None",
        "float(np.max(w)) if len(w) == len(ok) else None",
        ("tests/evaluation/test_report.py",),
    ),
    Bug(
        "the report's weighted mean is given when only some items have one",
        "kullm/evaluation/report.py",
        "float(np.mean(w)) if len(w) == len(ok) else None",
        "float(np.mean(w)) if w else None",
        ("tests/evaluation/test_report.py",),
    ),
    Bug(
        "the prompt mask is off by one (the last prompt token trained)",
        "kullm/data/sft.py",
        "[IGNORE_INDEX] * min(n_prompt, cutoff_len) + row[n_prompt:]",
        "[IGNORE_INDEX] * min(n_prompt - 1, cutoff_len) + row[n_prompt - 1 :]",
        ("tests/data/test_sft.py",),
    ),
    Bug(
        "packed position_ids continue across examples",
        "kullm/data/packing.py",
        "pos.extend(range(lengths[i]))",
        "pos.extend(range(len(pos), len(pos) + lengths[i]))",
        ("tests/data/test_packing.py",),
    ),
    # issue #23, item 12: resume bugs the fast suite let through
    Bug(
        "a graceful stop inside an accumulation window writes `last` mid-window",
        "kullm/training/preemption.py",
        "if not stop or trainer.fit_loop.epoch_loop._should_accumulate():",
        "if not stop:",
        ("tests/training/test_resume_windows.py",),
    ),
    Bug(
        "`last` refreshed (or saved again after a resume) mid-window",
        "kullm/training/checkpointing.py",
        "        if trainer.fit_loop.epoch_loop._should_accumulate():\n            # mid-window",
        "        if False:\n            # mid-window",
        ("tests/training/test_resume_windows.py",),
    ),
    Bug(
        "a resume-identity key left unrecorded (the sampler)",
        "kullm/training/resume.py",
        '        "sampler": c.get("sampler"),\n',
        "",
        ("tests/training/test_checkpoint_state.py::test_every_resume_identity_key_is_recorded_and_a_change_to_it_alone_is_refused",),
    ),
    Bug(
        "FSDP checkpoints keep the wrapper's parameter names",
        "kullm/training/fsdp.py",
        "state[clean_name(full)] =",
        "state[full] =",
        ("tests/training/test_fsdp.py::test_fsdp_on_two_processes_saves_plain_names_and_resumes_exactly",),
    ),
]


def tracked_copy(dest: Path) -> None:
    """The tracked files of this checkout (with uncommitted edits), without .git or caches."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))


def plant(bug: Bug, work: Path) -> tuple[bool, list[str], float]:
    """``(caught, failing tests, seconds)`` for one bug planted in a fresh copy under ``work``."""
    tracked_copy(work)
    target = work / bug.path
    text = target.read_text(encoding="utf-8")
    if text.count(bug.old) != 1:
        raise SystemExit(f"stale bug {bug.what!r}: its line occurs {text.count(bug.old)} times in {bug.path}")
    target.write_text(text.replace(bug.old, bug.new), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(work)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *bug.tests]
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    failed = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("FAILED")]
    if run.returncode not in (0, 1):  # collection errors, interrupted, no tests: not a verdict
        raise SystemExit(f"{bug.what}: pytest exited {run.returncode}\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return run.returncode == 1, failed, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("numbers", nargs="*", type=int, help=f"which bugs (1–{len(BUGS)}; default all)")
    args = p.parse_args(argv)
    chosen = args.numbers or range(1, len(BUGS) + 1)
    missed = 0
    print("| # | planted bug | tests run | caught by | s |\n|---|---|---|---|---:|")
    for n in chosen:
        bug = BUGS[n - 1]
        with tempfile.TemporaryDirectory(prefix=f"kullm-plant-{n}-") as tmp:
            caught, failed, secs = plant(bug, Path(tmp))
        missed += not caught
        by = ", ".join(f"`{f.split('::', 1)[-1]}`" for f in failed[:3]) + (" …" if len(failed) > 3 else "")
        tests = ", ".join(f"`{t.split('/')[-1]}`" for t in bug.tests)
        print(f"| {n} | {bug.what} | {tests} | {by if caught else '**NOTHING**'} | {secs:.0f} |", flush=True)
    if missed:
        print(f"{missed} planted bug(s) caught by no test", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
