"""Exact resume from every checkpoint of a two-epoch run: mid-epoch in either epoch and at the epoch end, for the
default (length-grouped) sampler, token-budget batches and packed rows."""

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import cfg_for
from safetensors.torch import load_file

from kullm.train import train

COMMON = [
    "seed=1234",
    "trainer.max_steps=16",
    "trainer.max_epochs=3",  # bounded, as users run: Lightning then sizes the schedule from the data
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.checkpoint.monitor=train/loss",
    "callbacks.checkpoint.save_top_k=-1",
    "callbacks.samples.num=0",
    "lora.lora_dropout=0.1",
]  # fmt: skip  (dropout draws from the RNG: its state must be restored too)
VARIANTS = {
    "length_grouped": [],
    "random": ["sampler=random"],
    "token_budget": ["data.batching=tokens", "data.token_budget=1024"],
    "packing": ["data.packing=true", "batch_size=4", "micro_batch_size=2"],
}


class SamplerEpochs(L.Callback):
    """Which epoch the training sampler was at for each micro-batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, trainer.datamodule.train_sampler.epoch))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_from_every_checkpoint_ends_with_the_straight_runs_adapter(tmp_path, variant):
    common = [*COMMON, *VARIANTS[variant]]
    epochs = SamplerEpochs()
    straight = train(cfg_for(tmp_path / "straight", *common), extra_callbacks=[epochs])
    assert straight["trainer"].current_epoch >= 1, "the run must span two epochs"
    assert all(a == b for a, b in epochs.seen)  # every sampler (token budgets too) reshuffles per epoch
    want = load_file(Path(straight["adapter"]) / "adapter_model.safetensors")
    ckpts = sorted((tmp_path / "straight" / "checkpoints").glob("step*.ckpt"))
    steps = [torch.load(c, weights_only=True)["global_step"] for c in ckpts]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    for ckpt, step in zip(ckpts[:-1], steps[:-1], strict=True):
        resumed = train(cfg_for(tmp_path / f"from{step}", *common, f"ckpt_path={ckpt}"))
        got = load_file(Path(resumed["adapter"]) / "adapter_model.safetensors")
        for k in want:
            assert torch.equal(got[k], want[k]), f"{variant}: resumed from step {step}: {k} differs"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", ["length_grouped", "token_budget", "packing"])
def test_resume_on_two_processes_is_exact_with_dropout(tmp_path, variant):
    """Each rank draws its own dropout masks and its own shard of batches: a resumed DDP run gives every rank its
    own RNG state and position back, mid-epoch in either epoch."""
    import os
    import subprocess
    import sys

    common = [*COMMON, "experiment=smoke", "logger=csv", "strategy=ddp", "trainer.devices=2", "trainer.max_steps=20",
              "batch_size=8", "micro_batch_size=2", f"data.cache_dir={tmp_path}/cache", *VARIANTS[variant]]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(name: str, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "kullm.train", *common, *extra, f"hydra.run.dir={tmp_path}/{name}"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    want = run("straight")
    saved = sorted((tmp_path / "straight" / "checkpoints").glob("step*.ckpt"))[:-1]  # not the final step
    loaded = {c: torch.load(c, weights_only=True) for c in saved}
    ckpts = [saved[1], max((c for c in saved if loaded[c]["epoch"] == 1), default=None)]  # mid-epoch 0 and 1
    assert ckpts[1] is not None and len(loaded[saved[1]]["kullm"]["rng_per_rank"]) == 2
    for ckpt in ckpts:
        got = run(ckpt.stem, f"ckpt_path={ckpt}")
        assert all(torch.equal(got[k], want[k]) for k in want), f"resumed from {ckpt.name}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_with_dataloader_workers_is_exact(tmp_path):
    """Batches come from worker processes (the order still comes from kullm's sampler in the main process)."""
    common = [*COMMON, "num_workers=2"]
    straight = train(cfg_for(tmp_path / "straight", *common))
    want = load_file(Path(straight["adapter"]) / "adapter_model.safetensors")
    for step in (6, 12):  # mid-epoch 0, mid-epoch 1
        ckpt = tmp_path / "straight" / "checkpoints" / f"step{step:06d}.ckpt"
        resumed = train(cfg_for(tmp_path / f"from{step}", *common, f"ckpt_path={ckpt}"))
        got = load_file(Path(resumed["adapter"]) / "adapter_model.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want), f"resumed from step {step}"
