"""``kullm-train``: LoRA instruction tuning with Lightning, configured by Hydra.

    kullm-train experiment=smoke
    kullm-train experiment=kullm-v2-polyglot-12.8b strategy=deepspeed_zero2 trainer.devices=4
    kullm-train -m experiment=smoke hparams_search=lora_sweep

``train(cfg)`` runs seed → tokenizer → data → model → logger → callbacks → trainer → fit → final adapter, and
returns the final metrics. Every save leaves an adapter folder loadable by ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, ListConfig

from kullm.config import CONF_DIR, ConfigError, check_overrides, redact, validate
from kullm.records import DataError

log = logging.getLogger(__name__)


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes that will train: devices per node × nodes (``auto`` counts visible GPUs, else 1)."""
    devices, accel = trainer_cfg.get("devices", 1), str(trainer_cfg.get("accelerator", "auto"))
    if isinstance(devices, (list, ListConfig)):
        n = len(devices)
    elif str(devices) in ("auto", "-1"):
        n = torch.cuda.device_count() if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
    else:
        n = int(devices)
    return max(1, n) * int(trainer_cfg.get("num_nodes", 1))


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


def check_combination(cfg: DictConfig) -> None:
    """Refuse, before anything loads, what cannot run: GPU-only strategies on CPU, sharding a quantized base."""
    strategy, quant = cfg.strategy, cfg.quant.get("mode", "none")
    accel = str(cfg.trainer.get("accelerator", "auto"))
    has_gpu = torch.cuda.is_available()
    if accel in ("gpu", "cuda") and not has_gpu:
        raise ConfigError(f"trainer.accelerator={accel} but this machine has no CUDA GPU: use trainer=cpu")
    if strategy.get("gpu_only") and (accel == "cpu" or not has_gpu):
        raise ConfigError(
            f"strategy={strategy.name} runs only on CUDA GPUs (Lightning refuses it on CPU); "
            "use strategy=ddp (or auto) here"
        )
    if strategy.get("shards_params") and quant != "none":
        raise ConfigError(
            f"strategy={strategy.name} shards the base weights, which bitsandbytes {quant} weights cannot be; "
            "use quant=none (bf16 base) or strategy=ddp / deepspeed_zero2"
        )


def build_strategy(cfg: DictConfig) -> Any:
    impl = cfg.strategy.impl
    return impl if isinstance(impl, str) else instantiate(impl)


