"""``kullm-generate``: answers from a trained adapter or a plain (merged) checkpoint.

    kullm-generate adapter=outputs/.../adapter prompt=고려대학교에 대해서 알려줘
    kullm-generate adapter=outputs/.../adapter input_file=eval.jsonl output_file=responses.jsonl generation=greedy
    kullm-generate base=merged/                      # neither prompt nor input_file: chat in the terminal
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from kullm.cli import run_cli
from kullm.config import validate

TEXT_KEYS = ("prompt", "input")  # free text given on the command line


def run(cfg: DictConfig) -> Path | str | None:
    """What ``kullm-generate`` does: a file run, one prompt, or a chat."""
    from kullm.inference.chat import chat
    from kullm.inference.files import generate_file
    from kullm.inference.generator import Generator, seed_everything

    if cfg.input_file:
        path = generate_file(cfg)
        print(f"responses: {path}")
        return path
    generator = Generator.from_config(cfg)
    seed_everything(cfg.generation.seed)
    if cfg.prompt is not None or cfg.input is not None:  # KULLM's own example: an empty instruction, text as input
        answer = generator.generate([(str(cfg.prompt or ""), str(cfg.input or ""))])[0]
        print(answer)
        return answer
    chat(generator)
    return None


def quote_text_args(args: Sequence[str]) -> list[str]:
    """Quote the free-text overrides (``prompt=``, ``input=``) for Hydra, whose grammar rejects unquoted Korean.

    ``prompt=고려대학교에 대해서 알려줘`` typed unquoted reaches us as three words; the words after ``prompt=`` that
    are not themselves ``key=value`` overrides or flags are joined back into the text. It then becomes
    ``prompt='고려대학교에 대해서 알려줘'`` with quotes, backslashes and ``${`` escaped, so the text arrives verbatim;
    values the user already quoted are left alone.
    """
    out = []
    for arg in join_free_text(args):
        key, eq, value = arg.partition("=")
        if eq and key in TEXT_KEYS and not is_quoted(value):
            value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
            value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def join_free_text(args: Sequence[str]) -> list[str]:
    """``["prompt=고려대학교에", "대해서", "알려줘", "generation=greedy"]`` → the text as one argument."""
    out: list[str] = []
    in_text = False
    for arg in args:
        key = arg.partition("=")[0]
        if in_text and "=" not in arg and not arg.startswith("-"):
            out[-1] += " " + arg
            continue
        in_text = "=" in arg and key in TEXT_KEYS and not is_quoted(arg.partition("=")[2])
        out.append(arg)
    return out


def is_quoted(value: str) -> bool:
    """Whether ``value`` is one quoted Hydra string (``'…'`` or ``"…"`` with no unescaped inner quote)."""
    q = value[:1]
    return len(value) >= 2 and q in "'\"" and value[-1] == q and re.search(rf"(?<!\\){q}", value[1:-1]) is None


def _job(cfg: DictConfig) -> None:
    """One ``kullm-generate`` run: the config checked, then :func:`run`; Ctrl-C ends it without a traceback."""
    try:
        validate(cfg)
        run(cfg)
    except KeyboardInterrupt:  # the chat has said goodbye, a file run keeps its rows
        if cfg.input_file:
            print("kullm-generate: interrupted; the rows written are kept: the same command resumes", file=sys.stderr)
        raise SystemExit(130) from None


def main() -> None:
    """``kullm-generate``: see ``conf/generate.yaml``; ``prompt=``/``input=`` text is quoted for Hydra first."""
    run_cli("kullm-generate", "generate", _job, catch=(ValueError, OSError), argv_hook=quote_text_args)


if __name__ == "__main__":
    main()
