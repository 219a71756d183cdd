"""Every preset composes, and its trainer, strategy and logger instantiate (GPU-only parts are checked, not run)."""

import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kullm.config import CONF_DIR, ConfigError, compose, validate
from kullm.training.loggers import build_loggers
from kullm.training.preflight import accumulation, build_strategy, validation_schedule, world_size

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))


def test_the_presets_are_there():
    assert {"smoke", "kullm-v2-polyglot-12.8b", "kullm-v1-polyglot-12.8b", "kullm-v2-polyglot-12.8b-bf16"} <= set(
        EXPERIMENTS
    )
    assert {"auto", "ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp"} <= set(STRATEGIES)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(tmp_path, name):
    cfg = compose("train", [f"experiment={name}", f"output_dir={tmp_path}", "logger.mode=disabled"])
    validate(cfg)
    accumulation(cfg.batch_size, cfg.micro_batch_size, world_size(cfg.trainer))
    build_strategy(cfg)
    # a GPU preset's Trainer cannot be built without a GPU: build it on CPU with everything else as configured
    trainer = instantiate(cfg.trainer, accelerator="cpu", devices=1, strategy="auto", logger=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    loggers = build_loggers(cfg, tmp_path)
    assert len(loggers) == {"none": 0, "csv": 1, "wandb": 2}[cfg.logger.name]  # W&B with a CSV beside it
    for logger in loggers:
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()


def test_seed_recipe_preset_is_the_recipe_as_it_ran(tmp_path):
    """finetune_polyglot.py at KULLM's kullm_v2 commit 33ef2a4: hard-coded TrainingArguments + HF defaults."""
    cfg = compose("train", ["experiment=kullm-v2-polyglot-12.8b", f"output_dir={tmp_path}"])
    assert cfg.model.name_or_path == "EleutherAI/polyglot-ko-12.8b"
    lora = OmegaConf.to_container(cfg.lora, resolve=True)
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"], lora["target_modules"]) == (
        8,
        16,
        0.05,
        ["query_key_value"],
    )
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.data.cutoff_len, cfg.data.val_set_size) == (128, 4, 512, 2000)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (
        3e-4,
        "linear",
        100,
        0.0,
    )
    assert (cfg.trainer.max_epochs, cfg.trainer.devices, cfg.trainer.precision) == (8, 4, "16-mixed")
    assert (cfg.quant.mode, cfg.model.dtype, cfg.gradient_checkpointing) == ("int8", "float16", True)
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.sampler == "length_grouped" and cfg.data.train_on_inputs is True and cfg.data.add_eos is True
    accumulate = accumulation(cfg.batch_size, cfg.micro_batch_size, world_size(cfg.trainer))
    assert accumulate == 8
    # evaluation every 200 *optimizer* steps: 1600 micro-batches, counted over epochs
    assert validation_schedule(cfg, accumulate) == {"val_check_interval": 1600, "check_val_every_n_epoch": None}
    ck = cfg.callbacks.checkpoint
    assert (ck.every_n_train_steps, ck.save_top_k, ck.monitor, ck.final) == (200, 3, "val/loss", "best")
    v1 = compose("train", ["experiment=kullm-v1-polyglot-12.8b", f"output_dir={tmp_path}"])
    assert v1.trainer.max_epochs == 5 and v1.data.name == "kullm-v1" and v1.lora.r == 8
    assert (v1.optim.schedule, v1.optim.warmup_steps, v1.quant.mode) == ("linear", 100, "int8")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_modern_preset_differs_from_the_seed_only_in_precision(tmp_path, version):
    seed = compose("train", [f"experiment=kullm-{version}-polyglot-12.8b", f"output_dir={tmp_path}"])
    modern = compose("train", [f"experiment=kullm-{version}-polyglot-12.8b-bf16", f"output_dir={tmp_path}"])
    assert (modern.quant.mode, modern.model.dtype, modern.trainer.precision) == ("none", "bfloat16", "bf16-mixed")
    assert modern.gradient_checkpointing is False
    a, b = OmegaConf.to_container(seed, resolve=True), OmegaConf.to_container(modern, resolve=True)
    for cfg in (a, b):
        cfg.pop("quant"), cfg["model"].pop("dtype"), cfg["trainer"].pop("precision"), cfg.pop("gradient_checkpointing")
        cfg["logger"].pop("tags")
    assert a == b


