"""Tokenizers and base models: hub/local loading (``kullm:tiny`` built by :mod:`kullm.tiny`), quantization, LoRA
wrapping, vocabulary growth, and loading a trained adapter onto its base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kullm.adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError, read_adapter, verify_adapter
from kullm.config import ConfigError, defaults
from kullm.special_tokens import bos_ids
from kullm.tiny import TINY, build_tiny

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "nf4", "fp4")
# The model, LoRA and quantization knobs users type most (kullm.config.validate collects this table).
SCHEMA: dict[str, Any] = {
    "gradient_checkpointing": bool,
    "lora.r": int,
    "lora.lora_alpha": float,
    "lora.lora_dropout": float,
    "quant.mode": QUANT_MODES,
}
MINIMUM: dict[str, float] = {"lora.r": 1}
RANGE: dict[str, str] = {"lora.lora_dropout": "[0, 1)"}
TARGET_NODES = ("lora",)  # instantiated with its _target_ (peft.LoraConfig): its keys must be arguments of it


def resolve_path(name_or_path: str, shape: Mapping[str, Any] | None = None) -> str:
    """A hub id or local path as given; ``kullm:tiny`` becomes the folder of the tiny model (built if needed)."""
    if name_or_path == TINY:
        return str(build_tiny(shape=shape))
    return name_or_path


def load_tokenizer(cfg: Mapping[str, Any]):
    """The tokenizer of a ``model=`` config node, with EOS and pad set explicitly and right padding for training (the
    keys a partial node leaves out are ``conf/model/tiny.yaml``'s, the base of every model preset)."""
    from transformers import AutoTokenizer

    cfg = defaults("model/tiny", cfg)
    path = resolve_path(cfg.tokenizer or cfg.name_or_path, cfg.tiny_shape)
    tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=bool(cfg.trust_remote_code))
    added = [str(t) for t in cfg.added_tokens or []]
    if added:  # before EOS/pad: a preset may make an added token its EOS (a chat marker on a base model)
        new = tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        log.info("model.added_tokens: %d of %d new to the tokenizer (%d tokens now)", new, len(added), len(tok))
    for key in ("eos_token", "pad_token"):
        token = cfg[key]
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


