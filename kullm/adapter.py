"""Adapter folders: what training leaves and what generation, merging and evaluation read.

An adapter folder holds

* ``adapter_config.json`` + ``adapter_model.safetensors`` — PEFT's own format (``PeftModel.from_pretrained``),
* the tokenizer (``save_pretrained``),
* ``template.yaml`` — the prompt template used in training,
* ``kullm_config.yaml`` — the resolved run config (secrets redacted); its ``model`` node names the base model.

Full fine-tuning (``lora=none``) leaves a *model folder* instead: a plain Hugging Face checkpoint (sharded
safetensors, ``generation_config.json`` with EOS and pad) with the same tokenizer, template and config files, which
``kullm-generate base=<folder>`` and vLLM/TGI load as they are.

Folders are written to a temporary sibling and renamed into place (:func:`kullm.atomic.write_folder`), so a crash
while writing never leaves a half-written adapter nor destroys the previous one. This module is the folder format
only: loading an adapter onto its base model is :func:`kullm.modeling.load_adapter`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.atomic import write_folder
from kullm.chat_template import served_prompter, serving
from kullm.errors import KullmError
from kullm.redaction import redact
from kullm.special_tokens import set_stop_tokens
from kullm.templates import Prompter
from kullm.untrusted import read_yaml

CONFIG_FILE = "kullm_config.yaml"
TEMPLATE_FILE = "template.yaml"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(KullmError, ValueError):
    """An adapter folder that is missing, incomplete or empty."""


@dataclass
class AdapterSpec:
    """What an adapter folder says about itself."""

    path: Path
    model: dict[str, Any]  # the ``model=`` node of the run that trained it
    prompter: Prompter
    config: dict[str, Any]


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without the segments FSDP, activation checkpointing and ``torch.compile`` wrappers insert."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _clean_weight_names(model, path: Path) -> None:
    """Rewrite a saved adapter whose weight names carry wrapper segments under the names PEFT loads.

    PEFT drops the adapter name only at the end of a name (``lora_A.default.weight`` → ``lora_A.weight``): behind a
    wrapper segment (``lora_A.default._fsdp_wrapped_module.weight``) it stays, so it is dropped here, with PEFT's own
    rule, once the segments are gone.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        if not any(w in k for k in f.keys() for w in WRAPPER_SEGMENTS):
            return
    adapter = model.active_adapter
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[model.peft_config[adapter].peft_type]
    weights = load_file(str(path))
    renamed = {tuner._remove_adapter_name_from_key(clean_name(k), adapter): v for k, v in weights.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})