def test_val_every_n_steps_refuses_what_would_validate_mid_step(tmp_path):
    cfg = compose("train", ["experiment=smoke", f"output_dir={tmp_path}", "trainer.val_check_interval=3"])
    with pytest.raises(ConfigError, match="not a multiple of the accumulation"):
        validation_schedule(cfg, 2)
    assert validation_schedule(cfg, 3) == {}
    half = compose("train", ["experiment=smoke", f"output_dir={tmp_path}", "trainer.val_check_interval=0.5"])
    with pytest.raises(ConfigError, match="use val_every_n_steps instead"):
        validation_schedule(half, 2)
    assert validation_schedule(half, 1) == {}
    for bad in ("0", "-2"):
        cfg = compose("train", ["experiment=smoke", f"output_dir={tmp_path}", f"val_every_n_steps={bad}"])
        with pytest.raises(ConfigError, match="val_every_n_steps"):
            validation_schedule(cfg, 2)
    both = compose(
        "train", ["experiment=smoke", f"output_dir={tmp_path}", "val_every_n_steps=2", "trainer.val_check_interval=4"]
    )
    with pytest.raises(ConfigError, match="not both"):
        validation_schedule(both, 2)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_instantiates_with_its_settings(tmp_path, name):
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    cfg = compose("train", [f"strategy={name}", f"output_dir={tmp_path}"])
    strategy = build_strategy(cfg)
    if name == "auto":
        assert strategy == "auto"
    elif name.startswith("deepspeed"):
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == (2 if name == "deepspeed_zero2" else 3)
        offload = name.endswith("offload")
        assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
        assert cfg.strategy.gpu_only and cfg.strategy.shards_params == (zero["stage"] == 3)
    elif name == "fsdp":
        from kullm.training.fsdp import LoraFSDPStrategy

        assert isinstance(strategy, LoraFSDPStrategy) and strategy.layer_classes is None  # from the model
        assert strategy.kwargs["use_orig_params"] is True and not cfg.strategy.gpu_only
        assert cfg.strategy.shards_params and strategy._state_dict_type == "full"
    else:
        assert type(strategy).__name__ == "DDPStrategy"


