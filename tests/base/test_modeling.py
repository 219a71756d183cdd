"""Base-model loading: shape-only models for benchmarks, without the checkpoint or the network."""

import pytest
from omegaconf import OmegaConf

from kullm.config import compose
from kullm.modeling import load_model

SMALL = ["model.shape.num_hidden_layers=2", "model.shape.hidden_size=64", "model.shape.num_attention_heads=4",
         "model.shape.intermediate_size=256"]  # fmt: skip


def model_node(*overrides):
    cfg = compose("prepare", ["model=polyglot-ko-12.8b", "output_dir=/dev/null", *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True)


def test_shape_only_builds_the_named_architecture_with_random_weights_offline():
    node = model_node("model.shape_only=true", "model.dtype=float32", *SMALL)
    model = load_model(node)  # the hub id is never fetched: HF_HUB_OFFLINE is set and nothing is cached
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 64, 4, 256)
    assert (c.vocab_size, c.rope_parameters["partial_rotary_factor"], c.use_parallel_residual) == (30080, 0.5, True)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    emb = model.get_input_embeddings().weight
    assert emb.shape == (30080, 64) and float(emb.std()) > 0  # random, not zeros
    n = sum(p.numel() for p in model.parameters())
    assert n == 2 * 30080 * 64 + 2 * (4 * 64 * 64 + 4 * 64 + 2 * 64 * 256 + 256 + 64 + 4 * 64) + 2 * 64


def test_shape_only_with_quantization_is_refused():
    with pytest.raises(ValueError, match="cannot be combined with quant"):
        load_model(model_node("model.shape_only=true", *SMALL), quant={"mode": "int8"})


@pytest.mark.parametrize(
    ("preset", "arch", "billions"),
    [("qwen2.5-7b-instruct", "Qwen2ForCausalLM", 7.62), ("solar-10.7b-instruct", "LlamaForCausalLM", 10.73),
     ("polyglot-ko-12.8b", "GPTNeoXForCausalLM", 12.89)],  # fmt: skip
)
def test_each_hub_preset_has_its_models_true_shape(preset, arch, billions):
    """The ``shape`` of a preset is the real model's (its parameter count, on the meta device), so ``shape_only``
    benchmarks measure that model; the preset itself builds offline in that architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = compose("prepare", [f"model={preset}", "output_dir=/dev/null"])
    shape = OmegaConf.to_container(cfg.model.shape, resolve=True)
    kind = shape.pop("model_type", "gpt_neox")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape))
    assert type(model).__name__ == arch
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    heads = ["model.shape.num_key_value_heads=2"] if kind != "gpt_neox" else []
    small = load_model(model_node(f"model={preset}", "model.shape_only=true", "model.dtype=float32", *SMALL, *heads))
    assert type(small).__name__ == arch and small.config.num_hidden_layers == 2


@pytest.mark.parametrize("experiment", ["chat-qwen2.5-7b", "kullm3-solar-10.7b"])
def test_modern_presets_compose_and_validate(experiment):
    from kullm.config import validate

    cfg = compose("train", [f"experiment={experiment}", "output_dir=/dev/null"])
    validate(cfg)
    assert cfg.model.revision and cfg.model.eos_token is None  # EOS from the model's own tokenizer
    assert cfg.lora.target_modules == "all-linear" and cfg.trainer.precision == "bf16-mixed"
    if experiment == "kullm3-solar-10.7b":
        assert cfg.template.name == "kullm_system" and cfg.data.chat_template == "template"
    else:
        assert cfg.model.revision == "a09a35458c702b33eeacc393d103063234e8bc28"
        assert cfg.data.chat_template == "tokenizer"
