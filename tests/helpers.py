"""What the test modules share (no test module imports another): the checkout's paths, files written for a test,
the configs a test composes (train, generate, merge, eval), a tiny LoRA adapter, the sample chat file and its exact
masks, a gradient comparison, a tiny LoRA model and a Lightning module on it, and the guard that refuses host syncs.
Fixtures built on these live in ``conftest.py``; heavy imports stay inside the helpers that need them."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from chat_server import ChatServer
from torch.utils._python_dispatch import TorchDispatchMode

from kullm.config import compose
from kullm.data.sft import IGNORE_INDEX
from kullm.templates import Prompter

# --- paths --------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]  # the checkout
SHARED_DATA = ROOT.parent / "shared" / "data"  # the real data sets, where ../shared has them
SHARED_EVAL_SET = SHARED_DATA / "kullm" / "user_oriented_instructions_eval.jsonl"
CHAT = ROOT / "data" / "sample_chat"  # the bundled conversations, in both layouts


def write_jsonl(path: Path, rows: list) -> Path:
    """One line per row: a dict as JSON, a string as it is (to write a broken line)."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@functools.cache
def prompter(name: str) -> Prompter:
    return Prompter.from_config(compose("prepare", [f"template={name}", "output_dir=/tmp/unused"]).template)


# --- training runs ------------------------------------------------------------------------------------------------

FAST = ["experiment=smoke", "logger=csv", "callbacks.samples.num=1", "callbacks.samples.max_new_tokens=4"]


def cfg_for(tmp_path, *overrides):
    return compose("train", [*FAST, f"output_dir={tmp_path}", f"data.cache_dir={tmp_path.parent}/cache", *overrides])


def metric_series(out: Path, key: str) -> list[float]:
    with open(out / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


# --- an adapter, and the generate, merge and eval configs that use one ------------------------------------------

ITEMS = [
    "고려대학교에 대해서 알려줘",
    ("다음 글을 한 문장으로 요약하세요.", "한국어는 아름다운 언어이다. 많은 사람들이 한국어를 배운다. " * 3),
    "안녕",
    {"instruction": "파이썬으로 리스트를 정렬하는 함수를 작성하세요.", "input": ""},
    "서울의 날씨는 어때?",
]


def make_adapter(folder: Path) -> Path:
    """A LoRA adapter with non-zero B (so that it changes the logits) on a purely random tiny model, whose greedy
    answers are long and varied (the default tiny model, warmed up on text, soon says '.' and stops)."""
    import peft
    from omegaconf import OmegaConf

    from kullm.adapter import save_adapter
    from kullm.modeling import load_model, load_tokenizer

    cfg = compose("prepare", [f"output_dir={folder.parent}", "model.tiny_shape={warmup_steps: 0}"])
    torch.manual_seed(0)
    model = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora)
    prompter = Prompter.from_config(cfg.template)
    return save_adapter(peft_model, folder, tokenizer=load_tokenizer(cfg.model), prompter=prompter, config=cfg)


def gen_cfg(adapter: Path, *overrides: str):
    return compose(
        "generate",
        [
            f"adapter={adapter}",
            "generation=greedy",
            "generation.max_new_tokens=16",
            "output_dir=/nonexistent",
            *overrides,
        ],
    )


def merge_cfg(adapter: Path, out: Path, *overrides: str):
    return compose("merge", [f"adapter={adapter}", f"out={out}", "max_shard_size=100KB", *overrides])


@functools.cache
def eval_set_file() -> Path:
    """The real 252-item set where ../shared has it; in a user's clone, a synthetic one in the same layout."""
    if SHARED_EVAL_SET.exists():
        return SHARED_EVAL_SET
    path = Path(tempfile.mkdtemp(prefix="kullm-eval-set-")) / "synthetic_eval.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(252):
            inp = f"입력 {i}" if i % 3 == 0 else ""
            row = {"id": f"user_oriented_task_{i}", "instruction": f"지시문 {i}번을 수행하세요.",
                   "instances": [{"input": inp, "output": f"Reference answer {i}."}]}  # fmt: skip
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def eval_cfg(server: ChatServer, out: Path, *overrides: str):
    return compose(
        "eval",
        [
            f"judge.base_url={server.url}",
            f"output_dir={out}",
            f"references={eval_set_file()}",
            "progress=false",
            "judge.backoff_base=0.01",
            "judge.backoff_max=0.05",
            "judge.timeout=2",
            "bootstrap.samples=500",
            *overrides,
        ],
    )


