"""Preference objectives (objective=dpo|ipo|orpo|simpo|kto): each loss as its paper writes it, the head-only
log-probabilities, the reference without a second base (adapter disabled, the SFT adapter frozen beside the trained
one, precomputed), and kullm-train end to end on the bundled Korean pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from console_scripts import one_line_error, run_script
from helpers import TINY_LORA_SHAPE, cfg_for, metric_series, tiny_lora
from safetensors.torch import load_file

from kullm.config import ConfigError, compose, validate
from kullm.data.sft import IGNORE_INDEX, Collator
from kullm.training.preference import (
    REFERENCE_ADAPTER,
    PreferenceObjective,
    Reference,
    log_odds,
    make_reference,
    precompute_reference,
    sequence_logps,
    token_logps,
)

# --- the losses against hand-computed values ----------------------------------------------------------------------

# two pairs: policy and reference summed log-probs, completion lengths
PC, PR, RC, RR = [-4.0, -9.0], [-6.0, -7.5], [-5.0, -8.0], [-5.5, -8.5]
NC, NR = [4.0, 6.0], [5.0, 3.0]


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _pairs_loss(name: str, **knobs):
    objective = PreferenceObjective({"name": name, **knobs})
    sums, counts = torch.tensor(PC + PR), torch.tensor(NC + NR)
    batch = {"labels": torch.zeros(4, 3, dtype=torch.long)}
    loss, stats = objective.loss(sums, counts, torch.tensor(RC + RR), batch)
    return objective, loss.item(), dict(zip(objective.keys, stats.tolist(), strict=True))


def test_dpo_loss_and_rewards_equal_the_paper_by_hand():
    beta, eps = 0.3, 0.1
    _, loss, stats = _pairs_loss("dpo", beta=beta, label_smoothing=eps)
    want, chosen, rejected, right = 0.0, 0.0, 0.0, 0
    for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True):
        z = beta * ((pc - pr) - (rc - rr))
        want += -(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z))
        chosen, rejected = chosen + beta * (pc - rc), rejected + beta * (pr - rr)
        right += beta * (pc - rc) > beta * (pr - rr)
    assert loss == pytest.approx(want, rel=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(chosen, rel=1e-6)
    assert stats["rewards/rejected"] == pytest.approx(rejected, rel=1e-6)
    assert stats["rewards/margin"] == pytest.approx(chosen - rejected, rel=1e-6)
    assert stats["rewards/accuracy"] == right == 1  # pair 1 is preferred, pair 2 is not
    assert stats["logps/chosen"] == pytest.approx(sum(PC)) and stats["logps/rejected"] == pytest.approx(sum(PR))
    _, plain, _ = _pairs_loss("dpo", beta=beta, label_smoothing=0.0)
    z = [beta * ((pc - pr) - (rc - rr)) for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)]
    assert plain == pytest.approx(sum(-math.log(_sig(v)) for v in z), rel=1e-6)


def test_ipo_loss_equals_the_paper_by_hand():
    beta = 0.25
    _, loss, _ = _pairs_loss("ipo", beta=beta)
    want = sum(((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2 for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True))
    assert loss == pytest.approx(want, rel=1e-6)


def test_simpo_loss_is_length_normalised_with_a_margin():
    beta, gamma = 2.0, 0.7
    _, loss, stats = _pairs_loss("simpo", beta=beta, gamma=gamma)
    means = [(pc / nc, pr / nr) for pc, pr, nc, nr in zip(PC, PR, NC, NR, strict=True)]
    want = sum(-math.log(_sig(beta * (mc - mr) - gamma)) for mc, mr in means)
    assert loss == pytest.approx(want, rel=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(sum(beta * mc for mc, _ in means), rel=1e-6)


def test_orpo_loss_is_nll_minus_lambda_log_sigmoid_of_the_log_odds_ratio():
    lam = 0.2
    _, loss, stats = _pairs_loss("orpo", lambda_or=lam)
    want, nll = 0.0, 0.0
    for pc, pr, nc, nr in zip(PC, PR, NC, NR, strict=True):
        mc, mr = pc / nc, pr / nr
        odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
        want += -mc - lam * math.log(_sig(odds))
        nll += -mc
    assert loss == pytest.approx(want, rel=1e-6)
    assert stats["nll"] == pytest.approx(nll, rel=1e-6)
    # log odds stays finite and exact near p = 1, where 1 - exp(m) cancels
    assert log_odds(torch.tensor([-1e-4], dtype=torch.float64)).item() == pytest.approx(
        -1e-4 - math.log(-math.expm1(-1e-4)), rel=1e-9
    )


def test_kto_loss_uses_the_clamped_detached_kl_and_per_label_weights():
    beta, wd, wu = 0.5, 1.0, 1.5
    objective = PreferenceObjective({"name": "kto", "beta": beta, "desirable_weight": wd, "undesirable_weight": wu})
    logps, ref = torch.tensor([-4.0, -6.0, -3.0], requires_grad=True), torch.tensor([-5.0, -5.0, -3.5])
    label = torch.tensor([True, False, True])
    batch = {"labels": torch.zeros(6, 3, dtype=torch.long), "label": label}
    for kl in (0.4, -0.3):  # a negative estimate is clamped to 0
        z0 = max(kl, 0.0)
        loss, stats = objective.loss(logps, None, ref, batch, torch.tensor(kl, requires_grad=True))
        want = 0.0
        for p, r, good in zip(logps.tolist(), ref.tolist(), label.tolist(), strict=True):
            want += wd * (1 - _sig(beta * (p - r - z0))) if good else wu * (1 - _sig(beta * (z0 - (p - r))))
        assert loss.item() == pytest.approx(want, rel=1e-6)
        named = dict(zip(objective.keys, stats.tolist(), strict=True))
        assert named["n_desirable"] == 2 and named["n_undesirable"] == 1 and named["kl"] == pytest.approx(z0)
        assert objective.units(batch) == 3
    loss.backward()
    assert logps.grad is not None  # the KL estimate is detached: only the examples' log-probs get a gradient


# --- log-probabilities at completion positions only ---------------------------------------------------------------


def _batch(spans, seed: int = 1, vocab: int = 96) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, n_prompt in spans:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return Collator(pad_id=0, pad_to_multiple_of=8)(rows)


def _full_logps(model, batch) -> torch.Tensor:
    """The reference computation: every logit, log-softmax, per-row sums of the completion's next tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != IGNORE_INDEX)).sum(-1)


