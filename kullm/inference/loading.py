"""Loading what generation runs on: an adapter (``adapter=``), a checkpoint or merged folder (``base=``) or the
``model`` group, with its tokenizer, its template and the device it runs on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.templates import Prompter

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; a requested but missing GPU is an error."""
    import torch

    device = device or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device}, but torch sees no CUDA GPU: use device=cpu or device=auto")
    return device


def load_for_generation(cfg: DictConfig):
    """``(model, tokenizer, prompter, label)`` for ``adapter=``, ``base=`` or the ``model`` group, on cfg's device."""
    from kullm.modeling import load_adapter, load_model, load_tokenizer

    if cfg.adapter and cfg.base:
        raise ValueError("give adapter=<folder> or base=<checkpoint>, not both (an adapter names its own base)")
    device = resolve_device(cfg.device)
    quant = OmegaConf.to_container(cfg.quant, resolve=True) if cfg.quant else None
    quantized = bool(quant) and quant["mode"] != "none"
    device_map = cfg.device_map or ({"": device} if quantized else None)
    if cfg.adapter:
        model, tokenizer, prompter = load_adapter(
            cfg.adapter,
            dtype=cfg.dtype,
            quant=quant,
            device_map=device_map,
            trust_remote_code=bool(cfg.trust_remote_code),
        )
        label = str(Path(cfg.adapter).expanduser().resolve())
    else:
        node = model_node(cfg)
        model = load_model(node, quant=quant, device_map=device_map)
        model.eval()
        tokenizer = load_tokenizer(node)
        prompter = folder_prompter(node["name_or_path"]) or Prompter.from_config(cfg.template)
        name = Path(str(node["name_or_path"])).expanduser()
        label = str(name.resolve()) if name.exists() else str(node["name_or_path"])
    if device_map is None:
        model.to(device)
    log.info("generating with %s on %s (%s)", label, model.device, model.dtype)
    return model, tokenizer, prompter, label


def model_node(cfg: DictConfig) -> dict[str, Any]:
    """The ``model`` group node, or one for ``base=`` (its tokenizer, EOS and pad are the checkpoint's own)."""
    node = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.base:
        base = str(cfg.base)
        node.update(
            name=Path(base).name,
            name_or_path=base,
            revision=None,
            tokenizer=None,
            eos_token=None,
            pad_token=None,
            shape_only=False,
            dtype=cfg.dtype or checkpoint_dtype(base),
        )
    elif cfg.dtype:
        node["dtype"] = cfg.dtype
    return node


def checkpoint_dtype(name_or_path: str) -> str:
    """The dtype a checkpoint was saved in (``float32`` when its config does not say)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(name_or_path), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def trained_on_chat_template(folder: str | None) -> bool:
    """Whether the adapter or merged folder was trained with the tokenizer's own chat template (its
    ``kullm_config.yaml`` says ``data.chat_template: tokenizer``)."""
    from kullm.adapter import CONFIG_FILE
    from kullm.untrusted import read_yaml

    path = Path(str(folder or "")).expanduser() / CONFIG_FILE
    if not folder or not path.is_file():
        return False
    config = read_yaml(path)  # a shared folder's file: plain data, bounded
    data = (config.get("data") if isinstance(config, dict) else None) or {}
    return isinstance(data, dict) and data.get("chat_template") == "tokenizer"


def folder_prompter(name_or_path: str) -> Prompter | None:
    """The ``template.yaml`` that ``kullm-merge`` leaves in a merged folder, if there is one."""
    path = Path(name_or_path) / "template.yaml"
    return Prompter.from_file(path) if path.is_file() else None
