"""Causal-LM loss computed only where it is learned.

:func:`head_only_loss` runs the transformer body, keeps the hidden states of positions whose next-token label is
not -100, and applies the LM head to those rows only, fused with the cross-entropy
(:class:`FusedLinearCrossEntropy`): chunk by chunk, the loss and its gradient with respect to the hidden states (and
the head, when it trains) are computed in the forward pass and the chunk's logits freed, so at most
``chunk_size × vocab`` logits are alive at once and none is recomputed in backward. On instruction data most
positions are prompt or padding, so this skips most of the ``tokens × vocab`` logits that :func:`full_loss` (the
reference path) materialises. On CUDA, ``loss.impl`` can hand the fused step to Liger Kernel or Cut Cross-Entropy.

Both return ``(loss_sum, n_trained_tokens)``: cross-entropy summed over trained tokens, and how many there were (a
0-d tensor, so reading it never waits for the device), so the caller can normalise per trained token across
micro-batches and gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kullm.config import ConfigError
from kullm.data.sft import IGNORE_INDEX
from kullm.training.attention import VARLEN_IMPLEMENTATIONS, packed_model_inputs
from kullm.training.schema import LOSS_IMPLS

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the LM head of a plain or PEFT-wrapped HF causal LM.

    PEFT's ``PeftModel.base_model`` is its LoRA wrapper, not the body: unwrap with ``get_base_model()`` first,
    then take the HF model's body (``base_model_prefix``) and ``get_output_embeddings()``.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(lm, "base_model_prefix", "")
    body = getattr(lm, prefix, None) if prefix else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or head is None:
        raise TypeError(f"{type(lm).__name__} is not an HF causal LM with a body and an output embedding")
    return body, head


def model_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Forward kwargs for a collated batch, always with ``use_cache=False``.

    A packed batch (``position_ids`` with a 2-D padding mask, as the collator makes it) gets its block-causal
    4-D mask here (or none, for a variable-length kernel): a 2-D mask would let packed examples see each other.
    A batch the collator marks ``right_padded`` needs no mask at all (the outputs at pad positions differ, and are
    never trained on).
    """
    mask = batch.get("attention_mask")
    if batch.get("position_ids") is not None and (mask is None or mask.dim() == 2):
        return packed_model_inputs(batch, model)
    kwargs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    if batch.get("right_padded") and mask is not None and mask.dim() == 2:
        # causal attention over right-padded rows: no real token ever sees a pad, so the mask changes nothing the
        # loss reads; without it SDPA runs is_causal, and transformers does not read the mask on the host to decide
        kwargs.pop("attention_mask")
    kwargs["use_cache"] = False  # a cache makes GPT-NeoX ignore reset position_ids (packed rows leak)
    return kwargs


