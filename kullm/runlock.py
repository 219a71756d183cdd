"""One process per run folder: ``kullm-train`` and ``kullm-eval`` hold an exclusive lock on their output folder.

Two trainings in one run folder would both write ``last.ckpt`` (Lightning then adds ``last-v1.ckpt``) and both
report success; two evaluations in one ``output_dir`` would judge every id twice. The lock is ``flock`` on
``<folder>/.kullm.lock``, which holds the owner's PID: the OS releases it when the process ends, however it ends
(a kill, a requeue), so a stale lock file never blocks the next run. Under DDP/FSDP only the launching process
(global rank 0) takes it: the other ranks work in the same folder on its behalf.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kullm.errors import KullmError

LOCK_NAME = ".kullm.lock"
# What launchers set in the processes they start (torchrun, Lightning's own launcher, SLURM, multi-node runs)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


class RunLocked(KullmError, RuntimeError):
    """Another live process holds the folder."""


def is_launching_process() -> bool:
    """Whether this process is global rank 0 (or not started by a multi-process launcher at all)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def hold(folder: str | Path) -> IO[bytes] | None:
    """Lock ``folder`` for this process and return the open lock file (closing it releases the lock); ``None``
    on ranks other than 0. Raise :class:`RunLocked` naming the holder's PID, ``OSError`` if the folder cannot be
    written."""
    if not is_launching_process():
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a lock file planted as a link never gets another file truncated
    f = os.fdopen(os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+b")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read(32).decode(errors="replace").strip() or "unknown"
        f.close()
        raise RunLocked(
            f"{folder} is in use by another run (PID {holder}); wait for it to end, or give this one another folder"
        ) from None
    f.truncate(0)
    f.seek(0)
    f.write(f"{os.getpid()}\n".encode())
    f.flush()
    return f


class RunFolderLock(Callback):
    """A Hydra callback: holds the run folder (``hydra.run.dir``) from before Hydra writes into it to the end of
    the run, and refuses a folder in use or one that cannot be written in one line."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self._held: IO[bytes] | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir)).absolute()
        try:
            self._held = hold(folder)
        except RunLocked as e:
            raise SystemExit(f"{self.prog}: {e}") from None  # Hydra turns an Exception here into a warning
        except OSError as e:
            raise SystemExit(f"{self.prog}: cannot write to the output folder {folder}: {e.strerror or e}") from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
