"""A shared folder (a downloaded adapter, model or merged checkpoint) is untrusted input: its YAML files are read as
plain data, and its chat template is rendered, within bounds.

* :func:`read_yaml` never resolves an interpolation (``${oc.env:OPENAI_API_KEY}`` would copy the reader's secrets
  into whatever is written next, e.g. a merged folder), refuses aliases (a few lines of ``&a``/``*a`` expand to
  gigabytes) and files larger than any kullm writes.
* :func:`render_chat` renders a tokenizer's ``chat_template`` as ``apply_chat_template`` does, in a Jinja sandbox
  that bounds the template's size, the steps and seconds it runs, and the size of every value it makes.

Each refusal is one line naming the file (or tokenizer) and what is wrong.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from kullm.errors import KullmError

MAX_YAML_BYTES = 1 << 20  # a kullm_config.yaml or template.yaml is a few KiB
MAX_TEMPLATE_CHARS = 256 << 10  # chat templates with tool use run to ~10 KiB
MAX_RENDER_STEPS = 1_000_000  # lines of template code run per render (a long conversation takes thousands)
MAX_RENDER_SECONDS = 10.0
MAX_RENDER_SIZE = 4 << 20  # characters (or items) of the output and of any value made while rendering
_JINJA = f"{os.sep}jinja2{os.sep}"  # Jinja's own modules: the runtime that calls what a template names
_WIDE = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string


class UntrustedFileError(KullmError, ValueError):
    """A shared file that kullm refuses to read (interpolations, aliases, too large, not YAML)."""


class TemplateBoundError(UntrustedFileError):
    """A chat template that ran past a bound while rendering: refused for every row, not just the one."""


class _PlainLoader(yaml.SafeLoader):
    """YAML as plain data: no aliases; ``1e-5`` is a float, as in OmegaConf (YAML 1.1 wants ``1.0e-5``)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            why = f"an alias (*{event.anchor}): kullm's files have none, and aliases can expand without bound"
            raise yaml.composer.ComposerError(None, None, why, event.start_mark)
        return super().compose_node(parent, index)


_PlainLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d[\d_]*)?[eE][-+]?\d+$"), list("-+0123456789.")
)


def read_yaml(path: str | Path) -> Any:
    """The plain data of a YAML file from a shared folder; :class:`UntrustedFileError` for one kullm will not read."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UntrustedFileError(f"{path}: {size} bytes, more than the {MAX_YAML_BYTES} a kullm file holds: refused")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as e:
        line = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise UntrustedFileError(f"{path}: {line}{e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UntrustedFileError(f"{path}: not a YAML file ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise UntrustedFileError(f"{path}: nested too deeply to be a kullm file") from None
    found = _interpolation(data)
    if found is not None:
        key, value = found
        raise UntrustedFileError(
            f"{path}: {key}: {value[:80]!r} is an interpolation; a shared folder's files are read as plain data and "
            "never resolved (one could read your environment's secrets): remove it"
        )
    return data


def _interpolation(node: Any, key: str = "") -> tuple[str, str] | None:
    """The first ``(key path, text)`` whose key or value holds OmegaConf's ``${…}`` syntax, else ``None``."""
    if isinstance(node, str):
        return (key or "<top>", node) if "${" in node else None
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        path = f"{key}.{k}" if key and isinstance(k, str) else f"{key}[{k}]" if key else str(k)
        found = _interpolation(str(k), path) if isinstance(k, str) else None
        found = found or _interpolation(v, path)
        if found is not None:
            return found
    return None


# --- chat templates -------------------------------------------------------------------------------------------


