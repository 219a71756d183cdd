"""Packing: exact rows, fill rate, and the proof that a packed batch trains exactly like its examples one by one."""

import random

import datasets
import pytest
import torch
from helpers import assert_grads_close
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from transformers import GPTNeoXForCausalLM  # noqa: F401  (imported here, once: mutation runs fork after collection)

from kullm.data.packing import PACKED_COLUMNS, pack_bins, pack_dataset, pack_examples
from kullm.data.sft import IGNORE_INDEX, Collator
from kullm.modeling import load_model
from kullm.tiny import TINY, TINY_SHAPE
from kullm.training.attention import block_causal_mask, packed_model_inputs, segment_ids, varlen_attn_implementation
from kullm.training.loss import full_loss, head_only_loss

NEG = torch.finfo(torch.float32).min


def test_hand_case_exact_rows():
    # lengths 3, 4, 2, 5, 1 into rows of 6: best fit decreasing → [5, 1], [4, 2], [3]
    ids = [[10, 11, 12], [20, 21, 22, 23], [30, 31], [40, 41, 42, 43, 44], [50]]
    labels = [[-100, 11, 12], [20, 21, 22, 23], [-100, 31], [-100, -100, 42, 43, 44], [50]]
    packed, stats = pack_examples(ids, labels, cutoff_len=6, seed=0)
    assert packed["input_ids"] == [[40, 41, 42, 43, 44, 50], [20, 21, 22, 23, 30, 31], [10, 11, 12]]
    assert packed["labels"] == [
        [-100, -100, 42, 43, 44, -100],  # 50 opens the second example: nobody learns to predict it
        [20, 21, 22, 23, -100, 31],
        [-100, 11, 12],
    ]
    assert packed["position_ids"] == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2]]
    assert packed["seq_lens"] == [[5, 1], [4, 2], [3]]
    assert packed["length"] == [6, 6, 3]
    assert (stats.examples, stats.rows, stats.tokens, stats.cutoff_len) == (5, 3, 15, 6)
    assert stats.fill_rate == pytest.approx(15 / 18)


def test_fill_rate_coverage_and_determinism():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(3000)]
    bins = pack_bins(lengths, 512, seed=1)
    assert sorted(i for b in bins for i in b) == list(range(3000))  # every example exactly once
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    fill = sum(lengths) / (len(bins) * 512)
    assert fill > 0.98, fill
    assert pack_bins(lengths, 512, seed=1) == bins
    with pytest.raises(ValueError, match="cutoff_len=512"):
        pack_bins([513], 512)


def test_pack_dataset_columns(caplog):
    ds = datasets.Dataset.from_dict(
        {"id": ["a", "b", "c"], "input_ids": [[1, 2], [3, 4, 5], [6]], "labels": [[1, 2], [3, 4, 5], [-100]]}
    )
    with caplog.at_level("INFO", logger="kullm.data.packing"):
        packed, stats = pack_dataset(ds, cutoff_len=4)
    assert packed.column_names == PACKED_COLUMNS
    assert packed["length"] == [4, 2] and stats.fill_rate == pytest.approx(6 / 8)
    assert sorted(t for row in packed["input_ids"] for t in row) == [1, 2, 3, 4, 5, 6]
    assert {k: str(packed.features[k].feature.dtype) for k in PACKED_COLUMNS[:4]} == dict.fromkeys(
        PACKED_COLUMNS[:4], "int32"
    ) and str(packed.features["length"].dtype) == "int32"  # int32 on disk: half the cache of int64
    assert "packed 3 examples into 2 rows of <= 4 tokens (fill rate 75.0%)" in caplog.messages
    # the seed reaches the bin packing: equal lengths are shared out differently
    ties = datasets.Dataset.from_dict({"input_ids": [[i] * 2 for i in range(8)], "labels": [[i] * 2 for i in range(8)]})
    rows = {tuple(map(tuple, pack_dataset(ties, 4, seed=s)[0]["input_ids"])) for s in range(4)}
    assert len(rows) > 1 and pack_dataset(ties, 4)[0]["input_ids"] == pack_dataset(ties, 4, seed=0)[0]["input_ids"]


def test_block_causal_mask_exact():
    m = block_causal_mask([[2, 1]], torch.float32, length=4)
    allowed = [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],  # second example: sees only itself
        [0, 0, 0, 1],  # padding query: only itself (no empty softmax row)
    ]
    expected = torch.where(torch.tensor(allowed, dtype=torch.bool), 0.0, NEG)
    assert m.shape == (1, 1, 4, 4)
    assert torch.equal(m[0, 0], expected)
    # the same mask from collated position_ids + padding mask
    pos = torch.tensor([[0, 1, 0, 0]])
    att = torch.tensor([[1, 1, 1, 0]])
    assert torch.equal(block_causal_mask(pos, torch.float32, attention_mask=att), m)
    assert segment_ids(pos, attention_mask=att).tolist() == [[0, 0, 1, -1]]
    # the padding mask is honoured even where padded positions continue instead of restarting at 0
    cont = block_causal_mask(torch.tensor([[0, 1, 2, 3]]), torch.float32, attention_mask=torch.tensor([[1, 1, 0, 0]]))
    assert torch.equal(cont[0, 0] == 0, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]).bool())


