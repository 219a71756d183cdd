"""Preflight, before anything loads: the run plan (world size, gradient accumulation, strategy) and the impossible
combinations it refuses."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from kullm.config import ConfigError
from kullm.training.loss import check_loss_impl


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes that will train: devices per node × nodes (``auto`` counts visible GPUs, else 1)."""
    devices, accel = trainer_cfg.devices, str(trainer_cfg.accelerator)
    if isinstance(devices, (list, ListConfig)):
        n = len(devices)
    elif str(devices) in ("auto", "-1"):
        n = torch.cuda.device_count() if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
    else:
        n = int(devices)
    return max(1, n) * int(trainer_cfg.num_nodes)


def accumulation(batch_size: int, micro_batch_size: int, world: int) -> int:
    """Gradient accumulation steps so that ``micro_batch_size × world × steps == batch_size`` exactly."""
    if batch_size <= 0 or micro_batch_size <= 0:
        raise ConfigError(f"batch_size ({batch_size}) and micro_batch_size ({micro_batch_size}) must be positive")
    if batch_size % (micro_batch_size * world):
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by micro_batch_size={micro_batch_size} × world size={world} "
            f"(= {micro_batch_size * world}): choose batch_size as a multiple of it"
        )
    return batch_size // (micro_batch_size * world)


def validation_schedule(cfg: DictConfig, accumulate: int) -> dict[str, Any]:
    """Trainer arguments for ``val_every_n_steps`` (optimizer steps, counted across epochs).

    Lightning counts ``val_check_interval`` in micro-batches: N optimizer steps are ``N × accumulate`` of them, so a
    validation (and the checkpoint it triggers) never falls inside a gradient-accumulation window.
    """
    every = cfg.val_every_n_steps
    lightning_interval = cfg.trainer.val_check_interval
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ConfigError(f"val_every_n_steps={every!r}: must be a positive number of optimizer steps (or null)")
        if lightning_interval is not None:
            raise ConfigError("give val_every_n_steps (optimizer steps) or trainer.val_check_interval, not both")
        return {"val_check_interval": every * accumulate, "check_val_every_n_epoch": None}
    if isinstance(lightning_interval, float) and lightning_interval != 1.0 and accumulate > 1:
        raise ConfigError(
            f"trainer.val_check_interval={lightning_interval} (a share of the epoch, in micro-batches) can validate "
            f"inside an accumulation window of {accumulate}: use val_every_n_steps instead"
        )
    counted = isinstance(lightning_interval, int) and not isinstance(lightning_interval, bool)
    if counted and lightning_interval % accumulate:
        raise ConfigError(
            f"trainer.val_check_interval={lightning_interval} micro-batches is not a multiple of the accumulation "
            f"({accumulate}): validation would land inside an optimizer step; use val_every_n_steps instead"
        )
    return {}


def check_combination(cfg: DictConfig) -> None:
    """Refuse, before anything loads, what cannot run: GPU-only strategies on CPU, sharding a quantized base."""
    strategy, quant = cfg.strategy, cfg.quant.mode
    accel = str(cfg.trainer.accelerator)
    has_gpu = torch.cuda.is_available()
    if accel in ("gpu", "cuda") and not has_gpu:
        raise ConfigError(f"trainer.accelerator={accel} but this machine has no CUDA GPU: use trainer=cpu")
    if strategy.gpu_only and (accel == "cpu" or not has_gpu):
        raise ConfigError(
            f"strategy={strategy.name} runs only on CUDA GPUs (Lightning refuses it on CPU); "
            "use strategy=ddp (or auto) here"
        )
    precision, dtype = str(cfg.trainer.precision), str(cfg.model.dtype or "float32")
    autocast = {"16-mixed": "float16", "bf16-mixed": "bfloat16"}.get(precision)
    if autocast and dtype in ("float16", "bfloat16") and dtype != autocast:
        raise ConfigError(
            f"trainer.precision={precision} over a {dtype} base casts every frozen weight to {autocast} on each "
            f"forward and keeps the copies for backward (+25 GB on 12.8b): use model.dtype={autocast} or "
            f"trainer.precision={'bf16-mixed' if dtype == 'bfloat16' else '16-mixed'}"
        )
    loss = cfg.loss
    if loss.head_only:
        check_loss_impl(str(loss.impl), accel)
    if strategy.shards_params and quant != "none":
        raise ConfigError(
            f"strategy={strategy.name} shards the base weights, which bitsandbytes {quant} weights cannot be; "
            "use quant=none (bf16 base) or strategy=ddp / deepspeed_zero2"
        )


def build_strategy(cfg: DictConfig) -> Any:
    impl = cfg.strategy.impl
    return impl if isinstance(impl, str) else instantiate(impl)
