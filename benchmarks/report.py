"""The BENCHMARKS.md sections: per-variant medians and paired ratios, the results table, the targets, and the
writer that replaces one section between its markers and keeps the rest of the file (other sections, notes)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import param_split
from benchmarks.runners import SEED_BEST, TRL_VARIANTS


def summarize(results: list[dict[str, Any]], variants: list[str], baseline: str) -> list[dict[str, Any]]:
    """Median per variant, and per-repeat ratios (paired within a repeat) as min/median/max: to ``baseline`` (the
    seed's best) and to the faster TRL variant of the same repeat."""
    ok = [r for r in results if "error" not in r]
    by = {v: [r for r in ok if r["variant"] == v] for v in variants}
    base = {r["repeat"]: r for r in by.get(baseline, [])}
    trl_best: dict[int, float] = {}
    for r in ok:
        if r["variant"] in TRL_VARIANTS:
            trl_best[r["repeat"]] = max(trl_best.get(r["repeat"], 0.0), r["trained_tok_s"])
    rows = []
    for v in variants:
        runs = by[v]
        if not runs:
            err = next((r["error"] for r in results if r["variant"] == v and "error" in r), "no result")
            rows.append({"variant": v, "error": err})
            continue
        row: dict[str, Any] = {"variant": v, "n": len(runs)}
        keys = ("trained_tok_s", "nonpad_tok_s", "pad_frac", "peak_rss_mib", "cuda_max_alloc_mib", "trained_tok_cpu_s")
        for key in (*keys, "trained_tokens", "nonpad_tokens", "slots"):
            vals = [r[key] for r in runs if key in r]
            if vals:
                row[key] = statistics.median(vals)
        for key in ("trained_tok_s", "peak_rss_mib", "cuda_max_alloc_mib"):
            ratios = [r[key] / base[r["repeat"]][key] for r in runs if r["repeat"] in base and key in r]
            if ratios:
                row[f"{key}_ratio"] = (min(ratios), statistics.median(ratios), max(ratios))
        vs_trl = [r["trained_tok_s"] / trl_best[r["repeat"]] for r in runs if r["repeat"] in trl_best]
        if vs_trl:
            row["trl_ratio"] = (min(vs_trl), statistics.median(vs_trl), max(vs_trl))
        row["steps"] = runs[0]["steps"]
        row["peak_delta_mib"] = statistics.median(r["peak_rss_mib"] - r["rss_before_train_mib"] for r in runs)
        rows.append(row)
    return rows


def _ratio(t: tuple[float, float, float] | None) -> str:
    return "" if t is None else f"{t[1]:.2f} ({t[0]:.2f}–{t[2]:.2f})"


def markdown_table(
    rows: list[dict[str, Any]], device: str, flops_per_token: float | None = None, baseline: str = SEED_BEST
) -> str:
    """The results table; with ``flops_per_token`` (4·N ÷ peak FLOP/s) an MFU column (GPU runs)."""
    if flops_per_token:
        for r in rows:
            if "trained_tok_s" in r:
                r["mfu"] = r["trained_tok_s"] * flops_per_token
    mem = "peak CUDA alloc MiB" if device == "cuda" else "peak RSS MiB (Δ in training)"
    mem_key = "cuda_max_alloc_mib" if device == "cuda" else "peak_rss_mib"
    head = (
        f"| variant | trained tok/s | non-pad tok/s | padding | {mem} | trained tok/s ÷ {baseline} "
        f"| trained tok/s ÷ best TRL | memory ÷ {baseline} |"
        + (" MFU |" if flops_per_token else "")
        + "\n|---|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|" if flops_per_token else "")
        + "\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:90]} | | | | | | |")
            continue
        memory_cell = f"{r[mem_key]:.0f}" + (f" ({r['peak_delta_mib']:+.0f})" if device != "cuda" else "")
        lines.append(
            f"| {r['variant']} | {r['trained_tok_s']:.0f} | {r['nonpad_tok_s']:.0f} | {100 * r['pad_frac']:.1f}% "
            f"| {memory_cell} | {_ratio(r.get('trained_tok_s_ratio'))} | {_ratio(r.get('trl_ratio'))} "
            f"| {_ratio(r.get(mem_key + '_ratio'))} |" + (f" {100 * r['mfu']:.1f}% |" if "mfu" in r else "")
        )
    return head + "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]], ceiling: float | None) -> str:
    """The issue's targets against this run: kullm's best vs the FLOP ceiling, vs TRL's best, and its memory."""
    kullm = [r for r in rows if r["variant"].startswith("kullm") and "trained_tok_s_ratio" in r]
    if not kullm:
        return ""
    best = max(kullm, key=lambda r: r["trained_tok_s_ratio"][1])
    lines = [f"Targets, kullm's best here (`{best['variant']}`), medians of per-repeat ratios:"]
    speed = best["trained_tok_s_ratio"][1]
    if ceiling:
        share = speed / ceiling
        lines.append(
            f"- speed over `{SEED_BEST}`: {speed:.2f}× against a FLOP ceiling of {ceiling:.2f}× = {100 * share:.0f}% "
            f"of it (target ≥ 90%: {'met' if share >= 0.9 else f'missed by {100 * (0.9 - share):.0f} points'})"
        )
    if "trl_ratio" in best:
        trl = best["trl_ratio"][1]
        lines.append(
            f"- over TRL's best: {trl:.2f}× (target ≥ 1.5×: {'met' if trl >= 1.5 else f'missed by {1.5 - trl:.2f}'})"
        )
    mem = min(kullm, key=lambda r: r.get("peak_rss_mib_ratio", (9, 9, 9))[1])
    if "peak_rss_mib_ratio" in mem:
        m = best["peak_rss_mib_ratio"][1]
        lines.append(
            f"- peak RSS ÷ `{SEED_BEST}`: {m:.2f} for `{best['variant']}`, lowest {mem['peak_rss_mib_ratio'][1]:.2f} "
            f"(`{mem['variant']}`) (target ≤ 0.70: {'met' if m <= 0.7 else f'missed by {m - 0.7:.2f}'})"
        )
        low = mem["peak_rss_mib_ratio"][1]
        if mem is not best and m > 0.7 >= low:  # met only by trading speed: say at what speed
            lines.append(
                f"  - met by `{mem['variant']}` ({low:.2f}) at {mem['trained_tok_s_ratio'][1]:.2f}× `{SEED_BEST}`'s "
                f"speed" + (f" and {mem['trl_ratio'][1]:.2f}× TRL's best" if "trl_ratio" in mem else "")
            )
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, Python {platform.python_version()}"


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "lightning", "datasets"))


