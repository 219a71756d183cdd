"""No host sync in the training step: nothing kullm runs in ``training_step`` waits for the device.

On a GPU every ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()`` or boolean-mask selection blocks the host
until the device catches up. On the CPU they cost nothing and show nothing, so the test watches the operators
themselves: every scalar read goes through ``aten._local_scalar_dense``, every data-dependent shape through
``nonzero`` (or an index with a boolean mask); a dispatch mode refuses them while ``training_step`` runs.

One read is upstream's and is counted, not refused: transformers' mask builder (``masking_utils``) checks the
position ids (or the padding mask) on the host once per forward to decide whether it may skip building a mask.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HostSync, no_host_sync

from kullm.config import compose
from kullm.train import train
from kullm.training.module import KullmLitModule


def test_the_guard_catches_each_kind_of_sync():
    t = torch.tensor([1.0, -2.0, 3.0])
    for read in (
        lambda: t.sum().item(),
        lambda: float(t.sum()),
        lambda: int(t.argmax()),
        lambda: bool(t.sum() > 0),
        lambda: t.tolist(),
        lambda: t[t > 0],
        lambda: t.nonzero(),
        lambda: t.numpy(),
    ):
        with pytest.raises(HostSync), no_host_sync():
            read()
    with no_host_sync():  # what stays on the device is allowed
        (t * 2).sum().clamp(min=1)
        t.index_select(0, torch.tensor([0, 2]))


@pytest.mark.parametrize("packing", [False, True])
def test_training_step_never_waits_for_the_device(tmp_path, monkeypatch, packing):
    """A real smoke run (2 micro-batches per optimizer step, head-only fused loss): every training_step runs under
    the guard, and the logged trained-token count is still the labels' own."""
    calls: list[int] = []
    upstream: list[list[str]] = []
    real = KullmLitModule.training_step

    def guarded(self, batch, batch_idx):
        with no_host_sync() as mode:
            out = real(self, batch, batch_idx)
        calls.append(batch_idx)
        upstream.append(mode.upstream)
        return out

    monkeypatch.setattr(KullmLitModule, "training_step", guarded)
    cfg = compose(
        "train",
        [
            "experiment=smoke",
            "logger=none",
            f"output_dir={tmp_path}",
            f"data.cache_dir={tmp_path}/cache",
            "batch_size=8",
            "micro_batch_size=4",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            "callbacks.samples.num=0",
            "callbacks.checkpoint.monitor=null",
            f"data.packing={str(packing).lower()}",
        ],
    )
    result = train(cfg)
    assert calls == [0, 1, 2, 3]
    assert all(len(reads) <= 1 for reads in upstream), upstream  # transformers' one look at the mask inputs
    module = result["module"]
    assert module.trained_tokens > 0 and result["metrics"]["train/trained_tokens"] == module.trained_tokens
