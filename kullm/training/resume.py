"""Resume checks: what a checkpoint must match to be resumed (:func:`run_identity`, stored in every checkpoint by
:class:`RunIdentity`), and :func:`resolve_resume`, which finds the checkpoint ``ckpt_path=`` names and refuses one
that is unreadable, foreign or from other run settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def run_identity(cfg) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: base model, LoRA, data and batch settings."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    model, lora, data = c.get("model") or {}, c.get("lora") or {}, c.get("data") or {}
    template = c.get("template") or {}
    return {
        "model.name_or_path": model.get("name_or_path"),
        "model.revision": model.get("revision"),
        "model.shape_only": model.get("shape_only"),
        "lora.r": lora.get("r"),
        "lora.lora_alpha": lora.get("lora_alpha"),
        "lora.lora_dropout": lora.get("lora_dropout"),
        "lora.target_modules": _targets(lora.get("target_modules")),
        "init_adapter": c.get("init_adapter"),
        "objective": c.get("objective"),  # the loss and its knobs (objective=dpo, beta, …)
        "data.path": data.get("path"),
        "data.cutoff_len": data.get("cutoff_len"),
        "data.train_on_inputs": data.get("train_on_inputs"),
        "data.val_set_size": data.get("val_set_size"),
        "data.packing": data.get("packing"),
        "data.train_on": data.get("train_on"),
        "data.chat_template": data.get("chat_template"),
        "template": {k: v for k, v in template.items() if k != "description"},
        "batch_size": c.get("batch_size"),
        "micro_batch_size": c.get("micro_batch_size"),
        "sampler": c.get("sampler"),
        "seed": c.get("seed"),
        "data.batching": data.get("batching"),
        "data.token_budget": data.get("token_budget"),
    }


def _targets(targets: Any) -> Any:
    """LoRA targets in a comparable form: a shorthand (``auto``, ``all-linear``) as is, a list sorted."""
    if not targets or isinstance(targets, str):
        return targets or None
    return sorted(targets)


class RunIdentity(L.Callback):
    """Stores :func:`run_identity` in every checkpoint (``kullm_run``) so that a resume can be checked."""

    def __init__(self, cfg) -> None:
        self.identity = run_identity(cfg)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["kullm_run"] = self.identity


def resolve_resume(ckpt_path: str | Path, cfg, allow_changes: bool = False) -> str:
    """The checkpoint file to resume from (a run folder means its ``checkpoints/last.ckpt``), checked to be a
    readable kullm checkpoint of the same run settings; raise ``ConfigError`` naming the problem."""
    import torch

    from kullm.config import ConfigError

    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise ConfigError(f"ckpt_path={ckpt_path}: a folder without checkpoints/last.ckpt")
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=path.stat().st_size > 0)
    except Exception as e:  # zero-byte, text, truncated, foreign pickles: many error types, one message
        why = " ".join(str(e).split())[:200]
        raise ConfigError(f"ckpt_path={path}: not a readable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "loops", "global_step"} <= set(ckpt):
        raise ConfigError(f"ckpt_path={path}: not a Lightning training checkpoint (no state_dict/loops/global_step)")
    saved = ckpt.get("kullm_run")
    if saved is None:
        raise ConfigError(f"ckpt_path={path}: written by another program (no kullm run settings); cannot check it")
    now = run_identity(cfg)
    # a key a checkpoint lacks was added to the identity after it was written: it cannot be checked, so it is not
    diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    if diff and not allow_changes:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"ckpt_path={path} was trained with other settings ({detail}): resume with the same ones, or pass "
            "allow_resume_changes=true to resume anyway"
        )
    return str(path)
