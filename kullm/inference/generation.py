"""Generation: a model, its tokenizer and template in; answers out (one prompt, a JSONL file, or a terminal chat).

A conversation (OpenAI ``messages`` / ShareGPT rows, or a chat's history) is rendered up to its last user turn
through the tokenizer's ``chat_template`` (an adapter's renders the template it was trained on); the answer is the
next assistant turn, cut at the model's end-of-turn tokens.

Batches are left-padded with an attention mask (GPT-NeoX derives position ids from it during ``generate``) and
sorted by prompt length; answers come back in input order. File runs go through the file in windows of
``WINDOW_BATCHES`` batches and append one JSON line per record, in input order, as each window finishes; a re-run
with the same ``output_file`` skips the ids already there, so a killed run resumes.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.data.chat import as_messages, split_reference
from kullm.data.records import DataError, Record, Reject, check_source, read_records, write_rejects
from kullm.modeling import bos_ids, eos_token_ids, with_bos
from kullm.resumable import AppendLog, read_done
from kullm.templates import Prompter
from kullm.untrusted import TemplateBoundError, render_chat

log = logging.getLogger(__name__)

Item = Record | Mapping[str, Any] | tuple[str, str] | str
Messages = list[dict[str, str]]  # a conversation: [{"role": "user" | "assistant" | "system", "content": ...}, ...]
BatchCallback = Callable[[list[int], list[str]], None]
# settings that may change between a run and its resumption without changing the answers
RESUMABLE_KEYS = ("batch_size",)
# a file run generates this many batches at a time (sorted by length among themselves) and then appends their rows
# in input order: the output file follows the input file, and a kill loses at most the window in progress
WINDOW_BATCHES = 4


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
        self.settings = dict(settings)
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
        if self.chat_only:  # as training made an instruction row a conversation (kullm.data.turns.record_turns)
            user = instruction + (f"\n\n{input_}" if input_ else "")
            return render_chat(self.tokenizer, [{"role": "user", "content": user}])
        return self.prompter.render(instruction, input_)

    def encode(self, prompt: str) -> list[int]:
        """A prompt's ids as training made them: after the tokenizer's BOS, unless its chat template rendered it."""
        return with_bos(self.bos, self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def budget(self, prompt_len: int) -> int:
        """New tokens allowed for a prompt: ``max_new_tokens``, else ``max_length`` minus the prompt's own length."""
        if self.settings.get("max_new_tokens"):
            return int(self.settings["max_new_tokens"])
        return max(int(self.settings.get("max_length") or 512) - prompt_len, 0)

    def generate(
        self, items: Sequence[Item], batch_size: int | None = None, on_batch: BatchCallback | None = None
    ) -> list[str]:
        """Answers to ``items`` in input order; ``on_batch(indices, answers)`` is called as each batch finishes."""
        prompts = [self.render(x) for x in items]
        ids = [self.encode(p) for p in prompts]
        size = int(batch_size or self.settings.get("batch_size") or 1)
        if size < 1:
            raise ValueError(f"generation.batch_size={size}: must be at least 1")
        if (self.config.num_beams or 1) > 1 and not self.settings.get("batch_beams"):
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


def left_pad(batch: list[list[int]], pad_id: int):
    """``(input_ids, attention_mask)`` with every row right-aligned, so that generated tokens follow each prompt."""
    import torch

    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, x in enumerate(batch):
        if x:
            input_ids[r, width - len(x) :] = torch.tensor(x)
            mask[r, width - len(x) :] = 1
    return input_ids, mask


def generation_config(model, settings: Mapping[str, Any], eos_ids: list[int], pad_id: int):
    """A ``GenerationConfig``: the model's own, with kullm's settings and the tokenizer's EOS/pad."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    sample = bool(settings.get("do_sample"))
    config.update(
        do_sample=sample,
        num_beams=int(settings.get("num_beams") or 1),
        repetition_penalty=float(settings.get("repetition_penalty") or 1.0),
        no_repeat_ngram_size=int(settings.get("no_repeat_ngram_size") or 0),
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=pad_id,
    )
    # temperature/top_p/top_k only mean something when sampling; set otherwise they only trigger warnings
    for key in ("temperature", "top_p", "top_k"):
        setattr(config, key, settings.get(key) if sample else None)
    return config


def resolve_device(device: str | None) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; a requested but missing GPU is an error."""
    import torch

    device = device or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device}, but torch sees no CUDA GPU: use device=cpu or device=auto")
    return device


