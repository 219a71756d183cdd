"""Tokenizers and base models: hub/local loading, Polyglot-ko special tokens, and the offline ``tiny`` model.

``model=tiny`` resolves ``name_or_path: kullm:tiny`` to a folder built once on disk (a random-init GPT-NeoX in
Polyglot-ko's shape, scaled down, with a byte-level BPE tokenizer trained on bundled Korean text), which is then
loaded through the very same ``from_pretrained`` code as a hub checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kullm.atomic import replace
from kullm.config import ConfigError

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


def cache_root() -> Path:
    """Where kullm keeps built models and processed datasets (``$KULLM_CACHE``, else ``~/.cache/kullm``)."""
    return Path(os.environ.get("KULLM_CACHE", "~/.cache/kullm")).expanduser()


def resolve_path(name_or_path: str, shape: Mapping[str, Any] | None = None) -> str:
    """A hub id or local path as given; ``kullm:tiny`` becomes the folder of the tiny model (built if needed)."""
    if name_or_path == TINY:
        return str(build_tiny(shape=shape))
    return name_or_path


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
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        replace(tmp, out)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
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


def load_tokenizer(cfg: Mapping[str, Any]):
    """The tokenizer of a ``model=`` config node, with EOS and pad set explicitly and right padding for training."""
    from transformers import AutoTokenizer

    path = resolve_path(cfg.get("tokenizer") or cfg["name_or_path"], cfg.get("tiny_shape"))
    tok = AutoTokenizer.from_pretrained(
        path,
        revision=cfg.get("revision"),
        trust_remote_code=bool(cfg.get("trust_remote_code", False)),
    )
    added = [str(t) for t in cfg.get("added_tokens") or []]
    if added:  # before EOS/pad: a preset may make an added token its EOS (a chat marker on a base model)
        new = tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        log.info("model.added_tokens: %d of %d new to the tokenizer (%d tokens now)", new, len(added), len(tok))
    for key in ("eos_token", "pad_token"):
        token = cfg.get(key)
        if not token:
            continue  # null: the tokenizer's own
        if token not in tok.get_vocab():
            raise ConfigError(
                f"model.{key}={token!r} is not a token of {path}'s tokenizer (its own is "
                f"{getattr(tok, key)!r}): set model.{key}=null to use the tokenizer's"
            )
        setattr(tok, key, token)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {path} has no EOS token: set model.eos_token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # labels never derive from pad, so sharing the id is safe
    tok.padding_side = "right"
    return tok


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS (what training appended) first, then any other EOS the model's configs name."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        for t in value if isinstance(value, list) else [value]:
            if t is not None and t not in ids:
                ids.append(int(t))
    if not ids:
        raise ValueError("neither the tokenizer nor the model config names an EOS token")
    return ids


def set_stop_tokens(model, tokenizer) -> None:
    """Write every stop token (:func:`eos_token_ids`) and the pad token into the model's generation config, as a
    checkpoint served without kullm (vLLM, TGI, plain ``generate``) needs them."""
    eos = eos_token_ids(model, tokenizer)
    config = model.generation_config
    config.eos_token_id = eos if len(eos) > 1 else eos[0]
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def bos_ids(tokenizer) -> list[int]:
    """The ids the tokenizer's own call puts before a text: its BOS where it adds one (Llama, Mistral, Gemma, SOLAR),
    none for GPT-NeoX (Polyglot-ko) or Qwen. The one place that decides how every prompt kullm trains on, generates
    from or serves begins (see :func:`with_bos`)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    return list(full[: starts[0]]) if starts else []


def with_bos(bos: Sequence[int], ids: list[int]) -> list[int]:
    """A prompt's ``ids`` behind ``bos`` (:func:`bos_ids`), unless they already begin with it (a chat template that
    renders ``bos_token`` itself): one BOS, never two."""
    return ids if list(ids[: len(bos)]) == list(bos) else [*bos, *ids]


