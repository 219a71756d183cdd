"""A progress bar over the whole run, not one per epoch: optimizer step of total, ETA, loss, lr and tokens/s."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class RunProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps over the whole run (a resumed run starts where it stopped);
    validation keeps its own bar."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=int(total) if total != float("inf") else None)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train (optimizer steps)")
        self._step = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # one bar for the run: nothing restarts at an epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._step or self.train_progress_bar.disable:
            return
        self._step = trainer.global_step
        self.train_progress_bar.n = trainer.global_step
        self._show_metrics(trainer)
        if self._step % max(self.refresh_rate, 1) == 0:
            self.train_progress_bar.refresh()

    def _show_metrics(self, trainer: L.Trainer) -> None:
        metrics = trainer.callback_metrics
        postfix = {"epoch": trainer.current_epoch}
        for key, name, fmt in (
            ("train/loss", "loss", "{:.4f}"),
            ("val/loss", "val_loss", "{:.4f}"),
            ("val/rewards/accuracy", "val_acc", "{:.3f}"),  # preference objectives (objective=dpo, …)
            ("train/rewards/margin", "margin", "{:.3f}"),
            ("lr", "lr", "{:.2e}"),
            ("train/tokens_per_s", "tok/s", "{:,.0f}"),
        ):
            if key in metrics:
                postfix[name] = fmt.format(float(metrics[key]))
        self.train_progress_bar.set_postfix(postfix, refresh=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        pass  # the bar runs on into the next epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if self._train_progress_bar is not None and not self.train_progress_bar.disable and not trainer.sanity_checking:
            self._show_metrics(trainer)  # this validation's val_loss, also when it is the run's last
            self.train_progress_bar.refresh()