def logit_map(model: torch.nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)``: what an architecture's forward does to the head's output before its loss.

    Cohere multiplies the logits by ``logit_scale``, Granite divides them by ``config.logits_scaling``, Gemma-2/3
    soft-cap them (``tanh(x / cap) * cap``, ``config.final_logit_softcapping``); ``(1.0, None)`` for the rest. The
    head-only loss must do the same, or it trains another model than the one that is served.
    """
    cfg = getattr(model, "config", None)  # a PeftModel passes both reads on to the model it wraps
    scale = 1.0
    if isinstance(getattr(model, "logit_scale", None), (int, float)):  # Cohere keeps it on the model
        scale = float(model.logit_scale)
    if getattr(cfg, "logits_scaling", None):  # Granite
        scale /= float(cfg.logits_scaling)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return scale, float(cap) if cap else None


def _chunk_ce(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, scale: float, cap: float | None
) -> torch.Tensor:
    logits = head(hidden).float()
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets, reduction="sum")


def linear_head(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of a head that is a plain linear layer (PEFT's ``modules_to_save`` copy included).

    None for anything else (a LoRA-wrapped head, a custom module): its forward is not ``h @ W.T + b``.
    """
    if type(head).__name__ == "ModulesToSaveWrapper":  # PEFT: the trained copy, or the original when disabled
        active = list(getattr(head, "active_adapters", []) or [])
        if getattr(head, "disable_adapters", False) or not active or active[0] not in head.modules_to_save:
            return linear_head(head.original_module)
        return linear_head(head.modules_to_save[active[0]])
    if type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks:
        return head.weight, head.bias
    return None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, weight, bias).float()


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ W.T + b`` against ``targets``, with its gradients computed in the forward.

    Per chunk of rows: logits, their log-sum-exp, the loss, then ``softmax - onehot`` turned at once into the
    gradient with respect to ``h`` (and ``W``, ``b`` when they train); the chunk's logits are freed before the next.
    Backward only scales the stored gradients by the incoming one: no logits are kept or recomputed. Under autocast
    the matmuls run in the autocast dtype and the softmax in float32, as the unfused head + ``.float()`` does.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size: int, compute_dtype):  # type: ignore[override]
        n = h.shape[0]
        need_w, need_b = weight.requires_grad, bias is not None and bias.requires_grad
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = torch.arange(min(chunk_size, n), device=h.device)
        for start in range(0, n, chunk_size):
            hc = h[start : start + chunk_size].to(compute_dtype)
            tc = targets[start : start + chunk_size]
            r = rows[: hc.shape[0]]
            logits = _chunk_logits(hc, w, b)  # (c, V) float32: the only chunk-sized buffer, reused in place
            picked = logits[r, tc]
            peak = logits.amax(dim=-1, keepdim=True)
            expd = logits.sub_(peak).exp_()
            total = expd.sum(dim=-1, keepdim=True)
            loss += (peak + total.log()).sum() - picked.sum()  # Σ log-sum-exp − Σ target logit
            grad = expd.div_(total)  # softmax …
            grad[r, tc] -= 1.0  # … − one-hot: d(loss)/d(logits)
            grad = grad.to(compute_dtype)
            grad_h[start : start + chunk_size] = grad @ w
            if need_w and grad_w.dtype == compute_dtype:
                grad_w.addmm_(grad.t(), hc)
            elif need_w:  # a half-precision product, accumulated in float32 across chunks
                grad_w += grad.t() @ hc
            if need_b:
                grad_b += grad.float().sum(0)
            del logits, expd, grad  # one views another: all must go before the next chunk's logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype)
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        gb = (grad_b * grad_loss).to(ctx.bias_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int | None = 1024,
    impl: str = "torch",
) -> torch.Tensor:
    """Summed cross-entropy of the linear head ``h @ weight.T + bias`` at ``targets`` (no -100 among them).

    ``impl``: ``torch`` (:class:`FusedLinearCrossEntropy`, any device), ``liger`` (Liger Kernel's Triton kernel) or
    ``cce`` (Apple's Cut Cross-Entropy): the last two run on CUDA only (see :func:`check_loss_impl`).
    """
    device_type = h.device.type
    compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    if impl in ("liger", "cce"):  # Triton kernels: one dtype for both operands, as autocast would pick
        h, weight = h.to(compute), weight.to(compute)
        bias = bias.to(compute) if bias is not None else None
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out = liger_fused_linear_cross_entropy(h, weight, targets, bias, ignore_index=IGNORE_INDEX, reduction="sum")
        return (out[0] if isinstance(out, tuple) else out).float()
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(h, weight, targets, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum").float()
    size = max(1, h.shape[0] if not chunk_size or chunk_size <= 0 else int(chunk_size))
    wants_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, weight, bias))
    with torch.autocast(device_type, enabled=False):
        if wants_grad:
            return FusedLinearCrossEntropy.apply(h, weight, bias, targets, size, compute)
        w, b = weight.to(compute), bias.to(compute) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], size):  # evaluation: the loss alone, chunk by chunk
            logits = _chunk_logits(h[start : start + size].to(compute), w, b)
            total += F.cross_entropy(logits, targets[start : start + size], reduction="sum")
        return total


_IMPL_PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}


def check_loss_impl(impl: str, accelerator: str = "auto") -> str:
    """The fused-loss implementation to use, refusing one that cannot run here (before anything loads).

    ``auto``: Liger Kernel, then Cut Cross-Entropy, when installed and training on CUDA; else kullm's torch one.
    """
    if impl not in LOSS_IMPLS:
        raise ConfigError(f"loss.impl={impl!r}: must be one of {', '.join(LOSS_IMPLS)}")
    import importlib.util

    on_cuda = accelerator not in ("cpu",) and torch.cuda.is_available()
    if impl == "auto":
        found = [k for k, (mod, _) in _IMPL_PACKAGES.items() if importlib.util.find_spec(mod) is not None]
        return found[0] if on_cuda and found else "torch"
    if impl in _IMPL_PACKAGES:
        module, package = _IMPL_PACKAGES[impl]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"loss.impl={impl} needs the {package} package, which is not installed: "
                f"pip install {package} (CUDA only), or use loss.impl=torch"
            )
        if not on_cuda:
            where = "this machine has none" if not torch.cuda.is_available() else f"trainer.accelerator={accelerator}"
            raise ConfigError(f"loss.impl={impl} runs on CUDA GPUs only ({where}): use loss.impl=torch (or auto)")
    return impl


