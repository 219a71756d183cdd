"""Experiment loggers: W&B (offline without a key) with a CSV beside it, CSV or none; closing a W&B run cleanly."""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from kullm.atomic import rewrite
from kullm.config import ConfigError
from kullm.redaction import redact, redact_args
from kullm.wandb_mode import wandb_mode


def build_loggers(cfg: DictConfig, out: Path, model=None) -> list:
    """The ``logger=`` group: W&B (offline without a key) and CSV, CSV alone, or none; the redacted config is
    logged."""
    from lightning.pytorch.loggers import WandbLogger

    lc = cfg.logger
    if lc.name == "none":
        return []
    loggers: list = [MetricsCSV(out)]  # W&B's files are not plain text: the curve is kept as CSV beside them
    if lc.name == "wandb":
        mode = wandb_mode(lc.mode)
        name, group = run_label(cfg)
        logger = WandbLogger(
            project=lc.project,
            entity=lc.entity,
            name=lc.run_name or name,
            group=lc.group or group,
            tags=list(lc.tags or []),
            save_dir=str(out),
            offline=mode == "offline",
            mode=mode,
            id=wandb_run_id(out),
            resume="allow",  # a resumed run (same folder) continues its W&B run instead of starting a second one
        )
        # Lightning always passes anonymous=None to wandb.init, which W&B (0.31) answers with a deprecation
        # warning whatever the value: the setting does nothing, so it is not passed at all
        logger._wandb_init.pop("anonymous", None)
        if lc.watch and model is not None:
            logger.watch(model, log=lc.watch, log_freq=int(lc.watch_log_freq))
        loggers.insert(0, logger)  # the trainer's main logger
    elif lc.name != "csv":
        raise ConfigError(f"logger.name must be wandb, csv or none, got {lc.name!r}")
    with redacted_argv():  # W&B records the command line when the run starts: never with a credential in it
        for logger in loggers:
            logger.log_hyperparams(redact(cfg))
    return loggers


class MetricsCSV(CSVLogger):
    """``<out>/csv/metrics.csv``, continued across the attempts of a run folder (see :class:`_ContinuedWriter`)."""

    def __init__(self, out: Path) -> None:
        super().__init__(save_dir=str(out), name="csv", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuedWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment


_NOT_METRICS = ("step", "epoch")


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, but a resumed run keeps the rows its earlier attempts wrote: a metric's earlier rows
    are dropped only from the first step this attempt logs it at (the steps it trains again), so each step of the
    curve appears once."""

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here
        self.earlier = _read_metrics(self.metrics_file_path)
        self.current: list[dict] = []
        self.restarted: dict[str, int] = {}  # metric → the first step this attempt logged it at
        self.metrics_keys = sorted(set().union(*self.earlier))

    def save(self) -> None:
        if not self.metrics:
            return
        rows, self.metrics = self.metrics, []
        self.current += rows
        restarted: dict[str, int] = {}
        for row in rows:
            for key in row:
                if key not in _NOT_METRICS and key not in self.restarted:
                    restarted.setdefault(key, int(row["step"]))
        keys = sorted(set(self.metrics_keys).union(*rows))
        if self.earlier and restarted:
            self.earlier = [r for r in (_trim(r, restarted) for r in self.earlier) if r.keys() - set(_NOT_METRICS)]
        self.restarted |= restarted
        if keys != self.metrics_keys or (self.earlier and restarted) or not self._fs.isfile(self.metrics_file_path):
            self.metrics_keys = keys
            _write_metrics(Path(self.metrics_file_path), keys, self.earlier + self.current)
        else:
            with open(self.metrics_file_path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=keys).writerows(rows)


def _trim(row: dict, restarted: dict[str, int]) -> dict:
    """``row`` without the metrics logged again from its step on."""
    step = int(float(row["step"]))
    return {k: v for k, v in row.items() if not (k in restarted and step >= restarted[k])}


def _read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _write_metrics(path: Path, keys: list[str], rows: list[dict]) -> None:
    """The whole file, replaced at once: a kill mid-write leaves the previous one."""
    with rewrite(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


WANDB_ID_FILE = "wandb_run_id"
# overrides that say where or how a run is stored, not what it trains
_NOT_IN_NAME = ("experiment=", "hparams_search=", "hydra.", "hydra/", "output_dir=", "run_name=", "ckpt_path=",
                "data.cache_dir=", "logger", "auto_resume=")  # fmt: skip


def run_label(cfg: DictConfig) -> tuple[str | None, str | None]:
    """A W&B run name — ``run_name``, else the experiment and the overrides that change what is trained — and, in
    a multirun, a group named after the sweep folder."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get() if HydraConfig.initialized() else None
    except ImportError:
        hc = None
    if hc is None:
        return cfg.run_name, None
    parts = [o for o in redact_args(list(hc.overrides.task)) if not o.startswith(_NOT_IN_NAME)]
    name = cfg.run_name or " ".join([hc.runtime.choices.get("experiment") or "train", *parts])[:128]
    group = Path(str(hc.sweep.dir)).name if hc.mode == RunMode.MULTIRUN else None
    return name, group


def log_adapter_artifact(loggers: list, adapter: Path) -> None:
    """Log the final adapter folder as a W&B model artifact when the run is online."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            if getattr(run, "settings", None) is None or run.settings.mode != "online":
                continue
            artifact = wandb.Artifact(name=f"adapter-{run.id}", type="model")
            artifact.add_dir(str(adapter))
            run.log_artifact(artifact)


def wandb_run_id(out: Path) -> str:
    """The W&B run id of this run folder: made and stored (``<out>/wandb_run_id``) by its first attempt, read back
    by a resumed one."""
    import secrets
    import string

    from lightning.pytorch.utilities import rank_zero_only

    path = Path(out) / WANDB_ID_FILE
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        return path.read_text(encoding="utf-8").strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id shape
    if rank_zero_only.rank == 0:  # other ranks log nothing to W&B
        path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    saved = sys.argv[:]
    sys.argv[1:] = redact_args(saved[1:])
    try:
        yield
    finally:
        sys.argv[:] = saved


def finish_wandb(loggers: list) -> None:
    """Close the W&B run (so each job of a sweep is its own run), wait until W&B's service has written (or uploaded)
    everything, and say how to upload an offline run."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            offline = getattr(run, "settings", None) is not None and run.settings.mode == "offline"
            run_dir = Path(run.dir).parent if offline else None
            run.finish()
            wandb.teardown()  # the service writes the run file asynchronously: wait for it before anyone reads it
            if run_dir is not None:
                rank_zero_info(f"kullm-train: W&B ran offline; upload with: wandb sync {run_dir}")
