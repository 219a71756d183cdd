"""Defaults live in conf/ only. Every preset is composed (each top-level config with every option of every group,
and every experiment), and an AST scan of kullm/ checks each config read against them: a key read as ``node.key``
(or ``node["key"]``) must be in the YAML; a ``.get`` of a key the YAML always has should be a required read; a
``.get`` default must not differ from the YAML's value nor stand for a key the YAML lacks. Which names are config
nodes is said per module below; any other receiver of ``.get("key", <literal>)`` must be listed as plain data."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kullm import config
from kullm.config import CONF_DIR, ROOT, compose, defaults

PACKAGE = ROOT / "kullm"
CONFIGS = ("train", "prepare", "generate", "merge", "eval")
ANY_MODEL = ("train.model", "prepare.model", "generate.model")
ANY_DATA = ("train.data", "prepare.data")
GENERATION = ("generate.generation", "eval.generation")

# What the names that hold config stand for, per module: a top-level config ("train"), one of its nodes in every
# preset ("train.data"), or a group option ("judge/openai": code that runs for that option only, or resolves a
# partial node against it with config.defaults). "Function:name" narrows a name to one function.
RECEIVERS: dict[str, dict[str, tuple[str, ...]]] = {
    "kullm/train.py": {
        "cfg": ("train",),
        "cc": ("train.callbacks.checkpoint",),
        "samples": ("train.callbacks.samples",),
    },
    "kullm/prepare.py": {"cfg": ("prepare",)},
    "kullm/generate.py": {"cfg": ("generate",)},
    "kullm/merge.py": {"cfg": ("merge",)},
    "kullm/evaluate.py": {"cfg": ("eval",)},
    "kullm/modeling.py": {
        "cfg": ANY_MODEL,
        "model_cfg": ANY_MODEL,
        "lora_cfg": ("train.lora",),
        "quant": ("train.quant", "generate.quant"),
        "int8": ("quant/int8",),
        "four_bit": ("quant/nf4",),
    },
    "kullm/data/records.py": {"ReadOptions.training:data": ANY_DATA},
    "kullm/data/sft.py": {"data": ANY_DATA},
    "kullm/data/sft_chat.py": {"data": ANY_DATA},
    "kullm/data/preprocess.py": {"data": ANY_DATA},
    "kullm/data/preference.py": {"data": ANY_DATA},
    "kullm/data/pairs.py": {"data": ANY_DATA},
    "kullm/data/contamination.py": {"data": ANY_DATA},
    "kullm/data/datamodule.py": {"self.data": ("train.data",)},
    "kullm/training/module.py": {
        "optim": ("train.optim",),
        "self.optim_cfg": ("train.optim",),
        "self.loss_cfg": ("train.loss",),
    },
    "kullm/training/preflight.py": {
        "cfg": ("train",),
        "trainer_cfg": ("train.trainer",),
        "strategy": ("train.strategy",),
        "loss": ("train.loss",),
    },
    "kullm/training/loggers.py": {"cfg": ("train",), "lc": ("logger/wandb",)},
    "kullm/inference/generator.py": {
        "cfg": ("generate",),
        "self.settings": GENERATION,
        "settings": GENERATION,
    },
    "kullm/inference/files.py": {"cfg": ("generate",), "generator.settings": GENERATION},
    "kullm/inference/loading.py": {"cfg": ("generate",), "quant": ("generate.quant",)},
    "kullm/inference/merging.py": {"cfg": ("merge",)},
    "kullm/evaluation/judges.py": {
        "build_judge:cfg": ("eval.judge",),
        "OpenAIJudge.__init__:cfg": ("judge/openai",),
        "HFJudge.__init__:cfg": ("judge/hf",),
        "JsonClient.__init__:cfg": ("judge/openai", "backend/deepl", "backend/openai"),
    },
    "kullm/translation/backends.py": {
        "build_backend:cfg": ("backend/deepl", "backend/openai"),
        "_Paced._setup:cfg": ("backend/deepl", "backend/openai"),
        "DeepLBackend.__init__:cfg": ("backend/deepl",),
        "OpenAIBackend.__init__:cfg": ("backend/openai",),
    },
    "kullm/evaluation/pipeline.py": {
        "cfg": ("eval",),
        "judge_cfg": ("eval.judge",),
        "bs": ("eval.bootstrap",),
        "gen_cfg": ("generate",),
    },
    "kullm/evaluation/report.py": {"wandb_cfg": ("eval.wandb",)},
    "kullm/evaluation/geval.py": {"from_config:cfg": ("eval.judge_prompt",)},
}
# Config keys read with .get on purpose, and why.
OPTIONAL: dict[tuple[str, str, str], str] = {
    ("kullm/evaluation/geval.py", "cfg", "name"): "unnamed",  # a prompt built in Python may have no name ("")
    ("kullm/evaluation/geval.py", "cfg", "turn"): "hand-built",  # ... nor a turn layout (its hash leaves it out)
}
# Receivers of .get("key", <literal>) that hold no config, and what they hold.
NOT_CONFIG: dict[tuple[str, str], str] = {
    ("kullm/cache.py", "os.environ"): "environment",
    ("kullm/data/stats.py", "read"): "report",  # a read report's counts (older caches lack some)
    ("kullm/tiny.py", "family"): "registry",  # kullm.tiny.FAMILIES
    ("kullm/training/checkpointing.py", "state_dict"): "checkpoint",
    ("kullm/training/module.py", "checkpoint"): "checkpoint",
    ("kullm/training/module.py", "state"): "checkpoint",
    ("kullm/training/sweep.py", "record"): "result",  # a job's result.json
    ("kullm/evaluation/bench_report.py", "old"): "result",  # a results.json kullm-bench wrote before
    ("kullm/evaluation/bench_report.py", "d"): "result",  # a results.json
    ("kullm/evaluation/bench_report.py", "m"): "result",  # its model record
    ("kullm/evaluation/bench_report.py", "r"): "result",  # one benchmark's result
    ("kullm/evaluation/bench_report.py", "meta"): "result",  # and its meta
    ("kullm/evaluation/bench_report.py", "settings"): "result",  # the settings an lm-eval task ran with
    ("kullm/evaluation/harness.py", "out"): "result",  # lm-eval's simple_evaluate output
    ("kullm/evaluation/harness.py", "entry"): "suite entry",  # conf/suite/*.yaml: keys optional by kind
    ("kullm/translation/recipes.py", "obj"): "row",  # a source row of a recipe (GPT4ALL, Dolly, ShareGPT)
    ("kullm/translation/recipes.py", "t"): "row",  # one ShareGPT turn
}
GLOBAL = ("experiment", "hparams_search")  # presets that may set any key (# @package _global_), composed alone
DICT_METHODS = {"get", "items", "keys", "values", "pop", "copy", "setdefault", "update", "__contains__"}


# --- the presets ------------------------------------------------------------------------------------------------


def groups(name: str) -> dict[str, list[str]]:
    """The groups in ``conf/<name>.yaml``'s defaults list and the options of each."""
    found = {}
    for entry in OmegaConf.load(CONF_DIR / f"{name}.yaml").get("defaults") or []:
        if isinstance(entry, DictConfig):
            (group,) = entry.keys()
            found[str(group)] = sorted(p.stem for p in (CONF_DIR / str(group)).glob("*.yaml"))
    return found


