"""Head-only loss: same loss and gradients as the full-logits path, with the LM head run on trained rows only,
fused with the cross-entropy (gradients made in the forward, no logits kept or recomputed)."""

import pytest
import torch
import torch.nn.functional as F

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


def _assert_grads_close(a, b, rel: float) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        err, scale = (a[k] - b[k]).abs().max().item(), b[k].abs().max().item()
        assert scale > 0 and err <= rel * scale, f"{k}: max abs diff {err:.3g} vs max abs grad {scale:.3g}"


def test_parts_of_peft_and_plain_models(lora_model):
    body, head = causal_lm_parts(lora_model)
    hf = lora_model.get_base_model()
    assert body is hf.gpt_neox and head is hf.lm_head  # not PeftModel.base_model (the LoRA wrapper)
    assert causal_lm_parts(hf) == (hf.gpt_neox, hf.lm_head)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 7, 22, 1024])
def test_head_only_equals_full(lora_model, batch, chunk_size):
    """22 trained tokens: chunks of 5 and 7 do not divide them, 1 is the extreme, 22 and None one chunk."""
    assert linear_head(causal_lm_parts(lora_model)[1]) is not None  # the fused path runs
    ref_loss, ref_n, ref_grads = _loss_and_grads(lora_model, full_loss, batch)
    loss, n, grads = _loss_and_grads(lora_model, head_only_loss, batch, chunk_size=chunk_size)
    assert int(n) == int(ref_n) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 22
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(grads, ref_grads, rel=1e-4)


def test_collated_positions_and_boolean_mask_agree(lora_model, batch):
    """The collator's CPU-made indices select exactly what the labels' mask selects."""
    bare = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    a, n_a, grads_a = _loss_and_grads(lora_model, head_only_loss, batch, chunk_size=7)
    b, n_b, grads_b = _loss_and_grads(lora_model, head_only_loss, bare, chunk_size=7)
    assert int(n_a) == int(n_b) == 22
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    _assert_grads_close(grads_a, grads_b, rel=1e-6)


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
        _assert_grads_close(grads, ref_grads, rel=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, None])
def test_fused_function_equals_linear_then_cross_entropy(chunk_size):
    """Loss and gradients with respect to the hidden states, a trainable weight and a bias, fp32."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(19, 16, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(50, generator=g)).requires_grad_()
    t = torch.randint(0, 50, (19,), generator=g)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    ref_grads = torch.autograd.grad(2.5 * ref, (h, w, b))  # an upstream gradient other than 1
    loss = fused_linear_cross_entropy(h, w, b, t, chunk_size=chunk_size)
    grads = torch.autograd.grad(2.5 * loss, (h, w, b))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


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
                loss_mod._chunk_ce, head, h[s : s + chunk], t[s : s + chunk], use_reentrant=False
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
    _assert_grads_close(grads, ref_grads, rel=5e-2)


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


def test_other_heads_recompute_chunks_in_backward(lora_model, batch):
    """A head that is not a plain linear layer (here: one with a forward hook, which fusing would skip) runs per
    chunk, checkpointed: the head runs again in backward, so only one chunk of logits is kept."""
    _, head = causal_lm_parts(lora_model)
    calls: list[int] = []
    hook = head.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    try:
        assert linear_head(head) is None
        loss, n = head_only_loss(lora_model, batch, chunk_size=8)
        forward_calls = len(calls)
        loss.backward()
    finally:
        hook.remove()
        lora_model.zero_grad(set_to_none=True)
    assert forward_calls == -(-int(n) // 8) and len(calls) == 2 * forward_calls


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
    from kullm.training.plan import check_combination

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
