"""Jobs that survive signals, preemption and time limits: stopping on a signal at an optimizer-step boundary with
``last`` saved (:class:`GracefulStop`, then :class:`Interrupted`), resuming a run folder's own ``last`` checkpoint,
and requeueing a SLURM job that received its pre-timeout signal."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from kullm.errors import KullmError
from kullm.training.checkpointing import AdapterCheckpoint

# What a cluster sends before the time limit: SIGUSR1 (`sbatch --signal=USR1@<s>`, Lightning's requeue signal) or
# SIGUSR2 (what submitit asks SLURM for)
PRE_TIMEOUT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(KullmError, RuntimeError):
    """Training stopped on a signal (Ctrl-C, SIGTERM, SLURM's pre-timeout SIGUSR1/2) after saving ``last`` at an
    optimizer-step boundary."""

    def __init__(self, signum: int, step: int, last: str | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; last checkpoint: {last}")
        self.signum, self.step, self.last = signum, step, last


class GracefulStop(L.Callback):
    """On Ctrl-C, SIGTERM or a cluster's pre-timeout SIGUSR1/SIGUSR2, finish the optimizer step in progress, write
    ``last`` and stop.

    Lightning's own handling stops at the next micro-batch (inside a gradient-accumulation window, whose partial
    gradient no checkpoint holds) and saves nothing; a second Ctrl-C stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = self.signum is not None
        if trainer.world_size > 1:  # every rank stops at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self.signum = self.signum or signal.SIGTERM
        for cb in trainer.callbacks:
            if isinstance(cb, AdapterCheckpoint):
                cb.refresh_last(trainer)
                # nothing saves this step again: what Lightning runs on its way out (validation, the "epoch end",
                # save_last at train end) would rewrite `last` as if the epoch had ended, and a resume would then
                # skip the epoch's remaining batches
                cb._last_global_step_saved, cb._last_checkpoint_saved = trainer.global_step, cb.last_model_path
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def own_last_checkpoint(out: str | Path) -> Path | None:
    """``<run folder>/checkpoints/last.ckpt`` if an earlier attempt of this run left one."""
    last = Path(out) / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def requeue(trainer: L.Trainer, signum: int | None) -> str | None:
    """Put this SLURM job back in the queue after a pre-timeout signal, as Lightning's ``SLURMEnvironment(
    auto_requeue=True)`` does (global rank zero runs ``scontrol requeue``); return the job id, or None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    # the environment Lightning itself consults to requeue (a single-device strategy carries none)
    env = getattr(trainer._accelerator_connector, "cluster_environment", None)
    if signum not in PRE_TIMEOUT_SIGNALS or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
        return None
    if not trainer.is_global_zero:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        rank_zero_warn(f"kullm-train: could not requeue SLURM job {job}: {e}")
        return None
    if result.returncode != 0:
        rank_zero_warn(f"kullm-train: scontrol requeue {job} failed: {' '.join(result.stderr.split())}")
        return None
    rank_zero_info(f"kullm-train: requeued SLURM job {job}; it resumes from its last checkpoint")
    return job