def gpu_section(command: str) -> str:
    return (
        "## GPU (polyglot-ko-1.3b shape, bf16, LoRA)\n\n"
        "Not run: no GPU was lent in this session. On a lent GPU run:\n\n"
        f"```\n{command}\n```\n\n"
        "It reports tokens/s, peak `torch.cuda.max_memory_allocated` and model-FLOPs utilisation counted as "
        "4·N FLOPs per trained token (N = all parameters of the base; forward 2·N plus the activation-gradient half "
        "of backward 2·N, no weight gradients for the frozen base), against the dense bf16 tensor-core peak "
        "(H100/H200 SXM: 989 TFLOP/s).\n"
    )


def shape_section(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    command: str,
    elapsed: float,
    ceiling: float | None,
) -> str:
    """One shape's results, between markers so that a run of the other shape leaves it in place."""
    shape = ", ".join(f"{k}={v}" for k, v in args.shape.items() if k not in ("bos_token_id", "eos_token_id"))
    body, head, embed = param_split(args.shape)
    share = head / (body + head)
    lines = [
        f"<!-- bench:{args.shape_name} -->",
        f"## `{args.shape_name}` shape on {args.device}\n",
        f"Generated by `python -m benchmarks` on {time.strftime('%Y-%m-%d %H:%M')} UTC in {elapsed / 60:.1f} min "
        f"(load average {os.getloadavg()[0]:.1f} at the end):\n",
        f"```\n{command}\n```\n",
        f"- Model: random-init GPT-NeoX ({shape}): {body / 1e6:.1f} M body + {head / 1e6:.1f} M LM-head parameters "
        f"(+ {embed / 1e6:.1f} M input embedding): the head is {100 * share:.0f}% of the matmul FLOPs per token. "
        "LoRA r=8, alpha=16, dropout 0.05 on `query_key_value`; fp32, no gradient checkpointing, every variant "
        "but `kullm_head_ckpt`.",
        f"- Data: {args.rows} rows ({', '.join(str(p) for p in args.data_sources)}), cutoff_len {args.cutoff_len}, "
        f"train_on_inputs={str(args.train_on_inputs).lower()}; global batch {args.batch_size} = micro-batch "
        f"{args.micro_batch_size} x {args.batch_size // args.micro_batch_size} accumulation; {args.steps} optimizer "
        f"steps per run (the first untimed), {args.repeats} repeats, variants interleaved within each repeat.",
    ]
    if ceiling:
        lines.append(
            f"- FLOP ceiling over `{SEED_BEST}`: **{ceiling:.2f}×** — the seed's FLOPs per trained token (body and "
            "head on every tensor slot, padding included, counted on its own batches) ÷ the minimum (body on non-pad "
            "tokens, head on trained tokens only), at 4·N per token (forward + activation gradients; LoRA adds no "
            "base weight gradients)."
        )
    lines += [
        "",
        markdown_table(rows, args.device, getattr(args, "flops_per_token", None)),
        targets(rows, ceiling),
    ]
    lines.append(f"<!-- /bench:{args.shape_name} -->\n")
    return "\n".join(lines)