def tokenizer_fingerprint(tok) -> str:
    """A hash of everything about a tokenizer that changes token ids (vocab, merges, normalizer, specials, the BOS
    that prompts begin with)."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    specials = {"eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token, "bos_ids": bos_ids(tok)}
    specials = json.dumps(specials, sort_keys=True)
    return hashlib.sha256((body + specials).encode()).hexdigest()[:16]


def quantization_config(quant: Mapping[str, Any] | None):
    """A ``BitsAndBytesConfig`` for a ``quant=`` node (``None`` for ``quant=none``), checked before weights load (the
    keys a partial node leaves out are ``conf/quant/int8.yaml``'s, or ``nf4.yaml``'s for 4-bit modes)."""
    if not quant or quant["mode"] == "none":
        return None
    import importlib.util

    import torch

    mode = quant["mode"]
    if mode not in QUANT_MODES[1:]:
        raise ValueError(f"quant.mode must be none, int8, nf4 or fp4, got {mode!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"quant={mode} needs bitsandbytes: pip install 'kullm[quant]' (or quant=none)")
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        int8 = defaults("quant/int8", quant)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(int8.llm_int8_threshold))
    four_bit = defaults("quant/nf4", quant)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mode,
        bnb_4bit_use_double_quant=bool(four_bit.double_quant),
        bnb_4bit_compute_dtype=getattr(torch, four_bit.compute_dtype),
    )


def load_model(cfg: Mapping[str, Any], quant: Mapping[str, Any] | None = None, device_map: Any = None):
    """The base causal LM of a ``model=`` node: from the hub or a local folder, or (``shape_only``) random weights.

    ``shape_only`` builds the architecture from ``cfg.shape`` (or the checkpoint's config.json) without loading
    weights, for benchmarks on hardware that lacks the checkpoint. The keys a partial node leaves out are
    ``conf/model/tiny.yaml``'s.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig

    qc = quantization_config(quant)  # errors about quantization come before any weights load
    cfg = defaults("model/tiny", cfg)
    dtype = getattr(torch, cfg.dtype or "float32")
    # null: transformers picks per architecture (sdpa where it is exact, eager for soft-capped Gemma-2 attention)
    common = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if cfg.shape_only:
        if cfg.shape:
            shape = dict(cfg.shape)
            kind = shape.pop("model_type", "gpt_neox")
            config = GPTNeoXConfig(**shape) if kind == "gpt_neox" else AutoConfig.for_model(kind, **shape)
        else:
            path = resolve_path(cfg.name_or_path, cfg.tiny_shape)
            config = AutoConfig.from_pretrained(path, revision=cfg.revision)
        if qc is not None:
            raise ValueError("shape_only builds random weights in memory: it cannot be combined with quant")
        model = AutoModelForCausalLM.from_config(config, **common)
    else:
        path = resolve_path(cfg.name_or_path, cfg.tiny_shape)
        if common["attn_implementation"] is None:
            kind = AutoConfig.from_pretrained(path, revision=cfg.revision).model_type
            common["attn_implementation"] = ATTN_IMPLEMENTATION.get(kind)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            quantization_config=qc,
            device_map=device_map,
            trust_remote_code=bool(cfg.trust_remote_code),
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


def load_adapter(
    folder: str | Path,
    *,
    dtype: str | None = None,
    quant: Mapping | None = None,
    device_map=None,
    trust_remote_code: bool = False,
):
    """Base model + adapter ready for inference: ``(peft_model, tokenizer, prompter)``.

    An adapter folder is shared data, never a source of permissions: ``trust_remote_code`` comes only from the
    caller (the user's own command line or config). A folder whose config asks for it is refused unless the caller
    allows it.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    spec = read_adapter(folder)
    saved = dict(spec.model)  # the folder's own model node (an older kullm's may lack keys: load_model fills them)
    if saved.get("trust_remote_code") and not trust_remote_code:
        raise AdapterError(
            f"{spec.path / CONFIG_FILE}: asks to run the base model's own Python code (model.trust_remote_code: "
            f"true, base {saved.get('name_or_path')!r}); kullm never takes that from a shared folder: pass "
            "trust_remote_code=true on your command line only if you trust that model's code"
        )
    saved["trust_remote_code"] = bool(trust_remote_code)
    if dtype:
        saved["dtype"] = dtype
    saved["shape_only"] = False
    tokenizer = AutoTokenizer.from_pretrained(str(spec.path), trust_remote_code=bool(trust_remote_code))
    base = load_model(saved, quant=quant, device_map=device_map)
    fit_vocabulary(base, tokenizer)  # tokens added in training (model.added_tokens): the trained embedding shape
    try:
        model = PeftModel.from_pretrained(base, str(spec.path), use_safetensors=True)
    except RuntimeError as e:  # PEFT's "size mismatch" (other errors, e.g. out of memory, are not the adapter's)
        if "size mismatch" not in str(e):
            raise
        raise AdapterError(shape_mismatch(spec.path / WEIGHTS_FILE, str(e), saved.get("name_or_path"))) from None
    model.eval()
    return model, tokenizer, spec.prompter


_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[.*?\])\)"
)


def shape_mismatch(path: Path, error: str, base: str | None) -> str:
    """One line for PEFT's "size mismatch" load error: the file, the first tensor, its shape and the base's (any
    other error is returned as it is, on one line)."""
    found = _MISMATCH.findall(error)
    if not found:
        return f"{path}: {' '.join(error.split())}"
    name, got, want = found[0]
    name = name.replace(".default.", ".")  # PEFT's adapter name, which the file's names do not carry
    more = f" (and {len(found) - 1} more tensor(s))" if len(found) > 1 else ""
    return (
        f"{path}: tensor {name} has shape {got} where base model {base!r} needs {want}{more}: an adapter trained "
        "on another base model (or with another LoRA rank)"
    )


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

    model_cfg = defaults("model/tiny", model_cfg)
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
        dtype = str(model_cfg.dtype or "float32")
        if dtype != "float32":
            log.warning("lora=none with model.dtype=%s: AdamW updates %s weights directly (no fp32 master copy); "
                        "model.dtype=float32 with trainer.precision=bf16-mixed trains in fp32", dtype, dtype)
        model.requires_grad_(True)
        return model
    config = lora_cfg if isinstance(lora_cfg, LoraConfig) else instantiate(lora_cfg)
    config.target_modules = lora_targets(config.target_modules, model.config.model_type)
    if model_cfg.added_tokens:
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
