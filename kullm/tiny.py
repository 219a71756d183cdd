"""The offline ``tiny`` model: ``model=tiny`` resolves ``name_or_path: kullm:tiny`` to a folder built once on disk (a
random-init GPT-NeoX in Polyglot-ko's shape, scaled down, with a byte-level BPE tokenizer trained on bundled Korean
text), which is then loaded through the very same ``from_pretrained`` code as a hub checkpoint; ``tiny_shape: {arch:
llama}`` and the other :data:`FAMILIES` give tiny stand-ins for today's model families.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kullm.atomic import write_folder
from kullm.cache import cache_root
from kullm.config import ConfigError
from kullm.special_tokens import bos_ids

log = logging.getLogger(__name__)

TINY = "kullm:tiny"
ASSETS = Path(__file__).parent / "assets"
# Polyglot-ko puts <|endoftext|> at id 2 and uses it as EOS and pad; the tiny tokenizer mirrors that layout.
SPECIAL_TOKENS = ["<|unused0|>", "<|sep|>", "<|endoftext|>"]
EOS = "<|endoftext|>"

TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "rotary_pct": 0.5,
    "max_position_embeddings": 2048,
    "use_parallel_residual": True,
    "vocab_size": 2048,  # tokenizer vocab rounded up, as Polyglot-ko pads 30003 tokens to 30080 embedding rows
    "tokenizer_vocab": 2000,
    "seed": 0,
    "warmup_steps": 60,  # full-weight steps on the bundled corpus after random init (0: purely random)
    "arch": "gpt_neox",  # or a key of FAMILIES: llama, qwen2, qwen3, mistral, gemma2
}


# Tiny stand-ins for today's model families (``tiny_shape: {arch: llama}``): each architecture with its family's
# special tokens, EOS and chat template, so kullm is tested on what users bring without a hub download.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {  # Llama-3 instruct layout: BOS added to every call, header tokens, <|eot_id|> ends a turn and is the
        # EOS; no pad; tied head
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>", "add_bos": True, "eos": "<|eot_id|>", "pad": None,
        "stop": ["<|end_of_text|>", "<|eot_id|>"],
        "config": {"num_key_value_heads": 2, "tie_word_embeddings": True},
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    },
    "qwen2": {  # ChatML: <|im_end|> ends a turn and is the EOS, <|endoftext|> pads; tied head
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "stop": ["<|im_end|>", "<|endoftext|>"],
        "config": {"num_key_value_heads": 2, "tie_word_embeddings": True},
        "chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    },
    "qwen3": {  # ChatML as Qwen2; RMSNorm on each head's queries and keys (q_norm/k_norm), explicit head_dim; tied head
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "stop": ["<|im_end|>", "<|endoftext|>"],
        "config": {"num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True},
        "chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    },
    "mistral": {  # <s> added to every call, [INST] turns, </s> ends an answer; no pad
        "specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "bos": "<s>", "add_bos": True, "eos": "</s>", "pad": None, "stop": ["</s>"],
        "config": {"num_key_value_heads": 2, "tie_word_embeddings": False},
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
        ),
    },
    "gemma2": {  # <bos> added to every call, <start_of_turn>/<end_of_turn>, soft-capped attention (eager), tied head
        "specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>", "add_bos": True, "eos": "<end_of_turn>", "pad": "<pad>", "stop": ["<eos>", "<end_of_turn>"],
        "config": {"num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True},
        "attn_implementation": "eager",
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
            "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        ),
    },
}


def build_tiny(out: str | Path | None = None, shape: Mapping[str, Any] | None = None) -> Path:
    """Build (once) and return a folder holding the tiny GPT-NeoX model and its tokenizer.

    Random init in Polyglot-ko's layout, then a brief warm-up on the bundled corpus (see :func:`_warm_up`).
    The folder name is a hash of the shape, the family's definition and the tokenizer corpus, so a change of any
    builds anew; the build is written to a temporary folder and renamed, so concurrent builders (DDP ranks, xdist)
    never see half a model.
    """
    shape = {**TINY_SHAPE, **(shape or {})}
    corpus = (ASSETS / "tiny_corpus.txt").read_text(encoding="utf-8")
    family = FAMILIES.get(shape["arch"])
    what = json.dumps(shape, sort_keys=True) + (json.dumps(family, sort_keys=True) if family else "")
    key = hashlib.sha256((what + corpus).encode()).hexdigest()[:12]
    out = Path(out) if out is not None else cache_root() / "models" / f"tiny-{key}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch

    arch = shape["arch"]
    if arch != "gpt_neox" and arch not in FAMILIES:
        raise ConfigError(f"model.tiny_shape.arch={arch!r}: must be gpt_neox or one of {sorted(FAMILIES)}")
    log.info("building the tiny %s model once (later runs load it from %s)", arch, out)
    tok = train_tiny_tokenizer(corpus.splitlines(), vocab_size=shape["tokenizer_vocab"], family=family)
    with torch.random.fork_rng(devices=[]):  # building must not touch the caller's RNG: runs never depend on the cache
        torch.manual_seed(shape["seed"])
        model = _tiny_model(shape, tok, corpus)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    write_folder(out, write, keep_existing=True)  # another process that finished first keeps its folder
    log.info("built the tiny model in %s", out)
    return out


def _tiny_model(shape: Mapping[str, Any], tok, corpus: str):
    """Random init in Polyglot-ko's layout (scaled down), or another family's architecture, then the warm-up."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")  # fmt: skip
    sizes = {k: shape[k] for k in sizes}
    family = FAMILIES.get(shape["arch"])
    if family is not None:
        stop = [tok.convert_tokens_to_ids(t) for t in family["stop"]]
        cfg = AutoConfig.for_model(
            shape["arch"],
            **sizes,
            bos_token_id=tok.bos_token_id,
            eos_token_id=stop if len(stop) > 1 else stop[0],
            pad_token_id=tok.pad_token_id,
            **family["config"],
        )
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=family.get("attn_implementation", "sdpa"))
        model.generation_config.eos_token_id = cfg.eos_token_id
        _warm_up(model, tok, corpus.splitlines(), steps=int(shape["warmup_steps"]), seed=int(shape["seed"]))
        return model
    cfg = GPTNeoXConfig(
        **sizes,
        rotary_pct=shape["rotary_pct"],
        use_parallel_residual=shape["use_parallel_residual"],
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(cfg)
    _warm_up(model, tok, corpus.splitlines(), steps=int(shape["warmup_steps"]), seed=int(shape["seed"]))
    return model


def _warm_up(model, tok, lines: list[str], steps: int, seed: int, block: int = 128, batch: int = 8) -> None:
    """A few hundred full-weight steps of language modelling on the bundled corpus.

    A purely random base has logits too flat for a low-rank adapter to move (LoRA on it: loss 7.65 → 7.51 in 40
    steps); after this warm-up the tiny model is a (very small) language model, so fine-tuning visibly learns.
    """
    import torch
    from tqdm.auto import tqdm

    if steps <= 0:
        return
    bos = bos_ids(tok)  # each line a document, as the family's pre-training saw them: [BOS] text EOS
    ids = [t for row in tok(lines, add_special_tokens=False)["input_ids"] for t in [*bos, *row, tok.eos_token_id]]
    data = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in tqdm(range(steps), desc="building the tiny model: warm-up", unit="step"):
        rows = data[torch.randint(len(data), (batch,), generator=g)]
        loss = model(input_ids=rows, labels=rows, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    log.info("tiny model warmed up on the bundled corpus: final loss %.2f", loss.item())


def train_tiny_tokenizer(lines: list[str], vocab_size: int = 2000, family: Mapping[str, Any] | None = None):
    """A byte-level BPE tokenizer (any text round-trips) with Polyglot-ko's special tokens (or a family's, with its
    chat template), trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family["specials"]) if family else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer)
    if family is None:
        return PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token=EOS,
            eos_token=EOS,
            pad_token=EOS,
            clean_up_tokenization_spaces=False,
            model_max_length=2048,
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=family["bos"],
        add_bos_token=bool(family.get("add_bos")),  # as the family's real tokenizer: every call starts with BOS
        eos_token=family["eos"],
        pad_token=family["pad"],
        additional_special_tokens=[t for t in family["specials"] if t not in (family["bos"], family["eos"], family["pad"])],  # noqa: E501
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tok.chat_template = family["chat_template"]
    return tok