def save_adapter(
    model,
    folder: str | Path,
    *,
    tokenizer=None,
    prompter: Prompter | None = None,
    config: DictConfig | Mapping | None = None,
    state_dict: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s adapter (PEFT format) with tokenizer, template and config; verify it; swap it in atomically.

    ``state_dict`` lets a sharded strategy pass the already-gathered adapter weights.
    """

    def write(tmp: Path) -> None:
        kwargs: dict[str, Any] = {"state_dict": dict(state_dict)} if state_dict is not None else {}
        if len(getattr(model, "peft_config", {})) > 1:  # a frozen reference adapter beside the trained one stays out
            kwargs["selected_adapters"] = [model.active_adapter]
        model.save_pretrained(str(tmp), safe_serialization=True, **kwargs)
        # PEFT picks the adapter's weights by walking the module tree; under FSDP that tree's names carry wrapper
        # segments, so a sharded strategy passes the weights under those names and they are renamed here
        _clean_weight_names(model, tmp / WEIGHTS_FILE)
        _write_meta(tmp, tokenizer, prompter, config)
        verify_adapter(tmp)

    return write_folder(folder, write)


def save_model(
    model,
    folder: str | Path,
    *,
    tokenizer,
    prompter: Prompter | None = None,
    config: DictConfig | Mapping | None = None,
    state_dict: Mapping[str, Any] | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write a fully fine-tuned ``model`` as a plain Hugging Face checkpoint with kullm's files; swap it in atomically.

    ``state_dict`` (names as in ``model.state_dict()``) lets a sharded strategy pass the gathered weights.
    """

    def write(tmp: Path) -> None:
        meta = {"tokenizer": tokenizer, "prompter": prompter, "config": config}
        write_model(model, tmp, **meta, state_dict=state_dict, max_shard_size=max_shard_size)

    return write_folder(folder, write)


def write_model(
    model,
    folder: Path,
    *,
    tokenizer,
    prompter: Prompter | None = None,
    config: DictConfig | Mapping | None = None,
    state_dict: Mapping[str, Any] | None = None,
    max_shard_size: str = "5GB",
) -> None:
    """Fill ``folder`` with :func:`save_model`'s files (the model with its stop tokens set, tokenizer, template,
    redacted config) and verify it; :func:`kullm.inference.merging.merge` checks it further before swapping it in."""
    set_stop_tokens(model, tokenizer)
    kwargs = {"state_dict": dict(state_dict)} if state_dict is not None else {}
    model.save_pretrained(str(folder), max_shard_size=max_shard_size, **kwargs)
    _write_meta(folder, tokenizer, prompter, config)
    verify_model(folder)


def _write_meta(tmp: Path, tokenizer, prompter: Prompter | None, config) -> None:
    if tokenizer is not None:  # carrying the chat_template of the prompt it was trained on (kullm.chat_template)
        with serving(tokenizer, served_prompter(prompter, (config or {}).get("data"))):
            tokenizer.save_pretrained(str(tmp))
    if prompter is not None:
        prompter.save(tmp / TEMPLATE_FILE)
    if config is not None:
        OmegaConf.save(OmegaConf.create(redact(config)), tmp / CONFIG_FILE)


def verify_model(folder: str | Path) -> int:
    """Check that ``folder`` holds a Hugging Face checkpoint with non-empty safetensors weights; return its size."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise AdapterError(f"{folder}: no config.json and *.safetensors: not a model folder")
    n = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            n += sum(_numel(f, k) for k in f.keys())
    if n == 0:
        raise AdapterError(f"{folder}: its safetensors hold no weights")
    return n


def is_model_folder(folder: str | Path) -> bool:
    """A full checkpoint (``lora=none``), not an adapter."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


def verify_adapter(folder: str | Path) -> int:
    """Check that ``folder`` holds a non-empty LoRA adapter; return its number of parameters."""
    from safetensors import safe_open

    folder = Path(folder)
    for name in ("adapter_config.json", WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder}: no {name}: not an adapter folder")
    check_safetensors(folder / WEIGHTS_FILE)
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        keys = list(f.keys())
        n = sum(_numel(f, k) for k in keys)
    if not keys or n == 0:
        raise AdapterError(f"{folder / WEIGHTS_FILE}: holds no adapter weights (an empty adapter)")
    wrapped = [k for k in keys if any(w in k for w in WRAPPER_SEGMENTS)]
    if wrapped:  # PEFT matches names exactly: these weights would be skipped on load, leaving a no-op adapter
        raise AdapterError(
            f"{folder / WEIGHTS_FILE}: {len(wrapped)} weight name(s) carry a wrapper segment (e.g. {wrapped[0]}): "
            "PEFT would load none of them"
        )
    return n


# bytes per element of each safetensors dtype
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header lies (a tensor whose bytes lie outside the file, overlap another's, or
    do not match its shape and dtype), naming the file and the tensor, before any reader trusts it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            raise AdapterError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = 0
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: _start(kv[1]))
    for name, info in tensors:
        why = _tensor_problem(info, size - 8 - n)
        if why is None and info["data_offsets"][0] != end:
            why = f"its bytes start at {info['data_offsets'][0]}, where the previous tensor ends at {end}"
        if why is not None:
            raise AdapterError(f"{path}: tensor {name}: {why}: the file's header lies, refusing it")
        end = info["data_offsets"][1]


def _start(info) -> int:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    return offsets[0] if isinstance(offsets, list) and offsets and isinstance(offsets[0], int) else -1


def _tensor_problem(info, data_bytes: int) -> str | None:
    """What is wrong with one tensor's header entry (``None``: nothing)."""
    if not isinstance(info, dict):
        return "no dtype, shape and data_offsets"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        return f"data_offsets {offsets!r} are not two integers"
    start, stop = offsets
    if not 0 <= start <= stop <= data_bytes:
        return f"data_offsets {offsets} lie outside the file's {data_bytes} bytes of data"
    numel = 1
    for d in shape:
        numel *= d
    if stop - start != numel * DTYPE_BYTES[dtype]:
        return f"shape {shape} ({dtype}) needs {numel * DTYPE_BYTES[dtype]} bytes, data_offsets give {stop - start}"
    return None


def _numel(f, key: str) -> int:
    n = 1
    for d in f.get_slice(key).get_shape():
        n *= d
    return n


def read_adapter(folder: str | Path) -> AdapterSpec:
    """Read an adapter folder's base-model node, template and config (no weights are loaded)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    if is_model_folder(folder):
        raise AdapterError(
            f"{folder}: a full checkpoint (lora=none), not an adapter: it loads as it is (kullm-generate "
            f"base={folder}, vLLM, TGI); there is nothing to merge"
        )
    verify_adapter(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE}: was it written by kullm-train?")
    config = read_yaml(cfg_path)  # plain data: a shared folder's interpolations are never resolved
    if not isinstance(config, dict) or "model" not in config:
        raise AdapterError(f"{cfg_path}: has no 'model' node naming the base model")
    tpl = folder / TEMPLATE_FILE
    prompter = Prompter.from_file(tpl) if tpl.is_file() else Prompter.from_config(config["template"])
    return AdapterSpec(folder, dict(config["model"]), prompter, config)
