"""The optimizer step: what reaches the optimizer is the gradient of the mean loss per trained token of the whole step.

Each test runs a real Lightning ``Trainer.fit`` of :class:`KullmLitModule` on a tiny random GPT-NeoX with LoRA and
plain SGD (the update is ``lr × gradient``, so any wrong scale shows in the adapter), and compares the adapter after
every step, the logged loss and the logged gradient norm with an independent by-hand reference: the cross-entropy
summed over every trained token of the step's micro-batches, divided by their count, back-propagated, clipped,
applied. Fast (a few seconds in all), so mutation testing can run them per mutant (see MUTATION.md).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_LORA_SHAPE, tiny_lora
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DeepSpeedStrategy, SingleDeviceStrategy
from transformers import GPTNeoXForCausalLM  # noqa: F401  (imported here, once: mutation runs fork after collection)

from kullm.data.sft import IGNORE_INDEX, Collator
from kullm.training.module import KullmLitModule

LR = 0.5
LOGGED = {"train/loss", "train/grad_norm", "train/tokens_per_s", "train/trained_tokens_per_s", "train/trained_tokens",
          "lr", "epoch"}  # fmt: skip


def micro_batch(seed: int, rows: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """A collated micro-batch of rows ``(length, prompt length)``: the prompt and the padding are not trained."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n, n_prompt in rows:
        ids = torch.randint(3, TINY_LORA_SHAPE["vocab_size"], (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return Collator(pad_id=2, pad_to_multiple_of=8)(examples)


def trained(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# Three optimizer steps of 2 micro-batches each, with very unequal trained-token counts (35 + 3, 12 + 30, 1 + 0):
# a per-micro-batch mean, a missing accumulation factor or a count of the wrong step all change the result.
STEPS = [
    [micro_batch(1, [(12, 2), (9, 3), (20, 1)]), micro_batch(2, [(6, 4), (5, 4)])],
    [micro_batch(3, [(14, 2)]), micro_batch(4, [(11, 1), (8, 0), (16, 3)])],
    [micro_batch(5, [(7, 6)]), micro_batch(6, [(6, 6), (4, 4)])],  # one trained token in the whole step
]


def reference(steps, clip: float | None = None) -> dict[str, list]:
    """SGD by hand: per step, ∇(Σ token cross-entropies of all its micro-batches) ÷ trained tokens, clipped."""
    model = tiny_lora()
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, list] = {"params": [], "loss": [], "grad_norm": [], "tokens": []}
    for step in steps:
        model.zero_grad(set_to_none=True)
        loss_sum, n = 0.0, 0
        for b in step:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
            loss.backward()
            loss_sum, n = loss_sum + loss.item(), n + trained(b)
        with torch.no_grad():
            grads = [p.grad / n for p in params]
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            factor = min(1.0, clip / (norm + 1e-6)) if clip is not None else 1.0
            for p, g in zip(params, grads, strict=True):
                p -= LR * factor * g
        out["params"].append(flat(model))
        out["loss"].append(loss_sum / n)
        out["grad_norm"].append(norm)
        out["tokens"].append(n)
    return out


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])


class Recorder(Logger):
    """Keeps every logged row in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class AdapterAfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.fit_loop.epoch_loop._should_accumulate():
            self.params.append(flat(pl_module.model))


class IdenticalSecondRank(SingleDeviceStrategy):
    """Two DDP ranks that hold the same micro-batches, seen from rank 0: DDP's averaged gradient is this process's own
    gradient, and a sum all-reduce gives twice this process's value (the real two-process run is the slow
    ``test_ddp_on_two_processes_trains_the_same_adapter_as_one_process``)."""

    @property
    def world_size(self) -> int:
        return 2

    @world_size.setter
    def world_size(self, value: int) -> None:  # SingleDeviceStrategy sets 1
        pass

    def reduce(self, tensor, group=None, reduce_op="mean"):
        return tensor * 2 if reduce_op == "sum" else tensor


def fit(steps, *, clip: float | None = None, strategy=None, accumulate: int = 2) -> dict:
    module = KullmLitModule(
        tiny_lora(),
        optim={"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": LR},
               "schedule": "constant", "warmup_steps": 0},
        loss={"head_only": True},
    )  # fmt: skip
    logger, spy = Recorder(), AdapterAfterEachStep()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy or "auto",
        max_steps=len(steps),
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        logger=logger,
        callbacks=[spy],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader([b for step in steps for b in step], batch_size=None)
    trainer.fit(module, loader)
    rows = [r for r in logger.rows if "train/loss" in r]
    return {"rows": rows, "params": spy.params, "trainer": trainer, "module": module}


def series(run: dict, key: str) -> list[float]:
    return [r[key] for r in run["rows"]]


def assert_params(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=lambda m, k=k: f"after step {k + 1}: {m}")


@pytest.fixture(scope="module")
def expected():
    return reference(STEPS)


class SteadyClock:
    """``time.perf_counter`` for the module only: every reading is 0.25 s after the previous one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        self.now += 0.25
        return self.now


