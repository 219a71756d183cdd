"""A model's special tokens as kullm uses them: the BOS every prompt begins with, and the stop tokens (EOS) a
saved checkpoint carries so that it ends its answers when served without kullm."""

from __future__ import annotations

from collections.abc import Sequence


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
