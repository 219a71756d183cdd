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