def test_every_step_applies_the_gradient_of_the_mean_loss_per_trained_token_of_the_whole_step(expected, monkeypatch):
    """One fit, every check on it (a module-scoped fit would hide these tests from mutmut's per-test coverage)."""
    import kullm.training.module as module

    monkeypatch.setattr(module, "time", SteadyClock())  # each step is 0.25 s after the previous one
    run = fit(STEPS)
    assert expected["tokens"] == [38, 42, 1]
    assert_params(run["params"], expected["params"])
    assert (run["params"][0] - flat(tiny_lora())).abs().max() > 1e-3  # the adapter really moved
    # logged: the loss per trained token, the norm of the scaled gradient, cumulative trained tokens, the lr
    assert len(run["rows"]) == 3 and all(r.keys() == LOGGED for r in run["rows"])
    assert series(run, "train/loss") == pytest.approx(expected["loss"], rel=1e-5)
    assert series(run, "train/grad_norm") == pytest.approx(expected["grad_norm"], rel=1e-4)
    assert series(run, "train/trained_tokens") == [38.0, 80.0, 81.0]
    assert series(run, "lr") == [LR, LR, LR]
    assert run["trainer"].progress_bar_metrics.keys() == {"loss"}  # the bar shows one number: the last step's loss
    assert float(run["trainer"].progress_bar_metrics["loss"]) == pytest.approx(expected["loss"][-1], rel=1e-5)
    assert run["module"].trained_tokens == 81
    # throughput: every real (non-padding) token, and the trained ones, per second of the step
    real = [sum(int(b["attention_mask"].sum()) for b in step) for step in STEPS]
    assert series(run, "train/tokens_per_s") == pytest.approx([4.0 * t for t in real], rel=1e-6)
    assert series(run, "train/trained_tokens_per_s") == pytest.approx([4.0 * n for n in expected["tokens"]], rel=1e-6)


def test_clipping_applies_to_the_scaled_gradient_and_the_logged_norm_is_before_clipping(expected):
    clip = 0.5 * min(expected["grad_norm"])
    clipped = reference(STEPS, clip=clip)
    res = fit(STEPS, clip=clip)
    assert_params(res["params"], clipped["params"])
    assert series(res, "train/grad_norm") == pytest.approx(clipped["grad_norm"], rel=1e-4)
    first_move = float(torch.linalg.vector_norm(res["params"][0] - flat(tiny_lora())))
    assert first_move == pytest.approx(LR * clip, rel=1e-4)  # the step was clipped to exactly the threshold


def test_two_ranks_holding_the_same_data_train_exactly_like_one(expected):
    """DDP averages gradients over ranks and the token count is summed over ranks: × world size restores the sum."""
    res = fit(STEPS, strategy=IdenticalSecondRank(accelerator=None, device=torch.device("cpu")))
    assert res["trainer"].world_size == 2
    assert_params(res["params"], expected["params"])
    assert series(res, "train/loss") == pytest.approx(expected["loss"], rel=1e-5)
    assert series(res, "train/grad_norm") == pytest.approx(expected["grad_norm"], rel=1e-4)
    assert series(res, "train/trained_tokens") == [76.0, 160.0, 162.0]  # both ranks' tokens


def test_one_micro_batch_per_step_needs_no_accumulation_factor():
    steps = [[b] for step in STEPS[:2] for b in step]
    ref, res = reference(steps), fit(steps, accumulate=1)
    assert_params(res["params"], ref["params"])
    assert series(res, "train/grad_norm") == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert float(res["trainer"].progress_bar_metrics["loss"]) == pytest.approx(ref["loss"][-1], rel=1e-5)