@pytest.mark.parametrize("chunk_size", [None, 3, 1024])
def test_head_only_sequence_logps_and_gradients_equal_the_full_logits(chunk_size):
    model = tiny_lora()
    batch = _batch([(20, 14), (13, 9), (17, 12), (9, 5)])
    weights = torch.tensor([0.3, -1.2, 0.7, 2.0])
    grads = []
    for fn in (lambda: _full_logps(model, batch), lambda: sequence_logps(model, batch, chunk_size=chunk_size)[0]):
        model.zero_grad(set_to_none=True)
        out = fn()
        (out * weights).sum().backward()  # per-sequence weights, as DPO's are
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        grads[-1]["_out"] = out.detach()
    torch.testing.assert_close(grads[1]["_out"], grads[0]["_out"], atol=1e-5, rtol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)
    counts = sequence_logps(model, batch)[1]
    assert counts.tolist() == [6, 4, 5, 4]  # completion tokens (the next-token targets after the prompt)
    full = sequence_logps(model, batch, head_only=False)[0]
    torch.testing.assert_close(full, grads[0]["_out"], atol=1e-5, rtol=1e-5)


def test_a_trained_head_takes_the_recomputed_path_with_the_same_values():
    model = tiny_lora()
    head = model.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(True)  # as under modules_to_save or full fine-tuning
    batch = _batch([(12, 5), (10, 6)])
    logps, rows = token_logps(model, batch, chunk_size=2)
    torch.testing.assert_close(
        torch.zeros(2).index_add(0, rows, logps), _full_logps(model, batch), atol=1e-5, rtol=1e-5
    )
    logps.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().max() > 0


# --- the reference ------------------------------------------------------------------------------------------------


