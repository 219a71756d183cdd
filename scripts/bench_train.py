"""Benchmark kullm's training path against a faithful reimplementation of the seed recipe.

    python scripts/bench_train.py                       # default CPU workload, 3 repeats, writes BENCHMARKS.md
    python scripts/bench_train.py --repeats 5 --steps 12 --variants seed,kullm_packed_head
    python scripts/bench_train.py --device cuda --model polyglot-ko-1.3b --shape-only --steps 30   # a lent GPU

Every variant runs in its own subprocess (a fresh interpreter, so peak RSS is its own), in one process tree,
alternating variants inside each repeat, with the same model shape, data, seed and number of optimizer steps:

- ``seed`` / ``seed_grouped``: HF ``Trainer`` + PEFT LoRA (r=8, alpha=16, dropout 0.05, ``query_key_value``),
  per-example ``Dataset.map(generate_and_tokenize_prompt)`` exactly as the seed's ``finetune.py`` (tokenize
  prompt+response, append EOS if room, mask by tokenizing the prompt alone), ``DataCollatorForSeq2Seq(
  pad_to_multiple_of=8)``, ``group_by_length`` off / on. The seed's forced 8-bit base is left out (fp32 on CPU,
  bf16 on GPU, for both paths): it would only make the seed slower.
- ``kullm_*``: ``kullm.train.train(cfg)`` with overrides switching one optimisation at a time.

Throughput is measured from the end of the first optimizer step to the end of the last (the first step carries
one-off start-up costs), over the micro-batches of those steps, identically in both paths: trained tokens (shifted
labels != -100), non-pad tokens (attention mask) and padded slots (tensor size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = [ROOT.parent / "shared/data/kullm/user_oriented_instructions_eval.jsonl", ROOT / "data/sample"]
IGNORE_INDEX = -100

# A random-init GPT-NeoX with Polyglot-ko's embedding rows (30080) and layout, scaled so that the default workload
# (6 variants x 3 repeats) finishes in under ~10 minutes on a 2-core CPU.
BENCH_SHAPE: dict[str, Any] = {
    "vocab_size": 30080,
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 512,
    "rotary_pct": 0.5,
    "max_position_embeddings": 2048,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "pad_token_id": 2,
}

# variant -> kullm overrides (None: the seed recipe, with group_by_length as given)
VARIANTS: dict[str, dict[str, Any]] = {
    "seed": {"seed": True, "group_by_length": False},
    "seed_grouped": {"seed": True, "group_by_length": True},
    "kullm_plain": {"overrides": ["sampler=random", "++data.packing=false", "++loss.head_only=false"]},
    "kullm_grouped": {"overrides": ["sampler=length_grouped", "++data.packing=false", "++loss.head_only=false"]},
    "kullm_head": {"overrides": ["sampler=length_grouped", "++data.packing=false", "++loss.head_only=true"]},
    "kullm_packed": {"overrides": ["sampler=random", "++data.packing=true", "++loss.head_only=false"]},
    "kullm_packed_head": {"overrides": ["sampler=random", "++data.packing=true", "++loss.head_only=true"]},
}
DEFAULT_VARIANTS = ["seed", "seed_grouped", "kullm_plain", "kullm_head", "kullm_packed", "kullm_packed_head"]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


# --- shared workload ------------------------------------------------------------------------------------------


def prepare_workload(work: Path, data_paths: list[Path]) -> Path:
    """Flatten the data sources into one ``{id, instruction, input, output}`` JSONL that both paths read."""
    from kullm.data.records import read_records

    rows = []
    for path in data_paths:
        if not path.exists():
            print(f"bench: skipping {path}: not found", file=sys.stderr)
            continue
        records, _ = read_records(path)
        rows += [{"id": r.id, "instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    if not rows:
        raise SystemExit("bench: no data found (" + ", ".join(map(str, data_paths)) + ")")
    out = work / "data.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def tokenizer_path() -> str:
    """The tiny byte-level BPE tokenizer (vocab 2000) built offline; Polyglot-ko's own is not available offline."""
    from kullm.modeling import build_tiny

    return str(build_tiny())


