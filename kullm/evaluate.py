"""``kullm-eval``: G-Eval LLM-judge scores for one or several runs of generated answers, and their report.

    kullm-eval responses=outputs/.../responses.jsonl judge=openai
    kullm-eval 'responses={gpt4:a.jsonl,kullm:b.jsonl}' reference=gpt4
    kullm-eval adapter=outputs/.../adapter
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kullm.config import CONF_DIR
from kullm.evaluation.runs import evaluate


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """``kullm-eval``: see ``conf/eval.yaml``."""
    summary = evaluate(cfg)
    first = next(iter(summary["runs"].values()))
    return first["overall"]


if __name__ == "__main__":
    main()
