"""The training run's knobs users type most, for :func:`kullm.config.validate` (which runs before anything loads).

Their consumers — the LightningModule (``optim.*``), the loss (``loss.*``), the run plan (batch sizes, trainer
limits, validation), the loggers, the checkpoint and sample callbacks, the data loader (``sampler``,
``data.packing``, ``data.batching``) — import torch; this table imports nothing, so validating a config stays cheap.
"""

from __future__ import annotations

from typing import Any

LOSS_IMPLS = ("auto", "torch", "liger", "cce")  # loss.impl: the fused LM head + loss (kullm.training.loss)
# objective=: the training loss (kullm.training.preference); sft is the token cross-entropy
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto")
PAIRED_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")  # chosen/rejected pairs
REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")  # trained against a reference model

SCHEMA: dict[str, Any] = {
    "seed": int,
    "batch_size": int,
    "micro_batch_size": int,
    "num_workers": int,
    "sampler": ("random", "length_grouped", "sequential"),  # kullm.data.sampling.make_sampler
    "data.packing": bool,
    "data.batching": ("rows", "tokens"),
    "optim.lr": float,
    "optim.weight_decay": float,
    "optim.warmup_ratio": float,
    "optim.warmup_steps": int,
    "optim.min_lr_ratio": float,
    "optim.schedule": ("cosine", "linear", "constant"),
    "loss.head_only": bool,
    "loss.impl": LOSS_IMPLS,
    "logger.name": ("wandb", "csv", "none"),
    "val_every_n_steps": int,
    "trainer.max_epochs": int,
    "trainer.max_steps": int,
    "callbacks.checkpoint.every_n_train_steps": int,
    "callbacks.checkpoint.save_top_k": int,
    "callbacks.samples.num": int,
    "objective.name": OBJECTIVES,
    "objective.beta": float,
    "objective.label_smoothing": float,
    "objective.gamma": float,
    "objective.lambda_or": float,
    "objective.desirable_weight": float,
    "objective.undesirable_weight": float,
    "objective.precompute_ref": bool,
    "objective.ref_copy": bool,
}
MINIMUM: dict[str, float] = {
    "batch_size": 1,
    "micro_batch_size": 1,
    "num_workers": 0,
    "optim.warmup_steps": 0,
    "trainer.max_epochs": -1,
    "trainer.max_steps": -1,
    "callbacks.checkpoint.every_n_train_steps": 1,
    "callbacks.checkpoint.save_top_k": -1,
    "callbacks.samples.num": 0,
    "objective.desirable_weight": 0,
    "objective.undesirable_weight": 0,
}
RANGE: dict[str, str] = {
    "optim.lr": "[0, inf)",
    "optim.warmup_ratio": "[0, 1]",
    "optim.min_lr_ratio": "[0, 1]",
    "objective.beta": "(0, inf)",
    "objective.label_smoothing": "[0, 0.5)",
}
# A limit of 0 optimizer steps or epochs trains nothing (-1: no limit).
EXCLUDED: dict[str, float] = {"trainer.max_steps": 0, "trainer.max_epochs": 0}
TARGET_NODES = ("trainer", "optim.optimizer", "strategy.impl")  # instantiated with their _target_


def check_config(cfg: Any) -> None:
    """Combinations of ``objective=`` a run cannot train, refused before anything loads (one line each)."""
    from omegaconf import OmegaConf

    from kullm.config import ConfigError

    name = OmegaConf.select(cfg, "objective.name", default=None)
    if name is None:
        return
    lora = OmegaConf.select(cfg, "lora", default=None)
    full = lora is None or not OmegaConf.select(cfg, "lora._target_", default=None)
    precompute = bool(OmegaConf.select(cfg, "objective.precompute_ref", default=False))
    ref_copy = bool(OmegaConf.select(cfg, "objective.ref_copy", default=False))
    if name in REFERENCE_OBJECTIVES and full and not (precompute or ref_copy):
        raise ConfigError(
            f"objective={name} with lora=none has no frozen base to be its reference (under LoRA: the base with "
            "the adapter off): set objective.precompute_ref=true (reference log-probs computed once before "
            "training, one model in memory) or objective.ref_copy=true (a frozen copy: twice the weights' memory)"
        )
    if ref_copy and not full:
        raise ConfigError(
            f"objective.ref_copy=true is for lora=none: under LoRA the reference of objective={name} is the base "
            "with the adapter disabled (or the init_adapter), with no copy"
        )
    if precompute and name == "kto":
        raise ConfigError(
            "objective.precompute_ref=true: KTO's KL term pairs each batch's prompts with other completions, "
            "which cannot be computed ahead: use a live reference (LoRA, or objective.ref_copy=true)"
        )
    monitor = OmegaConf.select(cfg, "callbacks.checkpoint.monitor", default=None)
    if monitor and str(monitor).startswith("val/rewards/"):
        if name == "sft" or (monitor == "val/rewards/accuracy" and name == "kto"):
            raise ConfigError(f"callbacks.checkpoint.monitor={monitor}: objective={name} does not log it")
        mode = OmegaConf.select(cfg, "callbacks.checkpoint.mode", default=None)
        if monitor in ("val/rewards/accuracy", "val/rewards/margin") and mode != "max":
            raise ConfigError(
                f"callbacks.checkpoint.monitor={monitor} is better when higher: set callbacks.checkpoint.mode=max"
            )
