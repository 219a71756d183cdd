"""``strategy=fsdp`` on two CPU processes (gloo): trains, clips by the global norm, checkpoints only the adapter,
resumes exactly and exports an adapter that plain PEFT loads — equal to the DDP run's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cfg_for, metric_series
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kullm.adapter import AdapterError, verify_adapter
from kullm.modeling import build_trainable_model
from kullm.tiny import build_tiny
from kullm.training.fsdp import _layer_classes, _wrap_policy

# a clip far below the gradient norm: every step clips, so a per-shard norm would show in the weights
COMMON = ["experiment=smoke", "logger=csv", "trainer.devices=2", "seed=7", "trainer.max_steps=12",
          "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "trainer.gradient_clip_val=0.05",
          "lora.lora_dropout=0.1", "callbacks.checkpoint.every_n_train_steps=2",
          "callbacks.checkpoint.monitor=train/loss", "callbacks.checkpoint.save_top_k=-1",
          "callbacks.samples.num=2", "callbacks.samples.max_new_tokens=4"]  # fmt: skip


def test_each_lora_layer_and_each_block_is_its_own_fsdp_unit(tmp_path):
    cfg = cfg_for(tmp_path)
    model = build_trainable_model(cfg.model, cfg.lora, cfg.quant)
    classes = _layer_classes(model, None)
    assert {c.__name__ for c in classes} == {"GPTNeoXLayer"}  # the model's _no_split_modules
    wrapped = {name for name, m in model.named_modules() if _wrap_policy(classes, True, m, False, 0)}
    lora = {n for n, m in model.named_modules() if ".lora_A.default" in n or ".lora_B.default" in n}
    layers = {n for n, m in model.named_modules() if type(m).__name__ == "GPTNeoXLayer"}
    assert lora and wrapped == lora | layers  # never a frozen base linear, embedding or norm on its own
    with pytest.raises(ValueError, match=r"no module of class \['LlamaDecoderLayer'\]"):
        _layer_classes(model, ["LlamaDecoderLayer"])


def test_an_adapter_whose_names_carry_a_wrapper_segment_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    key = "base_model.model.gpt_neox.layers.0._fsdp_wrapped_module.attention.dense.lora_A.weight"
    save_file({key: torch.ones(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="wrapper segment .*PEFT would load none of them"):
        verify_adapter(tmp_path)


def _run(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kullm.train", *COMMON, *extra, f"hydra.run.dir={tmp_path}/{name}",
           f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fsdp_on_two_processes_trains_resumes_and_exports_the_ddp_runs_adapter(tmp_path):
    fsdp = _run(tmp_path, "fsdp", "strategy=fsdp")
    _run(tmp_path, "ddp", "strategy=ddp")
    out = tmp_path / "fsdp"
    want = load_file(out / "adapter" / "adapter_model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")

    # the DDP run's adapter, within 1e-4, under plain PEFT names (no _fsdp_wrapped_module, no adapter name)
    assert want.keys() == ddp.keys() and all(".lora_" in k and "_fsdp" not in k for k in want)
    for k in want:
        torch.testing.assert_close(want[k], ddp[k], atol=1e-4, rtol=0)
    # the same global gradient norm (before clipping) at every step: norms are reduced over the shards
    norms = metric_series(out, "train/grad_norm")
    assert len(norms) == 12 and min(norms) > 0.05  # every step clipped
    assert norms == pytest.approx(metric_series(tmp_path / "ddp", "train/grad_norm"), rel=1e-4)
    assert metric_series(out, "val/loss")  # a validation ran (two epochs) ...
    assert "generated samples are off: LoraFSDPStrategy shards the parameters" in fsdp.stderr  # ... with no hang
    assert (tmp_path / "ddp" / "samples.jsonl").is_file() and not (out / "samples.jsonl").exists()

    # checkpoints hold the adapter and its optimizer state, never the frozen base
    ckpt = torch.load(out / "checkpoints" / "step000006.ckpt", weights_only=True)
    assert len(ckpt["state_dict"]) == len(want) and all(".lora_" in k for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"][0]["state"]) == len(want)

    # plain PEFT loads every weight (not a no-op adapter): logits move away from the base, as with DDP's adapter
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    ids = torch.tensor([[5, 17, 300, 41, 9, 2]])
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        loaded = {k: v for k, v in tuned.state_dict().items() if ".lora_" in k}
        assert len(loaded) == len(want)
        for k, v in loaded.items():
            assert torch.equal(v, want[k.replace(".default", "")]), k
        assert (tuned(ids).logits - plain).abs().max() > 1e-3

    # resumed from a mid-epoch checkpoint of either epoch: the straight run's adapter, bit for bit
    for step in (6, 10):
        _run(tmp_path, f"from{step}", "strategy=fsdp", f"ckpt_path={out}/checkpoints/step{step:06d}.ckpt")
        got = load_file(tmp_path / f"from{step}" / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want), f"resumed from step {step}"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fsdp_full_fine_tuning_on_two_processes_ends_with_the_ddp_runs_model_and_resumes_exactly(tmp_path):
    """``lora=none`` under FSDP: one unit per block, every weight sharded and trained, the gathered checkpoint a
    plain model folder equal to DDP's; a mid-run checkpoint (every weight + optimizer state) resumes bit for bit."""
    full = ("lora=none", "trainer.max_steps=4", "optim.lr=1e-3")
    _run(tmp_path, "fsdp", "strategy=fsdp", *full)
    _run(tmp_path, "ddp", "strategy=ddp", *full)
    want = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")  # reloads as a plain checkpoint
    first = load_file(build_tiny() / "model.safetensors")
    assert want.keys() == ddp.keys() == first.keys() and all("_fsdp" not in k for k in want)
    for k in want:
        torch.testing.assert_close(want[k], ddp[k], atol=1e-4, rtol=0)
        assert not torch.equal(want[k], first[k]), f"{k} never trained"
    assert metric_series(tmp_path / "fsdp", "train/grad_norm") == pytest.approx(
        metric_series(tmp_path / "ddp", "train/grad_norm"), rel=1e-4
    )
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step000002.ckpt"
    assert len(torch.load(ckpt, weights_only=True)["state_dict"]) == len(want)
    _run(tmp_path, "from2", "strategy=fsdp", *full, f"ckpt_path={ckpt}")
    got = load_file(tmp_path / "from2" / "model" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.timeout(900)
def test_fsdp_on_two_processes_saves_plain_names_and_resumes_exactly(tmp_path):
    """The fast suite's FSDP save and load on two CPU processes (gloo): the run ends with the one-process run's
    adapter; its checkpoints carry the same plain weight names (no wrapper segment); every adapter folder PEFT
    reloads keeps the run's secret out of its config; resumed from its mid-run checkpoint, it ends bit for bit where
    it did."""
    from kullm.train import train

    common = ["trainer.max_steps=4", "lora.lora_dropout=0.0", "callbacks.checkpoint.every_n_train_steps=2",
              "callbacks.checkpoint.monitor=train/loss", "callbacks.checkpoint.save_top_k=-1",
              "callbacks.samples.num=0", "trainer.limit_val_batches=0", "seed=7"]  # fmt: skip
    one = train(cfg_for(tmp_path / "one", *common))
    want = load_file(Path(one["adapter"]) / "adapter_model.safetensors")
    plain = torch.load(tmp_path / "one" / "checkpoints" / "step000004.ckpt", weights_only=True)

    secret = "hf_FSDPsecret0123456789"

    def fsdp(name: str, *extra: str) -> dict[str, torch.Tensor]:
        cmd = [sys.executable, "-m", "kullm.train", "experiment=smoke", "logger=csv", "strategy=fsdp",
               "trainer.devices=2", *common, f"+hub.hf_token={secret}", *extra, f"hydra.run.dir={tmp_path}/{name}",
               f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        assert res.returncode == 0, res.stderr[-4000:]
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    got = fsdp("fsdp")
    out = tmp_path / "fsdp"
    assert got.keys() == want.keys() and all("_fsdp" not in k for k in got)
    for k in want:  # the same global batches, reduced over two ranks: equal up to summation order
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
    saved = torch.load(out / "checkpoints" / "step000004.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and list(saved["state_dict"]) == list(plain["state_dict"])
    assert len(saved["optimizer_states"][0]["state"]) == len(plain["state_dict"])
    for folder in (out / "adapter", out / "checkpoints" / "last", out / "checkpoints" / "step000002"):
        verify_adapter(folder)
        text = (folder / "kullm_config.yaml").read_text(encoding="utf-8")
        assert "hf_token: <redacted>" in text and secret not in text and "fsdp" in text

    resumed = fsdp("resumed", f"ckpt_path={out / 'checkpoints' / 'step000002.ckpt'}")
    assert all(torch.equal(resumed[k], got[k]) for k in got)
