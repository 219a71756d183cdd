"""The seed recipe, reimplemented faithfully: its ``finetune.py`` tokenization (``generate_and_tokenize_prompt``,
one example at a time), HF ``Trainer`` with PEFT LoRA on ``query_key_value`` and ``DataCollatorForSeq2Seq``; a
reference artefact in its own right, and the baseline every other variant is measured against."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import IGNORE_INDEX, Meter, measured, random_checkpoint


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


def run_seed(args: argparse.Namespace, group_by_length: bool, out_dir: Path, as_ran: bool = False) -> dict[str, Any]:
    """The seed's ``finetune.py`` on the workload. ``as_ran`` (a GPU): its own base too, an 8-bit model in fp16
    from a checkpoint (here random weights in the shape, :func:`random_checkpoint`), prepared for int8 training
    (gradient checkpointing on), and fp16 AMP; otherwise the base of every other variant (fp32 on CPU, bf16 on GPU)."""
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
    prompter = kullm_prompter(Prompter)
    cutoff_len, train_on_inputs = args.cutoff_len, args.train_on_inputs

    generate_and_tokenize_prompt = seed_tokenize_fn(tokenizer, prompter, cutoff_len, train_on_inputs)

    raw = datasets.load_dataset("json", data_files=str(args.data), split="train")
    t0 = time.perf_counter()
    train_set = raw.shuffle(seed=args.seed).map(
        generate_and_tokenize_prompt, remove_columns=raw.column_names, load_from_cache_file=False
    )
    prep_s = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    if as_ran:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        model = GPTNeoXForCausalLM.from_pretrained(
            random_checkpoint(args.shape, Path(args.checkpoint)),
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),  # load_in_8bit=True
            dtype=torch.float16,  # torch_dtype=torch.float16
            device_map={"": 0},
        )
        model = prepare_model_for_kbit_training(model)  # the seed's prepare_model_for_int8_training
    else:
        config = GPTNeoXConfig(**args.shape)
        model = GPTNeoXForCausalLM(config).to(torch_dtype(args))
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

    precision = {"fp16": True, "bf16": False} if as_ran else {}  # fp16=True, hard-coded in the seed
    targs = TrainingArguments(
        **{**hf_trainer_args(args, out_dir), **precision},
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


def kullm_prompter(prompter_cls):
    from omegaconf import OmegaConf

    from kullm.config import CONF_DIR

    return prompter_cls.from_config(OmegaConf.load(CONF_DIR / "template" / "kullm.yaml"))


def torch_dtype(args: argparse.Namespace):
    import torch

    return torch.bfloat16 if args.device == "cuda" else torch.float32