@cache
def presets(name: str) -> tuple[tuple[dict[str, str], DictConfig], ...]:
    """``conf/<name>.yaml`` composed so that every option of every group is in one of them (the i-th option of each
    group together), and once with each global preset (experiment, hparams_search): ``(choices, config)`` pairs."""
    options = {g: opts for g, opts in groups(name).items() if g not in GLOBAL}
    rounds = [{g: o[i % len(o)] for g, o in options.items()} for i in range(max(map(len, options.values()), default=1))]
    rounds += [{g: o} for g in GLOBAL for o in groups(name).get(g, [])]
    return tuple((run, compose(name, [f"{g}={o}" for g, o in run.items()])) for run in rounds)


@cache
def nodes(source: str) -> tuple[DictConfig, ...]:
    """Every node a source stands for: a group option's node, or the node at a path in every preset of a config."""
    if "/" in source:
        return (defaults(source),)
    name, _, path = source.partition(".")
    found = (OmegaConf.select(cfg, path) if path else cfg for _, cfg in presets(name))
    return tuple(n for n in found if isinstance(n, DictConfig))


def value(node: DictConfig, key: str):
    try:
        return OmegaConf.to_container(node, resolve=True)[key]
    except Exception:  # an interpolation only a Hydra run resolves (${hydra:...}): compare what is written
        return OmegaConf.to_container(node, resolve=False)[key]


# --- the scan ---------------------------------------------------------------------------------------------------


