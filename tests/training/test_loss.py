"""Head-only loss: same loss and gradients as the full-logits path, with the LM head run on trained rows only,
fused with the cross-entropy (gradients made in the forward, no logits kept or recomputed)."""

import re
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grads_close

import kullm.training.loss as loss_mod
from kullm.config import ConfigError
from kullm.data.sft import IGNORE_INDEX, Collator
from kullm.training.loss import (
    causal_lm_parts,
    check_loss_impl,
    full_loss,
    fused_linear_cross_entropy,
    head_only_loss,
    linear_head,
    lm_loss,
    logit_map,
)


@pytest.fixture(scope="module")
def base_model():
    from kullm.modeling import load_model

    return load_model({"name_or_path": "kullm:tiny", "dtype": "float32", "attn_implementation": "sdpa"})


@pytest.fixture(scope="module")
def lora_model(base_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query_key_value"], init_lora_weights=False)
    return get_peft_model(base_model, lora)


def _rows(spans, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, n_prompt in spans:
        ids = torch.randint(3, 2000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return rows


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Right-padded rows whose prompts are masked: most positions are not trained (22 trained tokens)."""
    return Collator(pad_id=2, pad_to_multiple_of=8)(_rows([(30, 24), (17, 12), (40, 33), (9, 5)]))


def _loss_and_grads(model, fn, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss, n = fn(model, batch, **kwargs)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads


def test_parts_of_peft_and_plain_models(lora_model):
    body, head = causal_lm_parts(lora_model)
    hf = lora_model.get_base_model()
    assert body is hf.gpt_neox and head is hf.lm_head  # not PeftModel.base_model (the LoRA wrapper)
    assert causal_lm_parts(hf) == (hf.gpt_neox, hf.lm_head)
    with pytest.raises(TypeError, match="^Linear is not an HF causal LM with a body and an output embedding$"):
        causal_lm_parts(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 7, 22, 1024])
def test_head_only_equals_full(lora_model, batch, chunk_size):
    """22 trained tokens: chunks of 5 and 7 do not divide them, 1 is the extreme, 22 and None one chunk."""
    assert linear_head(causal_lm_parts(lora_model)[1]) is not None  # the fused path runs
    ref_loss, ref_n, ref_grads = _loss_and_grads(lora_model, full_loss, batch)
    loss, n, grads = _loss_and_grads(lora_model, head_only_loss, batch, chunk_size=chunk_size)
    assert int(n) == int(ref_n) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 22
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert_grads_close(grads, ref_grads, rel=1e-4)


def test_collated_batches_need_no_host_sync(lora_model, batch):
    """With the collator's CPU-made positions and count, the loss never waits for the device; a hand-made batch
    without them does (boolean indexing sizes its output from device data)."""
    from helpers import HostSync, no_host_sync

    with no_host_sync() as mode:
        loss, n = head_only_loss(lora_model, batch, chunk_size=8)
    assert len(mode.upstream) <= 1 and n.dim() == 0 and int(n) == 22  # transformers' one look at the mask inputs
    bare = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    with pytest.raises(HostSync, match="boolean mask|nonzero"), no_host_sync():
        head_only_loss(lora_model, bare, chunk_size=8)


def test_collated_positions_and_boolean_mask_agree(lora_model, batch):
    """The collator's CPU-made indices select exactly what the labels' mask selects."""
    bare = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    a, n_a, grads_a = _loss_and_grads(lora_model, head_only_loss, batch, chunk_size=7)
    b, n_b, grads_b = _loss_and_grads(lora_model, head_only_loss, bare, chunk_size=7)
    assert int(n_a) == int(n_b) == 22
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert_grads_close(grads_a, grads_b, rel=1e-6)


def test_trainable_head_gets_the_full_paths_gradient(batch):
    """modules_to_save on the LM head: the head's own weight trains, and its gradient comes from the fused loss."""
    from peft import LoraConfig, get_peft_model

    from kullm.modeling import load_model

    torch.manual_seed(0)
    base = load_model({"name_or_path": "kullm:tiny", "dtype": "float32", "attn_implementation": "sdpa"})
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["query_key_value"],
        modules_to_save=["lm_head"],
        init_lora_weights=False,
    )
    model = get_peft_model(base, lora)
    head = causal_lm_parts(model)[1]
    assert type(head).__name__ == "ModulesToSaveWrapper" and linear_head(head)[0].requires_grad
    ref_loss, _, ref_grads = _loss_and_grads(model, full_loss, batch)
    for chunk in (None, 5):
        loss, _, grads = _loss_and_grads(model, head_only_loss, batch, chunk_size=chunk)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        assert any("lm_head" in k for k in grads)
        assert_grads_close(grads, ref_grads, rel=1e-4)
    with model.disable_adapter():  # the base model again: the original head, not the trained copy
        assert linear_head(head)[0] is head.original_module.weight
    assert linear_head(head)[0] is head.modules_to_save["default"].weight


def linear_problem(*, seed: int, rows: int, hidden: int, vocab: int, scale: float):
    """Hidden states, a head weight (``scale``) and bias, all trainable, and targets: a seeded linear + CE problem."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, requires_grad=True)
    w = (scale * torch.randn(vocab, hidden, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(vocab, generator=g)).requires_grad_()
    return h, w, b, torch.randint(0, vocab, (rows,), generator=g)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, None])
def test_fused_function_equals_linear_then_cross_entropy(chunk_size):
    """Loss and gradients with respect to the hidden states, a trainable weight and a bias, fp32."""
    h, w, b, t = linear_problem(seed=3, rows=19, hidden=16, vocab=50, scale=0.3)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    ref_grads = torch.autograd.grad(2.5 * ref, (h, w, b))  # an upstream gradient other than 1
    loss = fused_linear_cross_entropy(h, w, b, t, chunk_size=chunk_size)
    grads = torch.autograd.grad(2.5 * loss, (h, w, b))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_head_gradient_under_bf16_accumulates_chunks_in_float32(monkeypatch):
    """One-row chunks under bf16 autocast: each chunk's products run on bf16 operands (bias included) and the
    trainable weight's and bias's gradients add up in float32, as accurate against a float64 reference as the unfused
    bf16 head (summing 64 chunk products in bf16 would be ~2.6× worse)."""
    h, w, b, t = linear_problem(seed=4, rows=64, hidden=32, vocab=300, scale=0.2)
    exact = torch.autograd.grad(
        F.cross_entropy(F.linear(h.double(), w.double(), b.double()), t, reduction="sum"), (w, b)
    )
    operands: set[tuple[torch.dtype, ...]] = set()
    real = loss_mod._chunk_logits
    monkeypatch.setattr(
        loss_mod, "_chunk_logits", lambda h, w, b: operands.add((h.dtype, w.dtype, b.dtype)) or real(h, w, b)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="sum")
        loss = fused_linear_cross_entropy(h, w, b, t, chunk_size=1)
        assert operands == {(torch.bfloat16,) * 3}
        operands.clear()
        with torch.no_grad():  # evaluation: the loss alone, on the same bf16 operands
            fused_linear_cross_entropy(h, w, b, t, chunk_size=16)
        assert operands == {(torch.bfloat16,) * 3}
    for got, ref, want in zip(
        torch.autograd.grad(loss, (w, b)), torch.autograd.grad(unfused, (w, b)), exact, strict=True
    ):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 1.25 * (ref.double() - want).abs().max()


def test_fused_function_under_bf16_autocast():
    """Matmuls in bf16, softmax in fp32, gradients returned in the inputs' dtypes: as the unfused head does."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(23, 32, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(300, 32, generator=g)).requires_grad_()
    t = torch.randint(0, 300, (23,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        loss = fused_linear_cross_entropy(h, w, None, t, chunk_size=6)
    ref_grads, grads = torch.autograd.grad(ref, (h, w)), torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_fused_peak_memory_is_at_most_one_chunk_of_logits():
    """Profiled peak of forward + backward: one chunk of float32 logits (plus row-sized tensors) for the fused
    loss, below the checkpointed chunks it replaces (which rebuild logits, log-softmax and its gradient)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    n, d, vocab, chunk = 300, 64, 5000, 64
    g = torch.Generator().manual_seed(5)
    h0, t = torch.randn(n, d, generator=g), torch.randint(0, vocab, (n,), generator=g)
    head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)

    def peak(step) -> int:
        h = h0.clone().requires_grad_()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
            step(h).backward()
        _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
        live = [sum(s) for s in sizes]
        return max(live) - live[0]

    def checkpointed(h):
        total = h.new_zeros(())
        for s in range(0, n, chunk):
            total = total + torch.utils.checkpoint.checkpoint(
                loss_mod._chunk_ce, head, h[s : s + chunk], t[s : s + chunk], 1.0, None, use_reentrant=False
            )
        return total

    logits_bytes = chunk * vocab * 4
    fused = peak(lambda h: fused_linear_cross_entropy(h, head.weight, None, t, chunk_size=chunk))
    old = peak(checkpointed)
    assert logits_bytes <= fused < logits_bytes + 4 * n * d * 4, (fused, logits_bytes)
    assert fused < old, (fused, old)


def test_full_loss_matches_transformers_mean(lora_model, batch):
    with torch.no_grad():
        loss, n = full_loss(lora_model, batch)
        hf = lora_model(**batch, use_cache=False).loss
    torch.testing.assert_close(loss / n, hf, rtol=1e-5, atol=0)


def test_bf16_autocast(lora_model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_n, ref_grads = _loss_and_grads(lora_model, full_loss, batch)
        loss, n, grads = _loss_and_grads(lora_model, head_only_loss, batch, chunk_size=7)
    assert n == ref_n and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    assert_grads_close(grads, ref_grads, rel=5e-2)


def test_head_sees_only_trained_rows(lora_model, batch):
    """What the saving is: rows × vocab logits materialised, counted at the head, per call."""
    _, head = causal_lm_parts(lora_model)
    calls: list[int] = []
    hook = head.register_forward_hook(lambda mod, args, out: calls.append(out.shape[:-1].numel()))
    try:
        with torch.no_grad():
            _, n = full_loss(lora_model, batch)
            full_rows = sum(calls)
            calls.clear()
            head_only_loss(lora_model, batch, chunk_size=8)
    finally:
        hook.remove()
    b, width = batch["input_ids"].shape
    assert full_rows == b * width
    assert sum(calls) == n and max(calls) <= 8
    assert n < full_rows / 3


def test_fused_head_runs_once_per_chunk_and_never_in_backward(lora_model, batch, monkeypatch):
    calls: list[int] = []
    real = loss_mod._chunk_logits
    monkeypatch.setattr(loss_mod, "_chunk_logits", lambda h, w, b: calls.append(h.shape[0]) or real(h, w, b))
    loss, n = head_only_loss(lora_model, batch, chunk_size=8)
    forward_calls = list(calls)
    loss.backward()
    lora_model.zero_grad(set_to_none=True)
    assert forward_calls == [8, 8, 6] and sum(forward_calls) == int(n)
    assert calls == forward_calls  # backward only scales the gradients stored in the forward
    calls.clear()
    with torch.no_grad():
        lm_loss(lora_model, batch, head_only=True, chunk_size=5)  # the module's way in passes loss.chunk_size on
    assert calls == [5, 5, 5, 5, 2]


def test_other_heads_recompute_chunks_in_backward(lora_model, batch):
    """A head that is not a plain linear layer (here: one with a forward hook, which fusing would skip) runs per
    chunk, checkpointed: the head runs again in backward, so only one chunk of logits is kept; the loss and the
    gradients are still the full path's (the chunks are summed, not averaged)."""
    ref_loss, _, ref_grads = _loss_and_grads(lora_model, full_loss, batch)
    lora_model.zero_grad(set_to_none=True)
    _, head = causal_lm_parts(lora_model)
    calls: list[int] = []
    hook = head.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    try:
        assert linear_head(head) is None
        loss, n = head_only_loss(lora_model, batch, chunk_size=8)
        forward_calls = len(calls)
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in lora_model.named_parameters() if p.requires_grad}
    finally:
        hook.remove()
        lora_model.zero_grad(set_to_none=True)
    assert forward_calls == -(-int(n) // 8) and len(calls) == 2 * forward_calls
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=0)
    assert_grads_close(grads, ref_grads, rel=1e-4)


def test_no_trained_token(lora_model):
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}, {"input_ids": [8, 9], "labels": [IGNORE_INDEX] * 2}]
    masked = Collator(pad_id=2)(rows)
    loss, n = lm_loss(lora_model, masked, head_only=True)
    assert int(n) == 0 and loss.item() == 0.0 and loss.requires_grad


def test_loss_impl_choice_and_refusals(monkeypatch):
    assert check_loss_impl("auto", "cpu") == "torch" and check_loss_impl("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match="loss.impl='fused': must be one of auto, torch, liger, cce"):
        check_loss_impl("fused", "cpu")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name))
    with pytest.raises(ConfigError, match="needs the liger-kernel package, which is not installed"):
        check_loss_impl("liger", "cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "cut_cross_entropy" else None)
    with pytest.raises(ConfigError, match="loss.impl=cce runs on CUDA GPUs only"):
        check_loss_impl("cce", "cpu")
    assert check_loss_impl("auto", "cpu") == "torch"  # installed, but not on CUDA


def test_train_refuses_a_cuda_only_loss_before_loading(tmp_path):
    from kullm.config import compose
    from kullm.training.preflight import check_combination

    cfg = compose("train", ["experiment=smoke", f"output_dir={tmp_path}", "loss.impl=cce"])
    with pytest.raises(ConfigError, match="loss.impl=cce"):
        check_combination(cfg)


def test_right_padded_batches_run_without_a_mask_and_give_the_same_outputs(lora_model, batch):
    """The collator's right-padded rows: causal attention never lets a real token see a pad, so dropping the mask
    (SDPA's is_causal path, no mask to build or inspect) leaves every real position's logits as they were."""
    from kullm.training.loss import model_inputs

    assert "attention_mask" not in model_inputs(lora_model, batch)
    hand_made = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    assert model_inputs(lora_model, hand_made)["attention_mask"] is batch["attention_mask"]  # no flag: kept
    with torch.no_grad():
        fast = lora_model(**model_inputs(lora_model, batch)).logits
        masked = lora_model(**model_inputs(lora_model, hand_made)).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(fast[real], masked[real], rtol=1e-5, atol=1e-5)


# --- what the loss hands to the fused kernels, the chunks it runs, and what evaluation computes -----------------


def _install_kernels(monkeypatch, calls: list[dict], liger_returns_tuple: bool) -> None:
    """Liger Kernel's and Cut Cross-Entropy's entry points as plain-torch modules with their documented signatures
    (the real ones need CUDA and Triton): each records what kullm passes and computes the true cross-entropy."""
    import types

    def kernel(name):
        def run(h, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", **_):
            calls.append({"kernel": name, "dtypes": (h.dtype, weight.dtype, bias.dtype if bias is not None else None),
                          "ignore_index": ignore_index, "reduction": reduction, "targets": targets})  # fmt: skip
            logits = F.linear(h, weight, bias).float()
            loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction).to(h.dtype)
            return (loss, None) if name == "liger" and liger_returns_tuple else loss

        return run

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = kernel("liger")
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = kernel("cce")
    for name, module in [("liger_kernel", types.ModuleType("liger_kernel")),
                         ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
                         ("liger_kernel.transformers.functional", functional), ("cut_cross_entropy", cce)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("impl", ["liger", "cce"])
def test_lm_loss_runs_the_chosen_kernel_on_trained_rows(lora_model, batch, monkeypatch, impl):
    """``loss.impl`` reaches the kernel (it was once shadowed by the attention implementation and ignored): the same
    summed loss as kullm's own, from the 22 trained rows, summed, with -100 as the ignore index."""
    calls: list[dict] = []
    _install_kernels(monkeypatch, calls, liger_returns_tuple=True)
    with torch.no_grad():
        ref, ref_n = lm_loss(lora_model, batch, head_only=True, impl="torch")
        assert calls == []
        loss, n = lm_loss(lora_model, batch, head_only=True, impl=impl)
    assert [c["kernel"] for c in calls] == [impl] and int(n) == int(ref_n) == 22
    assert calls[0]["ignore_index"] == IGNORE_INDEX and calls[0]["reduction"] == "sum"
    assert calls[0]["targets"].tolist() == batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX].tolist()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("impl", "liger_returns_tuple"), [("liger", True), ("liger", False), ("cce", False)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_get_both_operands_in_the_autocast_dtype(monkeypatch, impl, liger_returns_tuple, bias):
    """Under bf16 autocast, hidden states, weight and bias reach the kernel in bf16 (a Triton kernel takes one dtype);
    a bf16 (or tuple) result comes back as a float32 loss, within bf16 rounding of the float32 one."""
    calls: list[dict] = []
    _install_kernels(monkeypatch, calls, liger_returns_tuple)
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(9, 16, generator=g), 0.3 * torch.randn(40, 16, generator=g)
    b = 0.1 * torch.randn(40, generator=g) if bias else None
    t = torch.randint(0, 40, (9,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, b, t, impl=impl)
    assert calls[0]["dtypes"] == (torch.bfloat16, torch.bfloat16, torch.bfloat16 if bias else None)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w, b), t, reduction="sum"), rtol=2e-2, atol=0)
    calls.clear()
    fused_linear_cross_entropy(h, w, b, t, impl=impl)  # no autocast: the weight's own dtype
    assert calls[0]["dtypes"] == (torch.float32, torch.float32, torch.float32 if bias else None)


