"""The terminal chat: a conversation with a :class:`~kullm.inference.generator.Generator`, streamed token by token."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kullm.inference.generator import Generator, Messages


def chat(generator: Generator, lines: Iterable[str] | None = None, write: Callable[[str], Any] | None = None) -> None:
    """A terminal chat, streaming tokens; an empty line, ``/exit`` or end of input (Ctrl-D) quits with a goodbye,
    and so does Ctrl-C, whose ``KeyboardInterrupt`` is raised again after it (the CLI exits with 130).

    The conversation so far is rendered through the tokenizer's ``chat_template`` (an adapter's renders the template
    it was trained on, turns included); without one, or with a single-turn template, each line is answered alone.
    """
    from jinja2 import TemplateError

    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    multi_turn = bool(getattr(generator.tokenizer, "chat_template", None))
    how = "keeps the conversation" if multi_turn else "answers each line alone (the tokenizer has no chat template)"
    write(f"kullm chat with {generator.label}: {how} (an empty line, /exit, Ctrl-D or Ctrl-C quits)\n")
    source = iter(lines) if lines is not None else None
    history: Messages = []
    try:
        while True:
            write("\n>>> ")
            line = next(source, None) if source is not None else sys.stdin.readline()
            if not line or not line.strip() or line.strip() == "/exit":
                break
            turn = [*history, {"role": "user", "content": line.strip()}]
            if multi_turn:
                try:
                    generator.render(turn)
                except TemplateError as e:  # a single-turn template refuses a second exchange
                    write(f"(the template is single-turn, {e}: answering this line on its own)\n")
                    multi_turn, turn = False, turn[-1:]
            answer = "".join(_echo(generator.stream(turn if multi_turn else line.strip()), write))
            history = [*turn, {"role": "assistant", "content": answer}] if multi_turn else []
            write("\n")
    except KeyboardInterrupt:
        write("\nbye\n")
        raise
    write("\nbye\n")


def _echo(pieces: Iterable[str], write: Callable[[str], Any]) -> Iterator[str]:
    for piece in pieces:
        write(piece)
        yield piece