def head_only_loss(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    chunk_size: int | None = 1024,
    impl: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained positions, with the LM head applied only to those rows.

    ``batch`` holds ``input_ids`` and ``labels`` (unshifted, -100 = not trained) and optionally
    ``attention_mask`` (2-D, or a 4-D packed mask) and ``position_ids`` (packed rows: see :func:`model_inputs`).
    A linear head goes through :func:`fused_linear_cross_entropy` (``chunk_size`` rows at a time, gradients made
    in the forward, no logits kept); any other head (e.g. LoRA on the LM head), or soft-capped logits (Gemma-2),
    runs per chunk with the chunk's logits recomputed in backward. The architecture's own logit scaling and
    soft-capping (:func:`logit_map`) are applied as its forward does. The token count is a 0-d tensor: reading it
    never waits for the device.
    """
    body, head = causal_lm_parts(model)
    hidden = body(**model_inputs(model, batch)).last_hidden_state
    labels = batch["labels"].to(hidden.device)
    positions = batch.get("trained_positions")
    if positions is not None and batch.get("n_trained") is not None:
        # the collator's CPU-made indices: the gather's size is known on the host, nothing waits for the device
        positions = positions.to(hidden.device)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (n_trained, d)
        t = labels.reshape(-1).index_select(0, positions + 1)
        n = batch["n_trained"].to(hidden.device)
    else:  # a hand-made batch: boolean indexing sizes its output from the mask, a device sync
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        h, t, n = hidden[:, :-1][keep], targets[keep], keep.sum()
    if h.shape[0] == 0:
        return hidden.sum() * 0.0, n  # keeps the graph connected (DDP expects every trainable grad)
    scale, cap = logit_map(model)
    linear = linear_head(head) if cap is None else None  # soft-capped logits are no linear map of h
    if linear is not None:
        weight, bias = linear
        if scale != 1.0:  # scaled logits are the head with scaled weights: still fused
            weight, bias = weight * scale, bias * scale if bias is not None else None
        return fused_linear_cross_entropy(h, weight, bias, t, chunk_size=chunk_size, impl=impl), n
    size = h.shape[0] if not chunk_size or chunk_size <= 0 else chunk_size
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], size):
        hc, tc = h[start : start + size], t[start : start + size]
        if torch.is_grad_enabled() and h.shape[0] > size:
            total = total + checkpoint(_chunk_ce, head, hc, tc, scale, cap, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hc, tc, scale, cap)
    return total, n


def full_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: logits at every position, then summed cross-entropy over trained ones."""
    logits = model(**model_inputs(model, batch)).logits
    labels = batch["labels"].to(logits.device)
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    n = (targets != IGNORE_INDEX).sum()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, n


def flatten_packed(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A packed micro-batch as one row of its real tokens (padding dropped).

    transformers finds the example boundaries of a variable-length kernel from reset ``position_ids`` only when the
    batch has a single row; with several rows and no mask it would attend causally across the examples of a row.
    Each row's first label is no target of the row before it, so it is masked: the loss is unchanged.
    """
    valid = batch["attention_mask"].bool()
    labels = batch["labels"].clone()
    labels[1:, 0] = IGNORE_INDEX
    return {
        "input_ids": batch["input_ids"][valid][None],
        "position_ids": batch["position_ids"][valid][None],
        "attention_mask": None,
        "labels": labels[valid][None],
    }


def lm_loss(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    head_only: bool = True,
    chunk_size: int | None = 1024,
    impl: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on ``loss.head_only``: :func:`head_only_loss` (with the fused-loss ``impl``) or :func:`full_loss`."""
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if batch.get("position_ids") is not None and attn in VARLEN_IMPLEMENTATIONS and batch["input_ids"].shape[0] > 1:
        batch = flatten_packed(batch)
    if head_only:
        return head_only_loss(model, batch, chunk_size=chunk_size, impl=impl)
    return full_loss(model, batch)
