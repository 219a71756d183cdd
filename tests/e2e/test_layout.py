"""The tree the design card describes: conf/ at the top, stage folders, no import running back up, a wheel whose
console scripts still find the config tree, and tests that mirror the package without importing one another."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kullm.config import CONF_DIR, ROOT

PACKAGE = ROOT / "kullm"
TESTS = ROOT / "tests"
# lower stages first: a module may import its own stage or a lower one, never a higher one
STAGES = ["base", "data", "training", "inference", "evaluation", "translation", "cli"]
CLIS = {"prepare", "train", "generate", "merge", "evaluate", "bench", "translate"}
# tests/ mirrors the package: a folder per stage, base/ for the flat base modules, e2e/ for the CLIs as users run
# them and the tree itself, scripts/ for scripts/ and benchmarks/; shared helpers and fixtures sit at the top
TEST_FOLDERS = {"base", "data", "training", "inference", "evaluation", "translation", "e2e", "scripts"}
# the flat base modules in tiers, lower first: a base module may import its own tier or a lower one (a cycle inside a
# tier is caught by test_no_import_cycle_anywhere)
BASE_TIERS = [
    # files, configs, prompts and tokens: no kullm import beyond this tier
    {"atomic", "cache", "chat_template", "cli", "config", "console", "errors", "language", "redaction", "resumable",
     "runlock", "special_tokens", "templates", "untrusted", "wandb_mode"},
    {"adapter", "tiny"},  # the folders kullm writes for a model: an adapter or model folder, the tiny model's
    {"modeling"},  # loading models (hub, local, tiny, an adapter on its base) and wrapping them for training
]  # fmt: skip


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in STAGES:
        return parts[1]
    return "cli" if parts[-1] in CLIS and len(parts) == 2 else "base"


def kullm_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kullm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if (PACKAGE / node.module[6:]).is_dir())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kullm"))
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Every kullm module and the kullm modules it imports (lazy ones included; ``from kullm import x`` of a
    non-module ``x`` is an edge to ``kullm``)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {me: {owner(t, paths) for t in kullm_imports(path)} - {me} for me, path in paths.items()}


def owner(target: str, modules) -> str:
    """The module ``target`` names, or that holds it (``kullm.__version__`` → ``kullm``)."""
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module: each is an import cycle."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start] = seen
    found = {tuple(sorted(m for m in reach[v] if v in reach[m])) for v in graph if v in reach[v]}
    return sorted(list(c) for c in found)


def tier_of(module: str) -> int | None:
    """The base tier of a flat module (``None``: not a base module)."""
    name = module.removeprefix("kullm.")
    return next((i for i, tier in enumerate(BASE_TIERS) if name in tier), None)


def upward_base_imports(me: str, targets) -> list[str]:
    """The imports of base module ``me`` into a higher base tier."""
    mine = tier_of(me)
    return [f"{me} (tier {mine}) imports {t} (tier {tier_of(t)})"
            for t in sorted(targets) if mine is not None and (tier_of(t) or 0) > mine]  # fmt: skip


def imported_test_modules(path: Path) -> list[str]:
    """The ``test_*`` modules ``path`` imports, at any depth: by ``import``, ``from … import``, ``importorskip`` or
    ``import_module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            names = [str(node.args[0].value)] if func in ("importorskip", "import_module", "__import__") else []
        else:
            continue
        found += [n for n in names if n.split(".")[0].startswith("test_")]
    return sorted(found)


def test_conf_is_at_the_top_of_the_checkout():
    assert CONF_DIR == ROOT / "conf"
    assert not (PACKAGE / "conf").exists()
    for name in ("train", "prepare", "generate", "merge", "eval"):
        assert (CONF_DIR / f"{name}.yaml").is_file()


def test_the_package_is_grouped_by_stage():
    for stage in STAGES[1:-1]:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert CLIS <= top
    # beside the CLIs only the shared base every stage uses: a new flat module is a decision, made here
    base = set().union(*BASE_TIERS)
    assert top - CLIS == base, f"flat modules beside the CLIs should be the shared base only: {sorted(top - CLIS)}"


