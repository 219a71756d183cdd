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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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

    The folder name is a hash of the shape and the tokenizer corpus, so a change of either builds anew; the build
    is written to a temporary folder and renamed, so concurrent builders (DDP ranks, xdist) never see half a model.
    """
    shape = {**TINY_SHAPE, **(shape or {})}
    corpus = (ASSETS / "tiny_corpus.txt").read_text(encoding="utf-8")
    key = hashlib.sha256((json.dumps(shape, sort_keys=True) + corpus).encode()).hexdigest()[:12]
    out = Path(out) if out is not None else cache_root() / "models" / f"tiny-{key}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = train_tiny_tokenizer(corpus.splitlines(), vocab_size=shape["tokenizer_vocab"])
    torch.manual_seed(shape["seed"])
    cfg = GPTNeoXConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        intermediate_size=shape["intermediate_size"],
        rotary_pct=shape["rotary_pct"],
        max_position_embeddings=shape["max_position_embeddings"],
        use_parallel_residual=shape["use_parallel_residual"],
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(cfg)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the tiny model in %s", out)
    return out


def train_tiny_tokenizer(lines: list[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer (any text round-trips) with Polyglot-ko's special tokens, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def load_tokenizer(cfg: Mapping[str, Any]):
    """The tokenizer of a ``model=`` config node, with EOS and pad set explicitly and right padding for training."""
    from transformers import AutoTokenizer

    path = resolve_path(cfg.get("tokenizer") or cfg["name_or_path"], cfg.get("tiny_shape"))
    tok = AutoTokenizer.from_pretrained(
        path,
        revision=cfg.get("revision"),
        trust_remote_code=bool(cfg.get("trust_remote_code", False)),
    )
    if cfg.get("eos_token"):
        tok.eos_token = cfg["eos_token"]
    if cfg.get("pad_token"):
        tok.pad_token = cfg["pad_token"]
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {path} has no EOS token: set model.eos_token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # labels never derive from pad, so sharing the id is safe
    tok.padding_side = "right"
    return tok


def tokenizer_fingerprint(tok) -> str:
    """A hash of everything about a tokenizer that changes token ids (vocab, merges, normalizer, specials)."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    specials = json.dumps({"eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token}, sort_keys=True)
    return hashlib.sha256((body + specials).encode()).hexdigest()[:16]
