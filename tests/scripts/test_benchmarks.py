"""The benchmarks package (``python -m benchmarks``): its command line, the seed recipe's tokenization, the paired
ratios and the BENCHMARKS.md section writer; no timed runs."""

import argparse
import subprocess
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.measure import random_checkpoint  # noqa: E402
from benchmarks.report import markdown_table, summarize, write_report  # noqa: E402
from benchmarks.runners import SHAPES, kullm_overrides  # noqa: E402
from benchmarks.seed_recipe import seed_tokenize_fn  # noqa: E402

EOS = 0


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True)


def test_help_says_data_is_required_and_shows_the_commands():
    proc = run_module("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--data PATH" in proc.stdout and "required" in proc.stdout
    assert "python -m benchmarks --data data/sample" in proc.stdout


def test_no_data_is_a_one_line_error():
    proc = run_module("--no-prep")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("bench: --data PATH is required: e.g. --data ")


def test_a_data_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"^bench: --data: not found: .*nope\.jsonl$"):
        main(["--data", "data/sample", str(tmp_path / "nope.jsonl"), "--no-prep"])


class CharTokenizer:
    """One id per character (its code point); EOS is 0."""

    eos_token_id = EOS

    def __call__(self, text, truncation, max_length, padding, return_tensors):
        ids = [ord(c) for c in text][:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


class Prompter:
    def render(self, instruction: str, input: str) -> str:
        return f"{instruction}:{input}>"


def test_the_seed_tokenization_masks_the_prompt_and_appends_eos_only_when_there_is_room():
    row = {"instruction": "ab", "input": "", "output": "xyz"}
    encode = seed_tokenize_fn(CharTokenizer(), Prompter(), cutoff_len=16, train_on_inputs=False)
    out = encode(row)
    assert out["input_ids"] == [ord(c) for c in "ab:>xyz"] + [EOS]
    assert out["labels"] == [-100] * 4 + [ord(c) for c in "xyz"] + [EOS]
    full = seed_tokenize_fn(CharTokenizer(), Prompter(), cutoff_len=6, train_on_inputs=False)(row)
    assert full["input_ids"] == [ord(c) for c in "ab:>xy"]  # cut at cutoff_len: no room for EOS
    assert seed_tokenize_fn(CharTokenizer(), Prompter(), 16, train_on_inputs=True)(row)["labels"] == out["input_ids"]


def result(variant: str, repeat: int, tok_s: float, rss: float) -> dict:
    return {
        "variant": variant,
        "repeat": repeat,
        "steps": 6,
        "trained_tok_s": tok_s,
        "nonpad_tok_s": 2 * tok_s,
        "pad_frac": 0.25,
        "peak_rss_mib": rss,
        "rss_before_train_mib": rss - 100,
    }


def test_ratios_are_paired_within_a_repeat():
    results = [
        result("seed_grouped", 0, 100.0, 1000.0),
        result("kullm_head", 0, 300.0, 500.0),
        result("seed_grouped", 1, 200.0, 1000.0),
        result("kullm_head", 1, 200.0, 700.0),
        {"variant": "kullm_packed_head", "repeat": 0, "error": "RuntimeError: boom"},
    ]
    rows = summarize(results, ["seed_grouped", "kullm_head", "kullm_packed_head"], "seed_grouped")
    kullm = rows[1]
    assert kullm["trained_tok_s"] == 250.0
    assert kullm["trained_tok_s_ratio"] == (1.0, 2.0, 3.0)  # 3.0 and 1.0 per repeat, not 250 / 150
    assert kullm["peak_rss_mib_ratio"] == (0.5, 0.6, 0.7)
    assert rows[2] == {"variant": "kullm_packed_head", "error": "RuntimeError: boom"}
    table = markdown_table(rows, "cpu")
    assert "| kullm_head | 250 | 500 | 25.0% | 600 (+100) | 2.00 (1.00–3.00) |  | 0.60 (0.50–0.70) |" in table
    assert "| kullm_packed_head | failed: RuntimeError: boom |" in table


def section(name: str, body: str) -> str:
    return f"<!-- bench:{name} -->\n## `{name}`\n\n{body}\n<!-- /bench:{name} -->\n"


def test_the_report_writer_replaces_only_its_own_section(tmp_path):
    args = argparse.Namespace(data_sources=["data/sample"], device="cpu")
    path = tmp_path / "BENCHMARKS.md"
    notes = "## Reading the numbers (by hand)\n\n- a note\n"
    path.write_text("# Benchmarks\n\nintro\n\n" + section("head", "old head") + "\n" + notes, encoding="utf-8")

    write_report(path, args, section("head", "new head"), "head")
    assert path.read_text(encoding="utf-8") == "# Benchmarks\n\nintro\n\n" + section("head", "new head") + "\n" + notes

    write_report(path, args, section("body", "body table"), "body")  # a new section goes before the notes
    text = path.read_text(encoding="utf-8")
    assert text == "# Benchmarks\n\nintro\n\n" + section("head", "new head") + "\n" + section("body", "body table") + (
        "\n" + notes
    )

    fresh = tmp_path / "fresh.md"  # no file yet: the header (commands, machine, versions) comes first
    write_report(fresh, args, section("prep", "prep table"), "prep")
    text = fresh.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks: kullm vs the seed recipe and TRL's SFTTrainer\n")
    assert "python -m benchmarks --data data/sample --prep-only" in text
    assert text.endswith(section("prep", "prep table"))


def test_gpu_only_variants_are_refused_on_the_cpu():
    with pytest.raises(SystemExit, match=r"^bench: seed_as_ran, kullm_nf4 run on a GPU only \(--device cuda\)$"):
        main(["--data", "data/sample", "--variants", "seed_as_ran,kullm_head,kullm_nf4", "--no-prep"])


def test_a_quantized_variant_loads_the_checkpoint_instead_of_building_the_shape(tmp_path):
    args = argparse.Namespace(
        shape=SHAPES["head"], model="polyglot-ko-12.8b", device="cuda", tokenizer="tok", data=tmp_path / "d.jsonl",
        cutoff_len=512, train_on_inputs=False, steps=5, seed=42, batch_size=4, micro_batch_size=4,
        checkpoint=tmp_path / "ckpt",
    )  # fmt: skip
    nf4 = kullm_overrides(args, "kullm_nf4", tmp_path / "out")
    assert f"model.name_or_path={tmp_path / 'ckpt'}" in nf4 and "model.shape_only=false" in nf4
    assert not any(o.startswith("model.shape=") for o in nf4)
    assert nf4.index("quant=none") < nf4.index("quant=nf4")  # the variant's own override comes last and wins
    head = kullm_overrides(args, "kullm_head", tmp_path / "out")
    assert "model.shape_only=true" in head and not any(o.startswith("model.name_or_path=") for o in head)


def test_a_random_checkpoint_loads_whole_and_is_written_once(tmp_path):
    from transformers import GPTNeoXForCausalLM

    folder = random_checkpoint(SHAPES["head"], tmp_path / "ckpt", device="cpu")
    model, info = GPTNeoXForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    norm = model.gpt_neox.final_layer_norm
    assert bool((norm.weight == 1).all()) and bool((norm.bias == 0).all())
    assert 0.015 < float(model.get_output_embeddings().weight.detach().float().std()) < 0.025
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert random_checkpoint(SHAPES["head"], folder, device="cpu") == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp
