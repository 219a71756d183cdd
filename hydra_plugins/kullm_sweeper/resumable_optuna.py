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
            impl.n_trials = max(int(impl.n_trials) - done, 0)
            log.info(
                f"Study {name}: {done} trial(s) finished before, {len(stored) - done} interrupted; "
                f"{impl.n_trials} to run"
            )

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

    def _stored_trials(storage: str, name: str) -> list:
        import optuna

        try:
            return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except KeyError:  # no such study yet
            return []