def _unpack(packed: dict[str, list]) -> list[tuple[list[int], list[int], list[int]]]:
    """Cut every packed row back into its examples: (input_ids, labels, position_ids) per example, row by row."""
    out = []
    for r, lens in enumerate(packed["seq_lens"]):
        at = 0
        for n in lens:
            out.append(tuple(packed[k][r][at : at + n] for k in ("input_ids", "labels", "position_ids")))
            at += n
    return out


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 16), max_size=30),
    cutoff=st.integers(16, 24),
    seed=st.integers(0, 3),
    prompt=st.integers(0, 3),
)
def test_packing_properties(lengths, cutoff, seed, prompt):
    """Any lengths: rows within cutoff_len, every non-empty example exactly once and intact, positions restarting,
    only each later example's first label hidden, no two rows that would fit in one, the same rows for the same seed."""
    ids = [[1000 * i + t for t in range(n)] for i, n in enumerate(lengths)]
    labels = [[IGNORE_INDEX] * min(prompt, n) + x[prompt:] for x, n in zip(ids, lengths, strict=True)]
    packed, stats = pack_examples(ids, labels, cutoff, seed=seed)
    assert all(0 < n <= cutoff for n in packed["length"])
    assert [len(r) for r in packed["input_ids"]] == packed["length"] == [sum(s) for s in packed["seq_lens"]]
    examples = _unpack(packed)
    by_id = {x[0][0] // 1000: x for x in examples}
    assert sorted(by_id) == [i for i, n in enumerate(lengths) if n > 0] and len(examples) == len(by_id)
    first_of_row = {packed["input_ids"][r][0] // 1000 for r in range(len(packed["length"]))}
    for i, (x, lab, pos) in by_id.items():
        assert x == ids[i] and pos == list(range(lengths[i]))
        expected = list(labels[i]) if i in first_of_row else [IGNORE_INDEX, *labels[i][1:]]
        assert lab == expected
    rows = sorted(packed["length"])
    assert len(rows) < 2 or rows[0] + rows[1] > cutoff  # best fit: no two rows could have been one
    assert (stats.examples, stats.rows, stats.tokens) == (len(by_id), len(rows), sum(lengths))
    assert stats.fill_rate == (sum(lengths) / (len(rows) * cutoff) if rows else 1.0)
    assert pack_examples(ids, labels, cutoff, seed=seed) == (packed, stats)


def test_cutoff_boundaries_and_refusals():
    assert pack_bins([6, 6, 5, 1], 6) == [[0], [1], [2, 3]]  # exactly cutoff_len fits
    assert pack_bins([1, 1], 1) == [[0], [1]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than cutoff_len=6"):
        pack_bins([3, 9, 8], 6)  # the first example too long is named
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        pack_bins([], 0)
    with pytest.raises(ValueError, match="example 1: 3 input ids but 2 labels"):
        pack_examples([[1], [2, 3, 4]], [[1], [2, 3]], 8)
    packed, stats = pack_examples([[], [7], []], [[], [7], []], 4)
    assert packed["input_ids"] == [[7]] and (stats.examples, stats.rows, stats.fill_rate) == (1, 1, 0.25)
    packed, stats = pack_examples([], [], 4)
    assert packed == {k: [] for k in PACKED_COLUMNS} and (stats.rows, stats.fill_rate) == (0, 1.0)


def test_ties_are_ordered_by_the_seed():
    lengths = [3] * 8
    orders = {tuple(i for b in pack_bins(lengths, 6, seed=s) for i in b) for s in range(4)}
    assert len(orders) > 1  # equal lengths: the seed decides which examples share a row
    assert pack_bins(lengths, 6, seed=2) == pack_bins(lengths, 6, seed=2)


def test_segment_ids_from_any_input():
    assert segment_ids(torch.tensor([0, 1, 2, 0, 1])).tolist() == [[0, 0, 0, 1, 1]]  # 1-D position_ids
    assert segment_ids([[2, 3], [1]]).tolist() == [[0, 0, 1, 1, 1], [0, -1, -1, -1, -1]]  # width: the longest row
    assert segment_ids([[2, 3]], length=6).tolist() == [[0, 0, 1, 1, 1, -1]]
    with pytest.raises(ValueError, match="row 1 holds 5 tokens, more than length=4"):
        segment_ids([[1], [2, 3]], length=4)


def test_model_inputs_honour_a_padding_mask_whose_positions_continue():
    """A hand-made packed batch whose padding continues the last example's positions (the collator's restart at 0):
    the 2-D padding mask still hides the padding keys."""
    batch = {"input_ids": torch.tensor([[5, 6, 7, 2, 2]]), "position_ids": torch.tensor([[0, 1, 0, 1, 2]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}  # fmt: skip
    allowed = packed_model_inputs(batch, torch.nn.Linear(2, 2))["attention_mask"][0, 0] == 0
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],
        [False, False, False, True, False],  # padding: only itself
        [False, False, False, False, True],
    ]


def test_the_default_seed_is_zero_everywhere():
    """Without a seed, the rows are those of seed 0 (a reproducible run need not pass one), not of another seed."""
    ids = [[i] * 2 for i in range(8)]
    by_seed = [pack_examples(ids, ids, 4, seed=s)[0]["input_ids"] for s in (0, 1)]
    assert by_seed[0] != by_seed[1]  # equal lengths: the seed decides which examples share a row
    assert pack_examples(ids, ids, 4)[0]["input_ids"] == by_seed[0]
    assert pack_bins([2] * 8, 4) == pack_bins([2] * 8, 4, seed=0) != pack_bins([2] * 8, 4, seed=1)


def test_mask_in_half_precision_uses_that_dtype_and_its_minimum():
    m = block_causal_mask([[1, 1]], torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert m[0, 0].tolist() == [[0.0, torch.finfo(torch.bfloat16).min], [torch.finfo(torch.bfloat16).min, 0.0]]


def test_mask_dtype_follows_autocast_then_the_weights():
    batch = Collator(pad_id=2)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 0]}])
    model = torch.nn.Linear(2, 2)
    assert packed_model_inputs(batch, model)["attention_mask"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_model_inputs(batch, model)["attention_mask"].dtype == torch.bfloat16
    assert packed_model_inputs(batch, model.to(torch.float16))["attention_mask"].dtype == torch.float16
    quantized = torch.nn.Module()
    quantized.weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.int8), requires_grad=False)
    assert packed_model_inputs(batch, quantized)["attention_mask"].dtype == torch.float32  # int8 storage: float32


