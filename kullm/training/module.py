"""The ``LightningModule``: a PEFT-wrapped causal LM, AdamW over the adapter, a warmup + decay schedule.

The loss is the sum of token cross-entropies; gradients are divided by the number of trained tokens in the whole
optimizer step (all micro-batches, all ranks) just before the step, so the result does not depend on how the
tokens fell into micro-batches. Lightning checkpoints hold only the trainable weights (plus optimizer, scheduler,
loop and RNG state): the frozen base comes from the base model on resume.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate

from kullm.adapter import clean_name
from kullm.config import defaults
from kullm.training.checkpointing import Diverged
from kullm.training.fsdp import LoraFSDPStrategy
from kullm.training.loss import check_loss_impl, lm_loss
from kullm.training.preference import PreferenceObjective, Reference, sequence_logps

log = logging.getLogger(__name__)


class KullmLitModule(L.LightningModule):
    """Train a PEFT model; log loss, lr, grad norm, tokens and tokens/s per step, val loss/perplexity per validation.

    ``optim`` and ``loss`` are the ``optim=`` and ``loss`` nodes; the keys a partial one leaves out are
    ``conf/optim/adamw.yaml``'s and ``conf/train.yaml``'s. ``objective`` (the ``objective=`` node; none: SFT)
    picks a preference loss (:mod:`kullm.training.preference`): then the loss is summed over pairs (KTO: examples)
    and divided by those of the whole optimizer step, against ``reference`` when the objective needs one, and the
    rewards and log-probs are logged beside it (``train/…``, ``val/…``).
    """

    def __init__(
        self,
        model,
        *,
        optim: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        objective: Mapping[str, Any] | None = None,
        reference: Reference | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim_cfg = defaults("optim/adamw", optim)
        self.loss_cfg = defaults("train.loss", loss)
        self.preference = PreferenceObjective(objective) if objective and objective["name"] != "sft" else None
        if self.preference is not None and self.preference.needs_reference and reference is None:
            raise ValueError(f"objective={self.preference.name} trains against a reference: pass reference=")
        self.reference = reference
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.trained_tokens = 0
        # loss sum, trained tokens, non-pad tokens: accumulated on the device, read once per optimizer step
        self._window: torch.Tensor | None = None
        self._val: torch.Tensor | None = None
        self._loss_impl: str | None = None
        self._clock = time.perf_counter()
        self._rng_to_restore: dict[str, Any] | None = None

    # --- forward and loss -------------------------------------------------------------------------------------

    def forward(self, **batch):
        return self.model(**batch)

    def _loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loss_impl is None:
            self._loss_impl = check_loss_impl(str(self.loss_cfg.impl), self.device.type)
        return lm_loss(
            self.model,
            batch,
            head_only=bool(self.loss_cfg.head_only),
            chunk_size=int(self.loss_cfg.chunk_size),
            impl=self._loss_impl,
        )

    def _accumulate(self, buffer: torch.Tensor | None, *values: torch.Tensor, extra: torch.Tensor | None = None):
        """``buffer + values (+ extra, a 1-d tensor)`` in float64 on the module's device (no host round trip)."""
        row = torch.stack([torch.as_tensor(v).detach().to(self.device, torch.float64) for v in values])
        if extra is not None:
            row = torch.cat([row, extra.detach().to(self.device, torch.float64)])
        return row if buffer is None else buffer.to(self.device) + row

    def _width(self, base: int) -> int:
        """A window's length: ``base`` sums, plus the preference objective's metric sums."""
        return base + (len(self.preference.keys) if self.preference is not None else 0)

    def _preference_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss summed over pairs/examples, their number, metric sums)``: the reference first (no gradient, eval
        mode), then the policy's log-probs of every row in one forward (pairs: chosen rows, then rejected; KTO: the
        examples, then their mismatched rows for the KL estimate)."""
        objective = self.preference
        head = {"chunk_size": int(self.loss_cfg.chunk_size), "head_only": bool(self.loss_cfg.head_only)}
        ref = self.reference.logps(self.model, batch, **head) if objective.needs_reference else None
        sums, counts = sequence_logps(self.model, batch, **head)
        kl = None
        if objective.name == "kto":
            half = sums.shape[0] // 2
            kl = self._kl_estimate(sums[half:].detach() - ref[half:])
            sums, counts, ref = sums[:half], counts[:half], ref[:half]
        loss_sum, stats = objective.loss(sums, counts, ref, batch, kl)
        return loss_sum, torch.tensor(objective.units(batch)), stats

    def _kl_estimate(self, log_ratios: torch.Tensor) -> torch.Tensor:
        """KTO's KL estimate (before clamping): the mean policy − reference log-ratio of the mismatched rows, over
        all ranks."""
        total = torch.stack([log_ratios.double().sum(), torch.tensor(float(log_ratios.numel()), dtype=torch.float64)])
        if self.trainer is not None and self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total.to(self.device), reduce_op="sum")
        return (total[0] / total[1].clamp(min=1.0)).float().to(log_ratios.device)

    @property
    def _engine_scales_grads(self) -> bool:
        """DeepSpeed owns gradient accumulation and clipping: fall back to a per-micro-batch token mean."""
        return type(self.trainer.strategy).__name__.startswith("DeepSpeed")

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        stats = None
        if self.preference is not None:
            loss_sum, n, stats = self._preference_loss(batch)
        else:
            loss_sum, n = self._loss(batch)
        tokens = batch.get("n_tokens")
        if tokens is None:
            mask = batch["attention_mask"]
            tokens = mask.sum() if mask.dim() == 2 else torch.tensor(batch["input_ids"].numel())
        self._window = self._accumulate(self._window, loss_sum, n, tokens, extra=stats)
        if self._engine_scales_grads:
            # Lightning divides by the accumulation and DeepSpeed's engine.backward divides again (scale_wrt_gas):
            # undo Lightning's, so the loss is scaled once and clipping acts on the true gradient norm
            return loss_sum / torch.as_tensor(n).clamp(min=1) * self.trainer.accumulate_grad_batches
        return loss_sum

    def _at_step_boundary(self) -> bool:
        """Whether the coming ``optimizer.step()`` really steps: DeepSpeed's engine is stepped after every
        micro-batch and steps the weights only at the end of its accumulation window."""
        boundary = getattr(self.trainer.strategy.model, "is_gradient_accumulation_boundary", None)
        return not self._engine_scales_grads or boundary is None or bool(boundary())

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self._at_step_boundary():  # no collective, no log line per micro-batch: the window keeps adding up
            return
        window = self._window
        if window is None:
            window = torch.zeros(self._width(3), dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            window = self.trainer.strategy.reduce(window, reduce_op="sum")
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if not self._engine_scales_grads and grads:
            # Lightning divided each micro-batch loss by accumulate_grad_batches and DDP averaged over ranks
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / window[1].clamp(min=1.0)
            torch._foreach_mul_(grads, scale.float())
        norm = _grad_norm(grads).to(window)
        if self._sharded_grads and self.trainer.world_size > 1:  # each rank holds a disjoint shard of the gradient
            norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        # the one host read of the optimizer step: what the loggers print
        values = torch.cat([window, norm[None]]).tolist()
        (loss_sum, trained, tokens), extra, grad_norm = values[:3], values[3:-1], values[-1]
        self._check_finite(loss_sum / max(trained, 1.0), grad_norm)
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        logged = {
            "train/loss": loss_sum / max(trained, 1.0),
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": tokens / max(elapsed, 1e-9),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if self.preference is None:
            self.trained_tokens += int(trained)
            logged["train/trained_tokens_per_s"] = trained / max(elapsed, 1e-9)
            logged["train/trained_tokens"] = float(self.trained_tokens)
        else:  # ``trained`` counts pairs (KTO: examples)
            logged["train/examples_per_s"] = trained / max(elapsed, 1e-9)
            metrics = self.preference.metrics(dict(zip(self.preference.keys, extra, strict=True)), trained)
            logged |= {f"train/{k}": v for k, v in metrics.items()}
        self.log_dict(logged, prog_bar=False, rank_zero_only=True)
        self.log("loss", loss_sum / max(trained, 1.0), prog_bar=True, logger=False, rank_zero_only=True)
        self._window = None

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        """Stop before an optimizer step whose loss or gradient is NaN/inf (it would make every weight NaN): no NaN
        reaches the weights or a checkpoint, and those already written are kept. Under a grad scaler (fp16) an inf
        gradient is routine: the scaler skips that step itself. Reads the values already on the host (no sync)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        if math.isfinite(loss) and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        raise Diverged(
            f"training diverged at optimizer step {self.trainer.global_step + 1}: loss {loss:g}, gradient norm "
            f"{grad_norm:g}; stopped before that step (lower optim.lr, or check the data and precision)"
        )

    @property
    def _sharded_grads(self) -> bool:
        return isinstance(self.trainer.strategy, LoraFSDPStrategy)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # a sharded gradient's norm needs every shard: FSDP's own clip_grad_norm_ (Lightning's FSDP plugin refuses)
        if self._sharded_grads and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            self.trainer.strategy.clip_grad_norm(float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        if self.preference is not None:
            loss_sum, n, stats = self._preference_loss(batch)
            self._val = self._accumulate(self._val, loss_sum, n, extra=stats)
            return
        loss_sum, n = self._loss(batch)
        self._val = self._accumulate(self._val, loss_sum, n)

    def on_validation_epoch_end(self) -> None:
        total = self._val
        if total is None:
            total = torch.zeros(self._width(2), dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        (loss_sum, n), extra = total.tolist()[:2], total.tolist()[2:]
        self._val = None
        if n == 0:
            return
        val_loss = loss_sum / n
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=False)
        if self.preference is None:
            self.log("val/ppl", math.exp(min(val_loss, 50.0)), sync_dist=False)
            return
        metrics = self.preference.metrics(dict(zip(self.preference.keys, extra, strict=True)), n)
        for key, value in metrics.items():
            self.log(f"val/{key}", value, prog_bar=key == "rewards/accuracy", sync_dist=False)

    # --- optimisation -----------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameter: check lora.target_modules against the model's layer names")
        optimizer = instantiate(self.optim_cfg.optimizer)(params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_schedule())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_schedule(self):
        """The LR multiplier per optimizer step, its total steps read at the first step.

        Not here: ``estimated_stepping_batches`` makes Lightning build the training dataloader, which during
        ``configure_optimizers`` comes before a resumed run's loop state is restored, and that loader would then
        replay the interrupted epoch from its start. The factor at step 0 (asked when the scheduler is made) needs no
        total: 0 with a warmup, 1 without. A plain function: ``LambdaLR`` keeps it out of checkpoints.
        """
        optim = self.optim_cfg
        schedule, floor = optim.schedule, float(optim.min_lr_ratio)
        ratio, steps = float(optim.warmup_ratio), optim.warmup_steps
        resolved: dict[str, int] = {}

        def factor(step: int) -> float:
            if step == 0 and not resolved:
                warmup = int(steps) if steps is not None else int(ratio > 0)
                return lr_factor(0, warmup=warmup, total=1, schedule=schedule, floor=floor)
            if not resolved:
                total = int(self.trainer.estimated_stepping_batches)
                resolved.update(total=total, warmup=int(steps) if steps is not None else math.ceil(ratio * total))
            return lr_factor(step, **resolved, schedule=schedule, floor=floor)

        return factor

    # --- checkpoints and exact resume -------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {clean_name(n) for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": _numpy_state(),
            "python": random.getstate(),
        }
        checkpoint["kullm"] = {"trained_tokens": self.trained_tokens, "rng": rng}
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank draws its own dropout masks: each must get its own generators back (collective call: every
            # rank dumps the checkpoint, rank 0 writes it)
            per_rank: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(per_rank, rng)
            checkpoint["kullm"]["rng_per_rank"] = per_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("kullm", {})
        self.trained_tokens = int(state.get("trained_tokens", 0))
        per_rank = state.get("rng_per_rank") or [state.get("rng")]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if len(per_rank) != world:
            log.warning(
                "the checkpoint holds RNG states of %d rank(s), this run has %d: reusing rank 0's", len(per_rank), world
            )
        self._rng_to_restore = per_rank[rank] if len(per_rank) == world else per_rank[0]

    def on_fit_start(self) -> None:
        # from_pretrained returns a model in eval mode: train mode makes dropout and gradient checkpointing (which HF
        # layers apply only while training) act, as HF's Trainer does; validation switches back and forth itself
        self.model.train()
        if self.reference is not None:  # a frozen copy (lora=none, objective.ref_copy) sits outside the module tree
            self.reference.to(self.device)

    def on_train_start(self) -> None:
        # Lightning resumes mid-epoch without calling on_train_epoch_start: restore the RNG here (the batch order
        # was restored when the training dataloader was made: KullmDataModule.train_dataloader)
        if self._rng_to_restore is not None:  # the last thing before the first resumed step
            rng, self._rng_to_restore = self._rng_to_restore, None
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            _set_numpy_state(rng["numpy"])
            random.setstate(rng["python"])
        self._clock = time.perf_counter()

    def on_train_epoch_start(self) -> None:
        if self.trainer.datamodule is not None:
            self.trainer.datamodule.set_epoch(self.trainer.current_epoch)
        self._clock = time.perf_counter()


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads`` (one fused kernel per dtype, no host read), float32."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms))


def _numpy_state() -> dict[str, Any]:
    """NumPy's RNG state in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": pos,
        "has_gauss": has_gauss,
        "gauss": gauss,
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["gauss"]))


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, floor: float = 0.0) -> float:
    """The learning-rate multiplier at optimizer ``step`` (0-based): linear warmup, then cosine / linear decay or
    constant — the formulas of transformers' ``get_{cosine,linear,constant}_schedule_with_warmup`` (which the seed
    recipe's HF ``Trainer`` used), with an optional floor as a fraction of the peak."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    raise ValueError(f"optim.schedule must be cosine, linear or constant, got {schedule!r}")
