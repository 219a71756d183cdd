"""What a Lightning checkpoint carries besides the optimizer: only the trainable weights, the trained-token count and
every random generator (torch, NumPy, Python; one set per rank), restored just before the first resumed step.

The hooks are called directly here, on a tiny LoRA model (fast); the end-to-end resume tests (``test_train.py``'s
n + n = 2n, ``test_resume.py``) check that a resumed run ends with the straight run's adapter.
"""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import pytest
import torch
from helpers import module_on
from lightning.pytorch.strategies import SingleDeviceStrategy

from kullm.training.module import KullmLitModule


class Rank(SingleDeviceStrategy):
    """Rank ``rank`` of ``world`` processes, seen from this one."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__(device=torch.device("cpu"))
        self._rank, self._world = rank, world

    @property
    def global_rank(self) -> int:
        return self._rank

    @global_rank.setter
    def global_rank(self, value: int) -> None:  # Lightning's setup sets 0
        pass

    @property
    def world_size(self) -> int:
        return self._world

    @world_size.setter
    def world_size(self, value: int) -> None:
        pass


def draws() -> tuple[list[float], list[float], list[float]]:
    # one Gaussian per call: NumPy makes them in pairs and keeps the second in its state, which must come back too
    return torch.rand(3).tolist(), np.random.rand(3).tolist() + np.random.randn(1).tolist(), [random.random()]


def saved(module: KullmLitModule) -> dict:
    """``on_save_checkpoint`` on Lightning's full state dict, then a round trip through ``torch.save`` and the
    ``weights_only`` load that resuming uses."""
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_checkpoint_restores_every_generator_and_the_trained_token_count():
    module = module_on()
    module.trained_tokens = 1234
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    draws()  # the generators are mid-stream, not at a seed
    ckpt = saved(module)
    want = draws()  # what the run that was not interrupted draws next
    draws()  # the interrupted run moves on
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable and len(trainable) > 0  # no frozen base weight in the checkpoint
    resumed = module_on()
    resumed.on_load_checkpoint(ckpt)
    assert resumed.trained_tokens == 1234
    assert draws() != want  # restored at the first resumed step, not at load time
    resumed.on_train_start()
    assert draws() == want
    resumed.on_train_start()  # only once: a later call leaves the generators alone
    assert draws() != want


def test_each_rank_gets_its_own_generators_back(caplog):
    per_rank = []
    for seed in (10, 11):
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        per_rank.append(saved(module_on())["kullm"]["rng"])
        per_rank[-1]["next"] = draws()
    ckpt = {"state_dict": {}, "kullm": {"trained_tokens": 7, "rng": per_rank[0], "rng_per_rank": per_rank}}
    for rank in (0, 1):
        module = module_on(Rank(rank, 2))
        module.on_load_checkpoint(ckpt)
        module.on_train_start()
        assert draws() == per_rank[rank]["next"]
    with caplog.at_level(logging.WARNING, logger="kullm.training.module"):
        module = module_on(Rank(3, 4))  # resumed on more processes than saved it: every rank takes rank 0's
        module.on_load_checkpoint(ckpt)
        module.on_train_start()
    assert draws() == per_rank[0]["next"]
    assert [r.getMessage() for r in caplog.records if r.name == "kullm.training.module"] == [
        "the checkpoint holds RNG states of 2 rank(s), this run has 4: reusing rank 0's"
    ]


def test_a_checkpoint_without_kullms_state_resumes_from_zero_tokens_and_leaves_the_generators():
    module = module_on()
    module.trained_tokens = 99
    module.on_load_checkpoint({"state_dict": {}})  # a plain Lightning checkpoint
    torch.manual_seed(5)
    want = torch.rand(3).tolist()
    torch.manual_seed(5)
    module.on_train_start()
    assert module.trained_tokens == 0 and torch.rand(3).tolist() == want


# One override per key of the resume identity: each must change that key alone, and a checkpoint of the base
# settings must then be refused naming it. A key added to run_identity without a line here fails the test.
IDENTITY_VARIANTS = {
    "model.name_or_path": "model.name_or_path=someone/other-model",
    "model.revision": "model.revision=abc123",
    "model.shape_only": "model.shape_only=true",
    "lora.r": "lora.r=8",
    "lora.lora_alpha": "lora.lora_alpha=8",
    "lora.lora_dropout": "lora.lora_dropout=0.2",
    "lora.target_modules": "lora.target_modules=[query_key_value]",
    "init_adapter": "init_adapter=/some/adapter",
    "objective": "objective=orpo",
    "data.path": "data.path=/some/other.jsonl",
    "data.cutoff_len": "data.cutoff_len=128",
    "data.train_on_inputs": "data.train_on_inputs=true",
    "data.val_set_size": "data.val_set_size=16",
    "data.packing": "data.packing=true",
    "data.train_on": "data.train_on=last",
    "data.chat_template": "data.chat_template=tokenizer",
    "template": "template=alpaca",
    "batch_size": "batch_size=16",
    "micro_batch_size": "micro_batch_size=2",
    "sampler": "sampler=random",
    "seed": "seed=7",
    "data.batching": "data.batching=tokens",
    "data.token_budget": "data.token_budget=2048",
}


def test_every_resume_identity_key_is_recorded_and_a_change_to_it_alone_is_refused(tmp_path):
    from kullm.config import ConfigError, compose
    from kullm.training.resume import RunIdentity, resolve_resume, run_identity

    def cfg(*extra: str):
        return compose("train", ["experiment=smoke", f"output_dir={tmp_path}", *extra])

    base = cfg()
    ckpt = {"state_dict": {}, "loops": {}, "global_step": 3}
    RunIdentity(base).on_save_checkpoint(None, None, ckpt)  # what every checkpoint of the run carries
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    assert set(IDENTITY_VARIANTS) == set(run_identity(base))
    assert resolve_resume(path, base) == str(path)
    for key, override in IDENTITY_VARIANTS.items():
        other = cfg(override)
        changed = [k for k, v in run_identity(other).items() if v != run_identity(base)[k]]
        assert changed == [key], f"{override} changes {changed}, not only {key}"
        with pytest.raises(ConfigError) as e:
            resolve_resume(path, other)
        assert f"({key}: checkpoint " in str(e.value) and "allow_resume_changes=true" in str(e.value)
        assert resolve_resume(path, other, allow_changes=True) == str(path)


def test_a_checkpoint_written_before_an_identity_key_existed_resumes_without_checking_that_key(tmp_path):
    from kullm.config import ConfigError, compose
    from kullm.training.resume import RunIdentity, resolve_resume

    def cfg(*extra: str):
        return compose("train", ["experiment=smoke", f"output_dir={tmp_path}", *extra])

    ckpt = {"state_dict": {}, "loops": {}, "global_step": 3}
    RunIdentity(cfg()).on_save_checkpoint(None, None, ckpt)
    del ckpt["kullm_run"]["seed"]  # as an older kullm wrote it
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    assert resolve_resume(path, cfg("seed=7")) == str(path)
    with pytest.raises(ConfigError, match=r"\(sampler: checkpoint 'length_grouped', now 'random'\)"):
        resolve_resume(path, cfg("sampler=random"))  # the keys it has are still compared
