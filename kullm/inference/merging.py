"""Merging: fold a LoRA adapter into its base and write a plain Hugging Face checkpoint.

The merged folder holds sharded safetensors, the tokenizer, ``generation_config.json`` (EOS and pad from the
tokenizer) and the adapter's ``template.yaml`` (which ``kullm-generate base=merged/`` picks up). It is written to a
temporary sibling, reloaded with plain ``AutoModelForCausalLM`` and compared with base+adapter on a few prompts;
only when the largest logit difference is within tolerance does it replace ``out``.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.adapter import CONFIG_FILE, TEMPLATE_FILE, load_adapter, read_adapter
from kullm.atomic import clean_stale, replace
from kullm.inference.generation import left_pad
from kullm.modeling import bos_ids, set_stop_tokens, with_bos
from kullm.redaction import redact

log = logging.getLogger(__name__)


class MergeError(RuntimeError):
    """A merge that cannot be written or whose result does not match base+adapter."""


def merge(cfg: DictConfig) -> Path:
    """Merge ``cfg.adapter`` into its base, write ``cfg.out`` and return it; raise :class:`MergeError` on a mismatch."""
    out = Path(cfg.out).expanduser()
    check_out(out, bool(cfg.overwrite))
    spec = read_adapter(cfg.adapter)
    dtype = cfg.dtype or spec.model.get("dtype") or "float32"
    if dtype not in cfg.tolerances:
        raise ValueError(f"dtype must be one of {sorted(cfg.tolerances)}, got {dtype!r}")
    tolerance = float(cfg.tolerance if cfg.tolerance is not None else cfg.tolerances[dtype])
    model, tokenizer, prompter = load_adapter(
        cfg.adapter, dtype=dtype, device_map=cfg.device_map, trust_remote_code=bool(cfg.get("trust_remote_code", False))
    )
    prompts = [prompter.render(p) for p in cfg.check_prompts]
    bos = bos_ids(tokenizer)  # compared on prompts as training and generation make them
    input_ids, mask = left_pad(
        [with_bos(bos, tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts], _pad_id(tokenizer)
    )
    reference = logits(model, input_ids, mask)

    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_merged(merged, tokenizer, tmp, max_shard_size=str(cfg.max_shard_size))
        prompter.save(tmp / TEMPLATE_FILE)
        merge_node = {"adapter": str(spec.path), "dtype": dtype, "tolerance": tolerance}
        OmegaConf.save(OmegaConf.create({**redact(spec.config), "merge": merge_node}), tmp / CONFIG_FILE)
        del model, merged
        gc.collect()
        reloaded = load_plain(tmp, dtype, cfg.device_map)
        diff = float((logits(reloaded, input_ids, mask) - reference).abs().max())
        del reloaded
        scale = max(1.0, float(reference.abs().max()))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"largest logit difference, merged vs base+adapter ({len(prompts)} prompts, {dtype}): {diff:.3g} "
        f"(relative to the largest logit {scale:.3g}: {diff / scale:.3g}, tolerance {tolerance:g})"
    )
    if not diff / scale <= tolerance:  # also catches NaN
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeError(
            f"merged logits differ from base+adapter by {diff:.3g} (relative {diff / scale:.3g}) "
            f"> tolerance {tolerance:g}: nothing written to {out}"
        )
    swap_in(tmp, out)
    print(f"merged checkpoint: {out}")
    return out


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing file, or a non-empty folder unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise MergeError(f"out={out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"out={out} is not empty: choose another folder or pass overwrite=true")


def logits(model, input_ids, mask):
    """Float32 logits at the attended positions (padding positions are zeroed, so they never count as a difference)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
    return out.float().cpu() * mask[..., None]


def save_merged(model, tokenizer, folder: Path, *, max_shard_size: str) -> None:
    """Save the merged model (sharded safetensors), its tokenizer and a generation config with EOS and pad set."""
    set_stop_tokens(model, tokenizer)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(folder))
    lora = [k for k in weight_names(folder) if "lora" in k.lower()]
    if lora:
        raise MergeError(f"{folder}: merged weights still hold LoRA tensors, e.g. {lora[:3]}")


def weight_names(folder: Path) -> list[str]:
    """Tensor names of every safetensors file in ``folder``."""
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.extend(st.keys())
    return names


def load_plain(folder: Path, dtype: str, device_map: Any = None):
    """Load a checkpoint exactly as a user without PEFT would: ``AutoModelForCausalLM.from_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), device_map=device_map)
    return model.eval()


def swap_in(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old ``out`` is removed only after the new one is there."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
