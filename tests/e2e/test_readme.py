"""The documentation cannot drift from the code: every ``kullm-*`` command that README.md and docs/*.md show composes
and validates as its CLI would take it; README stays a front page; every relative link lands; the two set-up
commands are the ones ``.ci/run`` runs."""

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.types import RunMode

from kullm.cli import check_overrides
from kullm.config import CONF_DIR, ROOT, compose, validate

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
# the root config each console script composes (tests below check this covers every script in pyproject.toml)
CONFIG = {
    "kullm-prepare": "prepare",
    "kullm-train": "train",
    "kullm-generate": "generate",
    "kullm-merge": "merge",
    "kullm-eval": "eval",
    "kullm-translate": "translate",
    "kullm-bench": "bench",
}
# Placeholders a reader fills in, each replaced by a sample value of the right kind before the command is composed.
# Order matters: longer placeholders first. A placeholder missing here fails the test that meets it.
USER_CONF = "/path/to/my_conf"  # README's own-presets example: the test writes this folder (see user_conf)
SUBSTITUTIONS = {
    "<date>/<time>": "2025-01-01/12-00-00",  # a run folder's name
    "<run>": "outputs/train/2025-01-01/12-00-00",  # a run folder
    "<responses.jsonl>": "outputs/responses.jsonl",
    "<your copy>": "data/kullm-v1/kullm-v1.jsonl",  # a data file of your own
    "<folder>": "models/my-model",  # a model folder
    "<name>": "my-run",  # run_name=
    "/.../": "/my-run/",  # outputs/train/.../adapter
    "…": "outputs/train/my-run/adapter",  # adapter=…
}
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>|\.\.\.|…")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"kullm-[a-z]+")


@dataclass(frozen=True)
class Shown:
    """A ``kullm-*`` command as a page shows it."""

    path: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def shown_commands(path: Path, text: str) -> Iterator[Shown]:
    """Every ``kullm-*`` command in the fenced code blocks and inline code of one page, in page order."""
    found: list[tuple[int, str]] = []
    for block in FENCE.finditer(text):
        pending, start = "", 0
        for n, line in enumerate(block.group(1).splitlines(), _line_of(text, block.start(1))):
            start = start or n
            if line.rstrip().endswith("\\"):  # the command goes on on the next line
                pending += line.rstrip()[:-1] + " "
                continue
            found += [(start, part) for part in (pending + line).split("&&")]
            pending, start = "", 0
    outside = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # same line numbers, no code blocks
    for span in INLINE.finditer(outside):
        found.append((_line_of(outside, span.start()), span.group(1).replace("\n", " ")))
    for line, part in sorted(found, key=lambda x: x[0]):
        words = part.split()
        if words and COMMAND.fullmatch(words[0]):
            yield Shown(path, line, " ".join(words))


def all_shown() -> list[Shown]:
    return [c for path in DOCS for c in shown_commands(path, path.read_text(encoding="utf-8"))]


def fill_placeholders(text: str, user_conf: Path) -> str:
    """The command with its placeholders filled in and its trailing ``# comment`` left out."""
    text = re.split(r"\s#", text, maxsplit=1)[0].replace(f"file://{USER_CONF}", user_conf.as_uri())
    for placeholder, sample in SUBSTITUTIONS.items():
        text = text.replace(placeholder, sample)
    left = PLACEHOLDER.findall(text)
    assert not left, f"placeholder {left[0]!r} has no sample value: add one to SUBSTITUTIONS in {__file__}"
    return text


def arguments(script: str, words: list[str]) -> tuple[bool, list[str]]:
    """``(multirun, overrides)`` as the CLI reads its command line (``kullm-generate`` quotes free text first)."""
    if script == "kullm-generate":
        from kullm.generate import quote_text_args

        words = quote_text_args(words)
    multirun = any(w in ("-m", "--multirun") for w in words)
    flags = [w for w in words if w.startswith("-") and w not in ("-m", "--multirun")]
    assert not flags, f"flags {flags}: teach this test what they mean before a page shows them"
    return multirun, [w for w in words if not w.startswith("-")]


