"""Experiment loggers: W&B (offline without a key), CSV or none, and closing a W&B run cleanly."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from kullm.config import ConfigError
from kullm.redaction import redact, redact_args


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
        name, group = run_label(cfg)
        logger = WandbLogger(
            project=lc.project,
            entity=lc.get("entity"),
            name=lc.get("run_name") or name,
            group=lc.get("group") or group,
            tags=list(lc.get("tags") or []),
            save_dir=str(out),
            offline=mode == "offline",
            mode=mode,
            id=wandb_run_id(out),
            resume="allow",  # a resumed run (same folder) continues its W&B run instead of starting a second one
        )
        if lc.get("watch") and model is not None:
            logger.watch(model, log=lc.watch, log_freq=int(lc.get("watch_log_freq", 100)))
    else:
        raise ConfigError(f"logger.name must be wandb, csv or none, got {lc.name!r}")
    with redacted_argv():  # W&B records the command line when the run starts: never with a credential in it
        logger.log_hyperparams(redact(cfg))
    return [logger]


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
        return cfg.get("run_name"), None
    parts = [o for o in redact_args(list(hc.overrides.task)) if not o.startswith(_NOT_IN_NAME)]
    name = cfg.get("run_name") or " ".join([hc.runtime.choices.get("experiment") or "train", *parts])[:128]
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
