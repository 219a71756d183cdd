"""The model a benchmark scores: an adapter on its base (not merged), a merged or full checkpoint folder, or a hub
id, loaded once and shared by every suite of a ``kullm-bench`` run (lm-eval tasks, judge suites, purity).

Loading is :func:`kullm.inference.loading.load_for_generation` (the same ``adapter=`` / ``base=`` / ``model`` group
keys as ``kullm-generate``); generation is kullm's batched :class:`~kullm.inference.generator.Generator`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kullm.config import defaults
from kullm.templates import Prompter

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: what marks a folder as an adapter
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class BenchModel:
    """A loaded model and what results record about it.

    ``name``: the short label in tables (the folder's name, or the hub id); ``path``: what was given (absolute for
    a folder); ``adapter``: the adapter folder or None; ``base``: the base model's name or path (for a merged folder
    or hub id, ``path`` itself); ``hashes``: ``{"model": ..., "adapter": ...}`` content hashes (sha256 of the weight
    files, or a hub commit).
    """

    model: Any  # a transformers PreTrainedModel, or a peft PeftModel (the adapter applied, never merged)
    tokenizer: Any
    name: str
    path: str
    adapter: str | None
    base: str
    hashes: dict[str, str | None] = field(default_factory=dict)
    prompter: Prompter | None = None  # the training template (an adapter's, or a merged folder's template.yaml)
    chat_only: bool = False  # trained on the tokenizer's own chat template (data.chat_template=tokenizer)

    def generator(self, settings: Mapping[str, Any]):
        """kullm's batched :class:`~kullm.inference.generator.Generator` over this model; ``settings`` is a
        ``generation=`` node (keys it leaves out are ``conf/generation/default.yaml``'s)."""
        from kullm.inference.generator import Generator

        prompter = self.prompter or Prompter.from_config(defaults("template/kullm"))
        return Generator(self.model, self.tokenizer, prompter, settings, self.name, chat_only=self.chat_only)


def load_bench_model(cfg: DictConfig) -> BenchModel:
    """Load what ``adapter=`` / ``base=`` (or the ``model`` group) of a ``kullm-bench`` config names.

    A ``base=`` folder that holds ``adapter_config.json`` is taken as the adapter it is.
    """
    from omegaconf import OmegaConf

    from kullm.adapter import read_adapter
    from kullm.inference.loading import load_for_generation, trained_on_chat_template

    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    if not cfg.adapter and cfg.base and (Path(str(cfg.base)).expanduser() / ADAPTER_CONFIG).is_file():
        cfg.adapter, cfg.base = cfg.base, None
    model, tokenizer, prompter, label = load_for_generation(cfg)
    if cfg.adapter:
        spec = read_adapter(cfg.adapter)
        base = str(spec.model.get("name_or_path"))
        adapter = str(Path(str(cfg.adapter)).expanduser().resolve())
        hashes = {"model": base_hash(base, model), "adapter": folder_hash(Path(adapter))}
        name = Path(adapter).name
        if name == "adapter":  # a run's outputs/<run>/adapter: the run's name says more
            name = Path(adapter).parent.name
    else:
        base, adapter = label, None
        folder = Path(label)
        hashes = {"model": folder_hash(folder) if folder.is_dir() else hub_commit(model), "adapter": None}
        name = folder.name if folder.is_dir() else label
    return BenchModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=adapter or label,
        adapter=adapter,
        base=base,
        hashes=hashes,
        prompter=prompter,
        chat_only=trained_on_chat_template(cfg.adapter or cfg.base),
    )


def base_hash(base: str, model: Any) -> str | None:
    """The base model's hash: the weights of the folder it was loaded from, else the hub commit it was loaded at."""
    inner = getattr(model, "get_base_model", lambda: model)()
    loaded = str(getattr(getattr(inner, "config", None), "_name_or_path", "") or base)
    for name in (loaded, base):  # kullm:tiny loads from the folder it was built in
        if name and Path(name).expanduser().is_dir():
            return folder_hash(Path(name).expanduser())
    return hub_commit(model)


def folder_hash(folder: Path) -> str:
    """sha256 over a folder's weight files (names, then contents, in name order): the same weights, the same hash.

    Reading a 7B model's 15 GB takes a while, so the hash is kept in kullm's cache under the files' paths, sizes
    and modification times: a folder scored again is not read again unless a weight file changed.
    """
    from kullm.atomic import rewrite
    from kullm.cache import cache_root

    files = sorted(p for p in folder.resolve().iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    stamp = json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    memo = cache_root() / "weight-hashes" / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".txt")
    try:
        return memo.read_text(encoding="utf-8").strip()
    except OSError:
        pass
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with rewrite(memo) as tmp:  # whole or not at all: a concurrent reader never sees half a hash
            tmp.write_text(digest, encoding="utf-8")
    except OSError:  # a read-only cache only costs the hash again next time
        pass
    return digest


def hub_commit(model: Any) -> str | None:
    """The hub commit a model was downloaded at (transformers records it on the config), if known."""
    base = getattr(model, "get_base_model", lambda: model)()
    commit = getattr(getattr(base, "config", None), "_commit_hash", None)
    return f"commit:{commit}" if commit else None


def describe(bm: BenchModel) -> dict[str, Any]:
    """What ``results.json`` records about the model (JSON-ready)."""
    return json.loads(
        json.dumps(
            {
                "name": bm.name,
                "path": bm.path,
                "adapter": bm.adapter,
                "base": bm.base,
                "hashes": bm.hashes,
                "dtype": str(getattr(bm.model, "dtype", "")).removeprefix("torch."),
            }
        )
    )
