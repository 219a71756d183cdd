"""Preference data (#26): pairs and KTO rows read from every format, rendered like SFT, masked exactly, batched."""

import csv
import functools
import json
import os
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from console_scripts import one_line_error, run_script
from helpers import ROOT, prompter, trained_runs, write_jsonl
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import conversations, turn_text

from kullm.config import ConfigError, compose, validate
from kullm.data import pairs as pairs_mod
from kullm.data.pairs import collate_kto, collate_pairs, encode_kto, encode_pairs
from kullm.data.preference import KtoRecord, PairRecord, check_layout, kto_rows, read_preference
from kullm.data.preprocess import preprocess
from kullm.data.sft import IGNORE_INDEX, encode_batch
from kullm.data.sft_chat import encode_conversations, render_with_tokenizer
from kullm.data.sources import DataError
from kullm.modeling import load_tokenizer

SAMPLE = ROOT / "data" / "sample_pref"
SIDES = ("chosen", "rejected")
PROMPT, CHOSEN, REJECTED = "한국의 국화는 무엇인가요?", "한국의 국화는 무궁화입니다. 🌺", "It is the cherry blossom."
CONV = [
    {"role": "system", "content": "너는 친절한 비서야."},
    {"role": "user", "content": "고려대학교는 어디에 있어?"},
    {"role": "assistant", "content": "서울 성북구에 있습니다."},
    {"role": "user", "content": "설립 연도는?"},
]


@functools.cache
def tokenizer(model: str):
    """``tiny-llama``: a BOS on every call; ``tiny-qwen2``: ChatML, EOS <|im_end|> ≠ pad <|endoftext|>."""
    return load_tokenizer(compose("prepare", [f"model={model}", "output_dir=/tmp/unused"]).model)


def data_cfg(tmp_path, path, *overrides):
    cfg = compose(
        "prepare",
        [
            "data=sample_pref",
            f"data.path={path}",
            f"data.cache_dir={tmp_path}/cache",
            "output_dir=/tmp/unused",
            *overrides,
        ],
    )
    return cfg.data


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def pair_rows(n=3):
    return [
        {"id": f"p{i}", "prompt": f"{i}번째 질문: {PROMPT}", "chosen": f"{CHOSEN} ({i})", "rejected": f"{REJECTED} {i}"}
        for i in range(n)
    ]


def conv_row(rid="c1", chosen="1905년에 세워졌습니다.", rejected="It was founded in 1990."):
    return {
        "id": rid,
        "prompt": CONV[-1]["content"],
        "chosen": [*CONV, {"role": "assistant", "content": chosen}],
        "rejected": [*CONV, {"role": "assistant", "content": rejected}],
    }


def encode(tmp_path, rows, model, *overrides, kind="pairs"):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = data_cfg(tmp_path, path, f"data.kind={kind}", *overrides)
    recs, report = read_preference(data)
    tok = tokenizer(model)
    fn = encode_pairs if kind == "pairs" else encode_kto
    return (*fn(recs, data, tok, prompter(data_template(overrides)), "train"), report)


def data_template(overrides):
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("template=")), "kullm")