def test_flex_attention_is_refused_and_a_variable_length_kernel_gets_no_mask(lora_model):
    batch = Collator(pad_id=2)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 0]}])
    base = lora_model.get_base_model()
    try:
        base.config._attn_implementation = "flex_attention"
        with pytest.raises(ValueError, match=r"^packed training with flex_attention is not supported here: use sdpa, "
                           r"eager or flash-attn$"):  # fmt: skip
            packed_model_inputs(batch, lora_model)
        base.config._attn_implementation = "flash_attention_2"
        assert packed_model_inputs(batch, lora_model).keys() == {"input_ids", "position_ids", "use_cache"}
    finally:
        base.config._attn_implementation = "sdpa"


@pytest.mark.parametrize(("installed", "cuda", "expected"), [(True, True, "flash_attention_2"), (True, False, None),
                                                              (False, True, None)])  # fmt: skip
def test_the_variable_length_kernel_needs_flash_attn_and_cuda(monkeypatch, installed, cuda, expected):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: (real("torch") if installed else None) if name == "flash_attn"
        else real(name, *a)
    )  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert varlen_attn_implementation() == expected


# --- equivalence on the tiny model with LoRA -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model():
    torch.manual_seed(0)
    shape = {k: v for k, v in TINY_SHAPE.items() if k not in ("tokenizer_vocab", "seed", "warmup_steps")}
    # random weights in the tiny model's shape: no tokenizer or warm-up needed to compare packed with one by one
    base = load_model({"name_or_path": TINY, "shape_only": True, "shape": shape, "dtype": "float32",
                       "attn_implementation": "sdpa"})  # fmt: skip
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["query_key_value", "dense"],
        init_lora_weights=False,  # B != 0, so A and B both get gradients
    )
    return get_peft_model(base, lora)


def _examples(train_on_inputs: bool, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, n_prompt in [(11, 4), (6, 2), (17, 9), (4, 1), (9, 3), (13, 5)]:
        ids = torch.randint(3, 2000, (n,), generator=g).tolist()
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        out.append((ids, labels))
    return out


def _packed_batch(examples, cutoff_len: int = 24) -> dict[str, torch.Tensor]:
    packed, _ = pack_examples([e[0] for e in examples], [e[1] for e in examples], cutoff_len)
    rows = [{k: packed[k][i] for k in ("input_ids", "labels", "position_ids")} for i in range(len(packed["length"]))]
    return Collator(pad_id=2, pad_to_multiple_of=8)(rows)


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _one_by_one(model, examples, loss_fn):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for ids, labels in examples:
        loss, n = loss_fn(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])})
        loss.backward()
        total, count = total + loss.item(), count + n
    return total, count, _grads(model)


