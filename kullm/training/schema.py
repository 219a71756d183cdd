"""The training run's knobs users type most, for :func:`kullm.config.validate` (which runs before anything loads).

Their consumers — the LightningModule (``optim.*``), the loss (``loss.*``), the run plan (batch sizes, trainer
limits, validation), the loggers, the checkpoint and sample callbacks, the data loader (``sampler``,
``data.packing``, ``data.batching``) — import torch; this table imports nothing, so validating a config stays cheap.
"""

from __future__ import annotations

from typing import Any

LOSS_IMPLS = ("auto", "torch", "liger", "cce")  # loss.impl: the fused LM head + loss (kullm.training.loss)

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
}
RANGE: dict[str, str] = {"optim.lr": "[0, inf)", "optim.warmup_ratio": "[0, 1]", "optim.min_lr_ratio": "[0, 1]"}
# A limit of 0 optimizer steps or epochs trains nothing (-1: no limit).
EXCLUDED: dict[str, float] = {"trainer.max_steps": 0, "trainer.max_epochs": 0}
TARGET_NODES = ("trainer", "optim.optimizer", "strategy.impl")  # instantiated with their _target_
