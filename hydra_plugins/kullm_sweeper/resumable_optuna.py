"""Optuna's Hydra sweeper, made to continue a stored study: the same command again finishes an interrupted search.

``hydra.sweeper.n_trials`` counts the study's trials in all (not those of this launch), and the jobs of a continued
search are numbered after the trials already stored, so their folders never overwrite an earlier trial's.
Credentials among the fixed overrides are stored in the study as ``<redacted>`` (Optuna records every fixed
override of a trial in its database); the jobs still get the real values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the `sweeps` extra is not installed: nothing to register
    OptunaSweeper = None

if OptunaSweeper is not None:

    class ResumableOptunaSweeper(OptunaSweeper):
        """``OptunaSweeper`` that resumes its stored study (``storage`` + ``study_name``)."""

        def setup(self, **kwargs: Any) -> None:
            super().setup(**kwargs)
            impl = self.sweeper
            impl._configure_trials = _without_stored_secrets(impl._configure_trials)
            storage, name = impl.storage, impl.study_name
            if not storage or not name:
                return
            if str(storage).startswith("sqlite:///"):  # sqlite cannot create the folder of its file
                Path(str(storage).removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            stored = _stored_trials(storage, name)
            if not stored:
                return
            done = sum(1 for t in stored if t.state.is_finished())
            impl.job_idx = len(stored)  # trial k runs as job k: a continued search never reuses a folder
            impl.sampler = _continued_sampler(kwargs["config"].hydra.sweeper.get("sampler"), impl.sampler, len(stored))
            impl.n_trials = max(int(impl.n_trials) - done, 0)
            log.info(
                f"Study {name}: {done} trial(s) finished before, {len(stored) - done} interrupted; "
                f"{impl.n_trials} to run"
            )

        def sweep(self, arguments: list[str]) -> None:
            try:
                return super().sweep(arguments)
            except ValueError:  # Optuna's study.best_trial when no trial completed: "Record does not exist."
                impl = self.sweeper
                if impl.storage and impl.study_name and any(
                    t.state.name == "COMPLETE" for t in _stored_trials(impl.storage, impl.study_name)
                ):
                    raise
                raise SystemExit(
                    f"kullm-train: no trial of study {impl.study_name!r} returned a val/loss to minimise (each failed, "
                    "or ran no validation: it needs data.val_set_size > 0); see each trial's log in the sweep folder"
                ) from None

    def _without_stored_secrets(configure):
        from kullm.redaction import is_secret_key

        def secret(name: str) -> bool:
            return is_secret_key(name.lstrip("+~").rsplit(".", 1)[-1])

        def configure_trials(trials, search_space, fixed_params):
            hidden = {k: ("<redacted>" if secret(k) else v) for k, v in fixed_params.items()}
            real = {f"{k}=<redacted>": f"{k}={v}" for k, v in fixed_params.items() if secret(k)}
            overrides = configure(trials, search_space, hidden)
            return [tuple(real.get(o, o) for o in trial) for trial in overrides]

        return configure_trials

    def _continued_sampler(sampler_cfg: Any, sampler: Any, stored: int) -> Any:
        """The sampler seeded with ``seed + stored trials``: seeded as at the first launch, a continued study would
        propose the first launch's points again (trial 0 once more); seeded by its length, the same continuation
        still proposes the same points. An unseeded sampler (or a grid, which has no seed) is left as it is."""
        seed = sampler_cfg.get("seed") if sampler_cfg is not None else None
        if seed is None:
            return sampler
        from hydra.utils import instantiate

        return instantiate(sampler_cfg, seed=int(seed) + stored)

    def _stored_trials(storage: str, name: str) -> list:
        import optuna

        try:
            return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except KeyError:  # no such study yet
            return []