@pytest.mark.parametrize(("chunk_size", "chunks"), [(None, [19]), (0, [19]), (-4, [19]), (1, [1] * 19), (8, [8, 8, 3]),
                                                    (19, [19]), (64, [19])])  # fmt: skip
@pytest.mark.parametrize("grad", [True, False])
def test_chunks_the_fused_head_runs(monkeypatch, chunk_size, chunks, grad):
    """``chunk_size`` rows at a time (the memory bound); none, 0 or negative: all rows at once. Training and
    evaluation chunk alike, and give the same loss."""
    calls: list[int] = []
    real = loss_mod._chunk_logits
    monkeypatch.setattr(loss_mod, "_chunk_logits", lambda h, w, b: calls.append(h.shape[0]) or real(h, w, b))
    g = torch.Generator().manual_seed(7)
    h = torch.randn(19, 16, generator=g).requires_grad_(grad)
    w, t = 0.3 * torch.randn(50, 16, generator=g), torch.randint(0, 50, (19,), generator=g)
    loss = fused_linear_cross_entropy(h, w, None, t, chunk_size=chunk_size)
    assert calls == chunks and loss.requires_grad is grad
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w), t, reduction="sum"), rtol=1e-6, atol=1e-5)


def test_evaluation_with_a_biased_head_equals_linear_then_cross_entropy():
    h, w, b, t = linear_problem(seed=6, rows=11, hidden=8, vocab=40, scale=0.5)
    with torch.no_grad():
        ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, b, t, chunk_size=4), ref, rtol=1e-6, atol=1e-5)


