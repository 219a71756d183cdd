"""``kullm-eval``: G-Eval LLM-judge scores for one or several runs of generated answers, and their report.

    kullm-eval responses=outputs/.../responses.jsonl judge=openai
    kullm-eval 'responses={gpt4:a.jsonl,kullm:b.jsonl}' reference=gpt4
    kullm-eval adapter=outputs/.../adapter
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kullm.adapter import AdapterError
from kullm.config import CONF_DIR, ConfigError, exit_on_version, fail, print_redacted_cfg, validate
from kullm.console import quiet_third_party
from kullm.data.records import DataError
from kullm.evaluation.judges import JudgeError
from kullm.evaluation.runs import evaluate


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    quiet_third_party()  # after Hydra configured logging: no line per judge request
    try:
        validate(cfg)
        summary = evaluate(cfg)
    except (ConfigError, DataError, JudgeError, AdapterError, ValueError, OSError) as e:
        fail("kullm-eval", e)
    empty = nothing_judged(summary)
    if empty:
        fail("kullm-eval", RuntimeError(empty))
    first = next(iter(summary["runs"].values()))
    return first["overall"]


def nothing_judged(summary: dict) -> str:
    """Why the run failed when some run ended with no judgment at all ('' when every run has some)."""
    problems = []
    for name, run in summary["runs"].items():
        if run["judged"] == 0:
            errors = list(run["pending_errors"].values())
            why = f": {errors[0]}" if errors else f" ({run['failed']} unparseable)"
            problems.append(f"{name}: 0 of {run['total']} judged{why}")
    return "; ".join(problems) + ("; see " + summary["report"]["md"] if problems else "")


def main() -> None:
    """``kullm-eval``: see ``conf/eval.yaml``."""
    exit_on_version("kullm-eval", sys.argv[1:])
    if not print_redacted_cfg("eval", sys.argv[1:]):
        _hydra_main()


if __name__ == "__main__":
    main()