def prep_section(args: argparse.Namespace, prep: list[dict[str, Any]], command: str, elapsed: float) -> str:
    """The preprocessing comparison (:func:`run_prep`), between its own markers."""
    rounds = {k: [t for p in prep for t in p["times"][k]] for k in prep[0]["times"]}
    n = prep[0]["rows"]

    def row(what: str, seed: str, kullm: str) -> str:
        wall = [a[0] / b[0] for a, b in zip(rounds[seed], rounds[kullm], strict=True)]
        cpu = [a[1] / b[1] for a, b in zip(rounds[seed], rounds[kullm], strict=True)]
        rate = [n / statistics.median(t[0] for t in rounds[k]) for k in (seed, kullm)]
        return (
            f"| {what} | {rate[0]:.0f} | {rate[1]:.0f} | **{statistics.median(wall):.2f}×** "
            f"({min(wall):.2f}–{max(wall):.2f}) | {statistics.median(cpu):.2f}× ({min(cpu):.2f}–{max(cpu):.2f}) |"
        )

    cpu = {k: statistics.median(t[1] for t in v) for k, v in rounds.items()}
    ceiling = cpu["seed_map"] / cpu["tokenizer"]
    best = statistics.median(a[0] / b[0] for a, b in zip(rounds["seed_map"], rounds["kullm_map"], strict=True))
    threads = [a[0] / b[0] for a, b in zip(rounds["seed_map"], rounds["kullm_map_threads"], strict=True)]
    best = max(best, statistics.median(threads))
    return "\n".join(
        [
            "<!-- bench:prep -->",
            f"## Preprocessing on {args.device}\n",
            f"Generated by `python -m benchmarks` on {time.strftime('%Y-%m-%d %H:%M')} UTC in {elapsed / 60:.1f} min "
            f"(load average {os.getloadavg()[0]:.1f} at the end):\n",
            f"```\n{command}\n```\n",
            f"- Workload: {n} rows, made from the {args.rows} rows of {', '.join(args.data_sources)} repeated, each "
            "copy's instruction suffixed with its copy number (` (2)`, ` (3)`, …) so that no two rows are the same "
            f"(their outputs repeat); template `kullm`, cutoff_len {args.cutoff_len}, "
            f"train_on_inputs={str(args.train_on_inputs).lower()}. One process each, `TOKENIZERS_PARALLELISM=false` "
            "(both single-threaded but in the row that says otherwise); "
            f"{len(rounds['seed_map'])} rounds in {len(prep)} processes, seed and kullm "
            "alternating within each round; ratios are per round (median, min–max).",
            "",
            "| work | seed rows/s | kullm rows/s | kullm ÷ seed (wall) | kullm ÷ seed (CPU time) |",
            "|---|---:|---:|---:|---:|",
            row(
                "template + tokenize + mask: the seed's per-example `Dataset.map` (no cache) vs kullm's "
                "`sft.encode_split` (which also verifies every example and builds the Arrow columns)",
                "seed_map",
                "kullm_map",
            ),
            row(
                "end to end: the seed's `load_dataset` + `map` vs kullm's uncached `preprocess` (read, validate, "
                "deduplicate, split, the same encoding, save to the cache)",
                "seed_e2e",
                "kullm_e2e",
            ),
            f"| the same `sft.encode_split` with the Rust tokenizer's threads on the {os.cpu_count()} cores "
            "(`TOKENIZERS_PARALLELISM=true`, kullm's default when the variable is unset) | "
            f"{n / statistics.median(t[0] for t in rounds['seed_map']):.0f} | "
            f"{n / statistics.median(t[0] for t in rounds['kullm_map_threads']):.0f} | "
            f"**{statistics.median(threads):.2f}×** ({min(threads):.2f}–{max(threads):.2f}) | (n/a: threads) |",
            "",
            f"- kullm's floor: the Rust tokenizer alone, every prompt and every response once (what kullm cannot "
            f"skip), takes {cpu['tokenizer']:.2f} s CPU = {100 * cpu['tokenizer'] / cpu['kullm_map']:.0f}% of "
            f"`sft.encode_split` ({cpu['kullm_map']:.2f} s); the seed's `map` takes {cpu['seed_map']:.2f} s, so on one "
            f"thread no change outside the tokenizer can exceed **{ceiling:.2f}×** here. Target ≥ 5×: "
            + ("met." if best >= 5 else f"missed by {5 / best:.1f}× (see the notes below).")
            + "\n",
            "<!-- /bench:prep -->\n",
        ]
    )