def test_sweep_preset_composes_into_a_grid(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["hparams_search=lora_sweep"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == {"lora.r": "8,16,32", "optim.lr": "1e-4,3e-4"}
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert OmegaConf.to_container(cfg.logger, resolve=False)["group"] == "${kullm_basename:${hydra:sweep.dir}}"


def test_cfg_job_prints_the_composed_config():
    res = subprocess.run(
        [sys.executable, "-m", "kullm.train", "experiment=smoke", "optim.lr=0.01", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    printed = OmegaConf.create(res.stdout)
    assert printed.optim.lr == 0.01 and printed.model.name == "tiny" and printed.lora.r == 16


def test_wandb_auto_mode_is_offline_without_a_key_and_online_with_one(tmp_path, monkeypatch):
    from kullm.wandb_mode import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode("auto") == "online"  # `wandb login` stores the key there
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"  # the environment wins
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("offline") == "offline"


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_deepspeed_checkpoints_leave_the_frozen_base_out(tmp_path, name):
    cfg = compose("train", ["experiment=smoke", f"strategy={name}", f"output_dir={tmp_path}"])
    strategy = build_strategy(cfg)
    assert strategy.exclude_frozen_parameters is True  # ~26 GB less per save on 12.8b


def test_deepspeed_loss_is_scaled_once():
    """Lightning divides a training_step's loss by the accumulation, DeepSpeed's backward divides again: under
    DeepSpeed the module hands back per-token mean × accumulation, so the gradient is that of the per-token mean."""
    import types

    import torch

    from kullm.training.module import KullmLitModule

    class DeepSpeedStrategy:  # matched by name, as the module does
        pass

    module = KullmLitModule(torch.nn.Linear(2, 2), optim={}, loss={})
    module._loss = lambda batch: (torch.tensor(12.0), 4)
    module._trainer = types.SimpleNamespace(strategy=DeepSpeedStrategy(), accumulate_grad_batches=8)
    batch = {"attention_mask": torch.ones(1, 5)}
    assert float(module.training_step(batch, 0)) == pytest.approx(12.0 / 4 * 8)
    module._trainer.strategy = object()  # every other strategy: the token sum (normalised per optimizer step later)
    assert float(module.training_step(batch, 0)) == 12.0


def test_generated_samples_are_switched_off_with_the_reason_under_sharded_strategies(tmp_path):
    import types

    from kullm.training.samples import GenerationSamples, sharded_reason

    class FSDPStrategy:
        pass

    class DeepSpeedStrategy:
        zero_stage_3 = True

    for strategy in (FSDPStrategy(), DeepSpeedStrategy()):
        cb = GenerationSamples(tokenizer=None, output_dir=tmp_path, num=4)
        with pytest.warns(UserWarning, match="generated samples are off: .* would wait"):
            cb.setup(types.SimpleNamespace(strategy=strategy), None, "fit")
        assert cb.num == 0
    assert sharded_reason(types.SimpleNamespace()) == ""
    DeepSpeedStrategy.zero_stage_3 = False
    assert sharded_reason(DeepSpeedStrategy()) == ""  # ZeRO-2 keeps whole parameters on every rank


AUTOCAST_CASES = [("16-mixed", "bfloat16", False), ("bf16-mixed", "float16", False), ("bf16-mixed", "bfloat16", True),
                  ("16-mixed", "float32", True)]  # fmt: skip


@pytest.mark.parametrize(("precision", "dtype", "ok"), AUTOCAST_CASES)
def test_autocast_over_a_base_of_the_other_half_precision_is_refused(tmp_path, precision, dtype, ok):
    from kullm.training.preflight import check_combination

    cfg = compose("train", ["experiment=smoke", f"output_dir={tmp_path}", f"trainer.precision={precision}",
                            f"model.dtype={dtype}"])  # fmt: skip
    if ok:
        check_combination(cfg)
    else:
        with pytest.raises(ConfigError, match="casts every frozen weight"):
            check_combination(cfg)


def test_under_deepspeed_only_the_accumulation_boundary_reduces_and_logs():
    """DeepSpeed's engine is stepped after every micro-batch; the loss window is reduced and logged once per real
    optimizer step, with the tokens of every micro-batch in it."""
    import types

    import torch

    from kullm.training.module import KullmLitModule

    class Engine:
        micro_steps, accumulation = 0, 4

        def is_gradient_accumulation_boundary(self) -> bool:
            return (self.micro_steps + 1) % self.accumulation == 0

    class DeepSpeedStrategy:  # matched by name, as the module does
        model = Engine()

        def reduce(self, tensor, reduce_op):
            raise AssertionError("one process: nothing to reduce")

    module = KullmLitModule(torch.nn.Linear(2, 2), optim={}, loss={})
    module._loss = lambda batch: (torch.tensor(12.0), 4)
    module._trainer = types.SimpleNamespace(strategy=DeepSpeedStrategy(), accumulate_grad_batches=4, world_size=1)
    logged: list[dict] = []
    module.log_dict = lambda values, **kw: logged.append(values)
    module.log = lambda *a, **kw: None
    optimizer = types.SimpleNamespace(param_groups=[{"lr": 0.1}])
    batch = {"attention_mask": torch.ones(1, 5)}
    for step in range(8):
        module.training_step(batch, step)
        module.on_before_optimizer_step(optimizer)
        DeepSpeedStrategy.model.micro_steps += 1
    assert len(logged) == 2  # micro-batches 4 and 8
    assert [v["train/loss"] for v in logged] == [3.0, 3.0] and module.trained_tokens == 2 * 4 * 4