def test_a_scaled_biased_head_scales_its_bias_too():
    """Logit scaling on a head with a bias (Phi's): the fused path scales the weight and the bias."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    sizes = {"vocab_size": 2048, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4}  # fmt: skip
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("phi", **sizes), attn_implementation="eager")
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 1.0)  # strongly, so a missed or misscaled bias shows
    model.logit_scale = 0.25  # as Cohere keeps it
    batch = Collator(pad_id=0)(_rows([(20, 8), (13, 5)], seed=2))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] * 0.25
        ref = F.cross_entropy(logits.reshape(-1, 2048), batch["labels"][:, 1:].reshape(-1), reduction="sum")
        loss, n = head_only_loss(model, batch, chunk_size=5)
    assert linear_head(model.lm_head) is not None and int(n) == 20
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


def test_evaluation_runs_the_head_once_and_training_adds_only_the_input_gradient():
    """Counted matmul FLOPs: without gradients (validation) one head product, ``2·n·d·V``; with a gradient for the
    hidden states, one more (``softmax − onehot`` times the weight) and no recomputation."""
    from torch.utils.flop_counter import FlopCounterMode

    n, d, vocab = 13, 16, 60
    g = torch.Generator().manual_seed(8)
    h, w = torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g)
    t = torch.randint(0, vocab, (n,), generator=g)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    head = 2 * n * d * vocab
    trained = h.clone().requires_grad_()
    with torch.no_grad():
        assert flops(lambda: fused_linear_cross_entropy(trained, w, None, t, chunk_size=4)) == head
    assert flops(lambda: fused_linear_cross_entropy(h, w, None, t, chunk_size=4)) == head  # nothing requires grad
    assert flops(lambda: fused_linear_cross_entropy(trained, w, None, t, chunk_size=4).backward()) == 2 * head


def test_loss_impl_choice_on_a_cuda_machine(monkeypatch):
    """With CUDA (faked: this machine has none) ``auto`` prefers Liger Kernel, then Cut Cross-Entropy, then kullm's
    own; a device other than CUDA keeps kullm's own, and refuses a CUDA-only one by naming the device."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for installed, expected in [({"liger_kernel", "cut_cross_entropy"}, "liger"), ({"cut_cross_entropy"}, "cce"),
                                ({"liger_kernel"}, "liger"), (set(), "torch")]:  # fmt: skip
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a, have=installed: object() if name in have else None
        )
        assert check_loss_impl("auto", "cuda") == expected, installed
        assert check_loss_impl("auto", "cpu") == "torch"
        assert check_loss_impl("torch", "cuda") == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert check_loss_impl("liger", "cuda") == "liger" and check_loss_impl("cce", "cuda") == "cce"
    message = "loss.impl=cce runs on CUDA GPUs only (trainer.accelerator=cpu): use loss.impl=torch (or auto)"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        check_loss_impl("cce", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = "loss.impl=liger runs on CUDA GPUs only (this machine has none): use loss.impl=torch (or auto)"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        check_loss_impl("liger", "cuda")


@pytest.mark.parametrize("trainable", [True, False])
def test_fused_loss_is_stable_for_rows_far_apart(trainable):
    """Each row is shifted by its own maximum logit: rows whose logits lie hundreds apart (one would underflow to
    exp(-600) under a shared shift) still give the exact loss and gradients, with no inf or NaN."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0]], requires_grad=trainable)
    h = torch.tensor([[300.0, 0.0], [-300.0, 1.0], [2.0, -1.0]], requires_grad=True)
    t = torch.tensor([0, 1, 3])
    ref = F.cross_entropy(F.linear(h, w), t, reduction="sum")
    loss = fused_linear_cross_entropy(h, w, None, t, chunk_size=3)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    inputs = (h, w) if trainable else (h,)
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_loss_accumulates_in_float32_whatever_the_default_dtype():
    """A script that sets a bf16 default dtype (to build a model in bf16) still gets float32 sums of the loss and of
    the weight and bias gradients across chunks, not bf16 ones."""
    h, w, b, t = linear_problem(seed=9, rows=40, hidden=8, vocab=30, scale=0.5)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        loss = fused_linear_cross_entropy(h, w, b, t, chunk_size=3)
        grads = torch.autograd.grad(loss, (h, w, b))
    finally:
        torch.set_default_dtype(default)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "extra", "mapped"), [
    ("cohere", {"logit_scale": 0.25}, (0.25, None)),
    ("granite", {"logits_scaling": 8.0}, (0.125, None)),
    ("gemma3_text", {"final_logit_softcapping": 2.0, "head_dim": 16}, (1.0, 2.0)),
])  # fmt: skip
@pytest.mark.parametrize("head_lora", [False, True], ids=["head", "lora-head"])
def test_head_only_loss_applies_the_architectures_logit_scaling_and_soft_capping(kind, extra, mapped, head_lora):
    """Random tiny models whose forward scales or soft-caps the head's output (strongly, so a miss would show)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **sizes, **extra), attn_implementation="eager")
    # all-linear leaves the LM head alone (fused, scaled weights); LoRA on it too runs the per-chunk path
    targets = ["q_proj", "v_proj", "lm_head"] if head_lora else "all-linear"
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).train()
    assert logit_map(model) == mapped
    assert (linear_head(causal_lm_parts(model)[1]) is None) == head_lora
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, n_prompt in [(30, 20), (17, 9), (24, 20)]:
        ids = torch.randint(0, 512, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    batch = Collator(pad_id=0)(rows)
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, full_loss, batch)
    for chunk_size in (None, 5):
        loss, n, grads = _loss_and_grads(model, head_only_loss, batch, chunk_size=chunk_size)
        assert int(n) == int(ref_n) == 22
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        assert_grads_close(grads, ref_grads, rel=1e-4)


