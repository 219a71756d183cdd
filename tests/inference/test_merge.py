"""kullm-merge on the tiny model: a plain checkpoint that loads without PEFT and answers like base+adapter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ITEMS, gen_cfg, merge_cfg

from kullm.inference.generator import Generator
from kullm.inference.merging import MergeError, merge, weight_names


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory) -> Path:
    """Merged into a folder of this module's (the session's adapter is only read)."""
    return merge(merge_cfg(adapter, tmp_path_factory.mktemp("merge") / "merged"))


def test_merged_checkpoint_loads_without_peft_and_matches(adapter, merged):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kullm.modeling import load_adapter

    names = weight_names(merged)
    assert names and not [n for n in names if "lora" in n.lower()]
    assert json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]  # sharded
    assert len(list(merged.glob("model-*.safetensors"))) > 1
    assert not (merged / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert not any("lora" in n.lower() for n, _ in plain.named_parameters())
    assert plain.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(str(merged))
    assert plain.generation_config.eos_token_id == tok.eos_token_id
    assert plain.generation_config.pad_token_id == tok.pad_token_id

    peft_model, _, prompter = load_adapter(adapter)
    ids = torch.tensor([tok(prompter.render("고려대학교에 대해서 알려줘"), add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        want = peft_model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
    assert (base - want).abs().max() > 1e-2  # the adapter matters, so the comparison above can fail


def test_generate_from_the_merged_folder_answers_like_the_adapter(adapter, merged):
    from_merged = Generator.from_config(gen_cfg(adapter, "adapter=null", f"base={merged}"))
    assert from_merged.prompter == Generator.from_config(gen_cfg(adapter)).prompter  # template.yaml travelled
    assert from_merged.generate(ITEMS) == Generator.from_config(gen_cfg(adapter)).generate(ITEMS)


def test_refuses_a_non_empty_output_unless_overwrite(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty"):
        merge(merge_cfg(adapter, out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    merge(merge_cfg(adapter, out, "overwrite=true", "dtype=bfloat16"))
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folders left


def test_a_mismatch_above_tolerance_writes_nothing(adapter, tmp_path, capsys):
    with pytest.raises(MergeError, match="tolerance"):
        merge(merge_cfg(adapter, tmp_path / "out", "dtype=bfloat16", "tolerance=1e-7"))
    assert "largest logit difference" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_bad_adapter_folder_is_a_named_error(tmp_path):
    from kullm.adapter import AdapterError

    with pytest.raises(AdapterError, match="no such adapter folder"):
        merge(merge_cfg(tmp_path / "nope", tmp_path / "out"))


@pytest.mark.slow
def test_cli_merge(adapter, tmp_path):
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "kullm.merge", f"adapter={adapter}", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "largest logit difference" in proc.stdout and (out / "model.safetensors").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert again.returncode == 1 and "overwrite=true" in again.stderr
