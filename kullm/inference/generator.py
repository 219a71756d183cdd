"""The generation engine: a model, its tokenizer and template in; answers out.

A conversation (OpenAI ``messages`` / ShareGPT rows, or a chat's history) is rendered up to its last user turn
through the tokenizer's ``chat_template`` (an adapter's renders the template it was trained on); the answer is the
next assistant turn, cut at the model's end-of-turn tokens.

Batches are left-padded with an attention mask (GPT-NeoX derives position ids from it during ``generate``) and
sorted by prompt length; answers come back in input order. Loading lives in :mod:`kullm.inference.loading`, file
runs in :mod:`kullm.inference.files`, the terminal chat in :mod:`kullm.inference.chat`.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.config import defaults
from kullm.data.conversations import as_messages, split_reference
from kullm.data.records import Record
from kullm.inference.batching import left_pad
from kullm.inference.loading import load_for_generation, trained_on_chat_template
from kullm.special_tokens import bos_ids, eos_token_ids, with_bos
from kullm.templates import Prompter
from kullm.untrusted import render_chat

log = logging.getLogger(__name__)

Item = Record | Mapping[str, Any] | tuple[str, str] | str
Messages = list[dict[str, str]]  # a conversation: [{"role": "user" | "assistant" | "system", "content": ...}, ...]
BatchCallback = Callable[[list[int], list[str]], None]

# The generation.* knobs users type most (kullm.config.validate collects this table).
SCHEMA: dict[str, Any] = {
    "generation.batch_size": int,
    "generation.num_beams": int,
    "generation.max_length": int,
    "generation.max_new_tokens": int,
    "generation.top_p": float,
}
MINIMUM: dict[str, float] = {
    "generation.batch_size": 1,
    "generation.num_beams": 1,
    "generation.max_length": 1,
    "generation.max_new_tokens": 1,
}
RANGE: dict[str, str] = {"generation.top_p": "(0, 1]"}


class Generator:
    """A model, its tokenizer and template, and the generation settings: prompts in, answers out.

    Items are a :class:`Record`, a mapping with ``instruction`` (and ``input``), an ``(instruction, input)`` pair,
    or a plain instruction string, each rendered with the template; or a conversation (a record with turns, or a
    list of messages), rendered up to its last user turn with the tokenizer's ``chat_template``. ``chat_only``: the
    model was trained on the tokenizer's own chat template (``data.chat_template=tokenizer``), so an instruction is
    rendered as it was trained, one user turn (instruction, then its input) through that template.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompter: Prompter,
        settings: Mapping[str, Any],
        label: str = "",
        chat_only: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.chat_only = chat_only
        # a generation= node; the keys a partial one leaves out are conf/generation/default.yaml's
        self.settings = OmegaConf.to_container(defaults("generation/default", settings), resolve=True)
        self.label = label
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.bos = bos_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.config = generation_config(model, self.settings, self.eos_ids, self.pad_id)
        self._warned_beams = False

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Generator:
        """Load the adapter (or ``base``, or the ``model`` group) named by a ``generate`` config."""
        model, tokenizer, prompter, label = load_for_generation(cfg)
        chat_only = trained_on_chat_template(cfg.adapter or cfg.base)
        settings = OmegaConf.to_container(cfg.generation, resolve=True)
        return cls(model, tokenizer, prompter, settings, label, chat_only=chat_only)

    @property
    def device(self):
        return self.model.device

    def render(self, item: Item | Messages) -> str:
        """The prompt for one item, or for the next answer of a conversation (through the tokenizer's
        ``chat_template``: an adapter's renders the template it was trained on).

        Without a ``chat_template``, a conversation of one user turn is rendered as a single-turn prompt (what
        training made of it); a longer one raises ``ValueError``.
        """
        if isinstance(item, Record) and item.turns:
            item = as_messages(split_reference(item.turns)[0])
        if isinstance(item, list):
            if getattr(self.tokenizer, "chat_template", None):
                return render_chat(self.tokenizer, item)
            if len(item) != 1 or item[0]["role"] != "user":
                raise ValueError(
                    f"the tokenizer has no chat_template, so a conversation of {len(item)} turns cannot be rendered "
                    "(train with a multi-turn template, or give one user turn)"
                )
            item = item[0]["content"]
        instruction, input_ = item_text(item)
        if self.chat_only:  # as training made an instruction row a conversation (kullm.data.sft_chat.record_turns)
            user = instruction + (f"\n\n{input_}" if input_ else "")
            return render_chat(self.tokenizer, [{"role": "user", "content": user}])
        return self.prompter.render(instruction, input_)

    def encode(self, prompt: str) -> list[int]:
        """A prompt's ids as training made them: after the tokenizer's BOS, unless its chat template rendered it."""
        return with_bos(self.bos, self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def budget(self, prompt_len: int) -> int:
        """New tokens allowed for a prompt: ``max_new_tokens``, else ``max_length`` minus the prompt's own length."""
        if self.settings["max_new_tokens"]:
            return int(self.settings["max_new_tokens"])
        return max(int(self.settings["max_length"] or 512) - prompt_len, 0)

    def generate(
        self, items: Sequence[Item], batch_size: int | None = None, on_batch: BatchCallback | None = None
    ) -> list[str]:
        """Answers to ``items`` in input order; ``on_batch(indices, answers)`` is called as each batch finishes."""
        prompts = [self.render(x) for x in items]
        ids = [self.encode(p) for p in prompts]
        size = int(batch_size or self.settings["batch_size"] or 1)
        if size < 1:
            raise ValueError(f"generation.batch_size={size}: must be at least 1")
        if (self.config.num_beams or 1) > 1 and not self.settings["batch_beams"]:
            # a beam-search batch runs to its longest budget and its beams compete over it, so answers differ from
            # one prompt at a time: beams go one prompt at a time unless generation.batch_beams=true
            size = 1
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: out-of-memory shows at once
        answers: list[str] = [""] * len(ids)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            texts = self._generate_batch([ids[i] for i in chunk])
            for i, text in zip(chunk, texts, strict=True):
                answers[i] = self.prompter.extract(prompts[i] + text, prompts[i])
            if on_batch is not None:
                on_batch(chunk, [answers[i] for i in chunk])
        return answers

    def _generate_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.complete(batch)]

    def complete(self, batch: list[list[int]]) -> list[list[int]]:
        """New token ids for one left-padded batch of prompt ids, each cut at its own budget and before its EOS."""
        import torch

        budgets = [self.budget(len(x)) for x in batch]
        for x, b in zip(batch, budgets, strict=True):
            if b == 0:
                log.warning("a prompt of %d tokens leaves nothing of max_length: set generation.max_new_tokens", len(x))
        if max(budgets) == 0:
            return [[] for _ in batch]
        input_ids, mask = left_pad(batch, self.pad_id)
        config = copy.deepcopy(self.config)
        config.max_new_tokens = max(budgets)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), generation_config=config
            )
        new = out[:, input_ids.shape[1] :].tolist()
        return [until_eos(row[:b], self.eos_ids) for row, b in zip(new, budgets, strict=True)]

    def stream(self, item: Item | Messages) -> Iterator[str]:
        """Yield the answer to one item in pieces as tokens are generated (beam search falls back to one beam)."""
        import torch
        from transformers import TextIteratorStreamer

        ids = self.encode(self.render(item))
        budget = self.budget(len(ids))
        if budget == 0:
            return
        config = copy.deepcopy(self.config)
        config.max_new_tokens = budget
        if (config.num_beams or 1) > 1:
            if not self._warned_beams:
                log.info("streaming decodes with one beam (num_beams=%d is not streamable)", config.num_beams)
                self._warned_beams = True
            config.num_beams = 1
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        stop = threading.Event()

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        input_ids=torch.tensor([ids], device=self.device),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                        generation_config=config,
                        streamer=streamer,
                        stopping_criteria=_stopping_on(stop),
                    )
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:  # also when the reader stops early (Ctrl-C in a chat): the generation stops with it
            stop.set()
            thread.join()
        if errors:
            raise errors[0]


