"""Head-only loss: same loss and gradients as the full-logits path, with the LM head run on trained rows only."""

import pytest
import torch

from kullm.data.sft import IGNORE_INDEX, Collator
from kullm.training.loss import causal_lm_parts, full_loss, head_only_loss, lm_loss


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


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Right-padded rows whose prompts are masked: most positions are not trained."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, n_prompt in [(30, 24), (17, 12), (40, 33), (9, 5)]:
        ids = torch.randint(3, 2000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return Collator(pad_id=2, pad_to_multiple_of=8)(rows)


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


@pytest.mark.parametrize("chunk_size", [None, 5, 1024])
def test_head_only_equals_full(lora_model, batch, chunk_size):
    ref_loss, ref_n, ref_grads = _loss_and_grads(lora_model, full_loss, batch)
    loss, n, grads = _loss_and_grads(lora_model, head_only_loss, batch, chunk_size=chunk_size)
    assert n == ref_n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(grads, ref_grads, rel=1e-4)


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


def test_chunks_recompute_in_backward(lora_model, batch):
    """Chunks are checkpointed: the head runs again in backward, so only one chunk of logits is kept."""
    _, head = causal_lm_parts(lora_model)
    calls: list[int] = []
    hook = head.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    try:
        loss, n = head_only_loss(lora_model, batch, chunk_size=8)
        forward_calls = len(calls)
        loss.backward()
    finally:
        hook.remove()
        lora_model.zero_grad(set_to_none=True)
    assert forward_calls == -(-n // 8) and len(calls) == 2 * forward_calls


def test_no_trained_token(lora_model, batch):
    masked = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    loss, n = lm_loss(lora_model, masked, head_only=True)
    assert n == 0 and loss.item() == 0.0 and loss.requires_grad