def test_reference_with_the_adapter_disabled_is_the_base_model():
    from peft import LoraConfig, get_peft_model

    from kullm.modeling import load_model

    torch.manual_seed(0)
    base = load_model({"name_or_path": "t", "shape_only": True, "shape": TINY_LORA_SHAPE, "dtype": "float32"})
    batch = _batch([(16, 8), (11, 4)])
    with torch.no_grad():
        expected = _full_logps(base.eval(), batch)
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["query_key_value"], init_lora_weights=False)
    model = get_peft_model(base, lora).train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = Reference("base").logps(model, batch)
    assert model.training  # evaluated without dropout, then given back in train mode
    torch.testing.assert_close(ref, expected, atol=1e-6, rtol=1e-6)
    assert (sequence_logps(model.eval(), batch)[0] - expected).abs().max() > 1e-3  # the adapter changes the policy
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not ref.requires_grad


def _sft_adapter_cfg(adapter: Path, tmp_path: Path, *overrides: str):
    """A kullm-train config on the base the session's adapter (helpers.make_adapter) was trained on, warm-started
    from it."""
    return cfg_for(
        tmp_path, "model.tiny_shape={warmup_steps: 0}", "lora=default", "lora.r=8", "lora.lora_alpha=16",
        "lora.lora_dropout=0.0", f"init_adapter={adapter}", *overrides,
    )  # fmt: skip


def test_from_an_sft_adapter_the_reference_is_that_adapter_frozen_on_the_same_base(adapter, tmp_path):
    from kullm.adapter import save_adapter
    from kullm.modeling import build_trainable_model, load_adapter

    cfg = _sft_adapter_cfg(adapter, tmp_path, "objective=dpo")
    model = build_trainable_model(cfg.model, cfg.lora, cfg.quant, init_adapter=cfg.init_adapter)
    reference = make_reference(model, cfg.objective, init_adapter=cfg.init_adapter)
    assert reference.kind == "adapter" and set(model.peft_config) == {"default", REFERENCE_ADAPTER}
    assert model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the reference adapter never trains
    bases = {id(m.base_layer) for m in model.modules() if hasattr(m, "base_layer")}
    assert len(bases) == len([m for m in model.modules() if hasattr(m, "base_layer")])  # one base, no copy

    sft, _, _ = load_adapter(adapter)
    batch = _batch([(18, 9), (12, 7)], vocab=500)
    with torch.no_grad():
        expected = sequence_logps(sft, batch)[0]
    with torch.no_grad():  # the policy moves away from the SFT adapter …
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ref = reference.logps(model.train(), batch)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)  # … the reference stays the SFT model
    assert (sequence_logps(model.eval(), batch)[0] - expected).abs().max() > 1e-3
    assert model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable

    folder = save_adapter(model, tmp_path / "exported")  # the trained adapter alone, with PEFT's plain names
    assert not (folder / REFERENCE_ADAPTER).exists()
    assert all("reference" not in k for k in load_file(folder / "adapter_model.safetensors"))