def load_for_generation(cfg: DictConfig):
    """``(model, tokenizer, prompter, label)`` for ``adapter=``, ``base=`` or the ``model`` group, on cfg's device."""
    from kullm.adapter import load_adapter
    from kullm.modeling import load_model, load_tokenizer

    if cfg.adapter and cfg.base:
        raise ValueError("give adapter=<folder> or base=<checkpoint>, not both (an adapter names its own base)")
    device = resolve_device(cfg.device)
    quant = OmegaConf.to_container(cfg.quant, resolve=True) if cfg.get("quant") else None
    quantized = bool(quant) and quant.get("mode", "none") != "none"
    device_map = cfg.device_map or ({"": device} if quantized else None)
    if cfg.adapter:
        model, tokenizer, prompter = load_adapter(
            cfg.adapter,
            dtype=cfg.dtype,
            quant=quant,
            device_map=device_map,
            trust_remote_code=bool(cfg.get("trust_remote_code", False)),
        )
        label = str(Path(cfg.adapter).expanduser().resolve())
    else:
        node = model_node(cfg)
        model = load_model(node, quant=quant, device_map=device_map)
        model.eval()
        tokenizer = load_tokenizer(node)
        prompter = folder_prompter(node["name_or_path"]) or Prompter.from_config(cfg.template)
        name = Path(str(node["name_or_path"])).expanduser()
        label = str(name.resolve()) if name.exists() else str(node["name_or_path"])
    if device_map is None:
        model.to(device)
    log.info("generating with %s on %s (%s)", label, model.device, model.dtype)
    return model, tokenizer, prompter, label


def model_node(cfg: DictConfig) -> dict[str, Any]:
    """The ``model`` group node, or one for ``base=`` (its tokenizer, EOS and pad are the checkpoint's own)."""
    node = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.base:
        base = str(cfg.base)
        node.update(
            name=Path(base).name,
            name_or_path=base,
            revision=None,
            tokenizer=None,
            eos_token=None,
            pad_token=None,
            shape_only=False,
            dtype=cfg.dtype or checkpoint_dtype(base),
        )
    elif cfg.dtype:
        node["dtype"] = cfg.dtype
    return node


