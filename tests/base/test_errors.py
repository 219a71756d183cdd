"""One base for kullm's errors: every exception type kullm defines derives from ``KullmError``, which the CLIs show in
one line."""

import ast
import builtins
from pathlib import Path

import kullm
from kullm.errors import KullmError

PACKAGE = Path(kullm.__file__).parent


def class_bases() -> dict[str, list[str]]:
    """Every class kullm defines, by name, with the names of its bases."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names = [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, (ast.Name, ast.Attribute))]  # fmt: skip
                found[node.name] = names
    return found


def ancestors(name: str, bases: dict[str, list[str]]) -> set[str]:
    out, todo = set(), [name]
    while todo:
        for base in bases.get(todo.pop(), []):
            if base not in out:
                out.add(base)
                todo.append(base)
    return out


def is_builtin_exception(name: str) -> bool:
    kind = getattr(builtins, name, None)
    return isinstance(kind, type) and issubclass(kind, BaseException)


def test_every_public_error_type_derives_from_kullm_error():
    bases = class_bases()
    errors = {name for name in bases if any(map(is_builtin_exception, ancestors(name, bases)))}
    assert {"ConfigError", "DataError", "AdapterError", "MergeError", "JudgeError", "UntrustedFileError"} <= errors
    public = {n for n in errors - {"KullmError"} if not n.startswith("_")}  # _Retry and such never leave their module
    stray = sorted(n for n in public if "KullmError" not in ancestors(n, bases))
    assert not stray, f"error types that a CLI would show with a traceback: {stray}"


def test_errors_that_were_value_errors_still_are():
    from kullm.adapter import AdapterError
    from kullm.config import ConfigError
    from kullm.data.sources import DataError

    for kind in (ConfigError, DataError, AdapterError):
        assert issubclass(kind, KullmError) and issubclass(kind, ValueError)
