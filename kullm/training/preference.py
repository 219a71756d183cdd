"""Preference objectives — DPO, IPO, ORPO, SimPO, KTO — on per-sequence log-probabilities, and their reference.

Log-probabilities come from one forward of the whole micro-batch (for pairs: chosen rows, then rejected rows, as
the pair collator concatenates them) with the LM head applied only at completion positions, as the SFT loss does
(:mod:`kullm.training.loss`): :class:`FusedLinearLogProbs` returns each completion token's log-probability and
makes its gradient with respect to the hidden state in the forward pass, chunk by chunk, so no ``tokens × vocab``
logits are kept. A sequence's log-probability is the sum over its completion tokens (SimPO and ORPO: the mean).

The losses, per pair (or per KTO example), as their papers define them (``π``: policy, ``ref``: reference, both
summed log-probabilities; ``m``: mean log-probabilities):

* DPO (Rafailov et al. 2023), with conservative label smoothing ``ε``: ``z = β((π_c − π_r) − (ref_c − ref_r))``,
  ``−(1 − ε) log σ(z) − ε log σ(−z)``.
* IPO (Azar et al. 2023): ``((π_c − π_r) − (ref_c − ref_r) − 1/(2β))²``.
* ORPO (Hong et al. 2024), no reference: ``−m_c − λ log σ(log odds(m_c) − log odds(m_r))`` with
  ``log odds(m) = m − log(1 − e^m)``.
* SimPO (Meng et al. 2024), no reference: ``−log σ(β (m_c − m_r) − γ)``.
* KTO (Ethayarajh et al. 2024) on unpaired examples: ``r = π − ref``, ``z₀ = max(0, KL)`` (detached; KL estimated
  as the mean ``π − ref`` of the micro-batch's mismatched prompt/completion rows — the collator's second half —
  averaged over ranks), desirable
  ``λ_D (1 − σ(β (r − z₀)))``, undesirable ``λ_U (1 − σ(β (z₀ − r)))``.

The returned loss is a sum over pairs (examples); the module divides the gradients by the pairs of the whole
optimizer step, so the result does not depend on how pairs fell into micro-batches or ranks.

The reference (:class:`Reference`) costs no second base model: under LoRA it is the base with the adapter
disabled, or — when the policy starts from an SFT adapter (``init_adapter=``) — that adapter loaded a second time
as a frozen adapter on the same base; under full fine-tuning a frozen copy (``objective.ref_copy``), or
log-probabilities computed once before training (``objective.precompute_ref``, :func:`precompute_reference`).
It always runs in eval mode (no dropout), so a live and a precomputed reference agree.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kullm.config import defaults
from kullm.data.pairs import REF_COLUMNS  # the precomputed reference's columns of a paired split
from kullm.data.sft import IGNORE_INDEX
from kullm.training.loss import causal_lm_parts, linear_head, logit_map, model_inputs
from kullm.training.schema import OBJECTIVES, PAIRED_OBJECTIVES, REFERENCE_OBJECTIVES

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"  # the frozen SFT adapter's name beside the trained one ("default")


# --- per-token and per-sequence log-probabilities -----------------------------------------------------------------


class FusedLinearLogProbs(torch.autograd.Function):
    """Log-probabilities ``log softmax(h @ W.T + b)[target]`` per row, the gradient w.r.t. ``h`` made in the forward.

    Per chunk: logits, log-sum-exp, the picked log-probability, then ``onehot − softmax`` turned at once into
    ``d logp / d h`` (one row per token, the size of ``h``); backward scales each row by its incoming gradient.
    For a frozen head only (the head's gradient would need every chunk's logits again).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size: int, compute_dtype):  # type: ignore[override]
        n = h.shape[0]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_h = torch.empty_like(h)
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        rows = torch.arange(min(chunk_size, n), device=h.device)
        for start in range(0, n, chunk_size):
            hc = h[start : start + chunk_size].to(compute_dtype)
            tc = targets[start : start + chunk_size]
            r = rows[: hc.shape[0]]
            logits = F.linear(hc, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            out[start : start + hc.shape[0]] = logits[r, tc] - lse
            grad = logits.sub_(lse[:, None]).exp_().neg_()  # − softmax …
            grad[r, tc] += 1.0  # … + one-hot: d logp / d logits
            grad_h[start : start + hc.shape[0]] = grad.to(compute_dtype) @ w
            del logits, grad
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None, None, None


def _picked(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[row, target]`` per row, without the full log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def _chunk_logps(head, hidden, targets, scale: float, cap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return _picked(logits, targets)


def token_logps(
    model: torch.nn.Module, batch: Mapping[str, Any], *, chunk_size: int | None = 1024, head_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, rows)``: the log-probability of each trained next token (label not -100), and its row.

    ``head_only``: the LM head runs at those positions only (fused for a frozen linear head; per chunk with
    recomputation for a trained or non-linear head); otherwise the model's full logits are taken.
    """
    labels = batch["labels"]
    width = labels.shape[1]
    positions = batch.get("trained_positions")
    if positions is None:  # a hand-made batch: the positions from the labels
        rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        positions = rows * width + cols
    if not head_only:
        logits = model(**model_inputs(model, batch)).logits
        positions = positions.to(logits.device)
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
        targets = labels.to(logits.device).reshape(-1).index_select(0, positions + 1)
        return _picked(flat, targets), positions // width
    body, head = causal_lm_parts(model)
    hidden = body(**model_inputs(model, batch)).last_hidden_state
    positions = positions.to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    t = labels.to(hidden.device).reshape(-1).index_select(0, positions + 1)
    rows = positions // width
    size = max(1, h.shape[0] if not chunk_size or chunk_size <= 0 else int(chunk_size))
    scale, cap = logit_map(model)
    linear = linear_head(head) if cap is None else None
    frozen = linear is not None and not any(x is not None and x.requires_grad for x in linear)
    if frozen and h.shape[0] > 0:
        weight, bias = linear
        if scale != 1.0:
            weight, bias = weight * scale, bias * scale if bias is not None else None
        device = h.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            if torch.is_grad_enabled() and h.requires_grad:
                return FusedLinearLogProbs.apply(h, weight, bias, t, size, compute), rows
            w, b = weight.to(compute), bias.to(compute) if bias is not None else None
            parts = [
                _picked(F.linear(h[s : s + size].to(compute), w, b), t[s : s + size])
                for s in range(0, h.shape[0], size)
            ]
            return torch.cat(parts), rows
    parts = []
    for s in range(0, h.shape[0], size):
        if torch.is_grad_enabled() and h.shape[0] > size:
            parts.append(
                checkpoint(_chunk_logps, head, h[s : s + size], t[s : s + size], scale, cap, use_reentrant=False)
            )
        else:
            parts.append(_chunk_logps(head, h[s : s + size], t[s : s + size], scale, cap))
    if not parts:  # no trained token: keep the graph connected (DDP expects every trainable gradient)
        return hidden.sum()[None][:0].float(), rows
    return torch.cat(parts), rows


def sequence_logps(
    model: torch.nn.Module, batch: Mapping[str, Any], *, chunk_size: int | None = 1024, head_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)`` per row of ``batch``: the summed log-probability of its completion tokens, and how many."""
    logps, rows = token_logps(model, batch, chunk_size=chunk_size, head_only=head_only)
    n_rows = batch["labels"].shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=logps.device).index_add(0, rows, logps)
    counts = torch.zeros(n_rows, dtype=torch.float32, device=logps.device).index_add(0, rows, torch.ones_like(logps))
    return sums, counts


# --- the losses, as the papers write them (per pair / example) ----------------------------------------------------


def dpo_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float, label_smoothing: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """DPO's sigmoid loss per pair; ``label_smoothing`` ε > 0 is conservative DPO (labels flipped with prob. ε)."""
    z = beta * ((chosen - rejected) - (ref_chosen - ref_rejected))
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> torch.Tensor:
    """IPO's squared loss per pair: the log-ratio margin regressed onto ``1 / (2β)``."""
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 − p))`` of ``p = exp(mean_logp)``, computed stably (``log(1 − e^m) = log(−expm1(m))``)."""
    m = mean_logp.clamp(max=-1e-7)
    return m - torch.log(-torch.expm1(m))


def orpo_losses(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, lam: float) -> tuple[torch.Tensor, ...]:
    """ORPO per pair: ``(loss, nll, log σ(log odds ratio), log odds ratio)`` on mean log-probabilities."""
    ratio = log_odds(mean_chosen) - log_odds(mean_rejected)
    term = F.logsigmoid(ratio)
    nll = -mean_chosen
    return nll - lam * term, nll, term, ratio


def simpo_losses(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO per pair: length-normalised rewards ``β m``, target margin ``γ``."""
    return -F.logsigmoid(beta * (mean_chosen - mean_rejected) - gamma)


