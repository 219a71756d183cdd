"""Full fine-tuning (``lora=none``) and added tokens (``model.added_tokens``) on tiny Llama-shaped models (tied
embeddings): every weight trains, the run leaves a plain checkpoint that generates, resume is exact, and added tokens
grow the vocabulary, train, survive adapter loading and merge into a resized checkpoint."""

from pathlib import Path

import pytest
import torch
from helpers import cfg_for
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kullm.adapter import AdapterError, read_adapter
from kullm.config import ConfigError, compose
from kullm.inference.generator import Generator
from kullm.inference.merging import merge
from kullm.modeling import build_trainable_model, load_adapter
from kullm.tiny import build_tiny
from kullm.train import train

FULL = ("model=tiny-llama", "lora=none", "data.val_set_size=0", "callbacks.samples.num=0", "optim.lr=1e-3")
# 6 steps, validated (and checkpointed, all kept) every 3
RUN = ("trainer.max_steps=6", "data.val_set_size=8", "val_every_n_steps=3", "callbacks.checkpoint.save_top_k=-1")
ADDED = [f"<|extra_{i}|>" for i in range(60)]  # 2,000 tokens + 60 outgrow the tiny model's 2,048 rows


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return train(cfg_for(out, *FULL, *RUN))


def test_full_fine_tuning_trains_every_weight_and_leaves_a_plain_checkpoint(full_run):
    folder = Path(full_run["adapter"])
    assert folder.name == "model" and not (folder / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(build_tiny(shape={"arch": "llama"})).eval()
    before, after = base.state_dict(), weights(folder)
    assert set(after) == {k for k in before if k != "lm_head.weight"}  # the tied head is saved once
    unchanged = [k for k in after if torch.equal(after[k], before[k])]
    assert not unchanged  # embeddings, norms, attention and MLP all moved
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied
    module = full_run["module"].model.eval()
    ids = torch.tensor([[5, 80, 300, 17, 900]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, module(input_ids=ids).logits)
    # served as trained: Llama's stop token, and the chat template of the training prompt
    tok = AutoTokenizer.from_pretrained(folder)
    stops = plain.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|eot_id|>") in (stops if isinstance(stops, list) else [stops])
    assert "### 응답:" in tok.apply_chat_template([{"role": "user", "content": "안녕"}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip


def test_the_full_checkpoint_generates_with_base_and_is_refused_as_an_adapter(full_run):
    folder = Path(full_run["adapter"])
    cfg = compose("generate", [f"base={folder}", "generation=greedy", "generation.max_new_tokens=8",
                               "output_dir=/nonexistent"])  # fmt: skip
    gen = Generator.from_config(cfg)
    assert gen.prompter.name == "kullm"  # template.yaml of the run
    assert isinstance(gen.generate(["고려대학교에 대해서 알려줘"])[0], str)
    with pytest.raises(AdapterError, match=r"a full checkpoint \(lora=none\), not an adapter: .*kullm-generate base="):
        read_adapter(folder)
    with pytest.raises(AdapterError, match="there is nothing to merge"):
        merge(compose("merge", [f"adapter={folder}", f"out={folder.parent / 'merged'}"]))


def test_full_fine_tuning_resumes_exactly(full_run, tmp_path):
    (first,) = (Path(full_run["output_dir"]) / "checkpoints").glob("step000003*.ckpt")
    assert first.is_file() and (first.with_suffix("") / "config.json").is_file()  # a model folder per checkpoint
    state = torch.load(first, map_location="cpu", weights_only=False)["state_dict"]
    assert len(state) == len(list(full_run["module"].model.parameters()))  # every trainable weight, once
    resumed = train(cfg_for(tmp_path / "resumed", *FULL, *RUN, f"ckpt_path={first}"))
    a, b = weights(Path(full_run["adapter"])), weights(Path(resumed["adapter"]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)


def test_full_fine_tuning_refuses_a_quantized_base_and_a_warm_start(tmp_path):
    cfg = cfg_for(tmp_path, *FULL, "quant=int8")
    with pytest.raises(ConfigError, match="lora=none trains every weight, which a bitsandbytes int8 base cannot"):
        build_trainable_model(cfg.model, cfg.lora, cfg.quant)
    cfg = cfg_for(tmp_path, *FULL, f"init_adapter={tmp_path}")
    with pytest.raises(ConfigError, match="init_adapter warm-starts a LoRA adapter: it needs a lora= preset"):
        build_trainable_model(cfg.model, cfg.lora, cfg.quant, init_adapter=cfg.init_adapter)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # a tied head and an untied one
def test_added_tokens_resize_train_and_merge_into_a_resized_checkpoint(tmp_path, arch):
    tokens = "[" + ",".join(f"'{t}'" for t in ADDED) + "]"
    # the first added token ends every answer: its (tied) embedding row must learn to be predicted
    res = train(cfg_for(tmp_path / "run", f"model=tiny-{arch}", "lora=default", f"model.added_tokens={tokens}",
                        f"model.eos_token='{ADDED[0]}'", "trainer.max_steps=4", "data.val_set_size=0",
                        "callbacks.samples.num=0"))  # fmt: skip
    adapter = Path(res["adapter"])
    tok = AutoTokenizer.from_pretrained(adapter)
    assert len(tok) == 2060 and tok.eos_token == ADDED[0]
    peft = res["module"].model
    assert peft.get_base_model().get_input_embeddings().num_embeddings == 2112  # 2,060 rounded up to 64
    eos = tok.convert_tokens_to_ids(ADDED[0])
    # the adapter reloads onto a freshly resized base and answers as trained
    model, _, _ = load_adapter(adapter)
    ids = torch.tensor([[5, 80, 300, eos, 17]])
    peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft(input_ids=ids).logits)
    merged = merge(compose("merge", [f"adapter={adapter}", f"out={tmp_path / 'merged'}"]))
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert plain.config.vocab_size == 2112 and plain.lm_head.weight.shape[0] == 2112
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == (arch == "llama")
    # PEFT's wrappers hold the original rows and the trained copy; the head's row of the new token (tied: the
    # embedding's) learned to predict it, and the merged checkpoint holds the trained copies
    base = peft.get_base_model()
    for layer, merged_weight in ((base.get_input_embeddings(), plain.model.embed_tokens.weight),
                                 (base.get_output_embeddings(), plain.lm_head.weight)):  # fmt: skip
        trained, original = layer.modules_to_save["default"].weight, layer.original_module.weight
        torch.testing.assert_close(merged_weight, trained.detach())
    assert not torch.allclose(trained[eos], original[eos])  # the head's row
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, peft(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    stops = plain.generation_config.eos_token_id
    assert eos in (stops if isinstance(stops, list) else [stops])