# --- exact masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_a_string_pair_is_masked_exactly_as_sft_renders_it(tmp_path, model):
    tok = tokenizer(model)
    ds, counts, bad, _ = encode(
        tmp_path, [{"id": "a", "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], model
    )
    assert counts == {"records": 1, "kept": 1, "truncated": 0, "dropped_prompt_too_long": 0, "dropped_invariant": 0}
    assert bad == []
    (row,) = ds
    prompt = prompter("kullm").render(PROMPT, "")
    bos = [tok.bos_token_id] if model == "tiny-llama" else []
    want_prompt = bos + ids(tok, prompt)
    assert row["prompt_len"] == len(want_prompt)
    for side, text in (("chosen", CHOSEN), ("rejected", REJECTED)):
        answer = ids(tok, text) + [tok.eos_token_id]
        assert row[f"{side}_input_ids"] == want_prompt + answer
        assert row[f"{side}_labels"] == [IGNORE_INDEX] * len(want_prompt) + answer
        # the same example SFT makes of (prompt, answer)
        sft = encode_batch(tok, [prompt], [text], cutoff_len=512)
        assert (sft["input_ids"][0], sft["labels"][0]) == (row[f"{side}_input_ids"], row[f"{side}_labels"])
        (run,) = trained_runs(row[f"{side}_input_ids"], row[f"{side}_labels"])
        assert tok.decode(run, skip_special_tokens=False) == text + tok.eos_token
    assert row["length"] == max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
    seq = pairs_mod.as_sequence(row)  # what a sample generation continues: the prompt, then the chosen answer
    assert (seq["input_ids"], seq["labels"], seq["prompt_len"]) == (
        row["chosen_input_ids"],
        row["chosen_labels"],
        len(want_prompt),
    )


def test_a_conversation_pair_trains_only_the_last_answers_through_the_chat_template(tmp_path):
    tok = tokenizer("tiny-qwen2")
    ds, counts, bad, report = encode(tmp_path, [conv_row()], "tiny-qwen2", "data.chat_template=tokenizer")
    assert counts["kept"] == 1 and bad == [] and report.conversations == 1
    (row,) = ds
    served = tok.apply_chat_template(CONV, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert row["prompt_len"] == len(served)
    for side, text in (("chosen", "1905년에 세워졌습니다."), ("rejected", "It was founded in 1990.")):
        got_ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert got_ids[: len(served)] == served  # the prompt as a server renders it, the earlier answer included
        assert labels[: len(served)] == [IGNORE_INDEX] * len(served)  # the earlier answer is not trained
        assert (
            got_ids[len(served) :]
            == labels[len(served) :]
            == ids(tok, text) + [tok.convert_tokens_to_ids("<|im_end|>")]
        )
        assert [tok.decode(r) for r in trained_runs(got_ids, labels)] == [text + "<|im_end|>"]
    # as the SFT conversation path encodes the chosen conversation, trained on its last turn
    rec = read_preference(data_cfg(tmp_path, tmp_path / "p.jsonl", "data.chat_template=tokenizer"))[0][0]
    sft_rec = pairs_mod._as_record(rec, rec.chosen)
    enc = encode_conversations(tok, [render_with_tokenizer(tok, sft_rec)], cutoff_len=512, train_on="last")
    assert (enc["input_ids"][0], enc["labels"][0]) == (row["chosen_input_ids"], row["chosen_labels"])


def test_a_conversation_pair_through_the_kullm_template(tmp_path):
    tok = tokenizer("tiny-llama")
    ds, counts, bad, _ = encode(tmp_path, [conv_row()], "tiny-llama", "template=kullm_system")
    (row,) = ds
    assert bad == []
    for side, text in (("chosen", "1905년에 세워졌습니다."), ("rejected", "It was founded in 1990.")):
        runs = trained_runs(row[f"{side}_input_ids"], row[f"{side}_labels"])
        assert [tok.decode(r) for r in runs] == [text + tok.eos_token]
        assert row[f"{side}_labels"].index(runs[0][0]) == row["prompt_len"]
    assert row["chosen_input_ids"][: row["prompt_len"]] == row["rejected_input_ids"][: row["prompt_len"]]
    assert row["chosen_input_ids"][0] == tok.bos_token_id and row["chosen_input_ids"].count(tok.bos_token_id) == 1


def test_an_answer_given_alone_beside_a_prompt_of_turns_is_the_same_pair(tmp_path):
    whole = conv_row()
    alone = {
        "id": "c1",
        "prompt": CONV,
        "chosen": [whole["chosen"][-1]],
        "rejected": [whole["rejected"][-1]],
    }
    a = read_preference(data_cfg(tmp_path, write_jsonl(tmp_path / "a.jsonl", [whole])))[0]
    b = read_preference(data_cfg(tmp_path, write_jsonl(tmp_path / "b.jsonl", [alone])))[0]
    assert [(r.prompt, r.chosen, r.rejected) for r in a] == [(r.prompt, r.chosen, r.rejected) for r in b]
    assert a[0].prompt[-1] == ("user", "설립 연도는?") and not a[0].flat
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {k: [{"from": names[t["role"]], "value": t["content"]} for t in whole[k]] for k in SIDES}
    c = read_preference(data_cfg(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"id": "c1", **sharegpt}])))[0]
    assert [(r.prompt, r.chosen, r.rejected) for r in c] == [(r.prompt, r.chosen, r.rejected) for r in a]