def test_precomputed_and_live_references_give_the_same_loss_and_the_cache_is_reused(tmp_path, monkeypatch):
    import datasets

    import kullm.training.preference as pref

    model = tiny_lora().train()
    g = torch.Generator().manual_seed(3)
    rows = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": []}
    for n_prompt in (6, 9, 4, 7, 5):
        prompt = torch.randint(3, 96, (n_prompt,), generator=g).tolist()
        for side, n in (("chosen", 7), ("rejected", 4)):
            answer = torch.randint(3, 96, (n,), generator=g).tolist()
            rows[f"{side}_input_ids"].append(prompt + answer)
            rows[f"{side}_labels"].append([IGNORE_INDEX] * n_prompt + answer)
    ds = datasets.Dataset.from_dict(rows)

    def collate(items):
        return Collator(pad_id=0)([{"input_ids": r[f"{s}_input_ids"], "labels": r[f"{s}_labels"]}
                                   for s in ("chosen", "rejected") for r in items])  # fmt: skip

    cache = tmp_path / "reference-x.pt"
    done = precompute_reference(model, {"train": ds}, collate, cache_file=cache, reference=Reference("base"),
                                micro_batch_size=2)["train"]  # fmt: skip
    assert cache.is_file() and model.training  # the reference ran in eval mode and gave the mode back
    objective = PreferenceObjective({"name": "dpo", "beta": 0.2})
    items = [done[i] for i in range(len(done))]
    batch = collate(items)
    batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in items])
    batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in items])
    model.eval()
    losses = []
    for reference in (Reference("base"), Reference("precomputed")):
        sums, counts = sequence_logps(model, batch)
        losses.append(objective.loss(sums, counts, reference.logps(model, batch), batch)[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-7)

    def refuse(*args, **kwargs):
        raise AssertionError("computed again although cached")

    monkeypatch.setattr(pref, "reference_for_rows", refuse)
    again = precompute_reference(model, {"train": ds}, collate, cache_file=cache, reference=Reference("base"),
                                 micro_batch_size=2)["train"]  # fmt: skip
    assert again["ref_chosen_logps"] == done["ref_chosen_logps"]


def test_full_fine_tuning_reference_copy_stays_out_of_the_module():
    from kullm.modeling import load_model
    from kullm.training.module import KullmLitModule

    model = load_model({"name_or_path": "t", "shape_only": True, "shape": TINY_LORA_SHAPE, "dtype": "float32"})
    reference = make_reference(model, {"name": "dpo", "ref_copy": True})
    module = KullmLitModule(model, optim={}, loss={}, objective={"name": "dpo"}, reference=reference)
    assert reference.kind == "copy"
    n_params = sum(1 for _ in model.parameters())
    assert sum(1 for _ in module.parameters()) == n_params  # the copy is not a submodule: no optimizer, no ckpt
    assert all(not p.requires_grad for p in reference._copy[0].parameters())
    batch = _batch([(10, 5)])
    torch.testing.assert_close(reference.logps(model, batch), _full_logps(model.eval(), batch).detach())


# --- the config: one clear line before anything loads -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=dpo", "lora=none"], "objective=dpo with lora=none has no frozen base to be its reference"),
        (["objective=kto", "lora=none"], "objective=kto with lora=none has no frozen base"),
        (["objective=dpo", "objective.ref_copy=true"], "objective.ref_copy=true is for lora=none"),
        (["objective=kto", "objective.precompute_ref=true"], "objective.precompute_ref=true: KTO's KL term pairs"),
        (["objective=dpo", "callbacks.checkpoint.monitor=val/rewards/accuracy"],
         "callbacks.checkpoint.monitor=val/rewards/accuracy is better when higher"),
        (["callbacks.checkpoint.monitor=val/rewards/accuracy", "callbacks.checkpoint.mode=max"],
         "callbacks.checkpoint.monitor=val/rewards/accuracy: objective=sft does not log it"),
        (["objective=dpo", "objective.beta=0"], "objective.beta=0: must lie in (0, inf)"),
        (["objective=dpo", "objective.label_smoothing=0.5"], "objective.label_smoothing=0.5: must lie in [0, 0.5)"),
    ],
)  # fmt: skip
def test_impossible_objective_settings_are_one_named_error(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match="^" + _re(message)):
        validate(compose("train", ["data=sample_pref", f"output_dir={tmp_path}", *overrides]))


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_allowed_full_fine_tuning_settings_pass_the_check(tmp_path):
    for extra in ("objective.precompute_ref=true", "objective.ref_copy=true"):
        validate(compose("train", ["objective=dpo", "data=sample_pref", "lora=none", extra, f"output_dir={tmp_path}"]))
    validate(compose("train", ["objective=orpo", "data=sample_pref", "lora=none", f"output_dir={tmp_path}"]))
    assert compose("train", [f"output_dir={tmp_path}"]).objective.name == "sft"  # the default is unchanged