def kto_losses(
    logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
    beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """KTO per example: ``kl`` is the batch's KL estimate (detached, clamped at 0 here)."""
    z0 = kl.detach().clamp(min=0.0)
    r = logps - ref_logps
    good = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad)


# --- one objective: its loss sum and metric sums over a micro-batch -----------------------------------------------


class PreferenceObjective:
    """The loss of ``objective=<name>`` and the sums its metrics are made of (reduced over micro-batches and ranks,
    divided once per optimizer step). ``cfg`` is the ``objective`` node (keys left out: ``conf/objective/<name>``)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        name = str(cfg["name"])
        if name not in OBJECTIVES or name == "sft":
            raise ValueError(f"objective.name={name!r}: a preference objective is one of {OBJECTIVES[1:]}")
        self.cfg = defaults(f"objective/{name}", cfg)
        self.name = name
        self.paired = name in PAIRED_OBJECTIVES
        self.needs_reference = name in REFERENCE_OBJECTIVES
        self.keys = self._keys()

    def _keys(self) -> tuple[str, ...]:
        """The summed quantities of the window, in order."""
        if self.name == "kto":
            return ("n_desirable", "n_undesirable", "rewards/chosen", "rewards/rejected", "logps/chosen",
                    "logps/rejected", "kl", "kl_batches")  # fmt: skip
        parts = {"orpo": ("nll", "log_odds_ratio", "log_odds")}.get(self.name, ())
        return ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                "logps/rejected", *parts)  # fmt: skip

    def units(self, batch: Mapping[str, Any]) -> int:
        """Pairs (paired objectives) or examples (KTO) in a micro-batch — half its rows (the other half: rejected
        answers, or KTO's mismatched rows) — the loss's denominator."""
        return batch["labels"].shape[0] // 2

    def loss(
        self,
        sums: torch.Tensor,
        counts: torch.Tensor,
        ref: torch.Tensor | None,
        batch: Mapping[str, Any],
        kl: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss summed over the micro-batch's pairs/examples, metric sums in the order of self.keys)``."""
        if self.name == "kto":
            return self._kto(sums, ref, batch, kl)
        half = sums.shape[0] // 2
        pc, pr = sums[:half], sums[half:]
        mc, mr = pc / counts[:half].clamp(min=1), pr / counts[half:].clamp(min=1)
        cfg, parts = self.cfg, []
        if self.name in ("dpo", "ipo"):
            rc, rr = ref[:half], ref[half:]
            if self.name == "dpo":
                losses = dpo_losses(pc, pr, rc, rr, float(cfg.beta), float(cfg.label_smoothing))
            else:
                losses = ipo_losses(pc, pr, rc, rr, float(cfg.beta))
            chosen_r, rejected_r = float(cfg.beta) * (pc - rc), float(cfg.beta) * (pr - rr)
        elif self.name == "simpo":
            losses = simpo_losses(mc, mr, float(cfg.beta), float(cfg.gamma))
            chosen_r, rejected_r = float(cfg.beta) * mc, float(cfg.beta) * mr
        else:  # orpo
            losses, nll, term, ratio = orpo_losses(mc, mr, float(cfg.lambda_or))
            chosen_r, rejected_r = float(cfg.lambda_or) * mc, float(cfg.lambda_or) * mr
            parts = [nll.sum(), term.sum(), ratio.sum()]
        chosen_r, rejected_r = chosen_r.detach(), rejected_r.detach()
        stats = [chosen_r.sum(), rejected_r.sum(), (chosen_r - rejected_r).sum(), (chosen_r > rejected_r).float().sum(),
                 pc.detach().sum(), pr.detach().sum(), *(p.detach() for p in parts)]  # fmt: skip
        return losses.sum(), torch.stack(stats)

    def _kto(self, sums, ref, batch, kl) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        desirable = batch["label"].to(sums.device).bool()
        beta = float(cfg.beta)
        losses = kto_losses(sums, ref, desirable, kl, beta, float(cfg.desirable_weight), float(cfg.undesirable_weight))
        rewards = (beta * (sums - ref)).detach()
        d, u = desirable.float(), (~desirable).float()
        logps = sums.detach()
        z0, one = kl.detach().clamp(min=0.0).float(), torch.ones((), device=sums.device)
        stats = [
            d.sum(),
            u.sum(),
            (rewards * d).sum(),
            (rewards * u).sum(),
            (logps * d).sum(),
            (logps * u).sum(),
            z0,
            one,
        ]
        return losses.sum(), torch.stack([s.float() for s in stats])

    def metrics(self, totals: Mapping[str, float], units: float) -> dict[str, float]:
        """The logged values (``rewards/…``, ``logps/…``, the loss parts) from a window's totals."""
        if self.name == "kto":
            d, u = max(totals["n_desirable"], 1.0), max(totals["n_undesirable"], 1.0)
            chosen, rejected = totals["rewards/chosen"] / d, totals["rewards/rejected"] / u
            return {
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/margin": chosen - rejected,
                "logps/chosen": totals["logps/chosen"] / d,
                "logps/rejected": totals["logps/rejected"] / u,
                "kl": totals["kl"] / max(totals["kl_batches"], 1.0),
            }
        return {k: totals[k] / max(units, 1.0) for k in self.keys}


# --- the reference ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def adapter_as_reference(model, adapter: str | None) -> Iterator[None]:
    """``model`` (a ``PeftModel``) answering as the reference: its adapters off (``adapter=None``), or the frozen
    ``adapter`` active in place of the trained one; which parameters train is left exactly as it was."""
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(adapter)  # PEFT also flips requires_grad: restored below
    try:
        yield
    finally:
        model.set_adapter(active)
        for p, flag in flags:
            p.requires_grad_(flag)


class Reference:
    """Where the reference log-probabilities come from.

    ``kind``: ``base`` (the PEFT model with its adapter disabled), ``adapter`` (a frozen adapter on the same base,
    ``REFERENCE_ADAPTER``), ``copy`` (a frozen copy of a fully fine-tuned model, kept out of the module tree so
    that checkpoints, the optimizer and DDP never see it), ``current`` (the model as it is now: before training,
    its initial weights — what :func:`precompute_reference` reads) or ``precomputed`` (the batch's columns).
    """

    KINDS = ("base", "adapter", "copy", "current", "precomputed")

    def __init__(self, kind: str, model: torch.nn.Module | None = None) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"reference kind {kind!r}: one of {self.KINDS}")
        self.kind = kind
        self._copy = [model] if model is not None else []  # a list: not a submodule of whoever holds this

    def to(self, device: torch.device) -> Reference:
        if self._copy:
            self._copy[0].to(device)
        return self

    def logps(
        self, model: torch.nn.Module, batch: Mapping[str, Any], *, chunk_size: int | None = 1024, head_only: bool = True
    ) -> torch.Tensor:
        """The reference's summed log-probability of each row of ``batch`` (no gradient, eval mode)."""
        if self.kind == "precomputed":
            return batch_reference(batch)
        target = self._copy[0] if self.kind == "copy" else model
        with torch.no_grad(), _eval_mode(target):
            if self.kind == "copy":
                return sequence_logps(target, batch, chunk_size=chunk_size, head_only=head_only)[0]
            if self.kind == "current":
                return sequence_logps(model, batch, chunk_size=chunk_size, head_only=head_only)[0]
            with adapter_as_reference(model, REFERENCE_ADAPTER if self.kind == "adapter" else None):
                return sequence_logps(model, batch, chunk_size=chunk_size, head_only=head_only)[0]