def _stopping_on(event: threading.Event):
    """``generate``'s stopping criteria: every sequence ends once ``event`` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class EventSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([EventSet()])


def item_text(item: Item) -> tuple[str, str]:
    """``(instruction, input)`` of a generation item."""
    if isinstance(item, str):
        return item, ""
    if isinstance(item, Record):
        return item.instruction, item.input
    if isinstance(item, tuple):
        return item[0], item[1] or ""
    if isinstance(item, Mapping):
        return str(item["instruction"]), str(item.get("input") or "")
    raise TypeError(f"cannot generate from a {type(item).__name__}: give a Record, a mapping or a string")


def until_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    """Generated ids up to (not including) the first EOS; the padding that follows an EOS in a batch goes with it."""
    stop = next((k for k, t in enumerate(ids) if t in eos_ids), len(ids))
    return ids[:stop]


def generation_config(model, settings: Mapping[str, Any], eos_ids: list[int], pad_id: int):
    """A ``GenerationConfig``: the model's own, with kullm's settings and the tokenizer's EOS/pad."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    sample = bool(settings["do_sample"])
    config.update(
        do_sample=sample,
        num_beams=int(settings["num_beams"] or 1),
        repetition_penalty=float(settings["repetition_penalty"] or 1.0),
        no_repeat_ngram_size=int(settings["no_repeat_ngram_size"] or 0),
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=pad_id,
    )
    # temperature/top_p/top_k only mean something when sampling; set otherwise they only trigger warnings
    for key in ("temperature", "top_p", "top_k"):
        setattr(config, key, settings[key] if sample else None)
    return config


def seed_everything(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(int(seed))
