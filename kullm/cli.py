"""The shell every ``kullm-*`` command shares: ``run_cli(prog, config_name, task)``.

In order: ``--version`` and ``--help`` (answered before torch or Lightning is imported), third-party noise filtered,
a misspelled key refused with the nearest valid one, ``--cfg job`` printed with credentials redacted, kullm's Hydra
plugins registered, then ``hydra.main`` runs ``task(cfg)``. A :class:`~kullm.errors.KullmError` (and whatever else
the command names as the user's mistake) ends in one ``<prog>: <message>`` line through :func:`fail`; any other
exception keeps its traceback. A CLI module (``kullm/train.py``…) is its task plus one ``run_cli`` call in ``main()``,
and imports its stage's code inside the task, so that everything before ``hydra.main`` takes about a second.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from kullm.config import CONF_DIR, ConfigError, compose, nearest
from kullm.console import quiet_third_party
from kullm.errors import KullmError
from kullm.redaction import scrub, secret_values

if not OmegaConf.has_resolver("kullm_help"):  # hydra.help.template of each CLI (Hydra fills it with string.Template)
    OmegaConf.register_new_resolver("kullm_help", lambda name: help_text(str(name)).replace("$", "$$"))


def run_cli(
    prog: str,
    config_name: str,
    task: Callable[[DictConfig], Any],
    *,
    catch: tuple[type[BaseException], ...] = (),
    argv_hook: Callable[[Sequence[str]], list[str]] | None = None,
) -> None:
    """Run ``task`` as the console command ``prog`` over ``conf/<config_name>.yaml`` and ``sys.argv``.

    Args:
        catch: exception types besides :class:`KullmError` that are the user's mistake for this command (a file
            that cannot be read, a value it refuses): reported in one line, not with a traceback.
        argv_hook: rewrites the command line before anything reads it (``kullm-generate`` quotes free text).
    """
    exit_on_version(prog, sys.argv[1:])
    exit_on_help(config_name, sys.argv[1:])
    if argv_hook is not None:
        sys.argv[1:] = argv_hook(sys.argv[1:])
    args = sys.argv[1:]
    quiet_third_party()
    try:
        check_overrides(config_name, args)
    except ConfigError as e:
        fail(prog, e)
    if print_redacted_cfg(config_name, args):
        return
    expose_hydra_plugins()
    print_lightning_lines_bare()

    @functools.wraps(task)  # Hydra names the job, and its log file, after the module that defines the task
    def job(cfg: DictConfig) -> Any:
        quiet_third_party()  # again, after Hydra configured logging: no line per judge request
        try:
            return task(cfg)
        except (KullmError, *catch) as e:
            fail(prog, e)

    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(job)()


def print_lightning_lines_bare() -> None:
    """Give Lightning's loggers the console handler Lightning gives them when it is imported before anything set up
    logging: its lines (and kullm's, printed through its rank-zero logger) appear bare, not through Hydra's console
    format, and ``console.mirror_to_run_log`` adds the run's log file. Lightning is imported later, inside the job,
    where Hydra's handlers would otherwise make it pass its lines on to them."""
    if logging.getLogger().hasHandlers():
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
        logger.propagate = False


def exit_on_version(prog: str, argv: Sequence[str]) -> None:
    """``--version``: print kullm's version (not Hydra's) and exit."""
    if "--version" in argv or "-V" in argv:
        from kullm import __version__

        print(f"{prog} (kullm {__version__})")
        raise SystemExit(0)


def exit_on_help(config_name: str, argv: Sequence[str]) -> None:
    """``--help``: print :func:`help_text` and exit, as Hydra would print the ``hydra.help.template`` it fills."""
    if "--help" in argv or "-h" in argv:
        print(help_text(config_name))
        raise SystemExit(0)


def help_text(config_name: str) -> str:
    """``--help`` of one CLI: its usage (the root config's header), the config groups it uses with each option's
    one-line description (the option file's first comment), launchers for kullm-train, and its own settings."""
    root = CONF_DIR / f"{config_name}.yaml"
    text = root.read_text(encoding="utf-8")
    header = [line[2:] if line.startswith("# ") else line[1:] for line in _header(text)]
    out = [*header, "", "Config groups (group=option; * is the default):"]
    defaults = OmegaConf.load(root).get("defaults") or []
    groups = [(str(k), v) for entry in defaults if isinstance(entry, DictConfig) for k, v in entry.items()]
    if config_name == "train":
        groups.append(("hydra/launcher", "basic"))
    for group, default in groups:
        folder = CONF_DIR / group
        options = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
        out.append(f"  {group}=")
        if group == "hydra/launcher":
            out.append(f"    {'basic':<30}* jobs one after another in this process")
            out.append(f"    {'submitit_local':<30}  each job a separate local process (Hydra's submitit plugin)")
        for path in options:
            mark = "*" if path.stem == default else " "
            out.append(f"    {path.stem:<30}{mark} {_describe(path)}".rstrip())
    settings = re.findall(r"^([A-Za-z_]\w*):[ \t]*([^#\n]*?)[ \t]+#[ \t]*(.+)$", text, flags=re.M)
    if settings:
        out += ["", "Settings (key=value; any key of the composed config can be set the same way):"]
        out += [f"  {f'{key}={value.strip()}':<31} {note.strip()}" for key, value, note in settings]
    out += [
        "",
        "--cfg job prints the composed config (credentials redacted); -m runs a sweep (one job per combination);",
        "--version prints kullm's version. The README explains every group.",
    ]
    return "\n".join(out) + "\n"


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            lines.append(line)
    return lines


def _describe(path: Path) -> str:
    """The first sentence of an option file's header comment (its usage lines left out)."""
    words = " ".join(line.lstrip("#").strip() for line in _header(path.read_text(encoding="utf-8"))
                     if not line.startswith("#  ")).strip()  # fmt: skip
    if ". " in words:
        words = words[: words.index(". ") + 1]
    return words if len(words) <= 110 else words[:107].rstrip() + "..."


def check_overrides(config_name: str, args: Sequence[str]) -> None:
    """Fail on a command-line override of a key that does not exist, naming the nearest valid key.

    Hydra refuses such keys too, but without a suggestion; group selections (``model=tiny``) are left to Hydra,
    which lists the available options itself.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in _strip_flags(args) if "=" in a]
    if not plain:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception:
        return  # a syntax error: Hydra reports it with its own message
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    selections, keys = [], []
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or key.startswith("hydra") or o.package:
            continue
        if key in groups:
            if not o.is_sweep_override():
                selections.append(f"{key}={o.value()}")
        else:
            keys.append(key)
    if not keys:
        return
    try:
        cfg = compose(config_name, selections)
    except Exception:
        return  # a bad group option: Hydra reports it with the list of options
    for key in keys:
        if not _has_key(cfg, key):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent, default=None, throw_on_resolution_failure=False) if parent else cfg
            if isinstance(node, DictConfig):
                hint = nearest(leaf, list(node.keys()))
                hint = hint.replace("'", f"'{parent}." if parent else "'", 1) if hint else ""
            else:
                hint = nearest(key, _paths(cfg))
            raise ConfigError(f"unknown config key '{key}'{hint}; add it with '+{key}=…' if it is meant to be new")


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted ``key`` names a node of ``cfg``; nothing is resolved, and a required ``???`` counts."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node.keys():
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return False
    return True


def _strip_flags(args: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in (
            "--cfg",
            "-c",
            "--package",
            "-p",
            "--config-path",
            "-cp",
            "--config-name",
            "-cn",
            "--config-dir",
            "-cd",
            "--experimental-rerun",
            "--info",
            "-i",
        ):
            skip = a not in ("--info", "-i")
        elif not a.startswith("-"):
            out.append(a)
    return out


def _paths(cfg: DictConfig, prefix: str = "") -> list[str]:
    paths = []
    for k in cfg.keys():
        node = cfg._get_node(k)
        path = f"{prefix}{k}"
        paths.append(path)
        if isinstance(node, DictConfig):
            paths += _paths(node, f"{path}.")
    return paths


def print_redacted_cfg(config_name: str, args: Sequence[str]) -> bool:
    """``--cfg job`` (``-c job``): print the composed job config with credentials redacted instead of Hydra's
    plain dump; return whether it did. ``--cfg hydra|all`` are left to Hydra (they print no job values)."""
    argv = list(args)
    for flag in ("--cfg", "-c"):
        if flag in argv and argv.index(flag) + 1 < len(argv) and argv[argv.index(flag) + 1] == "job":
            i = argv.index(flag)
            rest = [a for k, a in enumerate(argv) if k not in (i, i + 1) and a not in ("--resolve",)]
            overrides = [a for a in rest if not a.startswith("-")]
            cfg = compose(config_name, overrides)
            secrets = secret_values(cfg, overrides)
            print(scrub(OmegaConf.to_yaml(cfg, resolve="--resolve" in argv), secrets), end="")
            return True
    return False


def expose_hydra_plugins() -> None:
    """Register kullm's own Hydra plugins (``hydra_plugins/kullm_sweeper``) with Hydra; call before ``hydra.main``.

    Hydra finds plugins by walking the folders of the ``hydra_plugins`` namespace once, when its ``Plugins``
    registry is first used (composing a config is enough). A setuptools editable install serves kullm's part of the
    namespace through an import hook that such a walk cannot list, so the plugin imports but is never found.
    Registering the class by name, through Hydra's ``Plugins.register``, works for every kind of install and
    whenever the walk ran. Without the ``sweeps`` extra there is nothing to register."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # the walk runs first: it would re-import our module and replace the class
    try:
        from hydra_plugins.kullm_sweeper.resumable_optuna import ResumableOptunaSweeper
    except ImportError:
        return
    plugins.register(ResumableOptunaSweeper)


class JobFailed(KullmError, RuntimeError):
    """One job of a multirun sweep failed (its config or data): Hydra records it and runs the other jobs."""


def fail(prog: str, error: BaseException) -> None:
    """Stop with ``<prog>: <error>`` on one line: ``SystemExit`` in a single run; in a multirun sweep an ordinary
    exception, which Hydra records as this job's failure while the other jobs still run (the sweep then exits
    non-zero). Hydra does not catch ``SystemExit``: one bad job would end the whole sweep."""
    message = f"{prog}: {' '.join(str(error).split())}"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except ImportError:
        multirun = False
    if multirun:
        raise JobFailed(message) from None
    raise SystemExit(message) from None