def tokenizer_fingerprint(tok) -> str:
    """A hash of everything about a tokenizer that changes token ids (vocab, merges, normalizer, specials, the BOS
    that prompts begin with)."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    specials = {"eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token, "bos_ids": bos_ids(tok)}
    specials = json.dumps(specials, sort_keys=True)
    return hashlib.sha256((body + specials).encode()).hexdigest()[:16]


def quantization_config(quant: Mapping[str, Any] | None):
    """A ``BitsAndBytesConfig`` for a ``quant=`` node (``None`` for ``quant=none``), checked before weights load."""
    if not quant or quant.get("mode", "none") == "none":
        return None
    import importlib.util

    import torch

    mode = quant["mode"]
    if mode not in ("int8", "nf4", "fp4"):
        raise ValueError(f"quant.mode must be none, int8, nf4 or fp4, got {mode!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"quant={mode} needs bitsandbytes: pip install 'kullm[quant]' (or quant=none)")
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(quant.get("llm_int8_threshold", 6.0)))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mode,
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
        bnb_4bit_compute_dtype=getattr(torch, quant.get("compute_dtype", "bfloat16")),
    )


def load_model(cfg: Mapping[str, Any], quant: Mapping[str, Any] | None = None, device_map: Any = None):
    """The base causal LM of a ``model=`` node: from the hub or a local folder, or (``shape_only``) random weights.

    ``shape_only`` builds the architecture from ``cfg.shape`` (or the checkpoint's config.json) without loading
    weights, for benchmarks on hardware that lacks the checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig

    qc = quantization_config(quant)  # errors about quantization come before any weights load
    dtype = getattr(torch, cfg.get("dtype") or "float32")
    # null: transformers picks per architecture (sdpa where it is exact, eager for soft-capped Gemma-2 attention)
    common = {"dtype": dtype, "attn_implementation": cfg.get("attn_implementation")}
    if cfg.get("shape_only"):
        if cfg.get("shape"):
            shape = dict(cfg["shape"])
            kind = shape.pop("model_type", "gpt_neox")
            config = GPTNeoXConfig(**shape) if kind == "gpt_neox" else AutoConfig.for_model(kind, **shape)
        else:
            path = resolve_path(cfg["name_or_path"], cfg.get("tiny_shape"))
            config = AutoConfig.from_pretrained(path, revision=cfg.get("revision"))
        if qc is not None:
            raise ValueError("shape_only builds random weights in memory: it cannot be combined with quant")
        model = AutoModelForCausalLM.from_config(config, **common)
    else:
        path = resolve_path(cfg["name_or_path"], cfg.get("tiny_shape"))
        if common["attn_implementation"] is None:
            kind = AutoConfig.from_pretrained(path, revision=cfg.get("revision")).model_type
            common["attn_implementation"] = ATTN_IMPLEMENTATION.get(kind)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.get("revision"),
            quantization_config=qc,
            device_map=device_map,
            trust_remote_code=bool(cfg.get("trust_remote_code", False)),
            **common,
        )
    if qc is not None and getattr(qc, "load_in_4bit", False):
        _train_safe_4bit(model)
    return model


