"""Jobs that survive preemption and time limits: resuming a run folder's own ``last`` checkpoint, and requeueing a
SLURM job that received its pre-timeout signal (after :class:`~kullm.training.checkpointing.GracefulStop` saved
``last`` at an optimizer-step boundary)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# What a cluster sends before the time limit: SIGUSR1 (`sbatch --signal=USR1@<s>`, Lightning's requeue signal) or
# SIGUSR2 (what submitit asks SLURM for)
PRE_TIMEOUT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


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
