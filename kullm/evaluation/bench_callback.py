"""``callbacks.bench=ko_quick``: kullm-bench on the adapter being trained, at the end of training (and every N
validations), its main metrics logged as ``bench/<task>`` to the progress bar, the loggers (W&B, CSV) and the run's
``result.json`` — where a sweep's summary and its Optuna objective (``sweep_metric=bench/<task>``) find them.

It lives with evaluation (it runs the benchmark harness) and is given to the trainer by ``kullm-train``, so training
never imports evaluation. It scores the module's own model in memory, on rank zero, with the adapter applied as
trained (never merged): one process holding the whole model (one device, or DDP), not a sharded one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from kullm.evaluation.bench_model import BenchModel

log = logging.getLogger(__name__)
SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")  # strategies whose ranks each hold a part of the model


def bench_config(suite: str, limit: int | None, overrides: list[str] | None, output_dir: Path) -> DictConfig:
    """The kullm-bench config a training run scores with (``conf/bench.yaml`` with these overrides)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from kullm.config import compose, validate

    args = [f"suite={suite}", f"output_dir={output_dir}"]
    if limit is not None:
        args.append(f"limit={int(limit)}")
    args += overrides or []
    if GlobalHydra.instance().is_initialized():  # inside kullm-train's own @hydra.main: the same config tree
        cfg = hydra.compose(config_name="bench", overrides=args)
    else:
        cfg = compose("bench", args)
    validate(cfg)
    return cfg


class BenchCallback(L.Callback):
    """Scores the training model on a kullm-bench suite; its main metrics become ``bench/<task>``."""

    def __init__(
        self,
        suite: str,
        output_dir: str | Path,
        tokenizer: Any,
        prompter: Any,
        *,
        every_n_validations: int = 0,
        limit: int | None = None,
        overrides: list[str] | None = None,
        base: str = "",
    ) -> None:
        from kullm.evaluation.harness import check_names, suite_entries

        self.out = Path(output_dir)
        self.cfg = bench_config(suite, limit, overrides, self.out / "bench")
        self.entries = suite_entries(self.cfg)
        check_names(self.entries, self.cfg)  # an unknown task fails here, before training starts
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.every = int(every_n_validations or 0)
        self.base = base
        self.validations = 0
        self.last: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from kullm.errors import KullmError

        kind = type(trainer.strategy).__name__
        if any(s in kind for s in SHARDED):
            raise KullmError(
                f"callbacks.bench={self.cfg.suite.name}: the {kind} shards the model, so no one rank can score it: "
                "drop callbacks.bench and run kullm-bench on the saved adapter"
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every <= 0:
            return
        self.validations += 1
        if self.validations % self.every:
            return
        values = self.score(trainer, pl_module, f"step{trainer.global_step:06d}")
        for key, value in values.items():
            pl_module.log(key, value, prog_bar=True, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        values = self.score(trainer, pl_module, "final")
        if values and trainer.is_global_zero:
            trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
                logger.save()

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict[str, float]:
        """Run the suite on the module's model (rank zero); ``{bench/<name>: main metric}``."""
        import torch

        from kullm.evaluation.bench_model import describe
        from kullm.evaluation.bench_report import write_results
        from kullm.evaluation.harness import run_entries

        if not trainer.is_global_zero:
            return {}
        model = pl_module.model
        was_training = model.training
        model.eval()
        bm = BenchModel(
            model=model,
            tokenizer=self.tokenizer,
            name=self.out.name,
            path=str(self.out),
            adapter=str(self.out / "adapter"),
            base=self.base,
            hashes={"model": None, "adapter": None},
            prompter=self.prompter,
        )
        out = self.out / "bench" / tag
        try:
            with torch.no_grad():
                results = run_entries(self.entries, bm, self.cfg, out)
        finally:
            model.train(was_training)
        settings = {"step": trainer.global_step, "limit": self.cfg.limit, "batch_size": self.cfg.batch_size}
        write_results(out, describe(bm), str(self.cfg.suite.name), settings, results)
        values = {
            f"bench/{name}": float(r["metrics"][r["main"]]) for name, r in results.items() if r["main"] in r["metrics"]
        }
        self.last = values
        log.info("kullm-train: %s", ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        return values