def test_the_invariant_is_checked_on_every_answer_and_a_violation_is_named_and_counted(tmp_path, monkeypatch):
    calls = []
    real_check = pairs_mod.check_conversation
    monkeypatch.setattr(pairs_mod, "check_conversation", lambda *a, **k: calls.append(1) or real_check(*a, **k))
    ds, counts, bad, _ = encode(tmp_path, pair_rows(3), "tiny-qwen2")
    assert len(calls) == 6 and counts["kept"] == 3
    real_encode = pairs_mod.encode_conversations

    def broken(*args, **kwargs):  # the second pair's rejected answer loses its last trained label
        enc = real_encode(*args, **kwargs)
        enc["labels"][3][-1] = IGNORE_INDEX
        return enc

    monkeypatch.setattr(pairs_mod, "encode_conversations", broken)
    ds, counts, bad, _ = encode(tmp_path, pair_rows(3), "tiny-qwen2")
    assert counts["kept"] == 2 and counts["dropped_invariant"] == 1 and ds["id"] == ["p0", "p2"]
    assert len(bad) == 1 and bad[0].startswith("p1: ")
    with pytest.raises(DataError, match="masking invariant fails for id p1"):
        encode(tmp_path, pair_rows(3), "tiny-qwen2", "data.policy=strict")


def test_a_prompt_filling_cutoff_and_identical_answers_are_named_counted_rejects(tmp_path):
    rows = pair_rows(2)
    rows.append({"id": "long", "prompt": "아주 긴 질문입니다. " * 40, "chosen": "네.", "rejected": "No."})
    rows.append({"id": "same", "prompt": "같은 답?", "chosen": "네, 같습니다.", "rejected": " 네, 같습니다. "})
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = data_cfg(tmp_path, path, "data.cutoff_len=64", "data.val_set_size=0")
    res = preprocess(data, tokenizer("tiny-qwen2"), prompter("kullm"))
    assert res.stats["read"]["rejected"] == {"identical_completions": 1}
    reject = json.loads(res.rejects_path.read_text(encoding="utf-8"))
    assert (reject["source"], reject["field"], reject["reason"]) == (f"{path}:4", "rejected", "identical_completions")
    assert res.stats["encoded"]["train"]["dropped_prompt_too_long"] == 1
    assert res.dataset["train"]["id"] == ["p0", "p1"]
    assert res.dataset["validation"].column_names == pairs_mod.PAIR_COLUMNS  # an empty split keeps its columns
    again = preprocess(data, tokenizer("tiny-qwen2"), prompter("kullm"))
    assert again.cache_hit and again.dataset["validation"].column_names == pairs_mod.PAIR_COLUMNS
    assert again.dataset["train"]["chosen_input_ids"] == res.dataset["train"]["chosen_input_ids"]
    with pytest.raises(DataError, match="no usable record"):  # the kind is in the cache key: read anew, as SFT rows
        preprocess(data_cfg(tmp_path, path, "data.kind=sft"), tokenizer("tiny-qwen2"), prompter("kullm"))