class Reads(ast.NodeVisitor):
    """Config reads of one module: ``(line, receiver, key, how, default)``, ``how`` "required" or "get"."""

    def __init__(self, table: dict[str, tuple[str, ...]]) -> None:
        self.table, self.scope, self.found, self.others = table, [], [], []

    def visit_FunctionDef(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def sources(self, receiver: str) -> tuple[tuple[str, ...], str] | None:
        """What ``receiver`` stands for, and the dotted path below the table's name (``cfg.data`` → "data")."""
        functions = [s for s in self.scope]
        for name in sorted(self.table, key=len, reverse=True):
            where, _, var = name.rpartition(":")
            if where and where not in (".".join(functions[-2:]), functions[-1] if functions else ""):
                continue
            if receiver == var or receiver.startswith(var + "."):
                rest = receiver[len(var) + 1 :]
                if rest and not re.fullmatch(r"\w+(\.\w+)*", rest):
                    return None
                return self.table[name], rest
        return None

    def add(self, node, receiver: str, key: str, how: str, default=None) -> None:
        resolved = self.sources(receiver)
        if resolved is not None:
            (srcs, rest) = resolved
            self.found.append((node.lineno, receiver, srcs, f"{rest}.{key}" if rest else key, how, default))
        elif how == "get" and default is not None:
            self.others.append((node.lineno, receiver, key))

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "get" and node.args and _text(node.args[0]):
            default = node.args[1] if len(node.args) > 1 else None
            if default is not None and isinstance(default, ast.Constant) and default.value is None:
                default = None
            self.add(node, ast.unparse(f.value), node.args[0].value, "get", default)
            for arg in node.args[1:]:
                self.visit(arg)
            self.visit(f.value)
            return
        if isinstance(f, ast.Attribute):  # node.items(), node.get: methods, not keys
            self.visit(f.value)
            for arg in [*node.args, *node.keywords]:
                self.visit(arg)
            return
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load) and node.attr not in DICT_METHODS:
            self.add(node, ast.unparse(node.value), node.attr, "required")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, ast.Load) and _text(node.slice):
            self.add(node, ast.unparse(node.value), node.slice.value, "required")
        self.generic_visit(node)


