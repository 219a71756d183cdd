"""``python -m benchmarks``: the command line; the parent schedules the runs and writes the report, each run is
this same entry point again as a ``--child``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import benchmarks
from benchmarks import ROOT
from benchmarks.measure import base_params, flop_ceiling, peak_flops, run_child
from benchmarks.report import markdown_table, prep_section, shape_section, summarize, targets, write_report
from benchmarks.runners import (
    DEFAULT_VARIANTS,
    SEED_BEST,
    SHAPE_STEPS,
    SHAPES,
    VARIANTS,
    model_shape,
    prep_workload,
    prepare_workload,
    run_kullm,
    run_prep,
    run_trl,
    tokenizer_path,
)
from benchmarks.seed_recipe import run_seed

DATA_HINT = (
    "e.g. --data data/eval/user_oriented_instructions_eval.jsonl data/sample (the published tables' workload; "
    "python scripts/download_data.py --only eval fetches the first), or --data data/sample (bundled, no download)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, usage = benchmarks.__doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=summary,
        epilog="examples:\n" + usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shape", choices=sorted(SHAPES), default="head", help="the CPU model shape (with --model bench)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (first untimed); head 6, body 3")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--train-on-inputs", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--model", default="bench", help="bench (a CPU shape, see --shape) or a model= config, e.g. polyglot-ko-1.3b"
    )
    p.add_argument("--shape-only", action="store_true", help="random weights in the model's shape (always on here)")
    p.add_argument("--no-prep", action="store_true", help="skip the preprocessing bench")
    p.add_argument("--prep-only", action="store_true", help="only the preprocessing bench (its section of the report)")
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        metavar="PATH",
        help=f"required: the rows to train on (files or folders kullm reads); {DATA_HINT}",
    )
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="random weights in the model's shape, written there on first use, for the variants that load a "
        "quantized base through from_pretrained (seed_as_ran, kullm_nf4, kullm_int8; default: in --work)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape_name = args.shape if args.model == "bench" else args.model
    if args.steps is None:
        args.steps = SHAPE_STEPS.get(args.shape_name, 6)
    return args


def child_main(args: argparse.Namespace) -> None:
    spec = argparse.Namespace(**json.loads(args.spec.read_text()))
    spec.data, spec.prep_data = Path(spec.data), Path(spec.prep_data)
    variant = args.child
    if variant == "prep":
        res = run_prep(spec)
    elif VARIANTS[variant].get("seed"):
        res = run_seed(spec, VARIANTS[variant]["group_by_length"], args.out_dir, VARIANTS[variant].get("as_ran", False))
    elif VARIANTS[variant].get("trl"):
        res = run_trl(spec, VARIANTS[variant]["packing"], args.out_dir)
    else:
        res = run_kullm(spec, variant, args.out_dir)
    args.result.write_text(json.dumps(res))


def prepare(args: argparse.Namespace, argv: list[str] | None = None) -> list[str]:
    """Check the command line, write the workload and ``<work>/spec.json`` (what every child reads); the variants."""
    if not args.data:
        raise SystemExit(f"bench: --data PATH is required: {DATA_HINT}")
    missing = [str(p) for p in args.data if not p.exists()]
    if missing:
        raise SystemExit(f"bench: --data: not found: {', '.join(missing)}")
    variants = [] if args.prep_only else [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.prep_only and args.no_prep:
        raise SystemExit("bench: --prep-only and --no-prep leave nothing to run")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench: unknown variants {unknown}; choose from {list(VARIANTS)}")
    gpu_only = [v for v in variants if VARIANTS[v].get("gpu")]
    if gpu_only and args.device != "cuda":
        raise SystemExit(f"bench: {', '.join(gpu_only)} run on a GPU only (--device cuda)")
    if any(VARIANTS[v].get("trl") for v in variants):
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise SystemExit("bench: the trl_* variants need TRL: pip install -c constraints.txt -e '.[bench]'")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but no CUDA GPU is visible")
    args.command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    work = args.work = args.work or Path(tempfile.mkdtemp(prefix="kullm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KULLM_CACHE", str(work / "kullm-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = prepare_workload(work, [Path(p) for p in args.data])
    args.shape = model_shape(args)
    args.tokenizer = tokenizer_path()
    args.checkpoint = args.checkpoint or work / f"checkpoint-{args.shape_name}"
    args.rows = sum(1 for _ in data.open(encoding="utf-8"))
    args.data_sources = [os.path.relpath(p, ROOT) for p in args.data]
    args.prep_data = work / "prep.jsonl"
    args.prep_rows = prep_workload(data, args.prep_data)
    spec = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("data", "out", "work")
    }
    spec.update(data=str(data), data_sources=args.data_sources)
    spec.pop("child", None)
    (work / "spec.json").write_text(json.dumps(spec, default=str))
    return variants


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    variants = prepare(args, argv)
    work, command, prep_rows = args.work, args.command, args.prep_rows
    print(
        f"bench: {args.rows} rows, shape {args.shape_name}, {len(variants)} variants x {args.repeats} repeats, "
        f"{args.steps} steps, work dir {work}",
        flush=True,
    )
    t0, prep_s = time.perf_counter(), 0.0
    results, prep = [], []
    for rep in range(args.repeats):
        results += [run_child(args, v, rep, work) for v in variants]
        if not args.no_prep:
            t1 = time.perf_counter()
            res = run_child(args, "prep", rep, work)
            prep_s += time.perf_counter() - t1
            if "error" not in res:
                prep.append(res)
                ratios = [a[0] / b[0] for a, b in zip(res["times"]["seed_map"], res["times"]["kullm_map"], strict=True)]
                print(f"bench: prep ({prep_rows} rows) repeat {rep}: seed/kullm map time ratios {ratios}", flush=True)
    elapsed = time.perf_counter() - t0
    (work / "results.json").write_text(json.dumps({"train": results, "prep": prep}, indent=1))
    if prep:
        write_report(args.out, args, prep_section(args, prep, command, prep_s), "prep")
        print(prep_section(args, prep, command, prep_s))
    if not variants:
        print(f"bench: wrote {args.out} ({elapsed / 60:.1f} min)")
        return
    baseline = SEED_BEST if SEED_BEST in variants else variants[0]
    rows = summarize(results, variants, baseline)
    seed_row = next((r for r in rows if r["variant"] == SEED_BEST and "slots" in r), None)
    ceiling = flop_ceiling(args.shape, seed_row) if seed_row else None
    if args.device == "cuda" and peak_flops():
        args.flops_per_token = 4 * base_params(args.shape) / peak_flops()
    print(markdown_table(rows, args.device, getattr(args, "flops_per_token", None), baseline))
    print(targets(rows, ceiling))
    write_report(args.out, args, shape_section(args, rows, command, elapsed, ceiling), args.shape_name)
    print(f"bench: wrote {args.out} ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