def test_under_deepspeed_each_micro_batch_is_a_token_mean_scaled_once():
    """DeepSpeed's engine divides by the accumulation again and clips itself: kullm hands it each micro-batch's
    token mean × accumulation (Lightning divides by it once), and a micro-batch without trained tokens gives 0."""
    for strategy in ("auto", DeepSpeedStrategy()):
        module = KullmLitModule(tiny_lora(), optim={}, loss={"head_only": True})
        module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, accumulate_grad_batches=4,
                                   logger=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        for batch in (STEPS[0][0], STEPS[2][0], STEPS[2][1]):  # 35, 1 and 0 trained tokens
            loss = float(module.training_step(batch, 0).detach())
            n = trained(batch)
            summed = reference([[batch]])["loss"][0] * n if n else 0.0
            want = summed if strategy == "auto" else summed / max(n, 1) * 4
            assert loss == pytest.approx(want, rel=1e-5, abs=1e-7), (strategy, n)


def test_the_grad_norm_is_zero_when_no_parameter_holds_a_gradient():
    """DeepSpeed ZeRO keeps the gradients inside its engine (``p.grad`` stays None): the norm logged is 0, no crash."""
    from kullm.training.module import _grad_norm

    module = KullmLitModule(tiny_lora(), optim={}, loss={})
    grads = lambda: [p.grad for p in module.trainable_parameters() if p.grad is not None]  # noqa: E731
    assert float(_grad_norm(grads())) == 0.0
    module.trainable_parameters()[0].grad = torch.full_like(module.trainable_parameters()[0], 2.0)
    assert float(_grad_norm(grads())) == pytest.approx(2.0 * module.trainable_parameters()[0].numel() ** 0.5)


class OtherRankHolds(IdenticalSecondRank):
    """Rank 0 of two, where the other rank's validation sums are ``other``: a sum all-reduce adds them."""

    def __init__(self, other: torch.Tensor) -> None:
        super().__init__(device=torch.device("cpu"))
        self.other = other

    def reduce(self, tensor, group=None, reduce_op="mean"):
        if torch.is_tensor(tensor) and tensor.shape == self.other.shape:  # kullm's validation sums
            assert reduce_op == "sum"
            return tensor + self.other.to(tensor)
        return super().reduce(tensor, group, reduce_op)  # Lightning's own (the loader length): the same per rank


def test_val_loss_is_the_mean_per_trained_token_over_every_validation_batch_and_rank():
    """val/loss = Σ token cross-entropies of every validation batch ÷ their trained tokens (not the last batch's,
    not a mean of batch means); on two ranks both sums are all-reduced first; val/ppl is its exponential."""
    batches = [b for step in STEPS for b in step]  # 6 batches, 35 / 3 / 12 / 30 / 1 / 0 trained tokens
    model = tiny_lora()
    with torch.no_grad():
        sums = []
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            sums.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")))  # fmt: skip
    counts = [trained(b) for b in batches]
    other = torch.tensor([123.0, 40.0], dtype=torch.float64)  # the second rank's loss sum and trained tokens
    for strategy, want in (
        ("auto", sum(sums) / sum(counts)),
        (OtherRankHolds(other), (sum(sums) + 123.0) / (sum(counts) + 40)),
    ):
        module = KullmLitModule(tiny_lora(), optim={}, loss={"head_only": True})
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
        (got,) = trainer.validate(module, torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)
        assert got["val/loss"] == pytest.approx(want, rel=1e-5), strategy
        assert got["val/ppl"] == pytest.approx(math.exp(want), rel=1e-5)
        assert module._val is None  # reset for the next validation
        assert set(trainer.progress_bar_metrics) == {"val/loss"}  # shown in the bar; the perplexity only logged


def test_a_validation_without_batches_logs_nothing_or_the_other_ranks_loss(monkeypatch):
    """A process whose share of the validation set is empty: alone it logs nothing; beside another rank it still
    joins the all-reduce (in float64, as the others' sums are) and logs their mean."""
    for strategy, want in (("auto", []), (OtherRankHolds(torch.tensor([0.1, 3.0], dtype=torch.float64)), [0.1 / 3])):
        module = KullmLitModule(tiny_lora(), optim={}, loss={})
        module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False,
                                   enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        logged: dict[str, float] = {}
        monkeypatch.setattr(module, "log", lambda name, value, logged=logged, **kwargs: logged.__setitem__(name, value))
        module.on_validation_epoch_end()  # no batch ran here
        assert [v for k, v in logged.items() if k == "val/loss"] == want  # exact: no float32 round trip
        assert module._val is None
