"""FSDP for adapter training: Lightning's ``FSDPStrategy`` with what LoRA on a frozen base needs.

* Each LoRA layer is an FSDP unit of its own, beside one unit per transformer block (the model's
  ``_no_split_modules``): flat parameters never mix frozen and trainable weights, so backward allocates and
  reduce-scatters gradients for the adapter only. Under full fine-tuning (``lora=none``) the blocks are the units.
* Checkpoints and exported adapters hold the trainable weights only, under plain names (no ``_fsdp_wrapped_module``),
  gathered unit by unit from the adapter's units: the frozen base is never gathered to save.
* Gradients are clipped by their global norm across shards (``FullyShardedDataParallel.clip_grad_norm_``), which
  Lightning's FSDP precision plugin refuses to do.
* It also runs on CPU processes (gloo), which Lightning refuses for its own class: how kullm tests it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from kullm.adapter import clean_name


def _is_adapter_leaf(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.requires_grad for p in params)


def _layer_classes(model: nn.Module, names: list[str] | None) -> set[type[nn.Module]]:
    """The block classes to wrap: ``names`` or, by default, every ``_no_split_modules`` entry of the HF model."""
    if not names:
        names = sorted({n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])})
    found = {type(m) for m in model.modules() if type(m).__name__ in set(names)}
    missing = set(names) - {c.__name__ for c in found}
    if missing:
        raise ValueError(f"strategy.impl.layer_classes: no module of class {sorted(missing)} in the model")
    return found


def _wrap_policy(
    layer_classes: set[type[nn.Module]], adapter: bool, module: nn.Module, recurse: bool, nonwrapped_numel: int
) -> bool:
    if recurse:
        return True
    return isinstance(module, tuple(layer_classes)) or (adapter and _is_adapter_leaf(module))


class LoraFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that wraps LoRA layers as their own units, saves only the adapter, clips by the global norm and
    runs on CPU processes too.

    :param layer_classes: class names of the transformer blocks to wrap (default: the model's ``_no_split_modules``).
    """

    def __init__(self, *, layer_classes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer_classes = list(layer_classes) if layer_classes else None

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if "auto_wrap_policy" not in self.kwargs or self.kwargs["auto_wrap_policy"] is None:
            # full fine-tuning (every weight trains): one unit per block, no per-layer units
            adapter = not all(p.requires_grad for p in model.parameters())
            self.kwargs["auto_wrap_policy"] = functools.partial(
                _wrap_policy, _layer_classes(model, self.layer_classes), adapter
            )
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # Lightning passes ``device_id=None`` on CPU, which torch's FSDP refuses; ``cpu`` with gloo works
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def _adapter_units(self) -> list[nn.Module]:
        """FSDP units that directly hold a trainable parameter (collective order: the same on every rank)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return [u for u in FSDP.fsdp_modules(self.model) if any(p.requires_grad for _, p in _own_params(u))]

    def trainable_state(self, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Full trainable weights by clean name (on rank 0 only when ``rank0_only``); a collective call.

        Only the units holding trainable weights are gathered; a unit that also holds frozen weights (a layer the
        wrap policy could not split) is gathered whole, but its frozen weights are not kept.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        prefixes = {id(u): n for n, u in self.model.named_modules()}
        state: dict[str, torch.Tensor] = {}
        for unit in self._adapter_units():
            names = [n for n, p in _own_params(unit) if p.requires_grad]  # inside the context all look frozen
            # rank0_only / offload_to_cpu are not used: on CPU processes they crash the other ranks (a segfault in
            # torch 2.13), and an adapter unit is small enough to gather on every rank for the moment it is copied
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                if rank0_only and self.global_rank != 0:
                    continue
                base = prefixes[id(unit)]
                for name in names:  # the gathered views are plain attributes there, no longer parameters
                    full = f"{base}.{name}" if base else name
                    state[clean_name(full)] = functools.reduce(getattr, name.split("."), unit).detach().cpu().clone()
        return state

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.trainable_state()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer state keyed by parameter name (rank 0 holds it all).

        Lightning re-keys it by parameter *position* in ``model.parameters()``, which is wrong when the optimizer
        holds only some of them (the adapter): a resume would load the moments of other weights.
        """
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        # offloading to CPU from CPU processes aliases the gathered tensors (exp_avg saved as exp_avg_sq, torch 2.13)
        offload = self.world_size > 1 and self.root_device.type != "cpu"
        with FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        ):
            return FSDP.optim_state_dict(self.model, optimizer)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip every gradient shard by the norm of the whole (gathered) gradient; returns that norm."""
        return self.model.clip_grad_norm_(max_norm)


def _own_params(unit: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters an FSDP unit manages itself (not those of the units nested in it), by name inside it."""
    return [(n, p) for n, p in unit.named_parameters() if n.count("_fsdp_wrapped_module.") == 1]

