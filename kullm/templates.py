"""Prompt templates: render a prompt from a record, and find the response in generated text.

One :class:`Prompter` serves training (render) and generation (render + extract). Templates come from the
``template=`` config group (``kullm``, ``alpaca``, ``alpaca_short``, ``alpaca_legacy``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_SLOT = re.compile(r"\{(instruction|input)\}")


@dataclass(frozen=True)
class Prompter:
    """A prompt template: one string for rows with an input, one for rows without, and the response marker."""

    name: str
    prompt_input: str
    prompt_no_input: str
    response_marker: str
    description: str = ""

    def __post_init__(self) -> None:
        for key in ("prompt_input", "prompt_no_input"):
            slots = set(_SLOT.findall(getattr(self, key)))
            want = {"instruction", "input"} if key == "prompt_input" else {"instruction"}
            if slots != want:
                raise ValueError(
                    f"template {self.name!r}: {key} must contain {sorted(want)} slots, has {sorted(slots)}"
                )
        if self.response_marker not in self.prompt_no_input or self.response_marker not in self.prompt_input:
            raise ValueError(f"template {self.name!r}: response_marker {self.response_marker!r} is not in the prompts")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Prompter:
        """Build from a ``template=`` config node (any mapping with the dataclass's keys)."""
        keys = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in dict(cfg).items() if k in keys})

    @classmethod
    def from_file(cls, path: str | Path) -> Prompter:
        """Load a template saved by :meth:`save` (``template.yaml`` in an adapter folder)."""
        from omegaconf import OmegaConf

        return cls.from_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))

    def save(self, path: str | Path) -> None:
        """Write the template as YAML, so that generation uses exactly what training used."""
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(asdict(self)), path)

    def render(self, instruction: str, input: str | None = None) -> str:
        """The prompt for ``instruction`` (and ``input`` when it is non-empty), user text kept verbatim."""
        values = {"instruction": instruction, "input": input or ""}
        template = self.prompt_input if input else self.prompt_no_input
        # one pass over the template only: braces or slot names inside user text are never substituted
        return _SLOT.sub(lambda m: values[m.group(1)], template)

    def extract(self, text: str, prompt: str | None = None) -> str:
        """The response part of generated ``text``.

        Cuts the known ``prompt`` prefix when given and present; otherwise splits on the **last** response marker
        (the marker may occur in the instruction or input); text with no marker is returned whole.
        """
        if prompt is not None and text.startswith(prompt):
            return text[len(prompt) :].strip()
        head, marker, tail = text.rpartition(self.response_marker)
        return (tail if marker else text).strip()