def test_truncation_keeps_the_prompt_and_cuts_each_answer_to_cutoff(tmp_path):
    tok = tokenizer("tiny-qwen2")
    rows = [{"id": "t", "prompt": PROMPT, "chosen": "무궁화는 여름에 핍니다. " * 30, "rejected": "짧은 답."}]
    ds, counts, bad, _ = encode(tmp_path, rows, "tiny-qwen2", "data.cutoff_len=48")
    (row,) = ds
    assert counts["truncated"] == 1 and bad == []
    n = row["prompt_len"]
    assert len(row["chosen_input_ids"]) == 48 and tok.eos_token_id not in row["chosen_input_ids"][n:]
    assert (
        row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n] == ids(tok, prompter("kullm").render(PROMPT, ""))
    )
    assert row["rejected_input_ids"][-1] == tok.eos_token_id  # the short answer is whole
    assert ("무궁화는 여름에 핍니다. " * 30).startswith(tok.decode(row["chosen_input_ids"][n:]).rstrip("\ufffd"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turns=conversations(max_turns=3), other=turn_text, renderer=st.sampled_from(["kullm", "kullm_system", "chatml"]))
def test_the_invariant_holds_for_random_pairs(turns, other, renderer):
    """Korean, emoji, control characters and template markers in prompts and answers, 1–3 exchanges; a one-turn
    prompt also as a flat string pair."""
    chosen = turns[-1][1]
    assume(other.strip() != chosen.strip())
    tok = tokenizer("tiny-qwen2")
    flat = len(turns) == 2 and turns[0][0] == "user"
    rec = PairRecord("r", tuple(turns[:-1]), chosen, other, "f.jsonl:1", flat)
    template = "kullm" if renderer == "chatml" else renderer
    data = {"cutoff_len": 100_000, "chat_template": "tokenizer" if renderer == "chatml" else "template"}
    ds, counts, bad = encode_pairs([rec], data, tok, prompter(template), "train")
    assert bad == [] and counts["kept"] == 1
    (row,) = ds
    n = row["prompt_len"]
    assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]
    for side, text in (("chosen", chosen), ("rejected", other)):  # independent of check_conversation
        ids_, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids_[n:]
        assert tok.decode(ids_[n:]) == text + tok.eos_token


# --- bad rows and bad files ----------------------------------------------------------------------------------------


def test_a_conversation_pair_whose_prompts_differ_is_rejected_with_its_line(tmp_path):
    row = conv_row("bad")
    row["rejected"][2] = {"role": "assistant", "content": "부산에 있습니다."}
    path = write_jsonl(tmp_path / "p.jsonl", [conv_row("ok"), row])
    recs, report = read_preference(data_cfg(tmp_path, path))
    assert [r.id for r in recs] == ["ok"] and report.rejected == {"prompt_mismatch": 1}
    (reject,) = report.rejects
    assert (reject.source, reject.field) == (f"{path}:2", "rejected[2]")
    with pytest.raises(DataError, match=r"p.jsonl:2: rejected\[2\]: prompt_mismatch"):
        read_preference(data_cfg(tmp_path, path, "data.policy=strict"))


def test_a_file_without_rejected_is_one_error_naming_file_and_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPT, "chosen": CHOSEN}])
    with pytest.raises(DataError, match=r"p\.jsonl: rejected: preference rows need a 'rejected' field"):
        check_layout(data_cfg(tmp_path, path))
    with pytest.raises(DataError, match="'rejected' field"):
        read_preference(data_cfg(tmp_path, path))
    # a later row without it is a row reject, counted
    rows = [*pair_rows(1), {"id": "x", "prompt": PROMPT, "chosen": CHOSEN}]
    _, report = read_preference(data_cfg(tmp_path, write_jsonl(tmp_path / "q.jsonl", rows)))
    assert report.rejected == {"missing_field": 1} and report.rejects[0].field == "rejected"


def test_kto_on_pairs_needs_the_conversion_flag_and_kto_rows_make_no_pairs(tmp_path):
    paired = write_jsonl(tmp_path / "p.jsonl", pair_rows(2))
    with pytest.raises(DataError, match="set data.kto_from_pairs=true"):
        check_layout(data_cfg(tmp_path, paired, "data.kind=kto"))
    kto = SAMPLE / "kto.jsonl"
    with pytest.raises(DataError, match="train them with objective=kto"):
        check_layout(data_cfg(tmp_path, kto))
    check_layout(data_cfg(tmp_path, paired, "data.kind=kto", "data.kto_from_pairs=true"))


