"""Benchmark kullm's training path against a faithful reimplementation of the seed recipe and TRL's SFTTrainer.

    python scripts/bench_train.py                       # the head-heavy CPU shape, 3 repeats, writes BENCHMARKS.md
    python scripts/bench_train.py --shape body          # the body-heavy CPU shape (hidden 1024, 8 layers)
    python scripts/bench_train.py --repeats 5 --steps 12 --variants seed,kullm_packed_head
    python scripts/bench_train.py --device cuda --model polyglot-ko-1.3b --shape-only --steps 30   # a lent GPU

Every variant runs in its own subprocess (a fresh interpreter, so peak RSS is its own), in one process tree,
alternating variants inside each repeat, with the same model shape, data, seed and number of optimizer steps:

- ``seed`` / ``seed_grouped``: HF ``Trainer`` + PEFT LoRA (r=8, alpha=16, dropout 0.05, ``query_key_value``),
  per-example ``Dataset.map(generate_and_tokenize_prompt)`` exactly as the seed's ``finetune.py`` (tokenize
  prompt+response, append EOS if room, mask by tokenizing the prompt alone), ``DataCollatorForSeq2Seq(
  pad_to_multiple_of=8)``, ``group_by_length`` off / on. The seed's forced 8-bit base is left out (fp32 on CPU,
  bf16 on GPU, for both paths): it would only make the seed slower.
- ``trl_grouped`` / ``trl_packed``: TRL's ``SFTTrainer`` on the same rows as prompt/completion pairs (the KULLM
  prompt rendered, the output as completion), completion-only loss, the same LoRA, no gradient checkpointing,
  fp32 on CPU; padded batches with ``group_by_length``, or ``packing=True`` (best-fit decreasing, padding-free).
- ``kullm_*``: ``kullm.train.train(cfg)`` with overrides switching one optimisation at a time.

Throughput is measured from the end of the first optimizer step to the end of the last (the first step carries
one-off start-up costs), over the micro-batches of those steps, identically in every path: trained tokens (shifted
labels != -100), non-pad tokens (attention mask) and padded slots (tensor size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
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

# Random-init GPT-NeoX shapes with Polyglot-ko's embedding rows (30080) and layout. ``head``: small enough that the
# default workload finishes in ~15 minutes on a 2-core CPU, with the LM head ~87% of the FLOPs (flatters head-only
# loss); ``body``: hidden 1024 x 8 layers, the head ~23% of the FLOPs, nearer a 1.3B–12.8B model's balance.
_COMMON: dict[str, Any] = {
    "vocab_size": 30080,
    "rotary_pct": 0.5,
    "max_position_embeddings": 2048,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
SHAPES: dict[str, dict[str, Any]] = {
    "head": {**_COMMON, "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 512},
    "body": {
        **_COMMON,
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "intermediate_size": 4096,
    },
}
BENCH_SHAPE = SHAPES["head"]
SHAPE_STEPS = {"head": 6, "body": 3}  # optimizer steps per run (the first untimed)

# variant -> kullm overrides (``seed``: the seed recipe; ``trl``: TRL's SFTTrainer)
VARIANTS: dict[str, dict[str, Any]] = {
    "seed": {"seed": True, "group_by_length": False},
    "seed_grouped": {"seed": True, "group_by_length": True},
    "trl_grouped": {"trl": True, "packing": False},
    "trl_packed": {"trl": True, "packing": True},
    "kullm_plain": {"overrides": ["sampler=random", "++data.packing=false", "++loss.head_only=false"]},
    "kullm_grouped": {"overrides": ["sampler=length_grouped", "++data.packing=false", "++loss.head_only=false"]},
    "kullm_head": {"overrides": ["sampler=length_grouped", "++data.packing=false", "++loss.head_only=true"]},
    "kullm_packed": {"overrides": ["sampler=random", "++data.packing=true", "++loss.head_only=false"]},
    "kullm_packed_head": {"overrides": ["sampler=random", "++data.packing=true", "++loss.head_only=true"]},
    # memory for time: the blocks' activations recomputed in backward (the seed preset's 8-bit recipe turned it on)
    "kullm_head_ckpt": {
        "overrides": [
            "sampler=length_grouped",
            "++data.packing=false",
            "++loss.head_only=true",
            "gradient_checkpointing=true",
        ]
    },
}
DEFAULT_VARIANTS = ["seed", "seed_grouped", "trl_grouped", "trl_packed", "kullm_head", "kullm_packed_head"]
SEED_BEST, TRL_VARIANTS = "seed_grouped", ("trl_grouped", "trl_packed")
PREP_ROWS = 5000  # the preprocessing workload: at least this many rows
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
        return dict(SHAPES[args.shape])
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
        has_mask = attention_mask is not None and attention_mask.dim() == 2
        self.pending[1] += int(attention_mask.sum()) if has_mask else labels.numel()  # padding-free: no pad
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


def measured(device: str, fit):
    """``fit()`` (one variant's training) and the memory it used: ``(its result, memory(...))``."""
    rss_before = current_rss_mib()
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = fit()
    return result, memory(device, rss_before)


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- (a) the seed recipe --------------------------------------------------------------------------------------


def seed_tokenize_fn(tokenizer, prompter, cutoff_len: int, train_on_inputs: bool):
    """The seed's ``generate_and_tokenize_prompt`` (its ``finetune.py``), one example at a time."""

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

    return generate_and_tokenize_prompt


def hf_trainer_args(args, out_dir: Path) -> dict:
    """The HF ``Trainer`` settings the seed recipe and TRL's ``SFTTrainer`` variants share (the seed's numbers)."""
    return dict(
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
        seed=args.seed,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


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

    generate_and_tokenize_prompt = seed_tokenize_fn(tokenizer, prompter, cutoff_len, train_on_inputs)

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
        **hf_trainer_args(args, out_dir),
        train_sampling_strategy="group_by_length" if group_by_length else "random",  # group_by_length=True in v4
        remove_unused_columns=False,
    )
    trainer = MeteredTrainer(
        model=model,
        args=targs,
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
        callbacks=[StepClock()],
    )
    _, mem = measured(args.device, trainer.train)
    return {
        **meter.result(),
        **mem,
        "prep_rows": len(raw),
        "prep_rows_s": len(raw) / prep_s,
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_trl(args: argparse.Namespace, packing: bool, out_dir: Path) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` as a user would set it up for this data: prompt/completion rows, completion-only loss."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kullm.templates import Prompter

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompter = _kullm_prompter(Prompter)
    raw = datasets.load_dataset("json", data_files=str(args.data), split="train")
    pairs = raw.map(
        lambda r: {"prompt": prompter.render(r["instruction"], r["input"]), "completion": r["output"]},
        remove_columns=raw.column_names,
    )
    torch.manual_seed(args.seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**args.shape)).to(_dtype(args))
    model.config.use_cache = False
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query_key_value"], bias="none", task_type="CAUSAL_LM"
    )
    meter = Meter(args.device)

    class StepClock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            meter.step_end()

    class MeteredSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            meter.batch(inputs["labels"], inputs.get("attention_mask"))
            return super().training_step(model, inputs, num_items_in_batch)

    targs = SFTConfig(
        **hf_trainer_args(args, out_dir),
        gradient_checkpointing=False,  # SFTConfig turns it on by default; no other variant recomputes activations
        max_length=args.cutoff_len,
        completion_only_loss=True,
        packing=packing,
        train_sampling_strategy="random" if packing else "group_by_length",
    )
    t0 = time.perf_counter()
    trainer = MeteredSFTTrainer(
        model=model,
        args=targs,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepClock()],
    )
    prep_s = time.perf_counter() - t0  # tokenizing (and packing) the dataset, plus wrapping the model
    _, mem = measured(args.device, trainer.train)
    return {
        **meter.result(),
        **mem,
        "prep_rows": len(raw),
        "trl_setup_rows_s": len(raw) / prep_s,
        "params": sum(p.numel() for p in trainer.model.parameters()),
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
    clock = Clock()
    result, mem = measured(args.device, lambda: train(cfg, extra_callbacks=[clock]))
    return {
        **meter.result(),
        **mem,
        **prep,
        "global_step": result["metrics"]["global_step"],
    }


def prep_kullm(cfg) -> dict[str, float]:
    """kullm's preprocessing (read, split, tokenize, mask, verify, cache), so that train() hits the cache; timed."""
    from kullm.data.preprocess import preprocess
    from kullm.modeling import load_tokenizer
    from kullm.templates import Prompter

    tokenizer = load_tokenizer(cfg.model)
    prompter = Prompter.from_config(cfg.template)
    t0 = time.perf_counter()
    processed = preprocess(cfg.data, tokenizer, prompter)
    seconds = time.perf_counter() - t0
    n = sum(processed.stats["encoded"][s]["records"] for s in processed.stats["encoded"])
    return {"prep_rows": n, "preprocess_rows_s": n / seconds}


def prep_workload(data: Path, out: Path, rows_wanted: int = PREP_ROWS) -> int:
    """At least ``rows_wanted`` rows for the preprocessing bench: the workload's rows repeated, each copy's
    instruction suffixed with its copy number (`` (2)``, `` (3)``, …) so that no two rows are the same text."""
    base = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    rows, copy = list(base), 1
    while len(rows) < rows_wanted:
        copy += 1
        rows += [{**r, "id": f"{r['id']}~{copy}", "instruction": f"{r['instruction']} ({copy})"} for r in base]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def run_prep(args: argparse.Namespace, rounds: int = 3) -> dict[str, Any]:
    """The preprocessing workload, seed against kullm, alternating within each of ``rounds`` rounds:

    - ``map``: the seed's per-example ``Dataset.map(generate_and_tokenize_prompt)`` (no cache) over the loaded rows,
      against kullm's ``encode_records`` over the read records (template, tokenize, mask, verify every example,
      Arrow columns);
    - ``end to end``: the seed's ``load_dataset("json")`` + the same ``map``, against kullm's uncached
      ``preprocess`` (read, validate, deduplicate, split, the same encoding, save to the cache and reload);
    - ``tokenizer``: the Rust tokenizer alone on every prompt and every response, once each: kullm's floor;
    - ``kullm_map_threads``: ``encode_records`` with the Rust tokenizer's threads (``TOKENIZERS_PARALLELISM=true``,
      kullm's default when the variable is unset; every other step runs with it ``false``).

    Wall and CPU seconds of each; the ratios are per round (seed ÷ kullm, same round).
    """
    import datasets
    from transformers import AutoTokenizer

    from kullm.config import compose
    from kullm.data.preprocess import encode_records, preprocess
    from kullm.data.records import read_records
    from kullm.data.sft import token_ids
    from kullm.modeling import load_tokenizer
    from kullm.templates import Prompter

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="kullm-prep-"))
    cfg = compose(
        "train",
        [
            f"output_dir={work / 'out'}",
            "model=tiny",
            f"model.tokenizer={args.tokenizer}",
            f"data.path={args.prep_data}",
            "data.val_set_size=0",
            f"data.cutoff_len={args.cutoff_len}",
            f"data.train_on_inputs={str(args.train_on_inputs).lower()}",
            "data.allow_eval_overlap=true",  # the workload holds the evaluation set's rows: refusing them is not timed
            "template=kullm",
            "logger=none",
        ],
    )
    tokenizer, seed_tokenizer = load_tokenizer(cfg.model), AutoTokenizer.from_pretrained(args.tokenizer)
    prompter = Prompter.from_config(cfg.template)
    fn = seed_tokenize_fn(seed_tokenizer, _kullm_prompter(Prompter), args.cutoff_len, args.train_on_inputs)
    raw = datasets.load_dataset("json", data_files=str(args.prep_data), split="train", cache_dir=str(work / "hf0"))
    records, _ = read_records(args.prep_data)
    texts = [prompter.render(r.instruction, r.input) for r in records] + [r.output for r in records]

    def clock(f) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        f()
        return time.perf_counter() - w, time.process_time() - c

    def seed_e2e(i: int) -> None:
        ds = datasets.load_dataset(
            "json", data_files=str(args.prep_data), split="train", cache_dir=str(work / f"hf{i}")
        )
        ds.map(fn, remove_columns=ds.column_names, load_from_cache_file=False)

    def threaded(f, *a) -> None:  # the Rust tokenizer's own threads, as kullm runs when the variable is unset
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        try:
            f(*a)
        finally:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

    times: dict[str, list[tuple[float, float]]] = {}
    for i in range(1, rounds + 1):
        steps = {
            "seed_map": lambda: raw.map(fn, remove_columns=raw.column_names, load_from_cache_file=False),
            "kullm_map": lambda: encode_records(records, cfg.data, tokenizer, prompter, "train"),
            "seed_e2e": lambda i=i: seed_e2e(i),
            "kullm_e2e": lambda i=i: preprocess(cfg.data, tokenizer, prompter, cache_dir=work / f"cache{i}"),
            "tokenizer": lambda: token_ids(tokenizer, texts),
            "kullm_map_threads": lambda: threaded(encode_records, records, cfg.data, tokenizer, prompter, "train"),
        }
        for name, f in steps.items():
            times.setdefault(name, []).append(clock(f))
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": len(records), "times": times}


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
    if variant == "prep":
        cmd = cmd[:-2]  # no output folder
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(work))
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        print(f"bench: {variant} (repeat {repeat}) failed:\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"variant": variant, "repeat": repeat, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    res = json.loads(result_path.read_text())
    res.update(variant=variant, repeat=repeat, wall_s=wall, loadavg=(load0, load1))
    if variant == "prep":
        return res
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


def base_params(shape: dict[str, Any]) -> int:
    """N: parameters of the base model of this shape (built on the meta device, no memory)."""
    return sum(param_split(shape))


def param_split(shape: dict[str, Any]) -> tuple[int, int, int]:
    """(transformer body matmul weights, LM head, input embedding) parameter counts of this shape."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**shape))
    head = sum(p.numel() for p in model.get_output_embeddings().parameters())
    embed = sum(p.numel() for p in model.get_input_embeddings().parameters())
    return sum(p.numel() for p in model.parameters()) - head - embed, head, embed


def flop_ceiling(shape: dict[str, Any], seed_row: dict[str, Any]) -> float:
    """How many times fewer FLOPs per trained token than the seed the minimum needs, on the seed's own batches.

    Per token, forward 2·N and the activation-gradient half of backward 2·N (LoRA: no weight gradients for the
    frozen base; the adapter's own are negligible): 4·N. The seed runs body and head on every tensor slot
    (padding included: ``slots``); the minimum runs the body on non-pad tokens and the head on trained tokens only.
    Attention's sequence-quadratic term and the embedding lookup are left out (small at these lengths).
    """
    body, head, _ = param_split(shape)
    slots, nonpad, trained = seed_row["slots"], seed_row["nonpad_tokens"], seed_row["trained_tokens"]
    return (body + head) * slots / (body * nonpad + head * trained)


def peak_flops() -> float | None:
    """Dense bf16 peak of the visible GPU (FLOP/s), from its name; None when unknown."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return tflops * 1e12 if tflops else None


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
        f"Generated by `scripts/bench_train.py` on {time.strftime('%Y-%m-%d %H:%M')} UTC in {elapsed / 60:.1f} min "
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
            f"Generated by `scripts/bench_train.py` on {time.strftime('%Y-%m-%d %H:%M')} UTC in {elapsed / 60:.1f} min "
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
                "`encode_records` (which also verifies every example and builds the Arrow columns)",
                "seed_map",
                "kullm_map",
            ),
            row(
                "end to end: the seed's `load_dataset` + `map` vs kullm's uncached `preprocess` (read, validate, "
                "deduplicate, split, the same encoding, save to the cache)",
                "seed_e2e",
                "kullm_e2e",
            ),
            f"| the same `encode_records` with the Rust tokenizer's threads on the {os.cpu_count()} cores "
            "(`TOKENIZERS_PARALLELISM=true`, kullm's default when the variable is unset) | "
            f"{n / statistics.median(t[0] for t in rounds['seed_map']):.0f} | "
            f"{n / statistics.median(t[0] for t in rounds['kullm_map_threads']):.0f} | "
            f"**{statistics.median(threads):.2f}×** ({min(threads):.2f}–{max(threads):.2f}) | (n/a: threads) |",
            "",
            f"- kullm's floor: the Rust tokenizer alone, every prompt and every response once (what kullm cannot "
            f"skip), takes {cpu['tokenizer']:.2f} s CPU = {100 * cpu['tokenizer'] / cpu['kullm_map']:.0f}% of "
            f"`encode_records` ({cpu['kullm_map']:.2f} s); the seed's `map` takes {cpu['seed_map']:.2f} s, so on one "
            f"thread no change outside the tokenizer can exceed **{ceiling:.2f}×** here. Target ≥ 5×: "
            + ("met." if best >= 5 else f"missed by {5 / best:.1f}× (see the notes below).")
            + "\n",
            "<!-- /bench:prep -->\n",
        ]
    )


def header(args: argparse.Namespace) -> str:
    gpu_cmd = "python scripts/bench_train.py --device cuda --model polyglot-ko-1.3b --shape-only --steps 30"
    return "\n".join(
        [
            "# Benchmarks: kullm vs the seed recipe and TRL's SFTTrainer\n",
            "```\npython scripts/bench_train.py                # the head-heavy shape\n"
            "python scripts/bench_train.py --shape body   # the body-heavy shape\n"
            "python scripts/bench_train.py --prep-only    # preprocessing only\n```\n",
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--data", type=Path, nargs="*", default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
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
        res = run_seed(spec, VARIANTS[variant]["group_by_length"], args.out_dir)
    elif VARIANTS[variant].get("trl"):
        res = run_trl(spec, VARIANTS[variant]["packing"], args.out_dir)
    else:
        res = run_kullm(spec, variant, args.out_dir)
    args.result.write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    variants = [] if args.prep_only else [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.prep_only and args.no_prep:
        raise SystemExit("bench: --prep-only and --no-prep leave nothing to run")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench: unknown variants {unknown}; choose from {list(VARIANTS)}")
    if any(VARIANTS[v].get("trl") for v in variants):
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise SystemExit("bench: the trl_* variants need TRL: pip install -c constraints.txt -e '.[bench]'")
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
    args.data_sources = [os.path.relpath(p, ROOT) for p in args.data if Path(p).exists()]
    args.prep_data = work / "prep.jsonl"
    prep_rows = prep_workload(data, args.prep_data)
    spec = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("data", "out", "work")
    }
    spec.update(data=str(data), data_sources=args.data_sources)
    spec.pop("child", None)
    (work / "spec.json").write_text(json.dumps(spec, default=str))
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
