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
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from kullm.cli import run_cli
from kullm.config import ConfigError, validate
from kullm.console import mirror_to_run_log, quiet_third_party

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig, out: Path, tokenizer, prompter, has_val: bool) -> list[L.Callback]:
    from lightning.pytorch.callbacks import EarlyStopping

    from kullm.training.checkpointing import AdapterCheckpoint
    from kullm.training.progress import RunProgressBar
    from kullm.training.samples import GenerationSamples

    cc = cfg.callbacks.checkpoint
    monitor = cc.monitor if has_val else None
    callbacks: list[L.Callback] = [
        AdapterCheckpoint(
            dirpath=str(out / "checkpoints"),
            # no '=' in names: `ckpt_path=<that path>` must parse unquoted on Hydra's command line
            filename="step{step:06d}-val_loss_{val/loss:.4f}" if monitor == "val/loss" else "step{step:06d}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=cc.mode,
            save_top_k=int(cc.save_top_k) if monitor else 1,
            save_last=bool(cc.save_last),
            every_n_train_steps=cc.every_n_train_steps,
            tokenizer=tokenizer,
            prompter=prompter,
            config=cfg,
        )
    ]
    samples = cfg.callbacks.samples
    if has_val and samples is not None and int(samples.num) > 0:  # callbacks.samples=null: off, as num=0
        callbacks.append(GenerationSamples(tokenizer, out, int(samples.num), int(samples.max_new_tokens)))
    if cfg.callbacks.early_stopping and has_val:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", **cfg.callbacks.early_stopping))
    if cfg.callbacks.bench:  # kullm-bench on the trained model: bench/<task> (an unknown task fails here, before fit)
        from kullm.evaluation.bench_callback import BenchCallback

        callbacks.append(
            BenchCallback(
                str(cfg.callbacks.bench),
                out,
                tokenizer,
                prompter,
                every_n_validations=int(cfg.callbacks.bench_every or 0),
                limit=cfg.callbacks.bench_limit,
                overrides=list(cfg.callbacks.bench_overrides or []),
                base=str(cfg.model.name_or_path),
            )
        )
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RunProgressBar())
    return callbacks


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says; return the final metrics, the adapter folder, the trainer and the module."""
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import rank_zero_info

    from kullm.data.datamodule import KullmDataModule
    from kullm.data.preference import check_layout
    from kullm.data.sources import check_source
    from kullm.modeling import build_trainable_model, full_finetuning, load_tokenizer
    from kullm.templates import Prompter
    from kullm.training.checkpointing import AtomicCheckpointIO, Diverged, copy_adapter, export_adapter
    from kullm.training.loggers import build_loggers, finish_wandb, log_adapter_artifact
    from kullm.training.module import KullmLitModule
    from kullm.training.preemption import GracefulStop, Interrupted, own_last_checkpoint, requeue
    from kullm.training.preflight import (
        accumulation,
        build_strategy,
        check_combination,
        validation_schedule,
        world_size,
    )
    from kullm.training.result import RunRecord
    from kullm.training.resume import RunIdentity, resolve_resume

    quiet_third_party()
    mirror_to_run_log()  # kullm's and Lightning's lines in the run's log file too
    validate(cfg)
    check_combination(cfg)
    check_source(cfg.data.path, cfg.data.source, cfg.data.missing_hint)
    cfg.data.kind = cfg.objective.data  # the objective decides what the rows are (data.kind is kullm-prepare's)
    check_layout(cfg.data)  # preference rows that cannot serve data.kind: one line, before any model loads
    world = world_size(cfg.trainer)
    accumulate = accumulation(int(cfg.batch_size), int(cfg.micro_batch_size), world)
    has_val = cfg.data.val_set_size > 0  # a count or a fraction
    trainer_kwargs = validation_schedule(cfg, accumulate) if has_val else {"limit_val_batches": 0}
    final = final_adapter_choice(cfg, has_val)
    ckpt_path = cfg.ckpt_path
    if not ckpt_path and cfg.auto_resume and own_last_checkpoint(cfg.output_dir):
        ckpt_path = own_last_checkpoint(cfg.output_dir)  # an earlier attempt of this run (preempted, requeued)
        rank_zero_info(f"kullm-train: resuming from this run folder's last checkpoint, {ckpt_path}")
    if ckpt_path:
        ckpt_path = resolve_resume(ckpt_path, cfg, bool(cfg.allow_resume_changes))
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
    model = build_trainable_model(
        cfg.model,
        cfg.lora,
        cfg.quant,
        gradient_checkpointing=bool(cfg.gradient_checkpointing),
        init_adapter=cfg.init_adapter,
        tokenizer=tokenizer,
    )
    from kullm.training.preference import PrecomputedReference, make_reference

    reference = make_reference(model, cfg.objective, init_adapter=cfg.init_adapter)
    module = KullmLitModule(model, optim=cfg.optim, loss=cfg.loss, objective=cfg.objective, reference=reference)
    if reference is not None and reference.kind == "precomputed":
        extra_callbacks = [
            PrecomputedReference(
                model_cfg=cfg.model,
                init_adapter=cfg.init_adapter,
                micro_batch_size=int(cfg.micro_batch_size),
                chunk_size=int(cfg.loss.chunk_size),
                head_only=bool(cfg.loss.head_only),
            ),
            *extra_callbacks,
        ]
    loggers = build_loggers(cfg, out, model)
    stopper = GracefulStop()
    record = RunRecord(out)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        accumulate_grad_batches=accumulate,
        strategy=build_strategy(cfg),
        logger=loggers or False,
        callbacks=[
            *build_callbacks(cfg, out, tokenizer, prompter, has_val),
            stopper,
            RunIdentity(cfg),
            record,
            *extra_callbacks,
        ],
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
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Diverged as e:  # nothing is saved on the way out: the checkpoints written before stay as they were
        raise Diverged(f"{e}; last checkpoint: {_last_checkpoint(trainer) or 'none'}") from None
    if stopper.signum is not None:  # no final adapter for an unfinished run: resume it from last
        record.write(trainer, "interrupted")
        requeue(trainer, stopper.signum)  # under SLURM after its pre-timeout signal: back in the queue
        if trainer.is_global_zero:
            finish_wandb(loggers)
        raise Interrupted(stopper.signum, trainer.global_step, _last_checkpoint(trainer))
    adapter = out / ("model" if full_finetuning(cfg.lora) else "adapter")  # lora=none: a full checkpoint
    best = _best_adapter(trainer) if final == "best" else None
    if best is not None:
        if trainer.is_global_zero:
            copy_adapter(best, adapter)
        trainer.strategy.barrier("final_adapter")
    else:
        export_adapter(trainer, adapter, tokenizer=tokenizer, prompter=prompter, config=cfg)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    record.write(trainer, "finished", adapter)
    if trainer.is_global_zero:
        source = f" (the best checkpoint, {best.name})" if best is not None else ""
        what = "adapter" if adapter.name == "adapter" else "model"
        log_adapter_artifact(loggers, adapter)
        finish_wandb(loggers)  # W&B's end-of-run summary first: the run's last line says where its result is
        rank_zero_info(f"kullm-train: {what} saved to {adapter}{source}")
    return {
        "metrics": metrics,
        "adapter": str(adapter),  # lora=none: the model folder
        "output_dir": str(out),
        "trainer": trainer,
        "module": module,
    }


def final_adapter_choice(cfg: DictConfig, has_val: bool) -> str:
    """``callbacks.checkpoint.final``: ``last`` (the weights at the end) or ``best`` (by the monitored metric)."""
    final = str(cfg.callbacks.checkpoint.final or "last")
    if final not in ("last", "best"):
        raise ConfigError(f"callbacks.checkpoint.final={final!r}: must be last or best")
    if final == "best" and not (has_val and cfg.callbacks.checkpoint.monitor):
        raise ConfigError("callbacks.checkpoint.final=best needs a validation set and callbacks.checkpoint.monitor")
    return final


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    from kullm.training.checkpointing import AdapterCheckpoint

    return next((cb.last_model_path for cb in trainer.callbacks if isinstance(cb, AdapterCheckpoint)), None)


def _best_adapter(trainer: L.Trainer) -> Path | None:
    """The adapter folder beside the best checkpoint, if a validation ever ranked one."""
    from kullm.training.checkpointing import AdapterCheckpoint, adapter_dir

    for cb in trainer.callbacks:
        if isinstance(cb, AdapterCheckpoint) and cb.best_model_path:
            folder = adapter_dir(cb.best_model_path)
            if folder.is_dir():
                return folder
    return None


def _count(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _job(cfg: DictConfig) -> float | None:
    """One ``kullm-train`` job: :func:`train`, returning ``sweep_metric`` (``val/loss``) for a sweeper (``None``
    without one). A run
    stopped by a signal exits with ``128 + signum`` after saying how to resume it."""
    from kullm.training.preemption import Interrupted

    try:
        result = train(cfg)
    except Interrupted as e:
        again = f" (or run the same command again: run_name={cfg.run_name})" if cfg.run_name else ""
        print(f"kullm-train: {e}; resume with ckpt_path={e.last}{again}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    val = result["metrics"].get(str(cfg.sweep_metric))  # val/loss, or bench/<task> with callbacks.bench
    return None if val is None or math.isnan(val) else val


def main() -> None:
    """``kullm-train``: see ``conf/train.yaml``."""
    run_cli("kullm-train", "train", _job)


if __name__ == "__main__":
    main()
