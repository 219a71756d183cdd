"""The workload (model shapes, data rows, tokenizer) and the variants run against the seed recipe: TRL's
``SFTTrainer``, ``kullm.train.train`` with one optimisation switched at a time, and the preprocessing bench."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import Meter, measured, random_checkpoint
from benchmarks.seed_recipe import hf_trainer_args, kullm_prompter, seed_tokenize_fn, torch_dtype

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
_HEAD = VARIANTS["kullm_head"]["overrides"]
_QUANTIZED = {"checkpoint": True, "gpu": True}
# on a GPU only (scripts/gpu_check.py): the seed as it ran, another attention kernel, torch.compile, quantized bases
VARIANTS.update(
    {
        # 8-bit base in fp16 from a checkpoint, prepare_model_for_int8_training (gradient checkpointing), fp16 AMP
        "seed_as_ran": {"seed": True, "group_by_length": True, "as_ran": True, "gpu": True},
        "kullm_head_flex": {"overrides": [*_HEAD, "model.attn_implementation=flex_attention"], "gpu": True},
        # the transformer blocks compiled by the bench (kullm has no switch for it): torch.compile on vs kullm_head
        "kullm_head_compiled": {"overrides": _HEAD, "compile": True, "gpu": True},
        # QLoRA and LLM.int8 bases, from a random checkpoint in the shape, activations recomputed as both recipes do
        "kullm_nf4": {"overrides": [*_HEAD, "quant=nf4", "gradient_checkpointing=true"], **_QUANTIZED},
        "kullm_int8": {"overrides": [*_HEAD, "quant=int8", "gradient_checkpointing=true"], **_QUANTIZED},
    }
)
DEFAULT_VARIANTS = ["seed", "seed_grouped", "trl_grouped", "trl_packed", "kullm_head", "kullm_packed_head"]
SEED_BEST, TRL_VARIANTS = "seed_grouped", ("trl_grouped", "trl_packed")
PREP_ROWS = 5000  # the preprocessing workload: at least this many rows


def prepare_workload(work: Path, data_paths: list[Path]) -> Path:
    """Flatten the data sources into one ``{id, instruction, input, output}`` JSONL that both paths read."""
    from kullm.data.records import read_records

    rows = []
    for path in data_paths:
        records, _ = read_records(path)
        rows += [{"id": r.id, "instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    if not rows:
        raise SystemExit("bench: no data found (" + ", ".join(map(str, data_paths)) + ")")
    out = work / "data.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def tokenizer_path() -> str:
    """The tiny byte-level BPE tokenizer (vocab 2000) built offline; Polyglot-ko's own is not available offline."""
    from kullm.tiny import build_tiny

    return str(build_tiny())


def model_shape(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "bench":
        return dict(SHAPES[args.shape])
    from kullm.config import compose

    shape = compose("train", ["output_dir=/tmp/unused", f"model={args.model}"]).model.shape
    from omegaconf import OmegaConf

    return OmegaConf.to_container(shape, resolve=True)


def run_trl(args: argparse.Namespace, packing: bool, out_dir: Path) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` as a user would set it up for this data: prompt/completion rows, completion-only loss."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kullm.templates import Prompter

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompter = kullm_prompter(Prompter)
    raw = datasets.load_dataset("json", data_files=str(args.data), split="train")
    pairs = raw.map(
        lambda r: {"prompt": prompter.render(r["instruction"], r["input"]), "completion": r["output"]},
        remove_columns=raw.column_names,
    )
    torch.manual_seed(args.seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**args.shape)).to(torch_dtype(args))
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


def kullm_overrides(args: argparse.Namespace, variant: str, out_dir: Path) -> list[str]:
    shape = ",".join(f"{k}:{json.dumps(v)}" for k, v in args.shape.items())
    model = "tiny" if args.model == "bench" else args.model
    gpu = args.device == "cuda"
    if VARIANTS[variant].get("checkpoint"):  # a quantized base loads through from_pretrained: random weights on disk
        weights = [f"model.name_or_path={args.checkpoint}", "model.shape_only=false"]
    else:
        weights = ["model.shape_only=true", f"model.shape={{{shape}}}"]
    return [
        f"output_dir={out_dir}",
        f"model={model}",
        *weights,
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

    class Compile(L.Callback):
        """``torch.compile`` each transformer block (the model's ``_no_split_modules``) once the model is set up."""

        def on_fit_start(self, trainer, module) -> None:
            inner = module.model.get_base_model() if hasattr(module.model, "get_base_model") else module.model
            kinds = set(getattr(inner, "_no_split_modules", None) or ())
            blocks = [m for m in inner.modules() if type(m).__name__ in kinds]
            if not blocks:
                raise RuntimeError(f"no transformer block to compile (looked for {sorted(kinds)})")
            for block in blocks:
                block.compile(dynamic=True)  # length-grouped batches change length: one graph for all
            self.blocks = len(blocks)

    if VARIANTS[variant].get("checkpoint"):
        random_checkpoint(args.shape, Path(args.checkpoint))
    cfg = compose("train", kullm_overrides(args, variant, out_dir))
    prep = prep_kullm(cfg)
    clock = Clock()
    compiled = Compile() if VARIANTS[variant].get("compile") else None
    callbacks = [clock, compiled] if compiled else [clock]
    result, mem = measured(args.device, lambda: train(cfg, extra_callbacks=callbacks))
    return {
        **meter.result(),
        **mem,
        **prep,
        "global_step": result["metrics"]["global_step"],
        **({"compiled_blocks": compiled.blocks} if compiled else {}),
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
      against kullm's ``sft.encode_split`` over the read records (template, tokenize, mask, verify every example,
      Arrow columns);
    - ``end to end``: the seed's ``load_dataset("json")`` + the same ``map``, against kullm's uncached
      ``preprocess`` (read, validate, deduplicate, split, the same encoding, save to the cache and reload);
    - ``tokenizer``: the Rust tokenizer alone on every prompt and every response, once each: kullm's floor;
    - ``kullm_map_threads``: ``sft.encode_split`` with the Rust tokenizer's threads (``TOKENIZERS_PARALLELISM=true``,
      kullm's default when the variable is unset; every other step runs with it ``false``).

    Wall and CPU seconds of each; the ratios are per round (seed ÷ kullm, same round).
    """
    import datasets
    from transformers import AutoTokenizer

    from kullm.config import compose
    from kullm.data.preprocess import preprocess
    from kullm.data.records import read_records
    from kullm.data.sft import encode_split, token_ids
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
    fn = seed_tokenize_fn(seed_tokenizer, kullm_prompter(Prompter), args.cutoff_len, args.train_on_inputs)
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
            "kullm_map": lambda: encode_split(records, cfg.data, tokenizer, prompter, "train"),
            "seed_e2e": lambda i=i: seed_e2e(i),
            "kullm_e2e": lambda i=i: preprocess(cfg.data, tokenizer, prompter, cache_dir=work / f"cache{i}"),
            "tokenizer": lambda: token_ids(tokenizer, texts),
            "kullm_map_threads": lambda: threaded(encode_split, records, cfg.data, tokenizer, prompter, "train"),
        }
        for name, f in steps.items():
            times.setdefault(name, []).append(clock(f))
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": len(records), "times": times}
