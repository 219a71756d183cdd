"""DPO speed: kullm's ``objective=dpo`` against TRL's ``DPOTrainer`` on the same pairs, model shape and settings.

    python -m benchmarks.dpo --data data/sample_pref/pairs.jsonl --threads 1                    # head-heavy shape
    python -m benchmarks.dpo --data data/sample_pref/pairs.jsonl --threads 1 --shape body --steps 4   # 1024 x 8
    python -m benchmarks.dpo --data data/sample_pref/pairs.jsonl --steps 2 --repeats 1 --out /tmp/dpo.md   # a smoke run

``--data`` names preference pairs (one-string ``prompt``/``chosen``/``rejected`` rows, any file format kullm reads);
the rows are repeated, each copy's prompt suffixed with its copy number, until every run's steps draw distinct pairs.

Every variant in its own subprocess (peak RSS is its own), alternating within each repeat: random-init GPT-NeoX of
the shape (:data:`benchmarks.runners.SHAPES`), LoRA r=8, alpha=16, dropout 0.05 on ``query_key_value``, the
reference = the base with the adapter disabled, DPO sigmoid loss with β 0.1 on log-probs summed over completion
tokens, AdamW lr 3e-4, random order (but ``kullm_dpo_grouped``), the same micro-batch of pairs (chosen and rejected
in one forward), fp32 on CPU (bf16 on a GPU), no gradient checkpointing:

- ``kullm_dpo``: ``kullm.train.train(cfg)`` with ``objective=dpo`` (the ``kullm-train objective=dpo`` path): the
  pair collator, the fused head-only log-probs (``loss.head_only=true``), the reference forward under
  ``disable_adapter()`` in eval mode.
- ``kullm_dpo_grouped`` (not run by default): the same with kullm's default ``sampler=length_grouped`` (pairs of
  similar length in a micro-batch: less padding); TRL's DPO data has no ``input_ids`` for HF's length grouping.
- ``trl_dpo``: TRL's ``DPOTrainer`` given the PEFT config, the prompt rendered by the same template and the answers
  as completions (TRL appends EOS as kullm appends its end-of-turn token); ``disable_dropout=False`` so the LoRA
  dropout matches; TRL's own fused LM head (its default).

Throughput: trained pairs/s from the end of the first optimizer step to the end of the last (``--threads 1`` on a
shared CPU: more threads than free cores make every step's time erratic). Each run also records its first step's
loss: with LoRA's B = 0 the policy equals the reference, so both must read log 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import ROOT
from benchmarks.measure import Meter, child_env, measured, param_split
from benchmarks.report import machine
from benchmarks.runners import SHAPES, kullm_overrides, tokenizer_path

VARIANTS = ("kullm_dpo", "trl_dpo", "kullm_dpo_grouped")
DEFAULT_VARIANTS = ("kullm_dpo", "trl_dpo")
BETA = 0.1
SHAPE_STEPS = {"head": 12, "body": 4}  # optimizer steps per run (the first untimed)
SECTION = "dpo-{shape}"
KEYS = ("pairs_s", "pairs_cpu_s", "trained_tok_s", "pad_frac", "peak_rss_mib", "cuda_max_alloc_mib", "first_loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, usage = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.dpo",
        description=summary,
        epilog="examples:\n" + usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", type=Path, nargs="+", metavar="PATH", help="preference pairs (e.g. data/sample_pref/pairs.jsonl)"
    )
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--shape", choices=sorted(SHAPES), default="head")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (first untimed); head 12, body 4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="pairs per forward (2x rows: chosen, rejected)")
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads per run (torch and OpenMP; default: torch's own)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = SHAPE_STEPS[args.shape]
    return args


# --- the workload -------------------------------------------------------------------------------------------------


def pair_workload(data_paths: list[Path], out: Path, rows_wanted: int) -> int:
    """Flatten the pairs of ``data_paths`` into ``{id, prompt, chosen, rejected}`` JSONL rows (read and checked by
    kullm's reader), repeated until there are ``rows_wanted``, each copy's prompt suffixed `` (2)``, `` (3)``, …"""
    from kullm.config import compose
    from kullm.data.preference import read_preference

    base: list[dict[str, str]] = []
    for path in data_paths:
        cfg = compose("train", ["output_dir=/tmp/unused", "objective=dpo", "data=sample_pref", f"data.path={path}"])
        records, _ = read_preference(cfg.data)
        for r in records:
            if not r.flat:
                raise SystemExit(f"bench: {r.source}: conversation pairs are not benchmarked; give one-string prompts")
            base.append({"id": r.id, "prompt": r.instruction, "chosen": r.chosen, "rejected": r.rejected})
    if not base:
        raise SystemExit("bench: no pairs found (" + ", ".join(map(str, data_paths)) + ")")
    rows, copy = list(base), 1
    while len(rows) < rows_wanted:
        copy += 1
        rows += [{**r, "id": f"{r['id']}~{copy}", "prompt": f"{r['prompt']} ({copy})"} for r in base]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


# --- the variants (each in a child process) -----------------------------------------------------------------------


def _pairs_per_s(meter: Meter, pairs: list[int]) -> dict[str, Any]:
    res = meter.result()
    timed = sum(pairs[1 : res["steps"]])  # pairs of the timed steps (after the first)
    res["pairs"] = timed
    res["pairs_s"] = timed / res["seconds"]
    res["pairs_cpu_s"] = timed / res["cpu_seconds"] if res["cpu_seconds"] > 0 else float("nan")
    return res


def run_kullm_dpo(args: argparse.Namespace, out_dir: Path, sampler: str = "random") -> dict[str, Any]:
    """``kullm.train.train(cfg)`` with ``objective=dpo``, metered by a Lightning callback; ``sampler``: ``random``
    (as TRL's) or ``length_grouped`` (kullm's default)."""
    import lightning as L

    from kullm.config import compose
    from kullm.train import train

    meter, pairs = Meter(args.device), [0]

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.last_step, self.first_loss = 0, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            meter.batch(batch["labels"], batch["attention_mask"])
            pairs[-1] += int(batch["n_pairs"])

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if trainer.global_step != self.last_step:
                self.last_step = trainer.global_step
                meter.step_end()
                pairs.append(0)
                if self.first_loss is None:
                    self.first_loss = float(trainer.callback_metrics["train/loss"])

    args.shape_name = "bench"  # kullm_overrides: the shape from args.shape, model=tiny
    args.model, args.train_on_inputs = "bench", False
    overrides = [o for o in kullm_overrides(args, "kullm_head", out_dir) if not o.startswith("sampler=")]
    overrides += [f"sampler={sampler}", "objective=dpo", f"objective.beta={BETA}", "objective.label_smoothing=0.0"]
    cfg = compose("train", overrides)
    clock = Clock()
    result, mem = measured(args.device, lambda: train(cfg, extra_callbacks=[clock]))
    return {
        **_pairs_per_s(meter, pairs),
        **mem,
        "first_loss": clock.first_loss,
        "global_step": result["metrics"]["global_step"],
    }


def run_trl_dpo(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """TRL's ``DPOTrainer`` as a user would set it up for these pairs, with the same model, LoRA and settings."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from benchmarks.seed_recipe import hf_trainer_args, kullm_prompter, torch_dtype
    from kullm.templates import Prompter

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompter = kullm_prompter(Prompter)
    raw = datasets.load_dataset("json", data_files=str(args.data), split="train")
    rows = raw.map(
        lambda r: {"prompt": prompter.render(r["prompt"], ""), "chosen": r["chosen"], "rejected": r["rejected"]},
        remove_columns=raw.column_names,
    )
    torch.manual_seed(args.seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**args.shape)).to(torch_dtype(args))
    model.config.use_cache = False
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query_key_value"], bias="none", task_type="CAUSAL_LM"
    )
    meter, pairs, losses = Meter(args.device), [0], []

    class StepClock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            meter.step_end()
            pairs.append(0)

    class MeteredDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            meter.batch(labels, inputs.get("attention_mask"))
            pairs[-1] += inputs["input_ids"].shape[0] // 2
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not losses:
                losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    targs = DPOConfig(
        **hf_trainer_args(args, out_dir),
        gradient_checkpointing=False,  # DPOConfig turns it on by default; kullm's variant does not recompute
        max_length=args.cutoff_len,
        beta=BETA,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        disable_dropout=False,  # keep LoRA's dropout 0.05, as kullm trains it
        precompute_ref_log_probs=False,  # the live reference (adapter disabled), as kullm's
    )
    trainer = MeteredDPOTrainer(
        model=model,
        args=targs,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepClock()],
    )
    _, mem = measured(args.device, trainer.train)
    return {**_pairs_per_s(meter, pairs), **mem, "first_loss": losses[0] if losses else None}


