"""Run kullm's console scripts the way users do: the installed ``kullm-*`` entry points (``pip install -e .``),
from a folder outside the checkout, with the repository root kept off ``sys.path``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(sys.executable).parent  # pip puts console scripts beside the interpreter that installed them


def script(name: str) -> str:
    """The installed console script ``name`` (``kullm-train``…); fails the test, naming the fix, when it is absent."""
    path = SCRIPTS / name
    assert path.exists(), f"{name} is not installed beside {sys.executable}: pip install -e ."
    return str(path)


def run_script(name: str, *args: str, cwd: Path, timeout: int = 300, env: dict | None = None):
    """``name args…`` in ``cwd`` (which must lie outside the checkout), stdout and stderr captured as text."""
    cwd = Path(cwd).resolve()
    assert ROOT not in (cwd, *cwd.parents), f"{cwd} lies inside the checkout: users run kullm from elsewhere"
    environ = {**os.environ, **(env or {})}
    environ.pop("PYTHONPATH", None)  # the checkout reaches the script only through the install, as for users
    return subprocess.run(
        [script(name), *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The one ``<prog>: …`` line a failed command printed (no traceback, exactly one such line)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]