def jobs(overrides: list[str]) -> Iterator[list[str]]:
    """The jobs of a multirun: every combination of the command line's sweeps (an interval, which a search samples
    from, contributes its lower end)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    combos: list[list[str]] = [[]]
    for text, o in zip(overrides, parsed, strict=True):
        if not o.is_sweep_override():
            values = [text]
        elif isinstance(o.value(), IntervalSweep):
            values = [f"{o.get_key_element()}={o.value().start}"]
        else:
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        combos = [[*c, v] for c in combos for v in values]
    yield from combos


@cache
def composition_error(script: str, words: tuple[str, ...]) -> str | None:
    """Why the command does not compose and validate as its CLI would take it; ``None`` when it does."""
    config_name = CONFIG[script]
    try:
        multirun, overrides = arguments(script, list(words))
        check_overrides(config_name, overrides)
        if multirun:  # Hydra's own multirun composition first: sweeps, launcher and sweeper settings
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                GlobalHydra.instance().config_loader().load_configuration(
                    config_name, overrides, run_mode=RunMode.MULTIRUN
                )
        for job in jobs(overrides) if multirun else [overrides]:
            validate(compose(config_name, job))
    except Exception as e:  # noqa: BLE001 - any failure is the finding, reported with the command
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    return None


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory) -> Path:
    """README's own-presets folder: ``experiment/mine.yaml`` starting from a kullm preset, as README says it may."""
    folder = tmp_path_factory.mktemp("my_conf")
    (folder / "experiment").mkdir()
    (folder / "experiment" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - kullm-v2-polyglot-12.8b\n")
    return folder


SHOWN = all_shown()


@pytest.mark.parametrize("shown", SHOWN, ids=[f"{c.path.name}:{c.line}:{i}" for i, c in enumerate(SHOWN)])
def test_every_command_the_docs_show_composes(shown, user_conf):
    text = fill_placeholders(shown.text, user_conf)
    script, *words = shlex.split(text)
    assert script in CONFIG, f"{shown}\n  no console script {script!r}; there are: {', '.join(CONFIG)}"
    error = composition_error(script, tuple(words))
    assert error is None, f"{shown}\n  does not compose: {error}"


def test_the_pages_show_every_console_script_and_many_commands():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    scripts = re.findall(r"^([\w-]+) = ", pyproject.split("[project.scripts]\n")[1].split("\n[")[0], re.M)
    assert set(CONFIG) == set(scripts)
    assert {c.text.split()[0] for c in SHOWN} == set(CONFIG)
    assert len(SHOWN) >= 40, [str(c) for c in SHOWN]
    assert {p.name for p in DOCS} >= {"README.md", "data.md", "training.md", "inference.md", "evaluation.md"}


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_commands_sit_where_this_test_finds_them(path):
    """An indented code block would hide its commands from this test: pages fence their code."""
    outside = FENCE.sub("", path.read_text(encoding="utf-8"))
    hidden = [line for line in outside.splitlines() if re.match(r"( {4,}|\t)kullm-", line)]
    assert not hidden, f"{path.relative_to(ROOT)}: put these in a ```bash block: {hidden}"


def test_the_commands_table_has_a_row_for_every_console_script():
    section = _section(ROOT / "README.md", "Commands")
    rows = [line for line in section.splitlines() if line.startswith("| `kullm-")]
    assert [row.split("`")[1].split()[0] for row in rows] == list(CONFIG)


def test_a_command_that_does_not_compose_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `kullm-train optim.lrr=1e-4` or\n\n```bash\nkullm-eval judge=nosuch\n```\n", encoding="utf-8")
    shown = list(shown_commands(page, page.read_text(encoding="utf-8")))
    assert [(c.line, c.text) for c in shown] == [(1, "kullm-train optim.lrr=1e-4"), (4, "kullm-eval judge=nosuch")]
    assert "did you mean 'optim.lr'" in composition_error("kullm-train", ("optim.lrr=1e-4",))
    assert "nosuch" in composition_error("kullm-eval", ("judge=nosuch",))
    assert "Ambiguous value" in composition_error("kullm-train", ("optim.lr=1e-4,2e-4",))  # a sweep needs -m
    assert "Sweeping over Hydra" in composition_error("kullm-train", ("-m", "hydra.run.dir=a,b"))
    assert composition_error("kullm-train", ("-m", "experiment=smoke", "optim.lr=1e-4,2e-4")) is None
    with pytest.raises(AssertionError, match="has no sample value"):
        fill_placeholders("kullm-merge adapter=<checkpoint>", tmp_path)


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_setup_commands_are_the_ones_ci_runs():
    ci = [" ".join(line.split()) for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    ci_installs = [line.replace("python -m pip", "pip").replace(" -q", "") for line in ci if "pip install" in line]
    block = FENCE.search(_section(ROOT / "README.md", "Set up and run")).group(1)
    demo, tests = [[s.strip() for s in line.split("&&")] for line in block.splitlines() if line.startswith("pip ")]
    assert tests == [*ci_installs, "python -m pytest"]
    assert "python -m pytest" in ci
    assert demo[: len(ci_installs)] == ci_installs


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a page (lower case, punctuation dropped, spaces as hyphens)."""
    anchors: set[str] = set()
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_relative_link_lands(path):
    text = INLINE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in github_anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_anchor_rule_is_githubs(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Training: `kullm-train`\n## Faster training\n## Faster training\n## 맥락 유지, A/B\n")
    assert github_anchors(page) == {"training-kullm-train", "faster-training", "faster-training-1", "맥락-유지-ab"}


def _section(path: Path, title: str) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]