# --- the parent: schedule, summarise, report ----------------------------------------------------------------------


def run_child(args: argparse.Namespace, variant: str, repeat: int, work: Path) -> dict[str, Any]:
    result_path = work / f"{variant}-{repeat}.json"
    cmd = [sys.executable, "-m", "benchmarks.dpo", "--child", variant, "--result", str(result_path),
           "--spec", str(work / "spec.json"), "--out-dir", str(work / f"{variant}-{repeat}")]  # fmt: skip
    env = child_env(work)
    if args.threads:
        env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        print(f"bench: {variant} (repeat {repeat}) failed:\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"variant": variant, "repeat": repeat, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    res = json.loads(result_path.read_text())
    res.update(variant=variant, repeat=repeat, wall_s=wall, loadavg=(load0, load1))
    print(
        f"bench: {variant:<10} repeat {repeat}: {res['pairs_s']:6.2f} pairs/s, {res['trained_tok_s']:7.1f} trained "
        f"tok/s, pad {100 * res['pad_frac']:4.1f}%, peak RSS {res['peak_rss_mib']:.0f} MiB, first loss "
        f"{res['first_loss']:.6f}, {res['pairs_cpu_s']:.2f} pairs/CPU-s ({wall:.0f} s, load {load0:.1f}->{load1:.1f})",
        flush=True,
    )
    return res


def summarize(results: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Medians per variant and per-repeat ratios to ``trl_dpo`` of the same repeat (min, median, max)."""
    ok = [r for r in results if "error" not in r]
    trl = {r["repeat"]: r for r in ok if r["variant"] == "trl_dpo"}
    rows = []
    for v in variants:
        runs = [r for r in ok if r["variant"] == v]
        if not runs:
            err = next((r["error"] for r in results if r["variant"] == v and "error" in r), "no result")
            rows.append({"variant": v, "error": err})
            continue
        row: dict[str, Any] = {"variant": v, "n": len(runs), "steps": runs[0]["steps"]}
        for key in KEYS:
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals:
                row[key] = statistics.median(vals)
        row["first_losses"] = [r["first_loss"] for r in runs]
        row["trained_per_pair"] = statistics.median(r["trained_tokens"] / max(r["pairs"], 1) for r in runs)
        row["peak_delta_mib"] = statistics.median(r["peak_rss_mib"] - r["rss_before_train_mib"] for r in runs)
        for key in ("pairs_s", "peak_rss_mib", "cuda_max_alloc_mib"):
            ratios = [r[key] / trl[r["repeat"]][key] for r in runs if r["repeat"] in trl and key in r]
            if ratios:
                row[f"{key}_ratio"] = (min(ratios), statistics.median(ratios), max(ratios))
        rows.append(row)
    return rows


def _ratio(t: tuple[float, float, float] | None) -> str:
    return "" if t is None else f"{t[1]:.2f} ({t[0]:.2f}–{t[2]:.2f})"


def section(args: argparse.Namespace, rows: list[dict[str, Any]], elapsed: float) -> str:
    """The BENCHMARKS.md section of this shape, between its markers."""
    from importlib.metadata import version

    name = SECTION.format(shape=args.shape)
    shape = ", ".join(f"{k}={v}" for k, v in args.shape_dict.items() if k not in ("bos_token_id", "eos_token_id"))
    body, head, embed = param_split(args.shape_dict)
    mem_key = "cuda_max_alloc_mib" if args.device == "cuda" else "peak_rss_mib"
    mem = "peak CUDA alloc MiB" if args.device == "cuda" else "peak RSS MiB (Δ in training)"
    lines = [
        f"<!-- bench:{name} -->",
        f"## DPO, `{args.shape}` shape on {args.device}: kullm vs TRL's DPOTrainer\n",
        f"Generated by `python -m benchmarks.dpo` on {time.strftime('%Y-%m-%d %H:%M')} UTC in {elapsed / 60:.1f} min "
        f"(load average {os.getloadavg()[0]:.1f} at the end; {machine()}):\n",
        f"```\n{args.command}\n```\n",
        f"- Model: random-init GPT-NeoX ({shape}): {body / 1e6:.1f} M body + {head / 1e6:.1f} M LM-head parameters "
        f"(+ {embed / 1e6:.1f} M input embedding). LoRA r=8, alpha=16, dropout 0.05 on `query_key_value`; "
        f"{'bf16' if args.device == 'cuda' else 'fp32'}, no gradient checkpointing; the reference = the base with "
        f"the adapter disabled (no second model) in both.",
        f"- Data: {args.rows} pairs ({', '.join(args.data_sources)} repeated, each copy's prompt suffixed with its "
        f"copy number), template `kullm`, cutoff_len {args.cutoff_len}, random order "
        "(`kullm_dpo_grouped`: length-grouped); "
        f"{args.batch_size} pairs per "
        f"optimizer step = micro-batch {args.micro_batch_size} pairs (chosen and rejected rows in one forward) x "
        f"{args.batch_size // args.micro_batch_size} accumulation; DPO sigmoid, β {BETA}, AdamW lr 3e-4; "
        f"{args.steps} optimizer steps per run (the first untimed), {args.repeats} repeats, variants alternating "
        "within each repeat, each run in its own process"
        + (f" with {args.threads} CPU thread(s) (torch, OpenMP)." if args.threads else ", torch's default threads."),
        f"- Versions: {', '.join(f'{p} {version(p)}' for p in ('torch', 'transformers', 'peft', 'lightning', 'trl'))}.",
        "- Reading it: `kullm_dpo` and `trl_dpo` draw the same pairs in the same order (equal trained tokens per "
        "pair), so their pairs/s compare directly; `kullm_dpo_grouped` draws other pairs first (compare its trained "
        "tok/s). Only the total peak RSS compares across variants: kullm's Δ includes building the model, TRL's "
        "starts after it (and after TRL's imports and tokenization).",
        "",
        f"| variant | pairs/s | pairs per CPU-s | trained tok/s | trained tok per pair | padding | {mem} "
        f"| pairs/s ÷ trl_dpo | memory ÷ trl_dpo | first-step loss (log 2 = {math.log(2):.6f}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:90]} | | | | | | | | |")
            continue
        cell = f"{r[mem_key]:.0f}" + (f" ({r['peak_delta_mib']:+.0f})" if args.device != "cuda" else "")
        losses = ", ".join(f"{x:.6f}" for x in r["first_losses"])
        lines.append(
            f"| {r['variant']} | {r['pairs_s']:.2f} | {r['pairs_cpu_s']:.2f} | {r['trained_tok_s']:.0f} "
            f"| {r['trained_per_pair']:.1f} | {100 * r['pad_frac']:.1f}% | {cell} | {_ratio(r.get('pairs_s_ratio'))} "
            f"| {_ratio(r.get(mem_key + '_ratio'))} | {losses} |"
        )
    kullm = next((r for r in rows if r["variant"] == "kullm_dpo" and "pairs_s_ratio" in r), None)
    if kullm:
        speed, memory = kullm["pairs_s_ratio"][1], kullm[mem_key + "_ratio"][1]
        lines += [
            "",
            "Targets (issue #26), `kullm_dpo` (TRL's settings), medians of per-repeat ratios:",
            f"- pairs/s over TRL: {speed:.2f}× (target ≥ 1.5×: "
            f"{'met' if speed >= 1.5 else f'missed by {1.5 - speed:.2f}'})",
            f"- peak memory ÷ TRL: {memory:.2f} (target ≤ 1.0: {'met' if memory <= 1.0 else 'missed'})",
        ]
        grouped = next((r for r in rows if r["variant"] == "kullm_dpo_grouped" and "pairs_s_ratio" in r), None)
        if grouped:
            lines.append(
                "- with kullm's default length-grouped sampler (`kullm_dpo_grouped`): "
                f"{grouped['pairs_s_ratio'][1]:.2f}× TRL's pairs/s at {grouped[mem_key + '_ratio'][1]:.2f} of its "
                "memory"
            )
    lines.append(f"\n<!-- /bench:{name} -->\n")
    return "\n".join(lines)


def write_section(path: Path, text: str, name: str) -> None:
    """Replace section ``name`` of ``path`` (between its markers), or add it before the notes (or at the end)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->\n"
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end) :]
    else:
        notes = old.find("\n## Reading the numbers")
        new = old + "\n" + text if notes < 0 else old[: notes + 1] + text + "\n" + old[notes + 1 :]
    path.write_text(new, encoding="utf-8")


