"""``python -m benchmarks.lm_eval_speed``: ``kullm-bench`` against the ``lm_eval`` CLI on the same model and tasks.

    python -m benchmarks.lm_eval_speed                                   # the table in BENCHMARKS.md
    python -m benchmarks.lm_eval_speed --repeats 1 --rows 40 --out /tmp/l.md   # a quick run

Both commands run as users run them (the installed console scripts, offline, one subprocess each, alternating
within each repeat) on one model folder, with the same batch size, seeds and two local tasks whose data this script
writes: a multiple-choice task (log-likelihoods) and a generation task (greedy ``generate_until``). Wall time is the
whole command: interpreter start, lm-eval's task index, model load, the task, the results written. Each repeat also
checks that both commands report the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import ROOT
from benchmarks.report import machine, write_report

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},  # kullm's tiny model as the tests use it (hidden 64, 2 layers)
    "body": {
        "hidden_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
        "warmup_steps": 0,
    },  # fmt: skip
}
WORDS = ["사과", "바다", "하늘", "학교", "음악", "기차", "도서관", "커피", "겨울", "강아지", "연필", "구름"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def write_tasks(folder: Path, rows: int) -> list[str]:
    """Two lm-eval tasks over ``rows`` Korean questions (a JSON file): multiple choice and greedy generation."""
    rng = random.Random(0)
    data = []
    for i in range(rows):
        choices = rng.sample(WORDS, 4)
        data.append({"question": f"{i}번: '{choices[i % 4]}'와 같은 낱말은?", "choices": choices, "label": i % 4,
                     "answer": choices[i % 4]})  # fmt: skip
    (folder / "questions.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    files = f"dataset_kwargs:\n  data_files:\n    test: {folder / 'questions.json'}\ntest_split: test\n"
    (folder / "speed_mc.yaml").write_text(
        "task: speed_mc\ndataset_path: json\n" + files + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\n답:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n",
        encoding="utf-8",
    )
    (folder / "speed_gen.yaml").write_text(
        "task: speed_gen\ndataset_path: json\n" + files + "output_type: generate_until\n"
        'doc_to_text: "{{question}}\\n답:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  do_sample: false\n  max_gen_toks: 16\n'
        "metric_list:\n  - metric: exact_match\nmetadata:\n  version: 1.0\n",
        encoding="utf-8",
    )
    return ["speed_mc", "speed_gen"]


def script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise SystemExit(f"{name} is not installed: pip install -e . (and lm-eval)")
    return found


def run_kullm(model: Path, task: str, tasks: Path, batch: int, out: Path) -> tuple[float, dict[str, float]]:
    args = [script("kullm-bench"), f"base={model}", f"tasks=[{task}]", f"include_path={tasks}",
            f"batch_size={batch}", "device=cpu", "seed=1234", f"output_dir={out}"]  # fmt: skip
    seconds = timed(args, out.parent)
    result = json.loads((out / "results.json").read_text())["results"][task]
    return seconds, result["metrics"]


def run_lm_eval(model: Path, task: str, tasks: Path, batch: int, out: Path) -> tuple[float, dict[str, float]]:
    args = [script("lm_eval"), "--model", "hf", "--model_args", f"pretrained={model}", "--tasks", task,
            "--include_path", str(tasks), "--batch_size", str(batch), "--device", "cpu", "--seed", "1234",
            "--output_path", str(out)]  # fmt: skip
    seconds = timed(args, out.parent)
    row = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"][task]
    metrics = {k.split(",")[0]: float(v) for k, v in row.items() if "," in k and "_stderr" not in k}
    return seconds, metrics


def timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])}… failed:\n{proc.stderr[-3000:]}")
    return seconds


def measure(args: argparse.Namespace, model: Path, work: Path) -> list[dict[str, Any]]:
    tasks = work / "tasks"
    tasks.mkdir()
    cases = []
    for task in write_tasks(tasks, args.rows):
        times: dict[str, list[float]] = {"lm_eval": [], "kullm": []}
        numbers: dict[str, dict[str, float]] = {}
        for rep in range(args.repeats):
            order = ["lm_eval", "kullm"] if rep % 2 == 0 else ["kullm", "lm_eval"]
            for variant in order:
                out = work / f"{task}-{variant}-{rep}"
                run = run_kullm if variant == "kullm" else run_lm_eval
                seconds, metrics = run(model, task, tasks, args.batch_size, out)
                times[variant].append(seconds)
                numbers[variant] = metrics
                print(f"bench: {task} {variant} repeat {rep}: {seconds:.1f} s {metrics}", flush=True)
        same = all(numbers["kullm"].get(k) == v for k, v in numbers["lm_eval"].items())
        cases.append({"task": task, "times": times, "numbers": numbers, "same": same})
    return cases


def section(args: argparse.Namespace, cases: list[dict[str, Any]], command: str, elapsed: float) -> str:
    from importlib.metadata import version

    lines = [
        "<!-- bench:lm_eval -->",
        "## kullm-bench vs the lm_eval CLI (issue #25) on cpu\n",
        f"Generated by `python -m benchmarks.lm_eval_speed` on {time.strftime('%Y-%m-%d %H:%M')} UTC in "
        f"{elapsed / 60:.1f} min (load average {os.getloadavg()[0]:.1f} at the end):\n",
        f"```\n{command}\n```\n",
        f"- {machine()}; lm-eval {version('lm_eval')}, torch {version('torch')}, transformers "
        f"{version('transformers')}. Model: kullm's tiny GPT-NeoX, shape `{args.shape}` "
        f"({json.dumps(SHAPES[args.shape]) if SHAPES[args.shape] else 'hidden 64, 2 layers'}), float32.",
        f"- {args.rows} questions per task, batch size {args.batch_size}, seeds 1234; `speed_mc`: 4 choices each "
        "(log-likelihoods), `speed_gen`: greedy generation up to 16 tokens. Wall time of the whole command "
        f"(start, task index, model load, task, results), {args.repeats} repeats, the two commands alternating; "
        "ratio = kullm ÷ lm_eval per repeat (median, min–max).",
        "",
        "| task | lm_eval s (median) | kullm-bench s (median) | ratio | same numbers |",
        "|---|---:|---:|---:|---|",
    ]
    for c in cases:
        t = c["times"]
        ratios = [k / e for k, e in zip(t["kullm"], t["lm_eval"], strict=True)]
        lines.append(
            f"| {c['task']} | {statistics.median(t['lm_eval']):.1f} | {statistics.median(t['kullm']):.1f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) | "
            f"{'yes' if c['same'] else 'NO'}: {c['numbers']['kullm']} |"
        )
    return "\n".join(lines) + "\n<!-- /bench:lm_eval -->\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_eval_speed", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200, help="questions per task")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shape", choices=sorted(SHAPES), default="body")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    from kullm.tiny import build_tiny

    start = time.monotonic()
    model = build_tiny(shape=SHAPES[args.shape] or None)
    with tempfile.TemporaryDirectory(prefix="kullm-lm-eval-speed-") as tmp:
        cases = measure(args, model, Path(tmp))
    command = "python -m benchmarks.lm_eval_speed" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    text = section(args, cases, command, time.monotonic() - start)
    if "<!-- bench:" in (args.out.read_text(encoding="utf-8") if args.out.exists() else ""):
        write_report(args.out, args, text, "lm_eval")  # beside the other sections, replacing its previous one
    else:  # a file of its own (write_report would head it with the training benchmark's header)
        args.out.write_text(text, encoding="utf-8")
    print(f"bench: wrote the lm_eval section of {args.out}")


if __name__ == "__main__":
    main()