def test_no_import_runs_back_up_from_a_lower_stage():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 25
    bad = []
    for path in modules:
        me = module_name(path)
        for target in kullm_imports(path):
            if target == "kullm":
                continue
            if STAGES.index(stage_of(target)) > STAGES.index(stage_of(me)):
                bad.append(f"{me} ({stage_of(me)}) imports {target} ({stage_of(target)})")
    assert not bad, "\n".join(bad)


def test_the_stage_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from kullm.training.module import KullmLitModule\n")
    (target,) = kullm_imports(bad)
    assert STAGES.index(stage_of(target)) > STAGES.index(stage_of("kullm.data.records"))


def test_no_base_module_imports_a_higher_tier():
    graph = import_graph()
    bad = [line for me in sorted(graph) for line in upward_base_imports(me, graph[me])]
    assert not bad, "\n".join(bad)


def test_the_tier_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from kullm.adapter import read_adapter\n")
    assert upward_base_imports("kullm.atomic", kullm_imports(bad)) == [
        "kullm.atomic (tier 0) imports kullm.adapter (tier 1)"
    ]


def test_no_import_cycle_anywhere():
    """Over every module of every stage, lazy imports included: no strongly connected component."""
    graph = import_graph()
    assert {"kullm.adapter", "kullm.modeling", "kullm.tiny"} <= graph.keys() and len(graph) > 25
    assert cycles(graph) == []


def test_the_cycle_check_catches_a_lazy_import_back(tmp_path):
    graph = import_graph()
    planted = tmp_path / "atomic.py"
    planted.write_text("def f():\n    from kullm.modeling import load_model\n")  # modeling → tiny → atomic → modeling
    graph["kullm.atomic"] = {owner(t, graph) for t in kullm_imports(planted)}
    (cycle,) = cycles(graph)
    assert {"kullm.atomic", "kullm.tiny", "kullm.modeling"} <= set(cycle)


def test_the_tests_mirror_the_package_with_one_name_per_test_file():
    """No ``__init__.py`` under tests/: pytest imports each test file by its bare name, so two alike would collide."""
    files = sorted(TESTS.rglob("test_*.py"))
    assert {p.parent.relative_to(TESTS).as_posix() for p in files} == TEST_FOLDERS
    names = [p.name for p in files]
    assert sorted({n for n in names if names.count(n) > 1}) == []
    assert not list(TESTS.rglob("__init__.py"))


def test_no_test_module_imports_another():
    """What tests share lives in tests/helpers.py and in conftest.py's fixtures, never in a test module."""
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted(TESTS.rglob("*.py")) for m in imported_test_modules(p)]
    assert not bad, "\n".join(bad)


def test_the_test_import_rule_catches_each_spelling(tmp_path):
    t = "test"  # spelled apart, so that a grep of tests/ for these imports finds none here
    planted = tmp_path / "test_x.py"
    planted.write_text(
        f"import {t}_a\nfrom {t}_b import f\n\n\ndef g():\n    from {t}_c.d import h\n"
        f'    return pytest.importorskip("{t}_e"), importlib.import_module("optuna"), h\n'
    )
    assert imported_test_modules(planted) == ["test_a", "test_b", "test_c.d", "test_e"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_installed_wheel_finds_its_config_tree(tmp_path):
    """A non-editable install, run from outside the checkout, composes the seed preset from the packaged conf/."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "outputs", "build", "gpu_wheels", "*.egg-info",
                                                              "__pycache__"))
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("kullm-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import sys, kullm.config as c, kullm.train as t; print(c.CONF_DIR); sys.argv[0] = 'kullm-train'; t.main()"
    out = subprocess.run(
        [sys.executable, "-c", code, "experiment=kullm-v2-polyglot-12.8b", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == str(site / "kullm" / "conf")
    assert "schedule: linear" in out.stdout


def test_a_user_config_folder_joins_the_search_path(tmp_path):
    """Own experiment presets live outside the package: ``hydra.searchpath=[file://<folder>]``."""
    from kullm.config import compose

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - smoke\nseed: 7\nmicro_batch_size: 2\n", encoding="utf-8"
    )
    cfg = compose("train", [f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine", "output_dir=/dev/null"])
    assert cfg.seed == 7 and cfg.micro_batch_size == 2
    assert cfg.model.name == "tiny"  # the rest of smoke still applies