def prepare(args: argparse.Namespace, argv: list[str] | None) -> list[str]:
    """Check the command line, write the workload and ``<work>/spec.json``; the variants to run."""
    if not args.data:
        raise SystemExit("bench: --data PATH is required, e.g. --data data/sample_pref/pairs.jsonl (bundled)")
    missing = [str(p) for p in args.data if not p.exists()]
    if missing:
        raise SystemExit(f"bench: --data: not found: {', '.join(missing)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench: unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.batch_size % args.micro_batch_size:
        raise SystemExit("bench: --batch-size must be a multiple of --micro-batch-size")
    if "trl_dpo" in variants:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise SystemExit("bench: trl_dpo needs TRL: pip install -c constraints.txt -e '.[bench]'")
    args.command = "python -m benchmarks.dpo " + " ".join(sys.argv[1:] if argv is None else argv)
    work = args.work = args.work or Path(tempfile.mkdtemp(prefix="kullm-dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KULLM_CACHE", str(work / "kullm-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = work / "pairs.jsonl"
    args.rows = pair_workload([Path(p) for p in args.data], data, 2 * args.steps * args.batch_size)
    args.shape_dict = dict(SHAPES[args.shape])
    args.data_sources = [os.path.relpath(p, ROOT) for p in args.data]
    spec = {
        "data": str(data),
        "shape": args.shape_dict,
        "tokenizer": tokenizer_path(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "cutoff_len": args.cutoff_len,
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
        "checkpoint": "",
    }
    (work / "spec.json").write_text(json.dumps(spec))
    return variants


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        spec = argparse.Namespace(**json.loads(args.spec.read_text()))
        spec.data = Path(spec.data)
        if getattr(spec, "threads", None):
            import torch

            torch.set_num_threads(spec.threads)
        if args.child == "trl_dpo":
            res = run_trl_dpo(spec, args.out_dir)
        else:
            res = run_kullm_dpo(spec, args.out_dir, "length_grouped" if args.child.endswith("_grouped") else "random")
        args.result.write_text(json.dumps(res))
        return
    variants = prepare(args, argv)
    print(
        f"bench: {args.rows} pairs, shape {args.shape}, {len(variants)} variants x {args.repeats} repeats, "
        f"{args.steps} steps, work dir {args.work}",
        flush=True,
    )
    t0, results = time.perf_counter(), []
    for rep in range(args.repeats):
        results += [run_child(args, v, rep, args.work) for v in variants]
    elapsed = time.perf_counter() - t0
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    text = section(args, summarize(results, variants), elapsed)
    print(text)
    write_section(args.out, text, SECTION.format(shape=args.shape))
    print(f"bench: wrote {args.out} ({elapsed / 60:.1f} min)")
    if any("error" in r for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