def render_chat(tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=…)``, rendered in a bounded
    sandbox (:class:`TemplateBoundError` past a bound; the template's own errors are ``jinja2.TemplateError``)."""
    where = f"{getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}: chat_template"
    source = tokenizer.chat_template
    if isinstance(source, Mapping):  # named templates: the plain one
        source = source.get("default")
    if not isinstance(source, str):
        raise ValueError(f"{where}: none to render")
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    chat = [{str(k): v for k, v in m.items()} for m in messages]
    try:
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateBoundError(f"{len(source)} characters, over {MAX_TEMPLATE_CHARS}")
        with _bounded():  # compiling too: Jinja computes constant output (filters on literals) at compile time
            pieces = _compile(source).generate(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **special
            )
            return "".join(_take(pieces))
    except TemplateBoundError as e:
        raise TemplateBoundError(f"{where}: {e}: refused (a bound on templates from shared folders)") from None
    except RecursionError:
        raise TemplateBoundError(f"{where}: nests or recurses too deeply: refused") from None


def _take(pieces: Iterator[str]) -> Iterator[str]:
    size = 0
    for piece in pieces:
        size += len(piece)
        if size > MAX_RENDER_SIZE:
            raise TemplateBoundError(f"renders over {MAX_RENDER_SIZE} characters")
        yield piece


@contextmanager
def _bounded() -> Iterator[None]:
    """Count the lines of template code run in this thread, against a step and a time budget, and check the size of
    every value passed to a call."""
    deadline, steps = time.monotonic() + MAX_RENDER_SECONDS, 0

    def line(frame, event: str, arg):
        nonlocal steps
        steps += 1
        if steps > MAX_RENDER_STEPS:
            raise TemplateBoundError(f"ran over {MAX_RENDER_STEPS} steps (a loop without bound?)")
        if time.monotonic() > deadline:
            raise TemplateBoundError(f"ran over {MAX_RENDER_SECONDS:g} s")
        return line

    def call(frame, event: str, arg):
        if event != "call":
            return None
        # what the template calls (filters, methods, operators, macros), directly or through Jinja's runtime
        caller = frame.f_back.f_code.co_filename if frame.f_back is not None else ""
        if (caller == "<template>" or _JINJA in caller) and any(_too_big(v) for v in frame.f_locals.values()):
            raise TemplateBoundError(f"makes a value over {MAX_RENDER_SIZE} characters, items or in size")
        return line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _too_big(value: Any, depth: int = 0) -> bool:
    """An int, or a sized value, over :data:`MAX_RENDER_SIZE`; a call's ``*args``/``**kwargs`` are looked into."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > MAX_RENDER_SIZE
    if not isinstance(value, (str, bytes, list, tuple, dict)):
        return False
    if len(value) > MAX_RENDER_SIZE:
        return True
    if depth or not isinstance(value, (tuple, dict)) or len(value) > 16:
        return False
    items = list(value.values() if isinstance(value, dict) else value)
    return any(_too_big(v, 1) for v in items) or sum(len(v) for v in items if isinstance(v, str)) > MAX_RENDER_SIZE


@lru_cache(maxsize=16)
def _compile(source: str):
    return _environment().from_string(source)


@lru_cache(maxsize=1)
def _environment():
    """A sandbox set up as ``transformers`` sets up its own, with bounds on what its operators and calls make."""
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}…{% endgeneration %}``: marks assistant text for transformers' masks; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            return caller()

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            if (
                operator == "**"
                and isinstance(right, int)
                and right > 64
                and not (isinstance(left, int) and abs(left) <= 1)
            ):
                raise TemplateBoundError(f"{left!r} ** {right}: an exponent over 64")
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(n, int) and hasattr(seq, "__len__") and len(seq) * n > MAX_RENDER_SIZE:
                    raise TemplateBoundError(f"repeats a value past {MAX_RENDER_SIZE} items")
            if operator == "%" and isinstance(left, str) and _WIDE.search(left):
                raise TemplateBoundError("a format width of a million or more")
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value: Any):  # ``'…'.format`` / ``format_map``
            if isinstance(getattr(value, "__self__", None), str) and _WIDE.search(value.__self__):
                raise TemplateBoundError("a format width of a million or more")
            return super().wrap_str_format(value)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def format_(value, *args, **kwargs):
        if isinstance(value, str) and _WIDE.search(value):
            raise TemplateBoundError("a format width of a million or more")
        return plain_format(value, *args, **kwargs)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    plain_format = env.filters["format"]
    env.filters |= {"tojson": tojson, "format": format_}
    env.globals.pop("lipsum", None)  # loops in Python on its argument, past the step count
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f)}
    return env