def _train_safe_4bit(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first eval forward into an
    inference-only layout, after which training fails ("a view of a leaf Variable ..."). Turn that off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def full_finetuning(lora_cfg: Any) -> bool:
    """``lora=none`` (a node without ``_target_``; an experiment's LoRA knobs merged into it are ignored): no adapter,
    every weight of the base trains."""
    return lora_cfg is None or (isinstance(lora_cfg, Mapping) and not lora_cfg.get("_target_"))


def build_trainable_model(
    model_cfg: Mapping[str, Any],
    lora_cfg: Any,
    quant: Mapping[str, Any] | None = None,
    *,
    gradient_checkpointing: bool = False,
    init_adapter: str | None = None,
    tokenizer=None,
):
    """The model to train: base (optionally 8/4-bit) + LoRA with only the adapter trainable (a ``PeftModel``), or, for
    ``lora=none``, the whole base (full fine-tuning).

    With ``tokenizer``, the embeddings grow to its vocabulary when ``model.added_tokens`` made it larger; under LoRA,
    the input embedding and the output head then train whole (``modules_to_save``): a new token's rows start untrained.
    ``init_adapter`` (a PEFT adapter folder) warm-starts: its LoRA weights and settings, trainable again.
    """
    from hydra.utils import instantiate
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    full = full_finetuning(lora_cfg)
    if full and quantization_config(quant) is not None:
        mode = quant["mode"]
        raise ConfigError(f"lora=none trains every weight, which a bitsandbytes {mode} base cannot: use quant=none")
    if full and init_adapter:
        raise ConfigError("init_adapter warm-starts a LoRA adapter: it needs a lora= preset, not lora=none")
    model = load_model(model_cfg, quant=quant)
    model.config.use_cache = False  # training: a KV cache is wasted memory, and it breaks packed position_ids
    if tokenizer is not None:
        fit_vocabulary(model, tokenizer)
    if quantization_config(quant) is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not full:
            model.enable_input_require_grads()
    if full:
        dtype = str(model_cfg.get("dtype") or "float32")
        if dtype != "float32":
            log.warning("lora=none with model.dtype=%s: AdamW updates %s weights directly (no fp32 master copy); "
                        "model.dtype=float32 with trainer.precision=bf16-mixed trains in fp32", dtype, dtype)
        model.requires_grad_(True)
        return model
    config = lora_cfg if isinstance(lora_cfg, LoraConfig) else instantiate(lora_cfg)
    config.target_modules = lora_targets(config.target_modules, model.config.model_type)
    if model_cfg.get("added_tokens"):
        embed, head = embedding_names(model)
        config.modules_to_save = sorted({*(config.modules_to_save or []), embed, *([head] if head else [])})
        config.ensure_weight_tying = tied_embeddings(model)
    if init_adapter:
        return _warm_start(model, config, init_adapter)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # PEFT's "Target modules ... not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, _linear_types())})
        why = " ".join(str(e).split())
        targets = sorted(config.target_modules)
        raise ConfigError(f"lora.target_modules={targets}: {why} Linear layers here: {names}") from None


def fit_vocabulary(model, tokenizer, multiple: int = 64) -> int:
    """Grow the embeddings (and an untied head) to hold every token id of ``tokenizer``; return the row count.

    Spare rows are kept (Polyglot-ko pads 30,003 tokens to 30,080 rows): only a tokenizer that outgrew them resizes,
    to a multiple of ``multiple``. Adapter loading and merging call this with the adapter's tokenizer, so the base
    gets the very shape it was trained with.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple)
        log.info("embeddings resized from %d to %d rows for %d tokens", rows,
                 model.get_input_embeddings().num_embeddings, len(tokenizer))  # fmt: skip
    return model.get_input_embeddings().num_embeddings


def embedding_names(model) -> tuple[str, str | None]:
    """Module names (last segment) of the input embedding and of the output head (``None`` if it has none)."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    return names[id(model.get_input_embeddings())], names.get(id(head)) if head is not None else None


def tied_embeddings(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _warm_start(model, config, folder: str):
    """The base with the adapter in ``folder`` loaded trainable; its LoRA shape must be the configured one."""
    from peft import PeftConfig, PeftModel

    from kullm.adapter import AdapterError, verify_adapter

    path = Path(folder).expanduser()
    try:
        verify_adapter(path)  # safetensors weights, non-empty, plain names
    except AdapterError as e:
        raise ConfigError(f"init_adapter={folder}: {e}") from None
    saved = PeftConfig.from_pretrained(str(path))
    diff = [f"{k}: adapter {getattr(saved, k)!r}, lora.{k} {getattr(config, k)!r}"
            for k in ("r", "lora_alpha") if getattr(saved, k, None) != getattr(config, k)]  # fmt: skip
    if diff:
        raise ConfigError(f"init_adapter={folder} has another LoRA shape ({'; '.join(diff)}): set lora to match")
    return PeftModel.from_pretrained(model, str(path), is_trainable=True, use_safetensors=True)


# The seed's LoRA target per architecture for ``target_modules: auto``; others get every linear layer but the head.
AUTO_TARGETS: dict[str, list[str]] = {"gpt_neox": ["query_key_value"]}
# Attention kernels an architecture needs when ``model.attn_implementation`` is null (Gemma-2 soft-caps its scores,
# which SDPA cannot do); others get transformers' default.
ATTN_IMPLEMENTATION: dict[str, str] = {"gemma2": "eager"}


def lora_targets(targets: Any, model_type: str) -> Any:
    """``auto`` → the seed's target on GPT-NeoX, ``all-linear`` elsewhere; anything else as given."""
    if targets == "auto" or (not isinstance(targets, str) and set(targets or []) == {"auto"}):
        return AUTO_TARGETS.get(model_type, "all-linear")
    return targets


def _linear_types() -> tuple[type, ...]:
    import torch

    types: list[type] = [torch.nn.Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear8bitLt, bnb.nn.Linear4bit]
    except ImportError:
        pass
    return tuple(types)
