"""Packing, head-only loss and exact resume on today's architectures: tiny Llama (tied head, grouped-query attention,
rotary on every dimension), Mistral (untied head) and Qwen3 (q/k norm), on rows kullm's own data path encodes."""

from pathlib import Path

import pytest
import torch
from helpers import assert_grads_close, cfg_for, metric_series
from safetensors.torch import load_file

from kullm.data.datamodule import KullmDataModule
from kullm.data.packing import pack_bins, pack_examples
from kullm.data.sft import IGNORE_INDEX, Collator
from kullm.modeling import build_trainable_model, load_tokenizer
from kullm.templates import Prompter
from kullm.train import train
from kullm.training.loss import causal_lm_parts, full_loss, head_only_loss, linear_head, logit_map, model_inputs


def _setup(tmp_path: Path, arch: str, *overrides: str):
    """The config, tokenizer and processed training rows of ``model=tiny-<arch>`` on the bundled sample."""
    cfg = cfg_for(tmp_path / "run", f"model=tiny-{arch}", *overrides)
    tok = load_tokenizer(cfg.model)
    dm = KullmDataModule(cfg.data, tok, Prompter.from_config(cfg.template), micro_batch_size=4)
    dm.setup()
    return cfg, tok, dm.train_set


def _trainable(cfg, lora: bool):
    """LoRA (every linear layer, B random so A gets a gradient too) or full fine-tuning, float32, no dropout."""
    torch.manual_seed(0)
    model = build_trainable_model(cfg.model, cfg.lora if lora else None, cfg.quant)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss, n = fn(model, batch)
    loss.backward()
    return loss.detach(), int(n), _grads(model)


