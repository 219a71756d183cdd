"""Generated samples: a training callback that answers validation prompts at each validation."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from kullm.data.sft import IGNORE_INDEX


class GenerationSamples(L.Callback):
    """Greedy answers to the first ``num`` validation prompts after every validation.

    Rows (step, prompt, reference, response) are appended to ``<output_dir>/samples.jsonl`` and logged as a W&B
    table when W&B is the logger.
    """

    def __init__(self, tokenizer, output_dir: str | Path, num: int = 4, max_new_tokens: int = 64) -> None:
        self.tokenizer, self.num, self.max_new_tokens = tokenizer, num, max_new_tokens
        self.path = Path(output_dir) / "samples.jsonl"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        reason = sharded_reason(trainer.strategy)
        if reason and self.num > 0:
            rank_zero_warn(f"generated samples are off: {reason}")
            self.num = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num <= 0 or trainer.sanity_checking or not trainer.is_global_zero or trainer.datamodule is None:
            return
        val = trainer.datamodule.val_set
        rows = [self._sample(pl_module, val[i]) for i in range(min(self.num, len(val)))]
        if not rows:
            return
        step = trainer.global_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for prompt, reference, response in rows:
                f.write(
                    json.dumps(
                        {"step": step, "prompt": prompt, "reference": reference, "response": response},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    "val/samples", columns=["step", "prompt", "reference", "response"], data=[[step, *r] for r in rows]
                )

    @torch.no_grad()
    def _sample(self, pl_module: L.LightningModule, example: dict) -> tuple[str, str, str]:
        side = "chosen_" if "chosen_input_ids" in example else ""  # a preference pair: the chosen answer as reference
        ids, labels, n_prompt = example[f"{side}input_ids"], example[f"{side}labels"], example["prompt_len"]
        n_prompt = min(n_prompt, len(ids))
        tok = self.tokenizer
        prompt_ids = torch.tensor([ids[:n_prompt]], device=pl_module.device)
        reference = tok.decode(
            [t for t, lab in zip(ids[n_prompt:], labels[n_prompt:], strict=True) if lab != IGNORE_INDEX],
            skip_special_tokens=True,
        )
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        finally:
            model.train(was_training)
        response = tok.decode(out[0, n_prompt:], skip_special_tokens=True)
        return tok.decode(ids[:n_prompt]), reference, response


def sharded_reason(strategy) -> str:
    """Why rank 0 alone cannot generate under ``strategy`` ('' when it can): with sharded parameters every forward
    needs every rank in the collectives, and a rank-0-only ``generate`` would hang the run."""
    name = type(strategy).__name__
    if name.startswith("FSDP") or "FSDP" in name:
        return f"{name} shards the parameters, so generating on rank 0 alone would wait forever for the other ranks"
    if name.startswith("DeepSpeed") and getattr(strategy, "zero_stage_3", False):
        return "DeepSpeed ZeRO-3 shards the parameters, so generating on rank 0 alone would wait for the other ranks"
    return ""