def model_shape(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "bench":
        return dict(BENCH_SHAPE)
    from kullm.config import compose

    shape = compose("train", ["output_dir=/tmp/unused", f"model={args.model}"]).model.shape
    from omegaconf import OmegaConf

    return OmegaConf.to_container(shape, resolve=True)


# --- measurement shared by both paths -------------------------------------------------------------------------


class Meter:
    """Per-micro-batch token counts and per-optimizer-step end times."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.pending = [0, 0, 0]  # trained, non-pad, slots since the last step end
        self.shapes: list[list[int]] = []
        self.steps: list[tuple[float, float, int, int, int]] = []  # wall, CPU time, trained, non-pad, slots

    def batch(self, labels, attention_mask) -> None:
        self.pending[0] += int((labels[:, 1:] != IGNORE_INDEX).sum())
        self.pending[1] += int(attention_mask.sum()) if attention_mask.dim() == 2 else labels.numel()
        self.pending[2] += labels.numel()
        self.shapes.append(list(labels.shape))

    def step_end(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.steps.append((time.perf_counter(), time.process_time(), *self.pending))
        self.pending = [0, 0, 0]

    def result(self) -> dict[str, Any]:
        if len(self.steps) < 2:
            raise RuntimeError(f"need at least 2 optimizer steps to time, got {len(self.steps)}")
        timed = self.steps[1:]
        seconds = self.steps[-1][0] - self.steps[0][0]
        cpu_seconds = self.steps[-1][1] - self.steps[0][1]
        trained, nonpad, slots = (sum(s[k] for s in timed) for k in (2, 3, 4))
        return {
            "steps": len(self.steps),
            "timed_steps": len(timed),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "trained_tok_cpu_s": trained / cpu_seconds if cpu_seconds > 0 else float("nan"),
            "shapes": self.shapes,
            "step_seconds": [b[0] - a[0] for a, b in zip(self.steps, self.steps[1:], strict=False)],
            "trained_tokens": trained,
            "nonpad_tokens": nonpad,
            "slots": slots,
            "trained_tok_s": trained / seconds,
            "nonpad_tok_s": nonpad / seconds,
            "pad_frac": 1 - nonpad / slots if slots else 0.0,
        }


def memory(device: str, rss_before: float) -> dict[str, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    out = {"peak_rss_mib": peak, "rss_before_train_mib": rss_before}
    if device == "cuda":
        import torch

        out["cuda_max_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- (a) the seed recipe --------------------------------------------------------------------------------------


def run_seed(args: argparse.Namespace, group_by_length: bool, out_dir: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from kullm.templates import Prompter

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"  # as the seed did (DESIGN.md pitfalls); it does not change the cost
    prompter = _kullm_prompter(Prompter)
    cutoff_len, train_on_inputs = args.cutoff_len, args.train_on_inputs

    def tokenize(prompt: str, add_eos_token: bool = True) -> dict[str, list[int]]:
        result = tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
        if (
            result["input_ids"][-1] != tokenizer.eos_token_id
            and len(result["input_ids"]) < cutoff_len
            and add_eos_token
        ):
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return result

    def generate_and_tokenize_prompt(row: dict[str, str]) -> dict[str, list[int]]:
        full = tokenize(prompter.render(row["instruction"], row["input"]) + row["output"])
        if not train_on_inputs:
            user_len = len(
                tokenize(prompter.render(row["instruction"], row["input"]), add_eos_token=False)["input_ids"]
            )
            full["labels"] = [IGNORE_INDEX] * user_len + full["labels"][user_len:]
        return full

    raw = datasets.load_dataset("json", data_files=str(args.data), split="train")
    t0 = time.perf_counter()
    train_set = raw.shuffle(seed=args.seed).map(
        generate_and_tokenize_prompt, remove_columns=raw.column_names, load_from_cache_file=False
    )
    prep_s = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    config = GPTNeoXConfig(**args.shape)
    model = GPTNeoXForCausalLM(config).to(_dtype(args))
    model.config.use_cache = False
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query_key_value"], bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    meter = Meter(args.device)

    class StepClock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            meter.step_end()

    class MeteredTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            meter.batch(inputs["labels"], inputs["attention_mask"])
            return super().training_step(model, inputs, num_items_in_batch)

    targs = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        max_steps=args.steps,
        learning_rate=3e-4,
        warmup_steps=min(100, args.steps // 10),
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        train_sampling_strategy="group_by_length" if group_by_length else "random",  # group_by_length=True in v4
        seed=args.seed,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = MeteredTrainer(
        model=model,
        args=targs,
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
        callbacks=[StepClock()],
    )
    rss_before = current_rss_mib()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {
        **meter.result(),
        **memory(args.device, rss_before),
        "prep_rows": len(raw),
        "prep_rows_s": len(raw) / prep_s,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _kullm_prompter(prompter_cls):
    from omegaconf import OmegaConf

    from kullm.config import CONF_DIR

    return prompter_cls.from_config(OmegaConf.load(CONF_DIR / "template" / "kullm.yaml"))


def _dtype(args: argparse.Namespace):
    import torch

    return torch.bfloat16 if args.device == "cuda" else torch.float32


# --- (b) kullm ------------------------------------------------------------------------------------------------


def kullm_overrides(args: argparse.Namespace, variant: str, out_dir: Path) -> list[str]:
    shape = ",".join(f"{k}:{json.dumps(v)}" for k, v in args.shape.items())
    model = "tiny" if args.model == "bench" else args.model
    gpu = args.device == "cuda"
    return [
        f"output_dir={out_dir}",
        f"model={model}",
        "model.shape_only=true",
        f"model.shape={{{shape}}}",
        f"model.tokenizer={args.tokenizer}",
        f"model.dtype={'bfloat16' if gpu else 'float32'}",
        "model.attn_implementation=sdpa",
        f"data.path={args.data}",
        "data.val_set_size=0",
        f"data.cutoff_len={args.cutoff_len}",
        f"data.train_on_inputs={str(args.train_on_inputs).lower()}",
        f"data.cache_dir={out_dir / 'processed'}",
        "template=kullm",
        "lora=default",
        "quant=none",
        f"trainer={'gpu' if gpu else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if gpu else '32-true'}",
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=-1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1000000",
        "logger=none",
        "callbacks.checkpoint.every_n_train_steps=1000000",
        "callbacks.checkpoint.save_last=false",
        f"seed={args.seed}",
        f"batch_size={args.batch_size}",
        f"micro_batch_size={args.micro_batch_size}",
        "optim.lr=3e-4",
        f"optim.warmup_steps={min(100, args.steps // 10)}",
        *VARIANTS[variant]["overrides"],
    ]


def run_kullm(args: argparse.Namespace, variant: str, out_dir: Path) -> dict[str, Any]:
    """``kullm.train.train(cfg)`` with this variant's overrides, metered by a Lightning callback."""
    import lightning as L
    import torch

    from kullm.config import compose
    from kullm.train import train

    meter = Meter(args.device)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.last_step = 0
            self.packed = False

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            meter.batch(batch["labels"], batch["attention_mask"])
            self.packed |= "position_ids" in batch
            if batch_idx == 0 and bool(cfg.data.get("packing")) != self.packed:  # never report unpacked as packed
                raise RuntimeError(f"data.packing={cfg.data.get('packing')} but the batches are not packed")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if trainer.global_step != self.last_step:
                self.last_step = trainer.global_step
                meter.step_end()

    cfg = compose("train", kullm_overrides(args, variant, out_dir))
    prep = prep_kullm(cfg)
    rss_before = current_rss_mib()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = Clock()
    result = train(cfg, extra_callbacks=[clock])
    return {
        **meter.result(),
        **memory(args.device, rss_before),
        **prep,
        "global_step": result["metrics"]["global_step"],
    }


def prep_kullm(cfg) -> dict[str, float]:
    """kullm's batched preprocessing (read, split, tokenize, mask, verify, cache); train() then hits the cache."""
    from kullm.data.preprocess import preprocess
    from kullm.data.sft import encode_batch
    from kullm.modeling import load_tokenizer
    from kullm.templates import Prompter

    tokenizer = load_tokenizer(cfg.model)
    prompter = Prompter.from_config(cfg.template)
    rows = [json.loads(line) for line in Path(cfg.data.path).read_text(encoding="utf-8").splitlines()]
    t0 = time.perf_counter()  # tokenize + mask only, batched: the same work as the seed's per-example map
    encode_batch(
        tokenizer,
        [prompter.render(r["instruction"], r["input"]) for r in rows],
        [r["output"] for r in rows],
        cutoff_len=int(cfg.data.cutoff_len),
        train_on_inputs=bool(cfg.data.train_on_inputs),
    )
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    processed = preprocess(cfg.data, tokenizer, prompter)
    seconds = time.perf_counter() - t0
    n = sum(len(processed.dataset[s]) for s in processed.dataset)
    return {"prep_rows": len(rows), "prep_rows_s": len(rows) / encode_s, "preprocess_rows_s": n / seconds}


# --- parent: schedule, aggregate, report ----------------------------------------------------------------------


def run_child(args: argparse.Namespace, variant: str, repeat: int, work: Path) -> dict[str, Any]:
    result_path = work / f"{variant}-{repeat}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--result",
        str(result_path),
        "--spec",
        str(work / "spec.json"),
        "--out-dir",
        str(work / f"{variant}-{repeat}"),
    ]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(work))
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        print(f"bench: {variant} (repeat {repeat}) failed:\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"variant": variant, "repeat": repeat, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    res = json.loads(result_path.read_text())
    res.update(variant=variant, repeat=repeat, wall_s=wall, loadavg=(load0, load1))
    print(
        f"bench: {variant:<18} repeat {repeat}: {res['trained_tok_s']:8.1f} trained tok/s, "
        f"{res['nonpad_tok_s']:8.1f} non-pad tok/s, pad {100 * res['pad_frac']:4.1f}%, "
        f"peak RSS {res['peak_rss_mib']:.0f} MiB ({wall:.0f} s, load {load0:.1f}->{load1:.1f})",
        flush=True,
    )
    return res


def child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HOME": str(work / "hf"),
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    return env


def summarize(results: list[dict[str, Any]], variants: list[str], baseline: str) -> list[dict[str, Any]]:
    """Median per variant, and per-repeat ratios to the baseline (paired within a repeat) as min/median/max."""
    ok = [r for r in results if "error" not in r]
    by = {v: [r for r in ok if r["variant"] == v] for v in variants}
    base = {r["repeat"]: r for r in by.get(baseline, [])}
    rows = []
    for v in variants:
        runs = by[v]
        if not runs:
            err = next((r["error"] for r in results if r["variant"] == v and "error" in r), "no result")
            rows.append({"variant": v, "error": err})
            continue
        row: dict[str, Any] = {"variant": v, "n": len(runs)}
        keys = ("trained_tok_s", "nonpad_tok_s", "pad_frac", "peak_rss_mib", "cuda_max_alloc_mib", "prep_rows_s")
        for key in (*keys, "preprocess_rows_s", "trained_tok_cpu_s"):
            vals = [r[key] for r in runs if key in r]
            if vals:
                row[key] = statistics.median(vals)
        for key in ("trained_tok_s", "peak_rss_mib", "cuda_max_alloc_mib"):
            ratios = [r[key] / base[r["repeat"]][key] for r in runs if r["repeat"] in base and key in r]
            if ratios:
                row[f"{key}_ratio"] = (min(ratios), statistics.median(ratios), max(ratios))
        row["steps"] = runs[0]["steps"]
        row["peak_delta_mib"] = statistics.median(r["peak_rss_mib"] - r["rss_before_train_mib"] for r in runs)
        rows.append(row)
    return rows


def _ratio(t: tuple[float, float, float] | None) -> str:
    return "" if t is None else f"{t[1]:.2f} ({t[0]:.2f}–{t[2]:.2f})"


def base_params(shape: dict[str, Any]) -> int:
    """N: parameters of the base model of this shape (built on the meta device, no memory)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in GPTNeoXForCausalLM(GPTNeoXConfig(**shape)).parameters())


def peak_flops() -> float | None:
    """Dense bf16 peak of the visible GPU (FLOP/s), from its name; None when unknown."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return tflops * 1e12 if tflops else None


def markdown_table(rows: list[dict[str, Any]], device: str, flops_per_token: float | None = None) -> str:
    """The results table; with ``flops_per_token`` (4·N ÷ peak FLOP/s) an MFU column (GPU runs)."""
    if flops_per_token:
        for r in rows:
            if "trained_tok_s" in r:
                r["mfu"] = r["trained_tok_s"] * flops_per_token
    mem = "peak CUDA alloc MiB" if device == "cuda" else "peak RSS MiB (Δ in training)"
    mem_key = "cuda_max_alloc_mib" if device == "cuda" else "peak_rss_mib"
    head = (
        f"| variant | trained tok/s | non-pad tok/s | padding | {mem} | trained tok/s ÷ seed | memory ÷ seed |"
        + (" MFU |" if flops_per_token else "")
        + "\n|---|---:|---:|---:|---:|---:|---:|"
        + ("---:|" if flops_per_token else "")
        + "\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:90]} | | | | | |")
            continue
        memory_cell = f"{r[mem_key]:.0f}" + (f" ({r['peak_delta_mib']:+.0f})" if device != "cuda" else "")
        lines.append(
            f"| {r['variant']} | {r['trained_tok_s']:.0f} | {r['nonpad_tok_s']:.0f} | {100 * r['pad_frac']:.1f}% "
            f"| {memory_cell} | {_ratio(r.get('trained_tok_s_ratio'))} | {_ratio(r.get(mem_key + '_ratio'))} |"
            + (f" {100 * r['mfu']:.1f}% |" if "mfu" in r else "")
        )
    return head + "\n".join(lines) + "\n"


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


def write_report(
    path: Path, args: argparse.Namespace, rows: list[dict[str, Any]], command: str, elapsed: float
) -> None:
    shape = ", ".join(f"{k}={v}" for k, v in args.shape.items() if k not in ("bos_token_id", "eos_token_id"))
    gpu_cmd = "python scripts/bench_train.py --device cuda --model polyglot-ko-1.3b --shape-only --steps 30"
    body = [
        "# Benchmarks: kullm vs the seed recipe\n",
        f"Generated by `scripts/bench_train.py` on {time.strftime('%Y-%m-%d %H:%M')} in {elapsed / 60:.1f} min.\n",
        f"```\n{command}\n```\n",
        f"- Machine: {machine()}; device `{args.device}`.",
        f"- Versions: {versions()}.",
        f"- Model: random-init GPT-NeoX ({shape}); LoRA r=8, alpha=16, dropout 0.05 on `query_key_value`.",
        "- Tokenizer: kullm's tiny byte-level BPE (vocab 2000, trained offline on bundled Korean text): no "
        "Polyglot-ko tokenizer is available offline, and a 30k-vocab BPE trained on ~340 rows would learn "
        "whole phrases. Ids stay below 30080, so the embedding and LM head have Polyglot-ko's size; "
        "Korean text is split into more tokens than Polyglot-ko would make.",
        f"- Data: {args.rows} rows ({', '.join(str(p) for p in args.data_sources)}), cutoff_len {args.cutoff_len}, "
        f"train_on_inputs={str(args.train_on_inputs).lower()}; global batch {args.batch_size} = micro-batch "
        f"{args.micro_batch_size} x {args.batch_size // args.micro_batch_size} accumulation; {args.steps} optimizer "
        f"steps per run (the first untimed), {args.repeats} repeats, variants alternating within each repeat.",
        "- Columns: trained tok/s counts tokens whose shifted label is not -100; non-pad tok/s counts attention-mask "
        "tokens; padding = 1 − non-pad ÷ tensor slots. Peak RSS is the whole process (Δ: growth during "
        "training). Ratios are per repeat against `seed` in the same repeat: median (min–max).\n",
        "## CPU results\n",
        markdown_table(rows, args.device, getattr(args, "flops_per_token", None)),
        "Variants: `seed` = HF Trainer recipe, random order; `seed_grouped` = with `group_by_length`; "
        "`kullm_plain` = kullm, random order, full logits; `kullm_grouped` = length-grouped sampler; "
        "`kullm_head` = length-grouped + head-only loss; `kullm_packed` = packing, full logits; "
        "`kullm_packed_head` = packing + head-only loss.\n",
        "Preprocessing (rows/s, median): "
        + ", ".join(f"{r['variant']} {r['prep_rows_s']:.0f}" for r in rows if "prep_rows_s" in r)
        + " (tokenize + mask only: the seed's per-example `Dataset.map` without its cache vs kullm's batched "
        "`encode_batch`; kullm's whole `preprocess` — read, validate, split, tokenize, verify, write the cache — "
        "runs at "
        + ", ".join(f"{r['preprocess_rows_s']:.0f}" for r in rows if "preprocess_rows_s" in r)
        + " rows/s). On ~340 rows fixed costs dominate; rerun with a larger data set for a steadier figure.\n",
        gpu_section(gpu_cmd) if args.device != "cuda" else "",
    ]
    path.write_text("\n".join(body), encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--train-on-inputs", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--model", default="bench", help="bench (the small CPU shape) or a model= config, e.g. polyglot-ko-1.3b"
    )
    p.add_argument("--shape-only", action="store_true", help="random weights in the model's shape (always on here)")
    p.add_argument("--data", type=Path, nargs="*", default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(args: argparse.Namespace) -> None:
    spec = argparse.Namespace(**json.loads(args.spec.read_text()))
    spec.data = Path(spec.data)
    variant = args.child
    if VARIANTS[variant].get("seed"):
        res = run_seed(spec, VARIANTS[variant]["group_by_length"], args.out_dir)
    else:
        res = run_kullm(spec, variant, args.out_dir)
    args.result.write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench: unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but no CUDA GPU is visible")
    command = "python scripts/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="kullm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KULLM_CACHE", str(work / "kullm-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = prepare_workload(work, [Path(p) for p in args.data])
    args.shape = model_shape(args)
    args.tokenizer = tokenizer_path()
    args.rows = sum(1 for _ in data.open(encoding="utf-8"))
    args.data_sources = [str(p) for p in args.data if Path(p).exists()]
    spec = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("data", "out", "work")
    }
    spec.update(data=str(data), data_sources=args.data_sources)
    spec.pop("child", None)
    (work / "spec.json").write_text(json.dumps(spec, default=str))
    print(f"bench: {args.rows} rows, {len(variants)} variants x {args.repeats} repeats, work dir {work}", flush=True)
    t0 = time.perf_counter()
    results = [run_child(args, v, rep, work) for rep in range(args.repeats) for v in variants]
    elapsed = time.perf_counter() - t0
    (work / "results.json").write_text(json.dumps(results, indent=1))
    baseline = "seed" if "seed" in variants else variants[0]
    rows = summarize(results, variants, baseline)
    if args.device == "cuda" and peak_flops():
        args.flops_per_token = 4 * base_params(args.shape) / peak_flops()
    print(markdown_table(rows, args.device, getattr(args, "flops_per_token", None)))
    write_report(args.out, args, rows, command, elapsed)
    print(f"bench: wrote {args.out} ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
