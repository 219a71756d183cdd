"""Conversation records: OpenAI ``messages`` and ShareGPT ``conversations``, read into checked turns.

* OpenAI: ``{"id"?, "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ShareGPT: ``{"id"?, "conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}`` — the role names
  are configurable (``data.roles``), mapped onto ``system``/``user``/``assistant``.

A conversation is an optional system turn first, then user and assistant turns alternating, starting with a user
turn and ending with an assistant turn (a conversation to answer — generation input, judged answers — may end with
a user turn instead: ``open_end``). Everything else is a named reason (``unknown_role``, ``empty_turn``,
``system_not_first``, ``alternation``, ``not_ending_in_assistant``, ...) raised on the field that breaks it,
e.g. ``messages[3].role``, as a :class:`~kullm.data.sources.Reject`: :mod:`kullm.data.records` counts and
reports it like any other bad row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kullm.data.sources import Reject

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
FORMATS = ("auto", "instruction", "messages", "sharegpt")
# ShareGPT's role names seen in the wild (Vicuna, ShareGPT dumps) → the three roles; extend with data.roles
SHAREGPT_ROLES: dict[str, str] = {
    "system": SYSTEM,
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bing": ASSISTANT,
    "bard": ASSISTANT,
}
OPENAI_ROLES: dict[str, str] = {SYSTEM: SYSTEM, "developer": SYSTEM, USER: USER, ASSISTANT: ASSISTANT}

Turn = tuple[str, str]  # (role, content)


def detect_format(obj: Any, messages_key: str = "messages", conversations_key: str = "conversations") -> str:
    """``messages``, ``sharegpt`` or ``instruction``: which layout a row is in (by the key that holds its turns)."""
    if isinstance(obj, Mapping):
        if obj.get(messages_key) is not None:
            return "messages"
        if obj.get(conversations_key) is not None:
            return "sharegpt"
    return "instruction"


def parse_turns(
    obj: Mapping[str, Any],
    fmt: str,
    *,
    key: str,
    roles: Mapping[str, str] | None = None,
    open_end: bool = False,
) -> tuple[Turn, ...]:
    """The checked turns of one row in ``fmt`` (``messages`` or ``sharegpt``) held under ``key``.

    A turns field given as a JSON string (a CSV cell) is parsed first. ``open_end``: the last turn may be a user
    turn (the one to answer).
    """
    if fmt == "messages":
        role_key, content_key, names = "role", "content", {**OPENAI_ROLES, **(roles or {})}
    elif fmt == "sharegpt":
        role_key, content_key, names = "from", "value", {**SHAREGPT_ROLES, **(roles or {})}
    else:
        raise ValueError(f"not a conversation format: {fmt!r}")
    value = obj.get(key)
    if value is None:
        raise Reject("missing_field", key, f"no {key!r} field")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Reject("malformed_json", key, f"column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise Reject("nested_too_deep", key, "JSON nested too deeply to read") from None
    if not isinstance(value, list):
        raise Reject("bad_turns", key, f"expected a list of turns, got {type(value).__name__}")
    if not value:
        raise Reject("empty_conversation", key, "the conversation has no turn")
    turns: list[Turn] = []
    for k, item in enumerate(value):
        where = f"{key}[{k}]"
        if not isinstance(item, Mapping):
            raise Reject("bad_turns", where, f"expected an object, got {type(item).__name__}")
        name = item.get(role_key)
        if not isinstance(name, str):
            raise Reject("missing_field" if name is None else "not_a_string", f"{where}.{role_key}", "no role")
        role = names.get(name, names.get(name.lower()))
        if role is None:
            known = ", ".join(sorted(names))
            raise Reject("unknown_role", f"{where}.{role_key}", f"role {name!r} is none of {known} (data.roles)")
        content = item.get(content_key)
        if content is None:
            raise Reject("missing_field", f"{where}.{content_key}", f"no {content_key!r} field")
        if not isinstance(content, str):
            raise Reject("not_a_string", f"{where}.{content_key}", f"expected a string, got {type(content).__name__}")
        if (why := unencodable(content)) is not None:
            raise Reject("lone_surrogate", f"{where}.{content_key}", why)
        content = content.replace("\r\n", "\n")
        if not content.strip():
            raise Reject("empty_turn", f"{where}.{content_key}", f"the {role} turn is empty")
        turns.append((role, content))
    check_turns(turns, key, open_end=open_end)
    return tuple(turns)


def unencodable(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate, which a JSON escape such as ``\\ud800`` can
    make: tokenizers and every file writer fail on it), or ``None``."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate {text[e.start]!r} at character {e.start}: not text UTF-8 can hold"
    return None


def check_turns(turns: list[Turn] | tuple[Turn, ...], key: str = "messages", *, open_end: bool = False) -> None:
    """Raise :class:`~kullm.data.sources.Reject` unless ``turns`` is [system], user, assistant, user, assistant, ...,
    assistant (or ends with a user turn, when ``open_end``)."""
    start = 1 if turns and turns[0][0] == SYSTEM else 0
    for k, (role, _) in enumerate(turns):
        if role == SYSTEM and k > 0:
            raise Reject("system_not_first", f"{key}[{k}]", f"a system turn at position {k}: only the first may be")
    if start == len(turns):
        raise Reject("not_ending_in_assistant", key, "the conversation has only a system turn")
    for k in range(start, len(turns)):
        want = USER if (k - start) % 2 == 0 else ASSISTANT
        if turns[k][0] != want:
            prev = turns[k - 1][0] if k > start else "the start"
            raise Reject("alternation", f"{key}[{k}]", f"a {turns[k][0]} turn after {prev}: expected {want}")
    if turns[-1][0] != ASSISTANT and not (open_end and turns[-1][0] == USER):
        raise Reject("not_ending_in_assistant", f"{key}[{len(turns) - 1}]", "the last turn is not an assistant turn")


def split_reference(turns: tuple[Turn, ...] | list[Turn]) -> tuple[tuple[Turn, ...], str | None]:
    """``(history, reference)``: the turns up to the last user turn (what the next answer follows), and the
    assistant turn after it when the conversation has one (the reference answer), else ``None``."""
    last_user = max(k for k, (role, _) in enumerate(turns) if role == USER)
    history = tuple(turns[: last_user + 1])
    return history, (turns[last_user + 1][1] if last_user + 1 < len(turns) else None)


def as_messages(turns: tuple[Turn, ...] | list[Turn]) -> list[dict[str, str]]:
    """Turns as OpenAI messages (what ``apply_chat_template`` takes)."""
    return [{"role": role, "content": content} for role, content in turns]
