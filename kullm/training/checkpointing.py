"""Checkpoints a user keeps: an adapter folder beside every Lightning checkpoint, written atomically.

* :class:`AdapterCheckpoint` — Lightning's ``ModelCheckpoint`` (best k by ``val/loss`` + last) that also writes
  ``<checkpoint name>/`` as a PEFT adapter folder (a full model folder under ``lora=none``; see :mod:`kullm.adapter`)
  and removes it with its checkpoint.
* :class:`AtomicCheckpointIO` — writes ``.ckpt`` files to a temporary name and renames them, so a crash while
  writing never destroys the previous checkpoint.
* :func:`adapter_state` — the adapter weights, gathered from every rank under sharded strategies.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kullm.adapter import clean_name, save_adapter, save_model
from kullm.atomic import clean_stale, rewrite, write_folder
from kullm.errors import KullmError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary sibling then ``os.replace``: the old file stays whole until the new one is."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)
        with rewrite(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def adapter_state(trainer: L.Trainer, model) -> dict[str, Any] | None:
    """The trainable weights by name on global rank 0 (``None`` elsewhere), gathered when sharded.

    For a ``PeftModel``: a partial state dict with plain names (no wrapper segments), which
    ``PeftModel.save_pretrained(state_dict=...)`` accepts. For a fully fine-tuned model: its gathered state dict when
    sharded, else ``None`` (the model saves its own weights, with no copy).
    """
    from kullm.training.fsdp import LoraFSDPStrategy

    strategy = trainer.strategy
    peft = is_peft(model)
    if isinstance(strategy, LoraFSDPStrategy):
        state = strategy.trainable_state()  # plain names relative to the LightningModule ("model.base_model...")
        if not trainer.is_global_zero:
            return None
        if not peft:
            return {k.removeprefix("model."): v for k, v in state.items()}
        # PEFT finds the adapter's weights by the (wrapped) module tree: hand them over under those names;
        # save_adapter writes them under the plain ones
        wrapped = {n: clean_name(f"model.{n}") for n, p in model.named_parameters() if p.requires_grad}
        return {n: state[c] for n, c in wrapped.items()}
    if type(strategy).__name__.startswith("FSDP"):
        raise TypeError("plain FSDPStrategy gathers the whole base to save: use strategy=fsdp (LoraFSDPStrategy)")

    def trainable() -> dict[str, Any]:  # by state-dict name: a tied weight under each of its names
        return {n: p.detach().cpu().clone() for n, p in model.state_dict(keep_vars=True).items() if p.requires_grad}

    if type(strategy).__name__.startswith("DeepSpeed") and getattr(strategy, "zero_stage_3", False):
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return trainable() if trainer.is_global_zero else None
    if not peft:
        return None
    return trainable() if trainer.is_global_zero else None


def is_peft(model) -> bool:
    """Whether ``model`` trains an adapter (else: full fine-tuning)."""
    return hasattr(model, "peft_config")


class AdapterCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes a PEFT adapter folder next to each ``.ckpt`` (``best-…/``, ``last/``)."""

    def __init__(self, *, tokenizer=None, prompter=None, config=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tokenizer, self.prompter, self.config = tokenizer, prompter, config
        self._last_step = -1  # the optimizer step ``last`` holds

    # Lightning rewrites ``last`` only when a top-k save happens, so after a validation that is not among the best
    # k, ``last.ckpt`` silently stays at an older step. kullm keeps ``last`` at the latest step at every save point:
    # each ``every_n_train_steps``, each validation, each epoch end and the end of fit.

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None) -> str:
        # before the first validation the monitored metric does not exist: no invented "val_loss_0.0000" in names
        if filename is None and self.monitor and self.monitor not in metrics:
            filename = "step{step:06d}"
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step = trainer.global_step

    def refresh_last(self, trainer: L.Trainer) -> None:
        """Write ``last`` (checkpoint + adapter) for the current optimizer step unless it already holds it."""
        if not self.save_last or trainer.sanity_checking or trainer.fast_dev_run or trainer.global_step == 0:
            return
        if self._last_step != trainer.global_step:
            # Lightning's own "already saved at this step" markers are left as they were, so that a top-k save due
            # at this same step (a validation right after a periodic save) still happens
            marks = self._last_global_step_saved, self._last_checkpoint_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved, self._last_checkpoint_saved = marks

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            # mid-window: no optimizer step since the last save point, and a checkpoint here would hold a partial
            # window that no checkpoint can carry. (Lightning does not restore its "saved at this step" marker, so
            # a resumed run's first micro-batch would otherwise save the restored step again, one batch further.)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self._every_n_train_steps
        if every and trainer.global_step % every == 0:
            self.refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else Lightning saves at the epoch end, next
            self.refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self.refresh_last(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_step = int(state_dict.get("last_step", -1))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # the adapter first, the .ckpt last: a kill in between leaves the adapter a step ahead of the checkpoint
        # (resuming retrains that step and rewrites it identically), never a checkpoint ahead of its adapter
        export_adapter(
            trainer, adapter_dir(filepath), tokenizer=self.tokenizer, prompter=self.prompter, config=self.config
        )
        super()._save_checkpoint(trainer, filepath)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            shutil.rmtree(adapter_dir(filepath), ignore_errors=True)


def adapter_dir(ckpt_path: str | Path) -> Path:
    """``…/epoch=1-step=20.ckpt`` → ``…/epoch=1-step=20/`` (``last.ckpt`` → ``last/``)."""
    p = Path(ckpt_path)
    return p.with_name(p.name.removesuffix(".ckpt"))


def copy_adapter(source: Path, folder: str | Path) -> Path:
    """Copy a saved adapter folder to ``folder`` (rank 0), replacing it only once the copy is whole."""
    return write_folder(folder, lambda tmp: shutil.copytree(source, tmp))


def export_adapter(trainer: L.Trainer, folder: str | Path, **meta) -> Path | None:
    """Gather the adapter from every rank and write it (rank 0) as a verified PEFT folder (a model folder when fully
    fine-tuned); collective call."""
    model = trainer.lightning_module.model
    state = adapter_state(trainer, model)
    path = None
    if trainer.is_global_zero:
        path = (save_adapter if is_peft(model) else save_model)(model, folder, state_dict=state, **meta)
    trainer.strategy.barrier("export_adapter")
    return path


class Diverged(KullmError, RuntimeError):
    """The loss or the gradient norm of an optimizer step is not finite: training stopped before that step, so
    nothing written since holds its weights."""