def _packed(model, inputs, loss_fn):
    model.zero_grad(set_to_none=True)
    loss, n = loss_fn(model, inputs)
    loss.backward()
    return loss.item(), n, _grads(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_packed_loss_and_grads_equal_one_by_one(lora_model, attn, train_on_inputs):
    lora_model.get_base_model().set_attn_implementation(attn)
    examples = _examples(train_on_inputs)
    batch = _packed_batch(examples)
    assert batch["input_ids"].shape[0] < len(examples)  # really packed
    ref_loss, ref_n, ref_grads = _one_by_one(lora_model, examples, full_loss)
    explicit = {**packed_model_inputs(batch, lora_model), "labels": batch["labels"]}
    assert explicit["use_cache"] is False and explicit["attention_mask"].shape[1] == 1
    # the raw collated batch (position_ids + 2-D padding mask) gets its block mask inside the loss functions
    for loss_fn, inputs in [(full_loss, explicit), (head_only_loss, explicit), (head_only_loss, batch)]:
        loss, n, grads = _packed(lora_model, inputs, loss_fn)
        assert n == ref_n
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert_grads_close(grads, ref_grads, rel=1e-4)


def test_equivalence_test_can_fail(lora_model):
    """A plain padding mask (examples see each other) changes the loss: the test above would catch a leak."""
    lora_model.get_base_model().set_attn_implementation("sdpa")
    examples = _examples(train_on_inputs=True)
    batch = _packed_batch(examples)
    ref_loss, _, ref_grads = _one_by_one(lora_model, examples, full_loss)
    lora_model.zero_grad(set_to_none=True)
    leaky = lora_model(**{k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")})
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = leaky.loss * n
    loss.backward()
    assert abs(loss.item() - ref_loss) > 10 * 1e-5 * abs(ref_loss)  # 10x the tolerance of the real test
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_grads_close(_grads(lora_model), ref_grads, rel=1e-4)
    # and without the -100 at boundaries, one more token per extra example would be trained
    packed, _ = pack_examples([e[0] for e in examples], [e[1] for e in examples], 24)
    assert sum(sum(lab != IGNORE_INDEX for lab in row[1:]) for row in packed["labels"]) == sum(
        len(e[1]) - 1 for e in examples
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_no_cross_contamination(lora_model, attn):
    lora_model.get_base_model().set_attn_implementation(attn)
    a, b = list(range(100, 110)), list(range(200, 206))
    row = {"input_ids": a + b, "labels": a + b, "position_ids": list(range(10)) + list(range(6))}
    changed = {**row, "input_ids": [999] + a[1:] + b}
    batch = Collator(pad_id=2)([row, changed])
    with torch.no_grad():
        logits = lora_model(**packed_model_inputs(batch, lora_model)).logits
    torch.testing.assert_close(logits[0, 10:16], logits[1, 10:16], rtol=0, atol=1e-5)  # B unchanged
    assert (logits[0, :10] - logits[1, :10]).abs().max() > 1e-3  # A did change


@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_a_variable_length_kernel_sees_one_flattened_row_for_any_micro_batch(lora_model, monkeypatch, train_on_inputs):
    """transformers treats a mask-less batch as packed only when it has one row: a micro-batch of several packed rows
    is flattened first, with exactly the loss and gradients of one example at a time. sdpa stands in for
    flash-attention here (flash-attn cannot be installed on this CPU machine; transformers' sdpa path also reads the
    boundaries from position_ids, so it cannot show the cross-example leak that flash-attention's would)."""
    import kullm.training.attention as attention
    import kullm.training.loss as loss_mod
    from kullm.training.loss import lm_loss

    lora_model.get_base_model().set_attn_implementation("sdpa")
    examples = _examples(train_on_inputs)
    batch = _packed_batch(examples)
    assert batch["input_ids"].shape[0] > 1 and (batch["attention_mask"] == 0).any()  # several rows, some padding
    ref_loss, ref_n, ref_grads = _one_by_one(lora_model, examples, full_loss)
    monkeypatch.setattr(attention, "VARLEN_IMPLEMENTATIONS", ("sdpa",))
    monkeypatch.setattr(loss_mod, "VARLEN_IMPLEMENTATIONS", ("sdpa",))
    for head_only in (True, False):
        loss, n, grads = _packed(lora_model, batch, lambda m, b, h=head_only: lm_loss(m, b, head_only=h))
        assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5)
        assert_grads_close(grads, ref_grads, rel=1e-4)
    flat = loss_mod.flatten_packed(batch)
    assert flat["input_ids"].shape == (1, int(batch["attention_mask"].sum())) and flat["attention_mask"] is None