def build_loggers(cfg: DictConfig, out: Path, model=None) -> list:
    """The ``logger=`` group: W&B (offline without a key), CSV, or none; the redacted config is logged."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    lc = cfg.logger
    if lc.name == "none":
        return []
    if lc.name == "csv":
        logger = CSVLogger(save_dir=str(out), name="csv", version="")
    elif lc.name == "wandb":
        mode = wandb_mode(lc.get("mode", "auto"))
        logger = WandbLogger(
            project=lc.project,
            entity=lc.get("entity"),
            name=lc.get("run_name"),
            group=lc.get("group"),
            tags=list(lc.get("tags") or []),
            save_dir=str(out),
            offline=mode == "offline",
            mode=mode,
        )
        if lc.get("watch") and model is not None:
            logger.watch(model, log=lc.watch, log_freq=int(lc.get("watch_log_freq", 100)))
    else:
        raise ConfigError(f"logger.name must be wandb, csv or none, got {lc.name!r}")
    logger.log_hyperparams(redact(cfg))
    return [logger]


def wandb_mode(mode: str) -> str:
    """``auto``: online with an API key (environment or ``wandb login``), else offline. ``WANDB_MODE`` wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def build_callbacks(cfg: DictConfig, out: Path, tokenizer, prompter, has_val: bool) -> list[L.Callback]:
    from lightning.pytorch.callbacks import EarlyStopping

    from kullm.callbacks import GenerationSamples
    from kullm.checkpointing import AdapterCheckpoint

    cc = cfg.callbacks.checkpoint
    monitor = cc.get("monitor") if has_val else None
    callbacks: list[L.Callback] = [
        AdapterCheckpoint(
            dirpath=str(out / "checkpoints"),
            filename="step={step:06d}-val_loss={val/loss:.4f}" if monitor else "step={step:06d}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=cc.get("mode", "min"),
            save_top_k=int(cc.save_top_k) if monitor else 1,
            save_last=bool(cc.get("save_last", True)),
            every_n_train_steps=cc.get("every_n_train_steps"),
            tokenizer=tokenizer,
            prompter=prompter,
            config=cfg,
        )
    ]
    samples = cfg.callbacks.get("samples") or {}
    if has_val and int(samples.get("num", 0)) > 0:
        callbacks.append(GenerationSamples(tokenizer, out, int(samples.num), int(samples.get("max_new_tokens", 64))))
    if cfg.callbacks.get("early_stopping") and has_val:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", **cfg.callbacks.early_stopping))
    return callbacks


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says; return the final metrics, the adapter folder, the trainer and the module."""
    from kullm.checkpointing import AtomicCheckpointIO, export_adapter
    from kullm.datamodule import KullmDataModule
    from kullm.modeling import build_peft_model, load_tokenizer
    from kullm.module import KullmLitModule
    from kullm.templates import Prompter

    validate(cfg)
    check_combination(cfg)
    world = world_size(cfg.trainer)
    accumulate = accumulation(int(cfg.batch_size), int(cfg.micro_batch_size), world)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    tokenizer = load_tokenizer(cfg.model)
    prompter = Prompter.from_config(cfg.template)
    datamodule = KullmDataModule(
        cfg.data,
        tokenizer,
        prompter,
        micro_batch_size=int(cfg.micro_batch_size),
        sampler=cfg.sampler,
        num_workers=int(cfg.num_workers),
        seed=int(cfg.seed),
        pad_to_multiple_of=int(cfg.pad_to_multiple_of),
    )
    model = build_peft_model(cfg.model, cfg.lora, cfg.quant, gradient_checkpointing=bool(cfg.gradient_checkpointing))
    module = KullmLitModule(model, optim=cfg.optim, loss=cfg.get("loss"))
    has_val = int(cfg.data.get("val_set_size", 0)) > 0
    loggers = build_loggers(cfg, out, model)
    trainer_kwargs: dict[str, Any] = {}
    if not has_val:
        trainer_kwargs["limit_val_batches"] = 0
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        accumulate_grad_batches=accumulate,
        strategy=build_strategy(cfg),
        logger=loggers or False,
        callbacks=[*build_callbacks(cfg, out, tokenizer, prompter, has_val), *extra_callbacks],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # kullm's samplers shard by rank themselves (and resume mid-epoch)
        default_root_dir=str(out),
        **trainer_kwargs,
    )
    trainable, total = _count(model)
    rank_zero_info(
        f"kullm-train: effective batch {cfg.batch_size} = micro-batch {cfg.micro_batch_size} × {world} "
        f"device(s) × {accumulate} accumulation step(s)\n"
        f"kullm-train: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.4f}%)\n"
        f"kullm-train: output dir {out}"
    )
    # kullm's module skips the batches an interrupted epoch trained (KullmDataModule.resume_at), so Lightning's
    # "dataloader is not resumable" warning does not apply
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    adapter = export_adapter(trainer, out / "adapter", tokenizer=tokenizer, prompter=prompter, config=cfg)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        rank_zero_info(f"kullm-train: adapter saved to {adapter}")
        _finish_wandb(loggers)
    return {
        "metrics": metrics,
        "adapter": str(out / "adapter"),
        "output_dir": str(out),
        "trainer": trainer,
        "module": module,
    }


def _count(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _finish_wandb(loggers: list) -> None:
    """Close the W&B run (so each job of a sweep is its own run) and say how to upload an offline one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            offline = getattr(run, "settings", None) is not None and run.settings.mode == "offline"
            run_dir = Path(run.dir).parent if offline else None
            run.finish()
            if run_dir is not None:
                rank_zero_info(f"kullm-train: W&B ran offline; upload with: wandb sync {run_dir}")


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        result = train(cfg)
    except (ConfigError, DataError) as e:
        raise SystemExit(f"kullm-train: {e}") from None
    val = result["metrics"].get("val/loss")
    return None if val is None or math.isnan(val) else val


def main() -> None:
    """Console entry point: catch misspelled keys (with the nearest valid one) before Hydra runs."""
    try:
        check_overrides("train", sys.argv[1:])
    except ConfigError as e:
        raise SystemExit(f"kullm-train: {e}") from None
    _hydra_main()


if __name__ == "__main__":
    main()