def test_pairs_given_to_an_sft_run_are_one_error_and_sft_data_passes(tmp_path):
    paired = write_jsonl(tmp_path / "p.jsonl", pair_rows(2))
    with pytest.raises(DataError, match=r"p\.jsonl: preference pairs .* objective=dpo"):
        check_layout(data_cfg(tmp_path, paired, "data.kind=sft"))
    check_layout(compose("prepare", ["output_dir=/tmp/unused"]).data)  # the SFT sample
    ultrafeedback = {**conv_row(), "messages": conv_row()["chosen"]}  # its rows are SFT conversations too
    check_layout(data_cfg(tmp_path, write_jsonl(tmp_path / "u.jsonl", [ultrafeedback]), "data.kind=sft"))


# --- formats -------------------------------------------------------------------------------------------------------


def _write_all_formats(tmp_path, rows):
    """The same rows as JSONL, a JSON array, CSV (conversations as JSON cells), Parquet and a save_to_disk folder."""
    out = {"jsonl": write_jsonl(tmp_path / "r.jsonl", rows)}
    out["json"] = tmp_path / "r.json"
    out["json"].write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    flat = [{k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
    out["csv"] = tmp_path / "r.csv"
    with out["csv"].open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    out["parquet"] = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), out["parquet"])
    out["saved"] = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(out["saved"]))
    return out


@pytest.mark.parametrize("shape", ["strings", "conversations"])
def test_pairs_read_alike_from_every_file_format(tmp_path, shape):
    rows = pair_rows(3) if shape == "strings" else [conv_row(f"c{i}", f"{i}: 1905년.", f"{i}: 1990.") for i in range(3)]
    files = _write_all_formats(tmp_path, rows)
    got = {}
    for fmt, path in files.items():
        recs, report = read_preference(data_cfg(tmp_path, path))
        assert report.n_rejected == 0, (fmt, report.rejects)
        got[fmt] = [(r.id, r.prompt, r.chosen, r.rejected) for r in recs]
    assert len(got["jsonl"]) == 3 and all(v == got["jsonl"] for v in got.values()), got


def test_kto_rows_read_from_every_format_with_text_labels_in_csv(tmp_path):
    rows = [{"id": f"k{i}", "prompt": f"{i}번 질문", "completion": f"{i}번 답", "label": i % 2 == 0} for i in range(4)]
    for fmt, path in _write_all_formats(tmp_path, rows).items():
        if fmt == "csv":  # csv.DictWriter writes True/False: the reader takes true/false/1/0 in any case
            assert "True" in path.read_text(encoding="utf-8")
        recs, report = read_preference(data_cfg(tmp_path, path, "data.kind=kto"))
        assert report.n_rejected == 0, fmt
        assert [(r.id, r.label) for r in recs] == [("k0", True), ("k1", False), ("k2", True), ("k3", False)], fmt
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "label": "maybe"}])
    _, report = read_preference(data_cfg(tmp_path, bad, "data.kind=kto"))
    assert report.rejected == {"not_a_bool": 1}


# --- KTO -----------------------------------------------------------------------------------------------------------


def test_kto_from_pairs_splits_each_pair_into_a_desirable_and_an_undesirable_row(tmp_path):
    tok = tokenizer("tiny-qwen2")
    ds, counts, bad, _ = encode(tmp_path, pair_rows(2), "tiny-qwen2", "data.kto_from_pairs=true", kind="kto")
    assert ds["id"] == ["p0:chosen", "p0:rejected", "p1:chosen", "p1:rejected"]
    assert ds["label"] == [True, False, True, False] and (counts["desirable"], counts["undesirable"]) == (2, 2)
    row = ds[1]
    answer = ids(tok, f"{REJECTED} 0") + [tok.eos_token_id]
    assert row["input_ids"][row["prompt_len"] :] == row["labels"][row["prompt_len"] :] == answer
    assert row["labels"][: row["prompt_len"]] == [IGNORE_INDEX] * row["prompt_len"]
    recs = [PairRecord("a", (("user", "q"),), "c", "r"), KtoRecord("b", (("user", "q"),), "x", False)]
    assert [(r.id, r.completion, r.label) for r in kto_rows(recs)] == [
        ("a:chosen", "c", True),
        ("a:rejected", "r", False),
        ("b", "x", False),
    ]