# --- kullm-train end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_on_the_bundled_pairs_raises_rewards_accuracy_and_records_it(tmp_path):
    from kullm.train import train

    res = train(cfg_for(tmp_path / "run", "objective=dpo", "data=sample_pref", "trainer.max_epochs=3",
                        "callbacks.samples.num=0", "callbacks.checkpoint.monitor=val/rewards/accuracy",
                        "callbacks.checkpoint.mode=max", "callbacks.checkpoint.final=best"))  # fmt: skip
    out = Path(res["output_dir"])
    accuracy = metric_series(out, "train/rewards/accuracy")
    margin = metric_series(out, "train/rewards/margin")
    assert metric_series(out, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference
    assert accuracy[0] == 0.0 and margin[0] == 0.0
    assert sum(accuracy[-3:]) / 3 > 0.6 and sum(margin[-3:]) / 3 > 0.1, (accuracy, margin)
    val = metric_series(out, "val/rewards/accuracy")
    assert len(val) == 3 and max(val) >= 0.75
    record = json.loads((out / "result.json").read_text())
    assert record["best_val_rewards_accuracy"] == pytest.approx(max(val))
    assert record["val_rewards_accuracy"] == pytest.approx(val[-1])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ipo", "orpo", "simpo", "kto"])
def test_each_objective_trains_through_kullm_train(tmp_path, name):
    from kullm.train import train

    data = "data=sample_kto" if name == "kto" else "data=sample_pref"
    res = train(cfg_for(tmp_path / "run", f"objective={name}", data, "trainer.max_epochs=1",
                        "trainer.log_every_n_steps=1", "callbacks.samples.num=0"))  # fmt: skip
    out = Path(res["output_dir"])
    assert metric_series(out, "train/rewards/chosen") and metric_series(out, "val/loss")
    assert all(math.isfinite(v) for v in metric_series(out, "train/loss"))
    if name == "kto":
        assert metric_series(out, "train/kl") and metric_series(out, "val/kl")
    else:
        assert metric_series(out, "val/rewards/accuracy")
    if name == "orpo":
        assert metric_series(out, "train/nll") and metric_series(out, "train/log_odds_ratio")


@pytest.mark.slow
def test_kullm_train_objective_dpo_through_the_installed_script(tmp_path):
    args = ["experiment=smoke", "objective=dpo", "data=sample_pref", "logger=csv", "trainer.max_epochs=1",
            "callbacks.samples.num=0", f"data.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    proc = run_script("kullm-train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "finished" and record["val_rewards_accuracy"] is not None
    bad = run_script("kullm-train", *args, "lora=none", cwd=tmp_path)
    assert "objective=dpo with lora=none has no frozen base" in one_line_error(bad, "kullm-train")


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _adapter_weights(res) -> dict[str, torch.Tensor]:
    folder = Path(res["adapter"])
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(folder / name)


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and max(float(v.abs().max()) for v in a.values()) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=1e-5)


DPO = ["experiment=smoke-dpo", "trainer.max_steps=4", "callbacks.checkpoint.monitor=null", "sampler=random"]


@pytest.mark.slow
def test_kullm_train_with_precomputed_reference_trains_the_live_reference_adapter(tmp_path):
    """LoRA: the cached base log-probs give the very adapter the live (adapter-disabled) reference gives; under
    lora=none the precomputed reference gives the model a frozen copy gives."""
    from kullm.train import train

    live = train(cfg_for(tmp_path / "live", *DPO))
    pre = train(cfg_for(tmp_path / "pre", *DPO, "objective.precompute_ref=true"))
    _assert_same_weights(_adapter_weights(live), _adapter_weights(pre))
    assert list((tmp_path / "cache").glob("*/reference-*.pt"))  # cached beside the processed data
    full = ["lora=none", "optim.lr=1e-4", "trainer.max_steps=2"]
    copy_run = train(cfg_for(tmp_path / "copy", *DPO, *full, "objective.ref_copy=true"))
    pre_full = train(cfg_for(tmp_path / "pre_full", *DPO, *full, "objective.precompute_ref=true"))
    _assert_same_weights(_adapter_weights(copy_run), _adapter_weights(pre_full), atol=1e-5)


@pytest.mark.slow
def test_dpo_resumes_mid_epoch_exactly(tmp_path):
    from kullm.train import train
    from kullm.training.resume import resolve_resume

    common = [*DPO, "trainer.max_steps=6", "lora.lora_dropout=0.1", "callbacks.checkpoint.every_n_train_steps=1",
              "trainer.limit_val_batches=0"]  # fmt: skip
    straight = train(cfg_for(tmp_path / "straight", *common))
    train(cfg_for(tmp_path / "first", *common), extra_callbacks=[StopAt(3)])
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="objective"):  # another loss is another run
        resolve_resume(str(last), cfg_for(tmp_path / "other", *common, "objective=ipo"), False)
    resumed = train(cfg_for(tmp_path / "resumed", *common, f"ckpt_path={last}"))
    assert resumed["metrics"]["global_step"] == 6
    _assert_same_weights(_adapter_weights(straight), _adapter_weights(resumed))


