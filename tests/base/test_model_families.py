"""Today's model families (tiny Llama, Qwen2, Qwen3, Mistral, Gemma-2 built offline): LoRA targets per architecture,
EOS and pad from the model's own tokenizer, the attention kernel each needs, and a training run that reloads
with PEFT."""

from pathlib import Path

import pytest
import torch
from helpers import cfg_for
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kullm.config import ConfigError, compose
from kullm.inference.merging import merge
from kullm.modeling import load_model, load_tokenizer, lora_targets
from kullm.tiny import FAMILIES, build_tiny
from kullm.train import train

FAMILY_EOS = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>",
              "gemma2": "<end_of_turn>"}  # fmt: skip


def test_lora_auto_targets_the_seeds_projection_on_gpt_neox_and_every_linear_layer_elsewhere():
    assert lora_targets("auto", "gpt_neox") == ["query_key_value"]
    assert lora_targets(["auto"], "llama") == "all-linear"
    assert lora_targets(["q_proj", "v_proj"], "llama") == ["q_proj", "v_proj"]


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_each_family_trains_with_its_own_eos_and_reloads_with_peft(tmp_path, arch):
    res = train(cfg_for(tmp_path / "run", f"model=tiny-{arch}", "lora=default", "trainer.max_steps=2",
                        "data.val_set_size=0", "callbacks.samples.num=0"))  # fmt: skip
    module, adapter = res["module"], Path(res["adapter"])
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.eos_token == FAMILY_EOS[arch]  # the model's own, never Polyglot's <|endoftext|>
    # every untruncated example's trained span ends with that EOS (a stop token of the model's generation config)
    ds = res["trainer"].datamodule.train_set
    eos = tok.convert_tokens_to_ids(FAMILY_EOS[arch])
    whole = [row for row in ds["labels"] if len(row) < 256]  # data.cutoff_len: truncated answers keep no EOS
    assert len(whole) > 50 and all([x for x in row if x != -100][-1] == eos for row in whole)
    # LoRA on every linear layer of the blocks (auto), never the output head
    wrapped = {n.split(".")[-4] for n, p in module.model.named_parameters() if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= wrapped and "lm_head" not in wrapped
    state = load_file(adapter / "adapter_model.safetensors")
    assert state and all(".lora_" in k for k in state)
    base_path = module.model.peft_config["default"].base_model_name_or_path
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter)).eval()
    ids = torch.tensor([tok("안녕하세요 반가워요")["input_ids"]])
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module.model(input_ids=ids).logits)
    # kullm-merge: a plain checkpoint with the family's tokenizer, stop tokens and (tied) head, answering the same
    merged = merge(compose("merge", [f"adapter={adapter}", f"out={tmp_path / 'merged'}"]))
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert AutoTokenizer.from_pretrained(merged).eos_token == FAMILY_EOS[arch]
    assert plain.config.tie_word_embeddings == reloaded.base_model.model.config.tie_word_embeddings
    stops = plain.generation_config.eos_token_id
    assert eos in (stops if isinstance(stops, list) else [stops])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reloaded(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_configured_eos_that_the_tokenizer_lacks_is_refused(tmp_path):
    cfg = cfg_for(tmp_path, "model=tiny-llama", "model.eos_token='<|endoftext|>'")
    with pytest.raises(ConfigError, match=r"model.eos_token='<\|endoftext\|>' is not a token of .*its own is "
                                          r"'<\|eot_id\|>'"):  # fmt: skip
        load_tokenizer(cfg.model)


def test_gemma2_gets_the_eager_kernel_and_others_transformers_default(tmp_path):
    for arch, kernel in (("gemma2", "eager"), ("llama", "sdpa")):
        cfg = cfg_for(tmp_path, f"model=tiny-{arch}")
        assert cfg.model.attn_implementation is None
        assert load_model(cfg.model).config._attn_implementation == kernel
    assert (build_tiny(shape={"arch": "qwen2"}) / "tokenizer_config.json").is_file()


def test_warm_start_from_an_adapter_trains_on_from_its_weights(tmp_path):
    from kullm.modeling import build_trainable_model

    common = ["trainer.max_steps=2", "data.val_set_size=0", "callbacks.samples.num=0"]
    first = Path(train(cfg_for(tmp_path / "first", *common))["adapter"])
    saved = load_file(first / "adapter_model.safetensors")
    cfg = cfg_for(tmp_path / "second", *common, f"init_adapter={first}")
    model = build_trainable_model(cfg.model, cfg.lora, cfg.quant, init_adapter=cfg.init_adapter)
    start = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    second = load_file(Path(train(cfg)["adapter"]) / "adapter_model.safetensors")
    assert any(not torch.equal(second[k], saved[k]) for k in saved)  # it trained on
    with pytest.raises(ConfigError, match=r"init_adapter=.* has another LoRA shape \(r: adapter 16, lora.r 8"):
        build_trainable_model(cfg.model, cfg_for(tmp_path, "lora.r=8").lora, cfg.quant, init_adapter=str(first))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_chat_model_trains_on_conversations_with_its_own_template_and_serves_it(tmp_path, arch):
    """Multi-turn messages rendered by the model's own chat template: one trained span per assistant turn (its
    content + the family's end-of-turn token), prompts exactly as apply_chat_template serves them, and the adapter
    and the merged checkpoint keep that template."""
    from helpers import CHAT, assert_exact_masks, sample_conversations

    cfg = cfg_for(tmp_path / "run", f"model=tiny-{arch}", f"data.path={CHAT / 'messages.jsonl'}",
                  "data.chat_template=tokenizer", "data.cutoff_len=1024", "data.val_set_size=4",
                  "trainer.max_epochs=1", "callbacks.samples.num=0")  # fmt: skip
    result = train(cfg)
    processed = result["trainer"].datamodule.processed
    assert processed.stats["invariant_violations"] == 0 and processed.stats["encoded"]["train"]["kept"] == 13
    served = AutoTokenizer.from_pretrained(result["adapter"])
    assert served.chat_template == FAMILIES[arch]["chat_template"] and served.eos_token == FAMILY_EOS[arch]
    for split in ("train", "validation"):
        assert_exact_masks(processed.dataset[split], served, sample_conversations())
    merged = merge(compose("merge", [f"adapter={result['adapter']}", f"out={tmp_path / 'merged'}"]))
    assert AutoTokenizer.from_pretrained(merged).chat_template == served.chat_template

    # the terminal chat keeps the conversation: the second answer is generated after the first exchange
    from kullm.inference.chat import chat
    from kullm.inference.generator import Generator

    gen_cfg = compose("generate", [f"adapter={result['adapter']}", "generation=greedy",
                                   "generation.max_new_tokens=6"])  # fmt: skip
    generator = Generator.from_config(gen_cfg)
    prompts: list[str] = []
    encode = generator.encode
    generator.encode = lambda prompt: (prompts.append(prompt), encode(prompt))[1]
    shown: list[str] = []
    chat(generator, ["안녕하세요", "한국의 수도는?"], shown.append)
    assert "keeps the conversation" in shown[0] and len(prompts) == 2
    first = [{"role": "user", "content": "안녕하세요"}]
    assert prompts[0] == served.apply_chat_template(first, add_generation_prompt=True, tokenize=False)
    answer = "".join(generator.stream(first))  # greedy: the first answer again (it may be empty on a random model)
    assert answer in "".join(shown[1:])
    history = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "한국의 수도는?"}]
    assert prompts[1] == served.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