def batch_reference(batch: Mapping[str, Any]) -> torch.Tensor:
    """The precomputed reference log-probabilities of a batch's rows (pairs: chosen rows, then rejected rows)."""
    if batch.get("ref_logps") is not None:
        return batch["ref_logps"].float()
    missing = [c for c in REF_COLUMNS if batch.get(c) is None]
    if missing:
        raise KeyError(
            f"objective.precompute_ref: the batch lacks {missing} (the data was not given reference columns)"
        )
    return torch.cat([batch[REF_COLUMNS[0]], batch[REF_COLUMNS[1]]]).float()


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def make_reference(model, objective: Mapping[str, Any], *, init_adapter: str | None = None) -> Reference | None:
    """The reference an objective trains against (``None`` for one that needs none, SFT included).

    Under LoRA: the base with the adapter disabled, or with ``init_adapter`` the SFT adapter loaded again on the same
    base as a frozen adapter. Under full fine-tuning: precomputed log-probs, or a frozen copy (``ref_copy``); the
    config check (:func:`kullm.training.schema.check_config`) has refused a run with neither.
    """
    name = str(objective["name"])
    if name not in REFERENCE_OBJECTIVES:
        return None
    cfg = defaults(f"objective/{name}", objective)
    if cfg.precompute_ref:
        return Reference("precomputed")
    if not _is_peft(model):
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return Reference("copy", frozen)
    if init_adapter:
        model.load_adapter(str(Path(init_adapter).expanduser()), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        return Reference("adapter")
    return Reference("base")


# --- reference log-probabilities computed once, cached beside the processed data ----------------------------------


def reference_key(model_cfg: Mapping[str, Any], init_adapter: str | None, dataset_fingerprint: str) -> str:
    """A cache key for precomputed reference log-probabilities: the reference model (base, revision, dtype, added
    tokens, the SFT adapter's weights) and the processed data."""
    parts = {k: model_cfg.get(k) for k in ("name_or_path", "revision", "dtype", "added_tokens", "tiny_shape", "shape")}
    if init_adapter:
        weights = Path(init_adapter).expanduser() / "adapter_model.safetensors"
        parts["init_adapter"] = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else init_adapter
    parts["data"] = dataset_fingerprint
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reference_for_rows(
    model: torch.nn.Module,
    dataset,
    collate,
    *,
    reference: Reference,
    micro_batch_size: int,
    device: torch.device | str = "cpu",
    chunk_size: int | None = 1024,
    head_only: bool = True,
) -> tuple[list[float], list[float]]:
    """The reference's summed log-probabilities of each pair of ``dataset`` (chosen, rejected), in row order."""
    chosen: list[float] = []
    rejected: list[float] = []
    for start in range(0, len(dataset), micro_batch_size):
        rows = [dataset[i] for i in range(start, min(start + micro_batch_size, len(dataset)))]
        batch = collate(rows)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logps = reference.logps(model, batch, chunk_size=chunk_size, head_only=head_only).double().cpu()
        half = logps.shape[0] // 2
        chosen += logps[:half].tolist()
        rejected += logps[half:].tolist()
    return chosen, rejected


def precompute_reference(
    model: torch.nn.Module,
    splits: Mapping[str, Any],
    collate,
    *,
    cache_file: Path,
    reference: Reference,
    micro_batch_size: int,
    device: torch.device | str = "cpu",
    chunk_size: int | None = 1024,
    head_only: bool = True,
) -> dict[str, Any]:
    """``splits`` (name → paired dataset) with ``REF_COLUMNS`` added: read from ``cache_file`` when it holds them,
    else computed by ``reference`` (before training: ``base`` under LoRA, ``current`` — the initial weights — for
    a warm-started adapter or full fine-tuning) and written there (temp-then-rename)."""
    from kullm.atomic import rewrite

    cached: dict[str, Any] = {}
    if cache_file.is_file():
        cached = torch.load(cache_file, weights_only=True)
    out, wrote = {}, False
    for name, ds in splits.items():
        if len(ds) == 0:
            out[name] = ds
            continue
        got = cached.get(name)
        if got is None or len(got[0]) != len(ds):
            got = reference_for_rows(model, ds, collate, reference=reference, micro_batch_size=micro_batch_size,
                                     device=device, chunk_size=chunk_size, head_only=head_only)  # fmt: skip
            cached[name], wrote = got, True
        out[name] = ds.add_column(REF_COLUMNS[0], list(got[0])).add_column(REF_COLUMNS[1], list(got[1]))
    if wrote:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with rewrite(cache_file) as tmp:
            torch.save(cached, tmp)
        log.info("reference log-probabilities of %s cached in %s", ", ".join(out), cache_file)
    return out


class PrecomputedReference(L.Callback):
    """``objective.precompute_ref``: before training (Lightning's ``setup``: the data is processed, no checkpoint is
    restored yet), the reference log-probabilities of every train and validation pair are added to the splits as
    :data:`REF_COLUMNS` — read from, or computed once into, ``reference-<key>.pt`` in the processed data's cache
    folder (keyed by the reference model and the data). Training then holds one model."""

    def __init__(
        self,
        *,
        model_cfg: Mapping[str, Any],
        init_adapter: str | None,
        micro_batch_size: int,
        chunk_size: int | None = 1024,
        head_only: bool = True,
    ) -> None:
        self.model_cfg, self.init_adapter = dict(model_cfg), init_adapter
        self.micro_batch_size, self.chunk_size, self.head_only = micro_batch_size, chunk_size, head_only
        self.cache_file: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        processed = trainer.datamodule.processed
        splits = {name: processed.dataset[name] for name in ("train", "validation")}
        sizes = {name: len(ds) for name, ds in splits.items()}
        key = reference_key(self.model_cfg, self.init_adapter, f"{processed.cache_dir.name}:{sizes}")
        self.cache_file = Path(processed.cache_dir) / f"reference-{key}.pt"
        model = pl_module.model
        # under LoRA from scratch the reference is the base (adapter off); otherwise the weights training starts from
        plain_lora = _is_peft(model) and not self.init_adapter
        reference = Reference("base" if plain_lora else "current")
        device = trainer.strategy.root_device
        model.to(device)  # where Lightning puts it next anyway
        with trainer.precision_plugin.forward_context():  # the precision the live reference would run in
            done = precompute_reference(
                model,
                splits,
                trainer.datamodule.collator,
                cache_file=self.cache_file,
                reference=reference,
                micro_batch_size=self.micro_batch_size,
                device=device,
                chunk_size=self.chunk_size,
                head_only=self.head_only,
            )
        for name, ds in done.items():
            processed.dataset[name] = ds