def checkpoint_dtype(name_or_path: str) -> str:
    """The dtype a checkpoint was saved in (``float32`` when its config does not say)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(name_or_path), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def trained_on_chat_template(folder: str | None) -> bool:
    """Whether the adapter or merged folder was trained with the tokenizer's own chat template (its
    ``kullm_config.yaml`` says ``data.chat_template: tokenizer``)."""
    from kullm.adapter import CONFIG_FILE
    from kullm.untrusted import read_yaml

    path = Path(str(folder or "")).expanduser() / CONFIG_FILE
    if not folder or not path.is_file():
        return False
    config = read_yaml(path)  # a shared folder's file: plain data, bounded
    data = (config.get("data") if isinstance(config, dict) else None) or {}
    return isinstance(data, dict) and data.get("chat_template") == "tokenizer"


def folder_prompter(name_or_path: str) -> Prompter | None:
    """The ``template.yaml`` that ``kullm-merge`` leaves in a merged folder, if there is one."""
    path = Path(name_or_path) / "template.yaml"
    return Prompter.from_file(path) if path.is_file() else None


def check_settings(path: Path, done: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]) -> None:
    """Refuse to resume a file that was written with other generation settings (one file, one set of settings)."""

    def key(s: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in s.items() if k not in RESUMABLE_KEYS}

    for rid, row in done.items():
        old = row.get("generation") or {}
        if key(old) != key(settings):
            diff = {k: (old.get(k), settings.get(k)) for k in key({**old, **settings}) if old.get(k) != settings.get(k)}
            raise ValueError(
                f"{path}: id {rid} was generated with other settings {diff} (old, new): "
                "resume with the same settings, or write to another output_file"
            )


def run_file(
    generator: Generator,
    input_file: str | Path,
    output_file: str | Path,
    *,
    fields: Mapping[str, str] | None = None,
    policy: str = "skip",
    batch_size: int | None = None,
    progress: bool = True,
    roles: Mapping[str, str] | None = None,
) -> Path:
    """Generate an answer for every record of ``input_file`` not yet in ``output_file``, appending in input order as
    each window of ``WINDOW_BATCHES`` batches finishes.

    Flat and self-instruct rows give ``{id, instruction, input, response}`` rows; conversations (OpenAI
    ``messages`` / ShareGPT, ``roles`` naming extra ShareGPT roles) give ``{id, messages, response}`` with
    ``messages`` the history the answer follows (system and turns up to the last user turn) and ``reference`` the
    conversation's own last assistant turn, when it has one. A conversation the template cannot render (a
    single-turn template, no ``chat_template``) is a reject like a malformed row.
    """
    from tqdm.auto import tqdm

    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    rejects = output_file.with_name(output_file.stem + ".rejects.jsonl")
    check_source(input_file, "files")
    records, report = read_records(
        input_file,
        fields=fields,
        policy=policy,
        require_output=False,
        allow_empty_output=True,
        content_ids=True,
        roles=roles,
        open_conversations=True,
    )
    records = _renderable(generator, records, report, policy)
    if report.rejects:
        write_rejects(report.rejects, rejects)
    if not records:
        raise DataError(
            f"{input_file}: no usable row ({report.n_rejected} rejected: {dict(report.rejected)}; see {rejects})"
        )
    for reject in report.rejects:
        log.warning("skipped %s", reject)
    settings = {**generator.settings, "model": generator.label}
    done = read_done(output_file, "response")
    check_settings(output_file, done, settings)
    todo = [r for r in records if r.id not in done]
    n_done = len(records) - len(todo)
    log.info("%s: %d records, %d already in %s, %d to go", input_file, len(records), n_done, output_file, len(todo))
    bar = tqdm(total=len(records), initial=n_done, unit="rec", disable=not progress)
    window = max(int(batch_size or generator.settings.get("batch_size") or 1), 1) * WINDOW_BATCHES
    with AppendLog(output_file) as out:
        for start in range(0, len(todo), window):  # input order between windows, length order inside each
            part = todo[start : start + window]
            answers = generator.generate(part, batch_size=batch_size, on_batch=lambda i, _: bar.update(len(i)))
            for rec, answer in zip(part, answers, strict=True):
                out.write({**response_row(rec, answer), "generation": settings})
    bar.close()
    if report.rejects:
        log.warning("%d bad row(s) skipped; see %s", report.n_rejected, rejects)
    return output_file


def response_row(rec: Record, answer: str) -> dict[str, Any]:
    """What a file run writes for one record (without the settings): the id, what was asked, the answer."""
    if not rec.turns:
        return {"id": rec.id, "instruction": rec.instruction, "input": rec.input, "response": answer}
    history, reference = split_reference(rec.turns)
    row = {"id": rec.id, "messages": as_messages(history), "response": answer}
    return row if reference is None else {**row, "reference": reference}


def _renderable(generator: Generator, records: list[Record], report, policy: str) -> list[Record]:
    """The records whose prompt the generator can render; the others become rejects (``unrenderable``)."""
    from jinja2 import TemplateError

    kept = []
    for rec in records:
        try:
            generator.render(rec)
        except TemplateBoundError:  # the template's fault, not the row's: every row would hit it
            raise
        except (TemplateError, ValueError) as e:
            field = "messages" if rec.turns else "instruction"
            if policy == "strict":
                raise DataError(f"{rec.source}: {field}: unrenderable: {e}") from None
            report.rejected["unrenderable"] += 1
            report.rejects.append(Reject(rec.source, "unrenderable", field, str(e), json.dumps(rec.id)))
            continue
        kept.append(rec)
    return kept


def generate_file(cfg: DictConfig) -> Path:
    """Answer every record of ``cfg.input_file`` into ``cfg.output_file`` (resuming it); return the output path."""
    if not cfg.input_file:
        raise ValueError("generate_file needs input_file=<jsonl>")
    output = Path(cfg.output_file or Path(cfg.output_dir) / "responses.jsonl")
    check_source(cfg.input_file, "files")  # before the model loads
    generator = Generator.from_config(cfg)
    seed_everything(cfg.generation.get("seed"))
    fields = OmegaConf.to_container(cfg.fields, resolve=True) if cfg.get("fields") else None
    roles = OmegaConf.to_container(cfg.roles, resolve=True) if cfg.get("roles") else None
    return run_file(generator, cfg.input_file, output, fields=fields, policy=cfg.get("policy") or "skip", roles=roles)


def seed_everything(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(int(seed))


def chat(generator: Generator, lines: Iterable[str] | None = None, write: Callable[[str], Any] | None = None) -> None:
    """A terminal chat, streaming tokens; an empty line, ``/exit`` or end of input (Ctrl-D) quits with a goodbye,
    and so does Ctrl-C, whose ``KeyboardInterrupt`` is raised again after it (the CLI exits with 130).

    The conversation so far is rendered through the tokenizer's ``chat_template`` (an adapter's renders the template
    it was trained on, turns included); without one, or with a single-turn template, each line is answered alone.
    """
    from jinja2 import TemplateError

    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    multi_turn = bool(getattr(generator.tokenizer, "chat_template", None))
    how = "keeps the conversation" if multi_turn else "answers each line alone (the tokenizer has no chat template)"
    write(f"kullm chat with {generator.label}: {how} (an empty line, /exit, Ctrl-D or Ctrl-C quits)\n")
    source = iter(lines) if lines is not None else None
    history: Messages = []
    try:
        while True:
            write("\n>>> ")
            line = next(source, None) if source is not None else sys.stdin.readline()
            if not line or not line.strip() or line.strip() == "/exit":
                break
            turn = [*history, {"role": "user", "content": line.strip()}]
            if multi_turn:
                try:
                    generator.render(turn)
                except TemplateError as e:  # a single-turn template refuses a second exchange
                    write(f"(the template is single-turn, {e}: answering this line on its own)\n")
                    multi_turn, turn = False, turn[-1:]
            answer = "".join(_echo(generator.stream(turn if multi_turn else line.strip()), write))
            history = [*turn, {"role": "assistant", "content": answer}] if multi_turn else []
            write("\n")
    except KeyboardInterrupt:
        write("\nbye\n")
        raise
    write("\nbye\n")


def _echo(pieces: Iterable[str], write: Callable[[str], Any]) -> Iterator[str]:
    for piece in pieces:
        write(piece)
        yield piece
