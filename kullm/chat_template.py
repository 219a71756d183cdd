"""What is trained is what is served: a kullm template as a Jinja ``chat_template``.

:func:`to_chat_template` turns a :class:`~kullm.templates.Prompter` into the Jinja string that
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` renders to exactly the prompt training used
(the single-turn prompt for one user turn; ``prompt_system`` and ``prompt_turn`` for conversations). An adapter
folder's tokenizer (and so a merged checkpoint's) carries it, so an OpenAI-compatible server (vLLM, TGI) applies
the format the model was trained on.

The generation prompt is the text from the response marker on (``### 응답:\\n``): every prompt of the template must
end with the same one, which ``add_generation_prompt`` adds and each assistant turn starts with. For a tokenizer whose
own call adds a BOS (Llama, Mistral, Gemma, SOLAR), the template renders it first, as training put it there: servers
tokenize a chat template's text without adding special tokens.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from kullm.special_tokens import bos_ids
from kullm.templates import Prompter

log = logging.getLogger(__name__)

_SLOT = re.compile(r"(\{(?:instruction|system)\})")
_VARS = {"{instruction}": "message['content']", "{system}": "ns.system"}


def generation_prompt(prompter: Prompter) -> str:
    """The tail every prompt of ``prompter`` ends with: from the last response marker to the end."""
    text = prompter.prompt_no_input
    return text[text.rindex(prompter.response_marker) :]


def to_chat_template(prompter: Prompter, bos: str = "") -> str:
    """The Jinja ``chat_template`` that renders ``prompter``'s prompts, after ``bos`` (the text of the BOS training
    put before every prompt; raises ``ValueError`` if none can)."""
    tail = generation_prompt(prompter)
    heads = {}
    for key in ("prompt_no_input", "prompt_system", "prompt_turn"):
        text = getattr(prompter, key)
        if text is None:
            continue
        if not text.endswith(tail) or _SLOT.search(text[len(text) - len(tail) :]):
            raise ValueError(
                f"template {prompter.name!r}: {key} does not end with the generation prompt {tail!r} after its "
                "slots, so no chat_template can render it"
            )
        heads[key] = _jinja_text(text[: len(text) - len(tail)])
    name = json.dumps(prompter.name, ensure_ascii=False)
    no_system = (
        heads["prompt_system"]
        if "prompt_system" in heads
        else "{{- raise_exception('template ' + " + name + " + ' cannot render a system turn') -}}"
    )
    later = (
        heads["prompt_turn"]
        if "prompt_turn" in heads
        else "{{- raise_exception('template ' + " + name + " + ' renders one user turn only') -}}"
    )
    gen = _literal(tail)
    return (
        f"{{#- kullm template {prompter.name}: the prompt this model was trained on -#}}\n"
        "{%- set ns = namespace(system=none, first=true) -%}\n"
        + (f"{{{{- {_literal(bos)} -}}}}\n" if bos else "")
        + "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'system' -%}\n"
        "{%- if not loop.first -%}{{- raise_exception('a system turn must come first') -}}{%- endif -%}\n"
        "{%- set ns.system = message['content'] -%}\n"
        "{%- elif message['role'] == 'user' -%}\n"
        f"{{%- if ns.first and ns.system is not none -%}}{no_system}\n"
        f"{{%- elif ns.first -%}}{heads['prompt_no_input']}\n"
        f"{{%- else -%}}{later}\n"
        "{%- endif -%}\n"
        "{%- set ns.first = false -%}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        f"{{{{- {gen} + message['content'] + eos_token -}}}}\n"
        "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        f"{{%- if add_generation_prompt -%}}{{{{- {gen} -}}}}{{%- endif -%}}\n"
    )


def _jinja_text(text: str) -> str:
    """Template text with ``{instruction}``/``{system}`` slots as one Jinja output expression."""
    parts = [_VARS[p] if p in _VARS else _literal(p) for p in _SLOT.split(text) if p]
    return "{{- " + " + ".join(parts or ["''"]) + " -}}"


def _literal(text: str) -> str:
    # a JSON string is a valid Jinja string literal (Jinja unescapes \n, \", \\ and \uXXXX the same way)
    return json.dumps(text, ensure_ascii=False)


@contextmanager
def serving(tokenizer, prompter: Prompter | None) -> Iterator[None]:
    """While the block runs, ``tokenizer.chat_template`` is ``prompter``'s, after the tokenizer's BOS where its call
    adds one (``None``: left as it is)."""
    try:
        template = to_chat_template(prompter, bos_text(tokenizer)) if prompter is not None else None
    except ValueError as e:
        log.warning("%s: the tokenizer keeps its own chat_template", e)
        template = None
    if template is None:
        yield
        return
    old = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = template
    try:
        yield
    finally:
        tokenizer.chat_template = old


def bos_text(tokenizer) -> str:
    """The text of the BOS that begins every prompt kullm trains on (:func:`kullm.special_tokens.bos_ids`; ``""``:
    none)."""
    bos = bos_ids(tokenizer)
    return tokenizer.decode(bos, skip_special_tokens=False, clean_up_tokenization_spaces=False) if bos else ""


def served_prompter(prompter: Prompter | None, data_cfg) -> Prompter | None:
    """The prompter whose template an adapter's tokenizer should carry: ``None`` when training rendered with the
    tokenizer's own chat template (``data.chat_template=tokenizer``), which then stays."""
    chat = (data_cfg or {}).get("chat_template") if hasattr(data_cfg, "get") else None
    return None if chat == "tokenizer" else prompter