def test_the_bundled_kto_sample_encodes(tmp_path):
    data = data_cfg(tmp_path, SAMPLE / "kto.jsonl", "data.kind=kto", "data.val_set_size=0")
    res = preprocess(data, tokenizer("tiny-qwen2"), prompter("kullm"))
    enc = res.stats["encoded"]["train"]
    assert enc["kept"] == 16 and enc["desirable"] == 8 and enc["undesirable"] == 8


# --- batches -------------------------------------------------------------------------------------------------------


def test_collate_pairs_puts_the_chosen_then_the_rejected_rows_in_one_right_padded_batch():
    def pair(chosen, chosen_labels, rejected, rejected_labels):
        return {"chosen_input_ids": chosen, "chosen_labels": chosen_labels} | {
            "rejected_input_ids": rejected,
            "rejected_labels": rejected_labels,
        }

    rows = [pair([5, 6, 7], [-100, 6, 7], [5, 8], [-100, 8]), pair([9, 1], [-100, 1], [9, 2, 3, 4], [-100, -100, 3, 4])]
    b = collate_pairs(rows, pad_id=0, pad_to_multiple_of=1)
    assert b["n_pairs"] == 2 and b["right_padded"]
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [9, 1, 0, 0], [5, 8, 0, 0], [9, 2, 3, 4]]
    assert b["labels"].tolist() == [
        [-100, 6, 7, -100],
        [-100, 1, -100, -100],
        [-100, 8, -100, -100],
        [-100, -100, 3, 4],
    ]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert int(b["n_trained"]) == 6 and int(b["n_tokens"]) == 11
    assert collate_pairs(rows, pad_id=0)["input_ids"].shape == (4, 8) and "ref_logps" not in b
    refs = [{**r, "ref_chosen_logps": -1.5 - i, "ref_rejected_logps": -7.25 - i} for i, r in enumerate(rows)]
    b = collate_pairs(refs, pad_id=0)
    assert b["ref_logps"].tolist() == [-1.5, -2.5, -7.25, -8.25] and b["ref_logps"].dtype == torch.float64


def test_collate_kto_adds_mismatched_rows_for_the_kl_estimate():
    rows = [
        {"input_ids": [1, 2, 30, 31], "labels": [-100, -100, 30, 31], "prompt_len": 2, "label": True},
        {"input_ids": [3, 40], "labels": [-100, 40], "prompt_len": 1, "label": False},
    ]
    b = collate_kto(rows, pad_id=0, pad_to_multiple_of=1)
    assert b["n_examples"] == 2 and b["label"].tolist() == [True, False] and b["label"].dtype == torch.bool
    assert b["input_ids"].tolist() == [[1, 2, 30, 31], [3, 40, 0, 0], [1, 2, 40, 0], [3, 30, 31, 0]]
    assert b["labels"].tolist()[2:] == [[-100, -100, 40, -100], [-100, 30, 31, -100]]
    assert collate_kto(rows, pad_id=0, pad_to_multiple_of=1, max_len=2)["input_ids"].tolist()[2] == [1, 2, 0, 0]


def test_packing_and_training_on_prompts_are_refused_for_preference_rows():
    with pytest.raises(ConfigError, match="data.packing=true: pairs rows are not packed"):
        validate(compose("prepare", ["data=sample_pref", "data.packing=true", "output_dir=/tmp/unused"]))
    with pytest.raises(ConfigError, match="data.train_on_inputs=true: kto rows"):  # kullm-train: the objective's rows
        validate(compose("train", ["objective=kto", "data.train_on_inputs=true", "output_dir=/tmp/unused"]))
    validate(compose("train", ["data.packing=true", "output_dir=/tmp/unused"]))  # SFT packs


