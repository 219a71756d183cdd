import csv
import itertools
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import FAST, cfg_for, metric_series
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kullm.cli import check_overrides
from kullm.config import ConfigError, validate
from kullm.train import train
from kullm.training.preflight import accumulation, check_combination


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    return train(cfg_for(out, "trainer.max_epochs=3"))


def test_smoke_loss_falls_and_files_exist(smoke):
    out = Path(smoke["output_dir"])
    losses, val = metric_series(out, "train/loss"), metric_series(out, "val/loss")
    assert len(losses) >= 10 and len(val) == 3
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert val[-1] < val[0], val
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and "last" in ckpts
    best = [n for n in ckpts if n.startswith("step") and n.endswith(".ckpt")]
    assert len(best) == 2  # save_top_k
    kept = sorted(float(n.removesuffix(".ckpt").rsplit("val_loss_", 1)[1]) for n in best)
    assert kept == pytest.approx(sorted(val)[:2], abs=1e-4)  # the two lowest val/loss, not the last two
    for name in best:
        assert (out / "checkpoints" / name.removesuffix(".ckpt") / "adapter_model.safetensors").exists()
    assert smoke["metrics"]["train/tokens_per_s"] > 0 and smoke["metrics"]["val/ppl"] > 1
    assert (out / "samples.jsonl").read_text(encoding="utf-8").count("\n") == 3


def test_adapter_reloads_with_plain_peft_and_matches_in_memory_logits(smoke):
    module = smoke["module"]
    base_path = module.model.peft_config["default"].base_model_name_or_path
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), smoke["adapter"]).eval()
    ids = torch.tensor([[5, 17, 300, 41, 9, 2]])
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_path)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapter really changes the model