# --- head-only loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gemma2"])
def test_head_only_loss_equals_the_full_logits_loss(tmp_path, arch, lora):
    """On a collated batch of real prompt-masked rows: the same summed loss and the same gradient on every trainable
    weight, LoRA or full fine-tuning (where a tied head's gradient adds to the embedding's through one weight)."""
    cfg, tok, rows = _setup(tmp_path, arch)
    batch = Collator(pad_id=tok.pad_token_id)([rows[i] for i in range(6)])
    assert (batch["labels"][:, :4] == IGNORE_INDEX).all() and (batch["attention_mask"] == 0).any()  # prompts, pads
    assert 0 < batch["n_trained"] < batch["attention_mask"].sum() - 6 * 4
    model = _trainable(cfg, lora)
    lm = model.get_base_model() if lora else model
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert tied == (arch != "mistral")
    # the fused head + cross-entropy runs, except on Gemma-2's soft-capped logits (a regression: they were ignored)
    assert (linear_head(causal_lm_parts(model)[1]) is not None) and logit_map(model) == (
        (1.0, 30.0) if arch == "gemma2" else (1.0, None)
    )
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, full_loss, batch)
    loss, n, grads = _loss_and_grads(model, head_only_loss, batch)
    assert n == ref_n == int(batch["n_trained"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    if not lora:  # the head's weight (the embedding too, when tied) trains and is compared
        head_names = [k for k in grads if "lm_head" in k or "embed_tokens" in k]
        assert len(head_names) == (1 if tied else 2), head_names
    assert_grads_close(grads, ref_grads, rel=1e-4)


# --- packing ----------------------------------------------------------------------------------------------------


def _pack(rows, cutoff_len: int) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """A collated batch of packed rows, and which examples each row holds (in order)."""
    packed, stats = pack_examples([r["input_ids"] for r in rows], [r["labels"] for r in rows], cutoff_len)
    bins = pack_bins([len(r["input_ids"]) for r in rows], cutoff_len)  # the same bins, as example indices
    assert stats.rows == len(bins) < len(rows)  # really packed
    cols = ("input_ids", "labels", "position_ids")
    return Collator(pad_id=0)([{k: packed[k][i] for k in cols} for i in range(stats.rows)]), bins


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_packed_rows_give_each_example_its_own_logits_loss_and_gradients(tmp_path, arch):
    """With the attention kernel kullm picks on CPU (sdpa; eager for Gemma-2) a packed batch is the examples run alone:
    block-diagonal attention, rotary positions restarting at each example, no label across a boundary."""
    cfg, tok, rows = _setup(tmp_path, arch)
    examples = [rows[i] for i in range(8)]
    cutoff = max(len(r["input_ids"]) for r in examples) + 40
    batch, bins = _pack(examples, cutoff)
    model = _trainable(cfg, lora=True)
    assert model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")

    with torch.no_grad():  # logits: each example's slice of its packed row equals the example alone
        logits = model(**model_inputs(model, batch)).logits
        for r, members in enumerate(bins):
            start = 0
            for i in members:
                ids = examples[i]["input_ids"]
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                assert batch["input_ids"][r, start : start + len(ids)].tolist() == ids
                torch.testing.assert_close(logits[r, start : start + len(ids)], alone, rtol=1e-4, atol=1e-4)
                start += len(ids)
        # the check can fail: causal attention along the whole row (a plain padding mask, positions counted along
        # the row) lets a row's later examples see the earlier ones. (Positions alone would not show it: rotary
        # scores depend on relative positions only, which the block-diagonal mask keeps within an example.)
        r = next(r for r, members in enumerate(bins) if len(members) > 1)
        first = len(examples[bins[r][0]]["input_ids"])
        assert batch["position_ids"][r, first] == 0 and batch["position_ids"][r, first - 1] == first - 1
        running = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaky = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=running,
                      use_cache=False).logits  # fmt: skip
        torch.testing.assert_close(leaky[r, :first], logits[r, :first], rtol=1e-4, atol=1e-4)
        assert (leaky[r, first : first + 8] - logits[r, first : first + 8]).abs().max() > 1e-2

    # loss and gradients: the packed batch (head-only and full logits) equals the examples one at a time
    model.zero_grad(set_to_none=True)
    ref_loss, ref_n = 0.0, 0
    for ex in examples:
        loss, n = full_loss(model, {k: torch.tensor([ex[k]]) for k in ("input_ids", "labels")})
        loss.backward()
        ref_loss, ref_n = ref_loss + loss.item(), ref_n + int(n)
    ref_grads = _grads(model)
    for fn in (head_only_loss, full_loss):
        loss, n, grads = _loss_and_grads(model, fn, batch)
        assert n == ref_n and loss.item() == pytest.approx(ref_loss, rel=1e-5)
        assert_grads_close(grads, ref_grads, rel=1e-4)


# --- training runs: packed training and exact resume ------------------------------------------------------------

RESUME = [
    "model=tiny-llama",
    "seed=1234",
    "trainer.max_steps=14",  # epoch-bounded (experiment=smoke: max_epochs=4), as users run; two epochs here
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.checkpoint.monitor=train/loss",
    "callbacks.checkpoint.save_top_k=-1",  # every checkpoint kept (kullm keeps only the last without validation)
    "callbacks.samples.num=0",
    "lora.lora_dropout=0.1",  # dropout draws from the RNG: its state must be restored too
]  # fmt: skip
BATCHING = {"default": ["batch_size=8", "micro_batch_size=4"],
            "packed": ["data.packing=true", "batch_size=8", "micro_batch_size=4"]}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("batching", sorted(BATCHING))
def test_llama_resumed_mid_epoch_ends_bit_for_bit_as_the_straight_run(tmp_path, batching):
    """LoRA with dropout on tiny Llama, interrupted in the middle of either epoch and resumed: the final adapter is the
    straight run's, bit for bit."""
    common = [*RESUME, *BATCHING[batching]]
    straight = train(cfg_for(tmp_path / "straight", *common))
    trainer = straight["trainer"]
    per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
    assert 4 < per_epoch < 13, per_epoch  # the 14 steps span two epochs
    want = load_file(Path(straight["adapter"]) / "adapter_model.safetensors")
    meta = {c: torch.load(c, weights_only=True) for c in (tmp_path / "straight" / "checkpoints").glob("step*.ckpt")}
    ckpts = {m["global_step"]: (c, m["epoch"]) for c, m in meta.items()}
    assert sorted(ckpts) == list(range(2, 15, 2))
    mid = [s for s in sorted(ckpts) if s % per_epoch and s < 14]
    for step in (mid[0], next(s for s in mid if s > per_epoch)):  # mid-epoch 0, mid-epoch 1
        assert ckpts[step][1] == step // per_epoch
        resumed = train(cfg_for(tmp_path / f"from{step}", *common, f"ckpt_path={ckpts[step][0]}"))
        got = load_file(Path(resumed["adapter"]) / "adapter_model.safetensors")
        assert got.keys() == want.keys() and len(want) > 0
        for k in want:
            assert torch.equal(got[k], want[k]), f"{batching}: resumed from step {step}: {k} differs"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_llama_trains_on_packed_rows(tmp_path):
    """A short packed run on tiny Llama: the training loss clearly falls."""
    out = tmp_path / "run"
    res = train(cfg_for(out, "model=tiny-llama", "data.packing=true", "batch_size=4", "micro_batch_size=2",
                        "trainer.max_epochs=3", "callbacks.samples.num=0"))  # fmt: skip
    stats = res["trainer"].datamodule.pack_stats
    assert stats.rows < stats.examples and stats.fill_rate > 0.8
    losses = metric_series(out, "train/loss")
    assert len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