# --- conversations: the sample chat file and its exact masks ------------------------------------------------------


def sample_conversations() -> dict[str, list[tuple[str, str]]]:
    """``data/sample_chat/messages.jsonl`` as ``{id: [(role, content), …]}``."""
    rows = [json.loads(line) for line in (CHAT / "messages.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["id"]: [(m["role"], m["content"]) for m in r["messages"]] for r in rows}


def trained_runs(ids, labels):
    """The runs of consecutive trained tokens (label not ignored) of one example."""
    out, prev = [], IGNORE_INDEX
    for t, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            out.append([t]) if prev == IGNORE_INDEX else out[-1].append(t)
        prev = lab
    return out


def assert_exact_masks(dataset, tok, convs):
    """Every example: one trained run per assistant turn, decoding to its content + EOS; prompts as served."""
    assert len(dataset) > 0
    for ex in dataset:
        turns = convs[ex["id"]]
        answers = [c for r, c in turns if r == "assistant"]
        got = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ex["input_ids"], ex["labels"])]
        assert got == [a + tok.eos_token for a in answers], ex["id"]
        # the prompt of each turn, as apply_chat_template serves it, is the example's tokens up to that turn
        starts = [
            i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX and ex["labels"][i - 1] == IGNORE_INDEX
        ]
        for k, start in zip([k for k, (r, _) in enumerate(turns) if r == "assistant"], starts, strict=True):
            msgs = [{"role": r, "content": c} for r, c in turns[:k]]
            served = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
            assert served["input_ids"] == ex["input_ids"][:start], (ex["id"], k)


# --- gradients, a tiny LoRA model and a Lightning module on it ----------------------------------------------------


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    """Same parameters, each gradient within ``rel`` × the largest entry of ``b``'s (which must not be zero)."""
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        err, scale = (a[k] - b[k]).abs().max().item(), b[k].abs().max().item()
        assert scale > 0 and err <= rel * scale, f"{k}: max abs diff {err:.3g} vs max abs grad {scale:.3g}"


TINY_LORA_SHAPE = {"vocab_size": 96, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "intermediate_size": 32, "max_position_embeddings": 64, "tie_word_embeddings": False}  # fmt: skip


def tiny_lora() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    from kullm.modeling import load_model

    torch.manual_seed(0)
    base = load_model({"name_or_path": "tiny-random", "shape_only": True, "shape": TINY_LORA_SHAPE, "dtype": "float32"})
    # init_lora_weights=False: B != 0, so A and B both get gradients
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["query_key_value", "dense_4h_to_h"],
                      init_lora_weights=False)  # fmt: skip
    return get_peft_model(base, lora)


def module_on(strategy="auto"):
    """A :class:`KullmLitModule` on :func:`tiny_lora`, attached to a CPU trainer with ``strategy``."""
    import lightning as L

    from kullm.training.module import KullmLitModule

    module = KullmLitModule(tiny_lora(), optim={}, loss={})
    module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False,
                               enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return module


# --- the host-sync guard (test_host_sync.py's docstring says what it watches) ------------------------------------

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default}


class HostSync(AssertionError):
    pass


UPSTREAM = "transformers/masking_utils.py"


class RefuseHostSync(TorchDispatchMode):
    """Raise :class:`HostSync` on any operator whose result the host must wait for (``upstream``: those called
    from transformers' mask builder, counted instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.upstream: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = None
        if func in SYNCING or func.overloadpacket in (aten._unique2, aten.repeat_interleave):
            why = f"{func} reads device data on the host"
        elif func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                why = f"{func} with a boolean mask sizes its output from device data"
        if why:
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()]
            if not any(UPSTREAM in f for f in frames):
                raise HostSync(why + " at " + " <- ".join(reversed(frames[-6:-1])))
            self.upstream.append(next(f for f in reversed(frames) if UPSTREAM in f))
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync():
    def refuse(self, *args, **kwargs):
        raise HostSync("Tensor.tolist/numpy reads device data on the host")

    with pytest.MonkeyPatch.context() as mp, RefuseHostSync() as mode:
        mp.setattr(torch.Tensor, "tolist", refuse)
        mp.setattr(torch.Tensor, "numpy", refuse)
        yield mode
