"""``kullm-eval``: G-Eval LLM-judge scores for one or several runs of generated answers, and their report.

    kullm-eval responses=outputs/.../responses.jsonl judge=openai
    kullm-eval 'responses={gpt4:a.jsonl,kullm:b.jsonl}' reference=gpt4
    kullm-eval adapter=outputs/.../adapter
"""

from __future__ import annotations

from omegaconf import DictConfig

from kullm.cli import run_cli
from kullm.config import validate
from kullm.errors import KullmError


def run(cfg: DictConfig) -> float | None:
    """What ``kullm-eval`` does: judge every run and write the report; return the first run's overall score (what a
    sweep optimises). A run that ended with no judgment at all fails the command."""
    from kullm.evaluation.pipeline import evaluate

    validate(cfg)
    summary = evaluate(cfg)
    empty = nothing_judged(summary)
    if empty:
        raise KullmError(empty)
    first = next(iter(summary["runs"].values()))
    return first["overall"]


def nothing_judged(summary: dict) -> str:
    """Why the run failed when some run ended with no judgment at all ('' when every run has some)."""
    problems = []
    for name, scores in summary["runs"].items():
        if scores["judged"] == 0:
            errors = list(scores["pending_errors"].values())
            why = f": {errors[0]}" if errors else f" ({scores['failed']} unparseable)"
            problems.append(f"{name}: 0 of {scores['total']} judged{why}")
    return "; ".join(problems) + ("; see " + summary["report"]["md"] if problems else "")


def main() -> None:
    """``kullm-eval``: see ``conf/eval.yaml``."""
    run_cli("kullm-eval", "eval", run, catch=(ValueError, OSError))


if __name__ == "__main__":
    main()
