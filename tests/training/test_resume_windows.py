"""Resume at whole accumulation windows, fast: a graceful stop (SIGTERM, SLURM's SIGUSR1) asked for mid-window
saves ``last`` at the end of that window; a periodic ``last`` is never refreshed mid-window; and two interruptions
inside one epoch, each resumed, end with the straight run's adapter, bit for bit.

Four micro-batches per optimizer step (batch 8 = micro-batch 2 × accumulation 4), so a checkpoint written one, two
or three micro-batches into a window shows in its loop counters.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import cfg_for
from safetensors.torch import load_file

from kullm.train import train
from kullm.training.preemption import Interrupted

ACCUMULATE = 4
# dropout 0.1: the RNG state must resume too
COMMON = ["seed=3", "batch_size=8", "micro_batch_size=2", "trainer.max_steps=6", "lora.lora_dropout=0.1",
          "trainer.limit_val_batches=0", "callbacks.checkpoint.monitor=null", "callbacks.samples.num=0",
          "callbacks.checkpoint.every_n_train_steps=1"]  # fmt: skip


class Saves(L.Callback):
    """(optimizer step, micro-batches taken) of every checkpoint this run writes."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
        self.seen.append((checkpoint["global_step"], progress["ready"]))


class SignalAt(L.Callback):
    """Sends this process ``sig`` as micro-batch ``batch_idx`` of the epoch starts (what a cluster does at any
    moment)."""

    def __init__(self, batch_idx: int, sig: int) -> None:
        self.batch_idx, self.sig = batch_idx, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            signal.raise_signal(self.sig)


def interrupted(out: Path, at: int, sig: int, *extra: str) -> tuple[int, Saves]:
    saves = Saves()
    with pytest.raises(Interrupted) as e:
        train(cfg_for(out, *COMMON, *extra), extra_callbacks=[SignalAt(at, sig), saves])
    assert e.value.signum == sig and e.value.last == str(out / "checkpoints" / "last.ckpt")
    return e.value.step, saves


def adapter(result_or_folder) -> dict[str, torch.Tensor]:
    folder = Path(result_or_folder["adapter"] if isinstance(result_or_folder, dict) else result_or_folder)
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.timeout(600)
def test_two_graceful_stops_mid_window_in_one_epoch_resume_to_the_straight_runs_adapter(tmp_path):
    saves = Saves()
    straight = train(cfg_for(tmp_path / "straight", *COMMON), extra_callbacks=[saves])
    assert saves.seen and all(ready == ACCUMULATE * step for step, ready in saves.seen), saves.seen
    assert {step for step, _ in saves.seen} == {1, 2, 3, 4, 5, 6}  # every_n_train_steps=1: a save point per step
    last = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0  # the whole run, and both interruptions below, fall inside one epoch
    want = adapter(straight)

    # SIGTERM as the 2nd micro-batch of window 2 starts: the window is finished, then `last` holds step 2
    step, first = interrupted(tmp_path / "a", 5, signal.SIGTERM)
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert step == last["global_step"] == 2 and progress["ready"] == ACCUMULATE * 2
    assert all(ready == ACCUMULATE * s for s, ready in first.seen), first.seen
    assert not (tmp_path / "a" / "adapter").exists()

    # resumed, then SLURM's SIGUSR1 as the 4th micro-batch of window 4 starts (same epoch): `last` holds step 4
    step, second = interrupted(tmp_path / "b", 15, signal.SIGUSR1, f"ckpt_path={tmp_path / 'a'}")
    last = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert step == last["global_step"] == 4 and progress["ready"] == ACCUMULATE * 4
    assert all(ready == ACCUMULATE * s for s, ready in second.seen), second.seen

    resumed = train(cfg_for(tmp_path / "c", *COMMON, f"ckpt_path={tmp_path / 'b'}"))
    assert resumed["metrics"]["global_step"] == 6
    got = adapter(resumed)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"resumed twice in one epoch: {k} differs from the straight run"
    # and each `last` adapter folder holds its checkpoint's weights (the step the run stopped at)
    stopped = adapter(tmp_path / "b" / "checkpoints" / "last")
    assert any(not torch.equal(stopped[k], want[k]) for k in want)