def _varlen_stand_in(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flash-attn's rule on the CPU: example boundaries come from reset ``position_ids`` only in a one-row batch
    (transformers' ``_is_packed_sequence``); any other batch is causal over each whole row."""
    pos = kwargs.get("position_ids")
    b, _, t, _ = query.shape
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    if b == 1 and pos is not None:
        segment = (pos[0] == 0).cumsum(0)
        allowed = allowed & (segment[:, None] == segment[None, :])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("head_only", [True, False])
@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
def test_packed_rows_give_each_example_its_own_loss(lora_model, monkeypatch, head_only, kernel):
    """A packed batch through ``lm_loss`` has each example's own loss. With SDPA the collated 2-D mask becomes a
    block-causal one. With flash-attn (CUDA only, so a stand-in with its boundary rule runs here) several rows would
    attend across the examples of a row: ``lm_loss`` flattens them into one row; a one-row batch is left as it is."""
    from transformers.modeling_utils import AttentionInterface

    from kullm.data.packing import pack_examples

    rows = _rows([(14, 9), (11, 4), (9, 6), (13, 5), (7, 3)], seed=3)
    alone = sum(float(full_loss(lora_model, Collator(pad_id=2)([r]))[0]) for r in rows)  # each example on its own
    packed, stats = pack_examples([r["input_ids"] for r in rows], [r["labels"] for r in rows], 28)
    assert stats.rows == 2 and all(len(s) > 1 for s in packed["seq_lens"])  # two rows (the fewest flattened)
    cols = ("input_ids", "labels", "position_ids")
    batch = Collator(pad_id=2)([{k: packed[k][i] for k in cols} for i in range(stats.rows)])
    if kernel == "varlen":
        monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", _varlen_stand_in)
        monkeypatch.setattr(lora_model.config, "_attn_implementation", "flash_attention_2")
    with torch.no_grad():
        loss, n = lm_loss(lora_model, batch, head_only=head_only)
        leaky, _ = (head_only_loss if head_only else full_loss)(lora_model, batch)  # the rows as they are
        one_row, _ = lm_loss(lora_model, loss_mod.flatten_packed(batch), head_only=head_only)
    assert int(n) == sum(int((torch.tensor(r["labels"][1:]) != IGNORE_INDEX).sum()) for r in rows)
    assert float(loss) == pytest.approx(alone, rel=1e-5) and float(one_row) == pytest.approx(alone, rel=1e-5)
    if kernel == "varlen":
        assert abs(float(leaky) - alone) > 1e-3 * alone  # the stand-in really leaks across a row's examples