def _text(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _literal(node: ast.expr):
    """The value of a default written as a literal (``4 << 20`` too); a name or a call is not one."""
    if any(isinstance(n, (ast.Name, ast.Attribute, ast.Call)) for n in ast.walk(node)):
        raise ValueError(ast.unparse(node))
    return eval(compile(ast.Expression(node), "<default>", "eval"))  # noqa: S307 (constants only, checked above)


def problems(module: str, source: str) -> list[str]:
    """What is wrong with the config reads of one module's source (``module``: its path under the checkout)."""
    scan = Reads(RECEIVERS.get(module, {}))
    scan.visit(ast.parse(source))
    found = []
    for line, receiver, sources, path, how, default in scan.found:
        where = f"{module}:{line}: {receiver}"
        parent, _, key = path.rpartition(".")
        held = []  # (source, the YAML's value or a marker that the key is absent) per node read
        for source in sources:
            for node in nodes(source):
                node = OmegaConf.select(node, parent) if parent else node
                if isinstance(node, DictConfig):
                    held.append((source, value(node, key) if key in node.keys() else KeyError))  # "???" too
        have = [v for _, v in held if v is not KeyError]
        missing = sorted({s for s, v in held if v is KeyError})
        if how == "required":
            if missing:
                found.append(f"{where}.{key}: read as required, but the YAML of {', '.join(missing)} lacks it")
            continue
        if (module, receiver.split(".")[0], key) in OPTIONAL:
            continue
        if held and not missing:
            found.append(f"{where}.get({key!r}): every preset has it: read it as {receiver}.{key}")
        if default is None:
            continue
        try:
            want = _literal(default)
        except ValueError:
            found.append(f"{where}.get({key!r}, {ast.unparse(default)}): a computed default for a config key")
            continue
        if not have:
            found.append(f"{where}.get({key!r}, {want!r}): a default in code only; put {key} in the YAML")
        for other in sorted({repr(v) for v in have if v != want}):
            found.append(f"{where}.get({key!r}, {want!r}): the YAML says {other}")
    for line, receiver, key in scan.others:
        if (module, receiver) not in NOT_CONFIG:
            found.append(
                f"{module}:{line}: {receiver}.get({key!r}, ...): name {receiver!r} in RECEIVERS (config) or in "
                "NOT_CONFIG (plain data, with what it holds)"
            )
    return found


def modules() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


# --- the tests --------------------------------------------------------------------------------------------------


def test_every_config_read_in_kullm_agrees_with_the_yaml():
    found = [p for module, source in modules().items() for p in problems(module, source)]
    assert not found, "\n".join(found)


def test_the_tables_name_real_modules_and_names():
    """A renamed module or variable must not leave its row behind, checking nothing."""
    code = modules()
    assert set(RECEIVERS) <= set(code)
    for module, table in RECEIVERS.items():
        for name in table:
            var = name.rpartition(":")[2]
            assert re.search(rf"\b{re.escape(var)}\b", code[module]), f"{module}: no {var!r}"
    for module, receiver in NOT_CONFIG:
        assert f"{receiver}.get(" in code[module], f"{module}: no {receiver}.get("
    for module, receiver, key in OPTIONAL:
        assert f'{receiver}.get("{key}"' in code[module], f"{module}: no {receiver}.get({key!r}"


def test_the_scan_fails_on_a_planted_disagreement_and_a_missing_key():
    source = (
        "def schedule(cfg):\n"
        '    ratio = cfg.optim.get("warmup_ratio", 0.0)\n'  # the YAML says 0.1 (and the presets 0.05, 0.03 ...)
        "    return ratio, cfg.optim.warmup_ration, cfg.data['cutoff_len']\n"  # a typo; a key every preset has
    )
    found = "\n".join(problems("kullm/train.py", source))
    assert "train.py:2: cfg.optim.get('warmup_ratio', 0.0): the YAML says 0.1" in found
    assert "every preset has it: read it as cfg.optim.warmup_ratio" in found
    assert "train.py:3: cfg.optim.warmup_ration: read as required, but the YAML of train lacks it" in found
    assert "cutoff_len" not in found


def test_the_scan_fails_on_a_default_in_code_only_and_on_an_unlisted_receiver():
    source = 'def f(cfg, row):\n    return cfg.data.get("shuffle_buffer", 1000), row.get("id", "x")\n'
    found = problems("kullm/train.py", source)
    assert found[0] == (
        "kullm/train.py:2: cfg.data.get('shuffle_buffer', 1000): a default in code only; put shuffle_buffer in the YAML"
    )
    assert found[1].startswith("kullm/train.py:2: row.get('id', ...): name 'row' in RECEIVERS")
    judge = 'class OpenAIJudge:\n    def __init__(self, cfg):\n        self.t = cfg.get("timeout", 30)\n'
    assert "the YAML says 60.0" in "\n".join(problems("kullm/evaluation/judges.py", judge))


def test_a_group_option_resolves_as_hydra_composes_it():
    """config.defaults reads an option's defaults list as Hydra does: the node every preset that chose it holds."""
    checked = set()
    for name in CONFIGS:
        for choices, cfg in presets(name):
            for group, option in choices.items():
                if group in GLOBAL:
                    continue
                node = OmegaConf.select(cfg, group)  # lora=none: an empty node (or none)
                node = OmegaConf.to_container(node, resolve=True) if node is not None else {}
                got = OmegaConf.to_container(defaults(f"{group}/{option}"), resolve=True)
                assert got == node, (name, group, option)
                checked.add(f"{group}/{option}")
    assert {"model/tiny-llama", "generation/greedy", "judge/hf", "strategy/deepspeed_zero3_offload"} <= checked
    loss = defaults("train.loss", {"chunk_size": 7})
    assert (loss.chunk_size, loss.impl) == (7, "auto")
    optim = defaults("optim/adamw", {"lr": 0.5, "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True}})
    assert optim.optimizer == {"_target_": "torch.optim.SGD", "_partial_": True} and optim.warmup_ratio == 0.1


def test_the_schema_is_collected_from_light_modules():
    """config.validate's tables come from the stages that consume each key, in modules that import no torch."""
    heavy = "{'torch', 'lightning', 'transformers'}"
    code = f"import sys, kullm.config as c; c.SCHEMA; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
    declared = {m for m, src in modules().items() if re.search(r"^SCHEMA\b", src, re.M)}
    named = {str(Path(*m.split(".")).with_suffix(".py")) for m in config.SCHEMA_MODULES}
    assert declared == named, "a module declaring SCHEMA is not in config.SCHEMA_MODULES (or the reverse)"
    assert config.SCHEMA["data.train_on"] is __import__("kullm.data.sft_chat", fromlist=["TRAIN_ON"]).TRAIN_ON
