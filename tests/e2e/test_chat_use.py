"""The chat recipe end to end with the real CLIs, per model family (tiny Llama, tiny Qwen2, each with its chat
template): kullm-train on an OpenAI messages file and on a ShareGPT file, the terminal chat over several turns,
kullm-merge (the merged checkpoint answers like adapter + base), kullm-generate on a conversation file and kullm-eval
judging the multi-turn answers against a local chat-completions server."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from chat_server import ChatServer, default_scores
from helpers import CHAT, assert_exact_masks, sample_conversations
from transformers import AutoTokenizer

from kullm.config import compose
from kullm.inference.generator import Generator
from kullm.tiny import FAMILIES

# a random base under a random LoRA (a warmed-up tiny model soon answers "." and stops): greedy answers that are
# long and differ from prompt to prompt, so the comparisons below compare something
TRAIN = ["experiment=smoke", "logger=csv", "trainer.max_steps=3", "data.val_set_size=0", "data.cutoff_len=1024",
         "callbacks.samples.num=0", "+model.tiny_shape.warmup_steps=0", "+lora.init_lora_weights=false"]  # fmt: skip
GREEDY = ["generation=greedy", "generation.max_new_tokens=8"]
LINES = ["안녕하세요", "한국의 수도는 어디인가요?", "그 도시의 유명한 음식을 알려 주세요"]


def kullm(module: str, *args: str, cwd: Path, stdin: str | None = None, timeout: int = 300) -> str:
    """Run ``python -m kullm.<module>`` (what the console script runs); its stdout, or the failure's stderr."""
    cmd = [sys.executable, "-m", f"kullm.{module}", *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    return proc.stdout


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def chat_turns(stdout: str) -> list[str]:
    """The answers a terminal chat printed: the text between one ``>>> `` prompt and the next."""
    return [part.removesuffix("\n") for part in stdout.split("\n>>> ")[1:-1]]


def expected_chat(adapter: Path) -> tuple[list[str], list[str]]:
    """The answers the chat must give, each streamed after the whole conversation before it; and, to show that the
    history changes them, each line's answer alone."""
    generator = Generator.from_config(compose("generate", [f"adapter={adapter}", *GREEDY]))
    history: list[dict] = []
    answers = []
    for line in LINES:
        history.append({"role": "user", "content": line})
        answers.append("".join(generator.stream(history)))
        history.append({"role": "assistant", "content": answers[-1]})
    alone = ["".join(generator.stream([{"role": "user", "content": line}])) for line in LINES]
    return answers, alone


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_chat_model_trains_chats_merges_and_is_judged(tmp_path, arch):
    model = f"model=tiny-{arch}"
    family_template = FAMILIES[arch]["chat_template"]
    # 1. train: the messages file with the model's own chat template, the ShareGPT file with kullm's
    runs = {}
    for name, extra in (("messages.jsonl", ["data.chat_template=tokenizer"]), ("sharegpt.json", [])):
        out, cache = tmp_path / name.split(".")[0], tmp_path / f"cache-{name}"
        printed = kullm("train", *TRAIN, model, f"data.path={CHAT / name}", *extra, f"hydra.run.dir={out}",
                        f"data.cache_dir={cache}", cwd=tmp_path)  # fmt: skip
        adapter = out / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file(), printed
        # what it trained on (kullm's cache of the processed data): every conversation, exact per-turn masks
        (processed,) = cache.iterdir()
        stats = json.loads((processed / "stats.json").read_text(encoding="utf-8"))
        assert stats["read"]["conversations"] == stats["encoded"]["train"]["kept"] == 17
        assert stats["invariant_violations"] == 0
        dataset = datasets.load_from_disk(str(processed / "dataset"))["train"]
        assert_exact_masks(dataset, AutoTokenizer.from_pretrained(adapter), sample_conversations())
        runs[name] = adapter
    served = {n: AutoTokenizer.from_pretrained(a).chat_template for n, a in runs.items()}
    assert served["messages.jsonl"] == family_template
    assert "kullm template kullm" in served["sharegpt.json"]

    # 2. chat back over several turns, each answer after the conversation so far (both adapters)
    for adapter in runs.values():
        stdout = kullm("generate", f"adapter={adapter}", *GREEDY, f"hydra.run.dir={tmp_path / 'chat'}",
                       cwd=tmp_path, stdin="\n".join([*LINES, "/exit"]) + "\n")  # fmt: skip
        assert "keeps the conversation" in stdout
        expected, alone = expected_chat(adapter)
        assert chat_turns(stdout) == expected and all(expected)
        assert expected[0] == alone[0] and expected[1:] != alone[1:]

    # 3. merge; the merged checkpoint answers a conversation file like adapter + base, greedy, batched
    adapter = runs["messages.jsonl"]
    merged = tmp_path / "merged"
    kullm("merge", f"adapter={adapter}", f"out={merged}", f"hydra.run.dir={tmp_path / 'merge'}", cwd=tmp_path)
    assert AutoTokenizer.from_pretrained(merged).chat_template == family_template
    answers = {}
    for how, source in (("adapter", f"adapter={adapter}"), ("merged", f"base={merged}")):
        out = tmp_path / f"{how}.responses.jsonl"
        kullm("generate", source, f"input_file={CHAT / 'sharegpt.json'}", f"output_file={out}", *GREEDY,
              "generation.batch_size=6", f"hydra.run.dir={tmp_path / how}", cwd=tmp_path)  # fmt: skip
        answers[how] = {r["id"]: (r["messages"], r["response"]) for r in rows(out)}
    assert len(answers["adapter"]) == 17 and answers["merged"] == answers["adapter"]
    assert len({response for _, response in answers["adapter"].values()}) > 5
    convs = {r["id"]: r["messages"] for r in rows(CHAT / "messages.jsonl")}
    assert all(msgs == convs[rid][:-1] for rid, (msgs, _) in answers["adapter"].items())

    # 4. judge the multi-turn answers (a real HTTP judge on 127.0.0.1)
    out = tmp_path / "eval"
    with ChatServer() as server:
        kullm("evaluate", f"responses={tmp_path / 'adapter.responses.jsonl'}", f"judge.base_url={server.url}",
              f"output_dir={out}", "references=null", "progress=false", "bootstrap.samples=100",
              cwd=tmp_path)  # fmt: skip
        asked = [r["messages"][1]["content"] for r in server.requests]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    (run,) = summary["runs"].values()
    assert (run["total"], run["judged"], run["failed"]) == (17, 17, 0)
    responses = [response for _, response in answers["adapter"].values()]
    means = {k: sum(default_scores(r)[k] for r in responses) / 17 for k in run["means"]}
    assert run["means"] == pytest.approx(means)
    multi = [msgs for msgs, _ in answers["adapter"].values() if sum(m["role"] == "user" for m in msgs) > 1]
    assert multi and all(
        any(f"Instruction:\n{m[-1]['content']}\n\nInput:\n" in a and m[-2]["content"] in a for a in asked)
        for m in multi
    )
