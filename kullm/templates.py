"""Prompt templates: render a prompt from a record, and find the response in generated text.

One :class:`Prompter` serves training (render) and generation (render + extract). Templates come from the
``template=`` config group (``kullm``, ``kullm_system``, ``alpaca``, ``alpaca_short``, ``alpaca_legacy``).

A template with ``prompt_turn`` (and ``prompt_system``) also renders conversations (:meth:`Prompter.render_turns`):
the first user turn is the single-turn prompt (or ``prompt_system`` when the conversation has a system turn), each
assistant turn is its content followed by the tokenizer's EOS, and each later user turn is ``prompt_turn``. A
one-turn conversation is therefore exactly a single-turn example.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_SLOT = re.compile(r"\{(instruction|input|system)\}")
_SLOTS = {
    "prompt_input": {"instruction", "input"},
    "prompt_no_input": {"instruction"},
    "prompt_system": {"system", "instruction"},
    "prompt_turn": {"instruction"},
}


@dataclass(frozen=True)
class Prompter:
    """A prompt template: one string for rows with an input, one for rows without, and the response marker."""

    name: str
    prompt_input: str
    prompt_no_input: str
    response_marker: str
    description: str = ""
    prompt_system: str | None = None  # the first user turn after a system turn: {system} and {instruction}
    prompt_turn: str | None = None  # a later user turn (after an assistant turn's EOS): {instruction}

    def __post_init__(self) -> None:
        for key, want in _SLOTS.items():
            text = getattr(self, key)
            if text is None:
                continue
            slots = set(_SLOT.findall(text))
            if slots != want:
                raise ValueError(
                    f"template {self.name!r}: {key} must contain {sorted(want)} slots, has {sorted(slots)}"
                )
            if self.response_marker not in text:
                raise ValueError(
                    f"template {self.name!r}: response_marker {self.response_marker!r} is not in {key}"
                )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Prompter:
        """Build from a ``template=`` config node (any mapping with the dataclass's keys)."""
        keys = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in dict(cfg).items() if k in keys})

    @classmethod
    def from_file(cls, path: str | Path) -> Prompter:
        """Load a template saved by :meth:`save` (``template.yaml`` in an adapter folder: plain data, unresolved)."""
        from kullm.untrusted import read_yaml

        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a template (a mapping of prompt_input, prompt_no_input, response_marker…)")
        return cls.from_config(data)

    def save(self, path: str | Path) -> None:
        """Write the template as YAML, so that generation uses exactly what training used."""
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(asdict(self)), path)

    def render(self, instruction: str, input: str | None = None) -> str:
        """The prompt for ``instruction`` (and ``input`` when it is non-empty), user text kept verbatim."""
        template = self.prompt_input if input else self.prompt_no_input
        return _fill(template, instruction=instruction, input=input or "")

    @property
    def multi_turn(self) -> bool:
        """Whether the template renders conversations of more than one user turn."""
        return self.prompt_turn is not None

    def render_turns(self, turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """A conversation as ``("prompt", text)`` and ``("assistant", content)`` pieces, in order.

        The end of each assistant turn (the tokenizer's EOS) is not in the pieces: the tokenizer adds its id.
        Raises ``ValueError`` for a conversation this template cannot render (more user turns than a single-turn
        template has, a system turn without ``prompt_system``).
        """
        system = turns[0][1] if turns and turns[0][0] == "system" else None
        pieces: list[tuple[str, str]] = []
        first = True
        for role, content in turns[1:] if system is not None else turns:
            if role == "assistant":
                pieces.append(("assistant", content))
                continue
            if role != "user":
                raise ValueError(f"a {role} turn where a user or assistant turn belongs")
            if first and system is not None:
                if self.prompt_system is None:
                    raise ValueError(f"template {self.name!r} has no prompt_system: it cannot render a system turn")
                pieces.append(("prompt", _fill(self.prompt_system, system=system, instruction=content)))
            elif first:
                pieces.append(("prompt", self.render(content)))
            else:
                if self.prompt_turn is None:
                    raise ValueError(f"template {self.name!r} has no prompt_turn: it renders one user turn only")
                pieces.append(("prompt", _fill(self.prompt_turn, instruction=content)))
            first = False
        return pieces

    def extract(self, text: str, prompt: str | None = None) -> str:
        """The response part of generated ``text``.

        Cuts the known ``prompt`` prefix when given and present; otherwise splits on the **last** response marker
        (the marker may occur in the instruction or input); text with no marker is returned whole.
        """
        if prompt is not None and text.startswith(prompt):
            return text[len(prompt) :].strip()
        head, marker, tail = text.rpartition(self.response_marker)
        return (tail if marker else text).strip()


def _fill(template: str, **values: str) -> str:
    # one pass over the template only: braces or slot names inside user text are never substituted
    return _SLOT.sub(lambda m: values[m.group(1)], template)
