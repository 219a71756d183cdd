"""Merging: fold a LoRA adapter into its base and write a plain Hugging Face checkpoint.

The merged folder is a model folder as full fine-tuning leaves (:func:`kullm.adapter.write_model`): sharded
safetensors, the tokenizer, ``generation_config.json`` (EOS and pad from the tokenizer), the adapter's
``template.yaml`` (which ``kullm-generate base=merged/`` picks up) and its redacted config with a ``merge`` entry. It
is written to a temporary sibling (:func:`kullm.atomic.write_folder`), reloaded with plain ``AutoModelForCausalLM``
and compared with base+adapter on a few prompts; only when the largest logit difference is within tolerance does it
replace ``out``.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kullm.adapter import read_adapter, write_model
from kullm.atomic import write_folder
from kullm.errors import KullmError
from kullm.inference.batching import left_pad
from kullm.modeling import load_adapter
from kullm.special_tokens import bos_ids, with_bos

log = logging.getLogger(__name__)


class MergeError(KullmError, RuntimeError):
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
        cfg.adapter, dtype=dtype, device_map=cfg.device_map, trust_remote_code=bool(cfg.trust_remote_code)
    )
    prompts = [prompter.render(p) for p in cfg.check_prompts]
    bos = bos_ids(tokenizer)  # compared on prompts as training and generation make them
    input_ids, mask = left_pad(
        [with_bos(bos, tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts], _pad_id(tokenizer)
    )
    reference = logits(model, input_ids, mask)

    unsaved = [model.merge_and_unload()]
    del model
    config = {**spec.config, "merge": {"adapter": str(spec.path), "dtype": dtype, "tolerance": tolerance}}

    def write(tmp: Path) -> None:
        # the merged model is handed over, not kept: its memory is free again before the reload below
        write_model(unsaved.pop(), tmp, tokenizer=tokenizer, prompter=prompter, config=config,
                    max_shard_size=str(cfg.max_shard_size))  # fmt: skip
        lora = [k for k in weight_names(tmp) if "lora" in k.lower()]
        if lora:
            raise MergeError(f"{tmp}: merged weights still hold LoRA tensors, e.g. {lora[:3]}")
        gc.collect()
        reloaded = load_plain(tmp, dtype, cfg.device_map)
        diff = float((logits(reloaded, input_ids, mask) - reference).abs().max())
        del reloaded
        scale = max(1.0, float(reference.abs().max()))
        print(
            f"largest logit difference, merged vs base+adapter ({len(prompts)} prompts, {dtype}): {diff:.3g} "
            f"(relative to the largest logit {scale:.3g}: {diff / scale:.3g}, tolerance {tolerance:g})"
        )
        if not diff / scale <= tolerance:  # also catches NaN
            raise MergeError(
                f"merged logits differ from base+adapter by {diff:.3g} (relative {diff / scale:.3g}) "
                f"> tolerance {tolerance:g}: nothing written to {out}"
            )

    write_folder(out, write)
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


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