def header(args: argparse.Namespace) -> str:
    data = " ".join(args.data_sources)
    gpu_cmd = f"python -m benchmarks --data {data} --device cuda --model polyglot-ko-1.3b --shape-only --steps 30"
    return "\n".join(
        [
            "# Benchmarks: kullm vs the seed recipe and TRL's SFTTrainer\n",
            f"```\npython -m benchmarks --data {data}                # the head-heavy shape\n"
            f"python -m benchmarks --data {data} --shape body   # the body-heavy shape\n"
            f"python -m benchmarks --data {data} --prep-only    # preprocessing only\n```\n",
            f"- Machine: {machine()}; **a shared box** (other jobs ran on the same 2 cores during the runs), so the "
            "figures are noisy: variants are interleaved within each repeat and every ratio is a median of per-repeat "
            "ratios (min–max in brackets).",
            f"- Versions: {versions()}.",
            "- Tokenizer: kullm's tiny byte-level BPE (vocab 2000, trained offline on bundled Korean text): no "
            "Polyglot-ko tokenizer is available offline. Ids stay below 30080, so the embedding and LM head have "
            "Polyglot-ko's size; Korean text is split into more tokens than Polyglot-ko would make.",
            "- Columns: trained tok/s counts tokens whose shifted label is not -100; non-pad tok/s counts "
            "attention-mask tokens; padding = 1 − non-pad ÷ tensor slots. Peak RSS is the whole process (Δ: growth "
            "during training). Ratios are per repeat against the variant named in the column, in the same repeat.",
            "- Variants: `seed` = HF Trainer recipe, random order; `seed_grouped` = with `group_by_length` (the seed's "
            "best); `trl_grouped` = TRL SFTTrainer, prompt/completion, completion-only loss, `group_by_length`; "
            "`trl_packed` = the same with `packing=True` (BFD, padding-free); `kullm_plain` = kullm, random order, "
            "full logits; `kullm_head` = length-grouped + fused head-only loss; `kullm_packed` = packing, full "
            "logits; `kullm_packed_head` = packing + fused head-only loss; `kullm_head_ckpt` = `kullm_head` with "
            "gradient checkpointing (activations recomputed in backward: memory for time).\n",
            gpu_section(gpu_cmd) if args.device != "cuda" else "",
        ]
    )


def write_report(path: Path, args: argparse.Namespace, section: str, name: str) -> None:
    """Put section ``name`` (a shape, or ``prep``) into ``path``: replace its previous one, keep the rest (the other
    sections, the notes)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->\n"
    if "<!-- bench:" not in text:
        text = header(args) + "\n" + section
    elif start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        notes = text.find("\n## Reading the numbers")
        text = text + "\n" + section if notes < 0 else text[: notes + 1] + section + "\n" + text[notes + 1 :]
    path.write_text(text, encoding="utf-8")