def test_the_datamodule_batches_the_bundled_pairs(tmp_path):
    from kullm.data.datamodule import KullmDataModule

    cfg = compose(
        "train", ["objective=dpo", "data=sample_pref", f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache"]
    )
    assert cfg.data.kind == "pairs"
    dm = KullmDataModule(cfg.data, load_tokenizer(cfg.model), prompter("kullm"), micro_batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) == 36 and len(dm.val_set) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["n_pairs"] == 4 and batch["input_ids"].shape[0] == 8
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all() and batch["attention_mask"].dtype == torch.long
    overrides = ["objective=kto", "data=sample_kto", f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/c"]
    kto = compose("train", overrides)
    dm = KullmDataModule(kto.data, load_tokenizer(kto.model), prompter("kullm"), micro_batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["n_examples"] == 2 and batch["input_ids"].shape[0] == 4 and batch["label"].dtype == torch.bool


# --- the command ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kullm_prepare_encodes_the_bundled_pairs_and_refuses_bad_files_in_one_line(tmp_path):
    common = [f"data.cache_dir={tmp_path}/cache"]
    ok = run_script("kullm-prepare", "data=sample_pref", f"hydra.run.dir={tmp_path}/ok", *common, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    stats = json.loads((tmp_path / "ok" / "data_stats.json").read_text(encoding="utf-8"))
    assert stats["encoded"]["train"]["kept"] + stats["encoded"]["validation"]["kept"] == 40
    assert stats["settings"]["kind"] == "pairs"
    assert set(datasets.load_from_disk(str(tmp_path / "ok" / "dataset"))["train"].column_names) == set(
        pairs_mod.PAIR_COLUMNS
    )
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": PROMPT, "chosen": CHOSEN}])
    proc = run_script("kullm-prepare", "data=sample_pref", f"data.path={missing}", *common, cwd=tmp_path)
    line = one_line_error(proc, "kullm-prepare")
    assert f"{missing}: rejected:" in line and "'rejected' field" in line
    proc = run_script("kullm-prepare", "data=sample_pref", "data.kind=kto", *common, cwd=tmp_path)
    line = one_line_error(proc, "kullm-prepare")
    assert "pairs.jsonl" in line and "data.kto_from_pairs=true" in line


def test_ultrafeedback_binarized_rows_read_as_conversation_pairs(tmp_path):
    """The layout of maywell/ko_Ultrafeedback_binarized (scripts/download_data.py --only ko-ultrafeedback)."""
    row = {
        "prompt": "서울의 유명한 시장을 알려 주세요.",
        "prompt_id": "abc123",
        "chosen": [
            {"content": "서울의 유명한 시장을 알려 주세요.", "role": "user"},
            {"content": "광장시장과 남대문시장이 유명합니다.", "role": "assistant"},
        ],
        "rejected": [
            {"content": "서울의 유명한 시장을 알려 주세요.", "role": "user"},
            {"content": "Namdaemun market.", "role": "assistant"},
        ],
        "score_chosen": 8.5,
        "score_rejected": 3.0,
    }
    row["messages"] = row["chosen"]
    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    (rec,), report = read_preference(data_cfg(tmp_path, path))
    assert report.n_rejected == 0 and report.conversations == 1
    assert (rec.prompt, rec.chosen, rec.rejected) == (
        (("user", "서울의 유명한 시장을 알려 주세요."),),
        "광장시장과 남대문시장이 유명합니다.",
        "Namdaemun market.",
    )
    assert rec.id == "uf.parquet:1"


def test_the_korean_preference_set_fails_offline_in_one_line_and_its_config_names_the_fetch(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "download_data.py"), "--out", str(tmp_path), "--only=ko-ultrafeedback"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("download_data: ")]
    assert "could not fetch maywell/ko_Ultrafeedback_binarized (" in line
    assert not (tmp_path / "ko-ultrafeedback").exists()
    cfg = compose("prepare", ["data=ko-ultrafeedback", "output_dir=/tmp/unused"])
    assert cfg.data.kind == "pairs" and cfg.data.path.endswith("data/ko-ultrafeedback/ko-ultrafeedback.jsonl")
    assert "--only ko-ultrafeedback" in cfg.data.missing_hint