def test_lightning_checkpoint_holds_only_trainable_weights(smoke):
    ckpt = torch.load(Path(smoke["output_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == sum(
        p.numel() for p in smoke["module"].parameters() if p.requires_grad
    )
    assert "optimizer_states" in ckpt and "lr_schedulers" in ckpt and "kullm" in ckpt


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_exact_resume_n_plus_n_equals_2n(tmp_path):
    common = [
        "trainer.max_steps=8",
        "lora.lora_dropout=0.1",  # dropout draws from the RNG: its state must be restored too
        "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.checkpoint.monitor=null",
        "callbacks.samples.num=0",
        "trainer.limit_val_batches=0",
        "sampler=random",
    ]
    straight = train(cfg_for(tmp_path / "straight", *common))
    train(cfg_for(tmp_path / "first", *common), extra_callbacks=[StopAt(4)])
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed = train(cfg_for(tmp_path / "resumed", *common, f"ckpt_path={last}"))
    assert resumed["metrics"]["global_step"] == straight["metrics"]["global_step"] == 8
    a = load_file(Path(straight["adapter"]) / "adapter_model.safetensors")
    b = load_file(Path(resumed["adapter"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    stopped = load_file(tmp_path / "first" / "adapter" / "adapter_model.safetensors")
    assert any((stopped[k] - a[k]).abs().max() > 1e-4 for k in a)  # halfway is really different


def quantized_base_check(res, layer: str) -> None:
    """The base's linear layers really are bitsandbytes layers, and the base really is smaller than in fp32."""
    bnb = pytest.importorskip("bitsandbytes")
    from omegaconf import OmegaConf

    from kullm.modeling import load_model

    model = res["module"].model
    kind = getattr(bnb.nn, layer)
    base_linears = [m for n, m in model.named_modules() if "lora_" not in n and isinstance(m, torch.nn.Linear)]
    quantized = [m for m in base_linears if isinstance(m, kind)]
    assert quantized and len(quantized) >= len(base_linears) - 1  # all but (at most) the LM head
    cfg = res["trainer"].lightning_module.model.peft_config["default"]
    plain = load_model(OmegaConf.to_container(cfg_for(Path("/tmp/unused")).model, resolve=True))
    assert model.get_memory_footprint() < plain.get_memory_footprint(), cfg.base_model_name_or_path


def test_int8_lora_trains_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    res = train(cfg_for(tmp_path, "quant=int8", "trainer.max_steps=2", "callbacks.samples.num=0"))
    assert res["metrics"]["global_step"] == 2
    assert (Path(res["adapter"]) / "adapter_model.safetensors").exists()
    quantized_base_check(res, "Linear8bitLt")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["batch_size=10", "micro_batch_size=4"],
            "batch_size=10 is not divisible by micro_batch_size=4 × world size=1",
        ),
        (["strategy=deepspeed_zero2"], "strategy=deepspeed_zero2 runs only on CUDA GPUs"),
        (["strategy=deepspeed_zero3"], "strategy=deepspeed_zero3 runs only on CUDA GPUs"),
        (["strategy=fsdp", "quant=int8"], "strategy=fsdp shards the base weights, which bitsandbytes int8"),
        (["trainer=gpu"], "trainer.accelerator=gpu but this machine has no CUDA GPU"),
        (["data.cutoff_len=abc"], "data.cutoff_len='abc': expected int, got str"),
        (
            ["optim.schedule=cosin"],
            "optim.schedule='cosin': must be one of cosine, linear, constant (did you mean 'cosine'?)",
        ),
        (
            ["+trainer.max_step=5"],
            "trainer.max_step: not an argument of lightning.pytorch.Trainer (did you mean 'max_steps'?)",
        ),
        (["+lora.rank=4"], "lora.rank: not an argument of peft.LoraConfig"),
    ],
)
def test_impossible_configs_fail_with_named_errors(tmp_path, overrides, message):
    cfg = cfg_for(tmp_path, *overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
        check_combination(cfg)
        accumulation(cfg.batch_size, cfg.micro_batch_size, 1)
    assert message in str(e.value)


def test_sharded_strategy_refuses_a_quantized_base(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = cfg_for(tmp_path, "strategy=deepspeed_zero3", "quant=nf4", "trainer=gpu")
    with pytest.raises(ConfigError, match="shards the base weights, which bitsandbytes nf4 weights cannot be"):
        check_combination(cfg)


def test_misspelled_override_names_the_nearest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        check_overrides("train", ["experiment=smoke", "optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"'data.cutof_len' \(did you mean 'data.cutoff_len'\?\)"):
        check_overrides("train", ["data.cutof_len=5"])
    check_overrides("train", ["-m", "optim.lr=1e-4,3e-4", "model=tiny", "+new.key=1", "--cfg", "job"])


def test_cli_reports_a_typo_in_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "kullm.train", "experiment=smoke", "lora.rr=4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert "kullm-train: unknown config key 'lora.rr' (did you mean 'lora.r'?)" in res.stderr
    assert "Traceback" not in res.stderr


def test_wandb_offline_run_has_metrics_and_config_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    secret = "hf_SECRETtoken123"
    res = train(
        cfg_for(tmp_path, "logger=wandb", "trainer.max_steps=2", f"+hub.hf_token={secret}", "callbacks.samples.num=1")
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("run-*.wandb")
    files = [p for p in runs[0].rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in files)
    assert b"train/loss" in record.read_bytes() and b"micro_batch_size" in blob
    assert secret.encode() not in blob
    assert secret not in (Path(res["adapter"]) / "kullm_config.yaml").read_text()


SGD = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps",
       "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.5", "lora.lora_dropout=0.0"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_on_two_processes_trains_the_same_adapter_as_one_process(tmp_path):
    """The same global batch of 8 (one process: 4 × 2 accumulation; two processes: 4 each) gives the same adapter
    and the same gradient norms. Plain SGD: a wrong gradient scale (e.g. dropping × world size) shows in the
    weights, where Adam would hide it."""
    common = [*FAST, "trainer.max_steps=4", "batch_size=8", "micro_batch_size=4", "sampler=random",
              "callbacks.samples.num=0", "trainer.log_every_n_steps=1", "trainer.gradient_clip_val=null",
              *SGD]  # fmt: skip
    runs = {}
    for name, extra in (("one", []), ("two", ["strategy=ddp", "trainer.devices=2"])):
        cmd = [sys.executable, "-m", "kullm.train", *common, *extra, f"hydra.run.dir={tmp_path}/{name}",
               f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=500, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = tmp_path / name
    assert "micro-batch 4 × 2 device(s) × 1 accumulation step(s)" in res.stdout + res.stderr
    a = load_file(runs["one"] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["two"] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max(float(a[k].abs().max()) for k in a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)
    norms = {n: metric_series(r, "train/grad_norm") for n, r in runs.items()}
    assert len(norms["one"]) == len(norms["two"]) == 4
    assert norms["two"] == pytest.approx(norms["one"], rel=1e-4)
    assert metric_series(runs["two"], "train/trained_tokens") == metric_series(runs["one"], "train/trained_tokens")


def sweep(tmp_path, values: str) -> subprocess.CompletedProcess:
    """A one-step multirun of the smoke experiment over ``values`` (``key=a,b``), jobs under ``<tmp>/sweep``."""
    cmd = [
        sys.executable, "-m", "kullm.train", "-m", *FAST, values, "trainer.max_steps=1", "callbacks.samples.num=0",
        "val_every_n_steps=1", f"hydra.sweep.dir={tmp_path}/sweep", f"data.cache_dir={tmp_path}/cache",
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_multirun_makes_one_run_per_value(tmp_path):
    res = sweep(tmp_path, "optim.lr=1e-3,2e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "adapter" / "adapter_model.safetensors").exists()
    lrs = [(tmp_path / "sweep" / j / ".hydra" / "overrides.yaml").read_text() for j in ("0", "1")]
    assert "optim.lr=0.001" in lrs[0] and "optim.lr=0.002" in lrs[1]
    # the summary: both jobs, best val/loss first, each with the val/loss its own run logged
    with open(tmp_path / "sweep" / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    losses = {j: metric_series(tmp_path / "sweep" / j, "val/loss")[-1] for j in ("0", "1")}
    best = min(losses, key=losses.get)
    assert [r["job"] for r in rows] == [best, "1" if best == "0" else "0"]
    assert [float(r["val_loss"]) for r in rows] == sorted(losses.values())
    assert rows[0]["overrides"] == f"optim.lr={0.001 if best == '0' else 0.002}" and rows[0]["steps"] == "1"
    assert rows[0]["adapter"] == str(tmp_path / "sweep" / best / "adapter") and float(rows[0]["tokens_per_s"]) > 0
    assert f"best: job {best} (optim.lr=" in res.stdout


def test_smoke_trains_with_packing_and_with_token_budget_batches(tmp_path):
    packed = train(cfg_for(tmp_path / "packed", "data.packing=true", "trainer.max_epochs=3", "batch_size=4",
                           "micro_batch_size=2"))  # fmt: skip
    losses = metric_series(tmp_path / "packed", "train/loss")
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert packed["trainer"].datamodule.pack_stats.fill_rate > 0.8
    shapes: list[tuple[int, int]] = []

    class Shapes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            shapes.append(tuple(batch["input_ids"].shape))

    budget = train(
        cfg_for(tmp_path / "tokens", "data.batching=tokens", "data.token_budget=512", "trainer.max_steps=3"),
        extra_callbacks=[Shapes()],
    )
    assert budget["metrics"]["global_step"] == 3 and len(shapes) == 6  # 3 steps × accumulation 2
    assert all(rows * width <= 512 for rows, width in shapes), shapes  # every micro-batch within the budget
    assert len({rows for rows, _ in shapes}) > 1  # rows follow the lengths, not micro_batch_size


def test_loss_is_normalised_per_trained_token_across_accumulation(tmp_path, monkeypatch):
    """One optimizer step over the same 8 examples: 1 micro-batch of 8 or 4 micro-batches of 2 give one adapter."""
    common = ["trainer.max_steps=1", "batch_size=8", "lora.lora_dropout=0.0", "sampler=random",
              "trainer.limit_val_batches=0", "callbacks.checkpoint.monitor=null", "callbacks.samples.num=0",
              "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1.0",
              # plain SGD: the update is lr × gradient, so any change of weighting shows (Adam would hide scale)
              "optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps"]  # fmt: skip
    whole = train(cfg_for(tmp_path / "whole", *common, "micro_batch_size=8"))
    split = train(cfg_for(tmp_path / "split", *common, "micro_batch_size=2"))
    a = load_file(Path(whole["adapter"]) / "adapter_model.safetensors")
    b = load_file(Path(split["adapter"]) / "adapter_model.safetensors")
    assert max(float(a[k].abs().max()) for k in a) > 0  # the step moved the adapter
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-4)
    # control: a plain mean per micro-batch (what DeepSpeed gets) weights tokens by their micro-batch, and differs
    from kullm.training.module import KullmLitModule

    monkeypatch.setattr(KullmLitModule, "_engine_scales_grads", property(lambda self: True))
    per_batch = train(cfg_for(tmp_path / "per_batch", *common, "micro_batch_size=2"))
    c = load_file(Path(per_batch["adapter"]) / "adapter_model.safetensors")
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-4


class _BlockCalls(L.Callback):
    """Counts the forward calls of the first block's attention during each training batch."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        block = pl_module.model.get_base_model().gpt_neox.layers[0].attention  # recomputed in backward if checkpointed
        block.register_forward_hook(lambda *_: self.per_batch.__setitem__(-1, self.per_batch[-1] + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.per_batch.append(0)


def test_gradient_checkpointing_recomputes_each_block_in_backward(tmp_path):
    calls = _BlockCalls()
    args = ("trainer.max_steps=2", "callbacks.samples.num=0", "data.val_set_size=0")
    res = train(cfg_for(tmp_path, "gradient_checkpointing=true", *args), extra_callbacks=[calls])
    assert res["metrics"]["global_step"] == 2 and res["metrics"]["train/loss"] > 0
    assert calls.per_batch and set(calls.per_batch) == {2}  # forward, then again in backward: checkpointing acted
    off = _BlockCalls()
    train(cfg_for(tmp_path / "off", *args), extra_callbacks=[off])
    assert set(off.per_batch) == {1}


def test_nf4_lora_trains_on_cpu_after_an_eval_forward(tmp_path):
    pytest.importorskip("bitsandbytes")
    res = train(cfg_for(tmp_path, "quant=nf4", "trainer.max_steps=2", "trainer.num_sanity_val_steps=1",
                        "callbacks.samples.num=0"))  # fmt: skip
    assert res["metrics"]["global_step"] == 2
    quantized_base_check(res, "Linear4bit")


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from kullm.training.checkpointing import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_validation_every_n_optimizer_steps_and_the_best_checkpoint_as_final_adapter(tmp_path):
    """``val_every_n_steps`` counts optimizer steps (here 3 steps = 6 micro-batches); ``final=best`` exports the best
    checkpoint's adapter, as the seed's ``load_best_model_at_end`` did. ``mode=max`` makes the best an early one."""
    out = tmp_path / "run"
    overrides = ["trainer.max_steps=9", "val_every_n_steps=3", "callbacks.checkpoint.final=best"]
    train(cfg_for(out, *overrides, "callbacks.checkpoint.save_top_k=1", "callbacks.checkpoint.mode=max"))
    with open(out / "csv" / "metrics.csv") as f:
        val_steps = [int(r["step"]) + 1 for r in csv.DictReader(f) if r.get("val/loss")]
    assert val_steps == [3, 6, 9]
    (best,) = [p for p in (out / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("step0")]
    assert best.name.startswith("step000003-val_loss_")  # the highest val/loss: the first validation
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert final.keys() == load_file(best / "adapter_model.safetensors").keys()
    for k, v in load_file(best / "adapter_model.safetensors").items():
        assert torch.equal(final[k], v), k
    last = load_file(out / "checkpoints" / "last" / "adapter_model.safetensors")
    assert any(not torch.equal(final[k], last[k]) for k in final)


def test_last_checkpoint_is_always_the_last_step(tmp_path):
    """Lightning refreshes ``last`` only on a top-k save; here no validation after the first is among the best 1."""
    out = tmp_path / "run"
    train(
        cfg_for(
            out,
            "trainer.max_steps=10",
            "val_every_n_steps=3",
            "callbacks.checkpoint.save_top_k=1",
            "callbacks.checkpoint.mode=max",
            "callbacks.checkpoint.every_n_train_steps=2",
        )
    )
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    last_adapter = load_file(out / "checkpoints" / "last" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], last_adapter[k]) for k in final)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_last_at_a_step_boundary_and_exits_non_zero(tmp_path, sig):
    import signal
    import time

    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "kullm.train", *FAST, "trainer.max_epochs=200", "callbacks.samples.num=0",
        "callbacks.checkpoint.every_n_train_steps=2", f"hydra.run.dir={run}", f"data.cache_dir={tmp_path}/cache",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("kullm-train: interrupted"))
    step = int(line.split(" at step ")[1].split(";")[0])
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == step > 0
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["ready"] == 2 * step  # whole optimizer steps (accumulation 2): no half-accumulated gradient
    adapter = load_file(run / "checkpoints" / "last" / "adapter_model.safetensors")
    assert len(adapter) == len(last["state_dict"]) > 0
    assert not (run / "adapter").exists()  # an unfinished run has no final adapter
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in line


def test_resume_refuses_broken_checkpoints_and_other_settings_in_one_line(tmp_path):
    from kullm.training.resume import resolve_resume

    run = tmp_path / "run"
    train(cfg_for(run, "trainer.max_steps=2", "callbacks.samples.num=0"))
    cfg = cfg_for(tmp_path / "again")
    last = run / "checkpoints" / "last.ckpt"
    assert resolve_resume(run, cfg) == str(last)  # a run folder means its last checkpoint
    assert resolve_resume(last, cfg) == str(last)
    bad = {"empty.ckpt": b"", "text.ckpt": b"not a checkpoint\n", "cut.ckpt": last.read_bytes()[:2000]}
    for name, body in bad.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(ConfigError, match=rf"ckpt_path=.*{name}: not a readable checkpoint"):
            resolve_resume(tmp_path / name, cfg)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(tmp_path / "missing.ckpt", cfg)
    with pytest.raises(ConfigError, match="without checkpoints/last.ckpt"):
        resolve_resume(tmp_path, cfg)
    other = cfg_for(tmp_path / "again", "lora.r=8", "lora.lora_alpha=8")
    with pytest.raises(ConfigError, match=r"lora.r: checkpoint 16, now 8; lora.lora_alpha: checkpoint 32, now 8"):
        resolve_resume(last, other)
    assert resolve_resume(last, other, allow_changes=True) == str(last)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kullm.train",
            *FAST,
            f"ckpt_path={tmp_path / 'cut.ckpt'}",
            f"hydra.run.dir={tmp_path}/x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "kullm-train: ckpt_path=" in proc.stderr and "warmed up" not in proc.stderr


@pytest.mark.slow
def test_a_bad_job_fails_alone_and_the_sweep_exits_non_zero(tmp_path):
    """batch_size 8 is not divisible by micro-batch 3: that job fails, the next still trains."""
    res = sweep(tmp_path, "micro_batch_size=3,4")
    assert res.returncode != 0
    assert "batch_size=8 is not divisible by micro_batch_size=3" in res.stderr
    assert not (tmp_path / "sweep" / "0" / "adapter").exists()
    assert (tmp_path / "sweep" / "1" / "adapter" / "adapter_model.safetensors").exists()
    with open(tmp_path / "sweep" / "sweep_summary.csv") as f:  # written although the sweep ended with an error
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [
        ("1", "finished", "micro_batch_size=4"),
        ("0", "failed", "micro_batch_size=3"),
    ]
    assert rows[1]["error"].startswith("kullm-train: batch_size=8 is not divisible by micro_batch_size=3")


def test_logged_lr_grad_norm_and_trained_tokens_are_the_real_values(tmp_path):
    """lr follows the schedule's formula; trained_tokens counts the shifted labels that are not -100; with plain
    SGD and no clipping every step moves the adapter by exactly lr × grad_norm."""
    from kullm.training.module import lr_factor

    seen: dict = {"tokens": [0], "params": []}

    def snapshot(pl_module):
        seen["params"].append(torch.cat([p.detach().flatten().clone() for p in pl_module.trainable_parameters()]))

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["tokens"][-1] += int((batch["labels"][:, 1:] != -100).sum())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not trainer.fit_loop.epoch_loop._should_accumulate():
                seen["tokens"].append(seen["tokens"][-1])
                snapshot(pl_module)

    sgd = [o for o in SGD if not o.startswith(("optim.schedule", "optim.warmup", "optim.lr"))]
    common = ["trainer.max_steps=5", "trainer.log_every_n_steps=1", "trainer.gradient_clip_val=null",
              "optim.lr=0.1", "optim.schedule=linear", "optim.warmup_steps=2", "trainer.limit_val_batches=0",
              "callbacks.checkpoint.monitor=null", *sgd]  # fmt: skip
    out = tmp_path / "run"
    train(cfg_for(out, *common), extra_callbacks=[Spy()])
    expected_lr = [0.1 * lr_factor(k, warmup=2, total=5, schedule="linear") for k in range(5)]  # 0, .05, .1, .067…
    assert metric_series(out, "lr") == pytest.approx(expected_lr)
    assert metric_series(out, "train/trained_tokens") == [float(t) for t in seen["tokens"][:5]]
    norms = metric_series(out, "train/grad_norm")
    moved = [float(torch.linalg.vector_norm(b - a)) for a, b in itertools.pairwise(seen["params"])]
    assert len(moved) == len(norms) == 5 and all(n > 0 for n in norms)
    assert moved == pytest.approx([lr * n for lr, n in zip(expected_lr, norms, strict=True)], rel=1e-4, abs=1e-9)