@pytest.mark.slow
def test_dpo_on_two_ddp_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    """8 pairs per optimizer step: one process 4 × 2 accumulation, two processes 4 each (gloo). Plain SGD, so a
    wrong scale of the pair-mean shows in the weights."""
    import os
    import subprocess
    import sys

    sgd = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps",
           "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.5"]  # fmt: skip
    common = ["experiment=smoke-dpo", "logger=csv", "trainer.max_steps=3", "batch_size=8", "micro_batch_size=4",
              "sampler=random", "trainer.log_every_n_steps=1", "trainer.gradient_clip_val=null",
              "callbacks.checkpoint.monitor=null", *sgd]  # fmt: skip
    runs = {}
    for name, extra in (("one", []), ("two", ["strategy=ddp", "trainer.devices=2"])):
        cmd = [sys.executable, "-m", "kullm.train", *common, *extra, f"hydra.run.dir={tmp_path}/{name}",
               f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=500, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = tmp_path / name
    a = load_file(runs["one"] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["two"] / "adapter" / "adapter_model.safetensors")
    _assert_same_weights(a, b, atol=2e-5)
    for key in ("train/loss", "train/rewards/accuracy", "train/rewards/margin", "train/grad_norm"):
        assert metric_series(runs["two"], key) == pytest.approx(metric_series(runs["one"], key), rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_the_dpo_adapter_merges_and_generates(tmp_path):
    from kullm.train import train

    res = train(cfg_for(tmp_path / "run", *DPO))
    merged = tmp_path / "merged"
    proc = run_script("kullm-merge", f"adapter={res['adapter']}", f"out={merged}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = run_script("kullm-generate", f"base={merged}", "prompt=대한민국의 수도는 어디인가요?",
                     "generation=greedy", "generation.max_new_tokens=8", cwd=tmp_path)  # fmt: skip
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-3000:]


@pytest.mark.slow
def test_sft_to_dpo_from_an_adapter_starts_at_log2_against_that_adapter(adapter, tmp_path):
    """Policy = reference at the first step only if the reference is the SFT adapter (not the bare base): every
    pair's margin is 0, the loss log 2. Precomputed from the same adapter, the run trains the same weights."""
    from kullm.train import train

    common = ["objective=dpo", "data=sample_pref", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
              "callbacks.samples.num=0", "callbacks.checkpoint.monitor=null", "sampler=random"]  # fmt: skip
    live = train(_sft_adapter_cfg(adapter, tmp_path / "live", *common))
    out = Path(live["output_dir"])
    assert metric_series(out, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-5)
    assert metric_series(out, "train/rewards/margin")[0] == pytest.approx(0.0, abs=1e-5)
    assert metric_series(out, "train/loss")[-1] < math.log(2)
    assert not (Path(live["adapter"]) / REFERENCE_ADAPTER).exists()
    pre = train(_sft_adapter_cfg(adapter, tmp_path / "pre", *common, "objective.precompute_ref=true"))
    _assert_same_weights(_adapter_weights(live), _adapter_weights(pre))


def test_sweep_summary_shows_the_reward_accuracy_of_preference_jobs(tmp_path):
    from kullm.training.result import write_result
    from kullm.training.sweep import summarize, write_summary

    for job, (loss, accuracy) in enumerate([(0.61, 0.75), (0.52, 0.875)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- objective=dpo\n- objective.beta={job + 1}\n")
        write_result(folder, {"status": "finished", "val_loss": loss, "val_rewards_accuracy": accuracy, "job": job})
    rows = summarize(tmp_path)
    csv_path, md_path = write_summary(tmp_path, rows)
    assert [r["val_rewards_accuracy"] for r in rows] == [0.875, 0.75]  # ranked by val/loss, as a search minimises
    assert "val_rewards_accuracy" in csv_path.read_text().splitlines()[0]
    table = md_path.read_text()
    assert "| val/rewards/accuracy |" in table and "| 0.8750 |" in table
