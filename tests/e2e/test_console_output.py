"""What a user sees from the installed console scripts, run from a folder of theirs: kullm's own lines and bars,
and none of the third-party notices that ask nothing of them (README: they are filtered)."""

import json
import re

import pytest
from chat_server import ChatServer
from console_scripts import run_script

# what each notice looks like on the screen, by what printed it
NOISE = {
    "bitsandbytes: optional kernels (and 'Set trust_remote_code=True')": r"kernels-community|trust_remote_code=True",
    "a Python FutureWarning (transformers, torch)": r"FutureWarning",
    "transformers' gradient-checkpointing rename": r"is_gradient_checkpointing",
    "torch's _pytree deprecation through Lightning": r"_pytree|LeafSpec",
    "DeepSpeed's accelerator line": r"Setting (ds_)?accelerator to",
    "W&B's deprecated 'anonymous' setting": r"anonymous setting",
    "Lightning's model summary with FLOPs 0": r"FLOPs",
    "Lightning's ad": r"Tip: For seamless",
    "one httpx line per judge request": r"HTTP Request:",
    "a traceback": r"Traceback",
}


def screen(proc) -> str:
    """What the terminal showed: stdout and stderr, progress bars' carriage returns as line ends."""
    return (proc.stdout + proc.stderr).replace("\r", "\n")


def assert_no_noise(proc) -> None:
    shown = screen(proc)
    found = {what: re.search(p, shown).group(0) for what, p in NOISE.items() if re.search(p, shown)}
    assert not found, f"third-party notices on screen: {found}\n{shown[-3000:]}"


@pytest.mark.slow
def test_generate_and_merge_show_no_third_party_notices(adapter, tmp_path):
    gen = run_script("kullm-generate", f"adapter={adapter}", "prompt=안녕하세요", "generation=greedy",
                     "generation.max_new_tokens=4", cwd=tmp_path, timeout=180)  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert_no_noise(gen)
    merged = run_script("kullm-merge", f"adapter={adapter}", f"out={tmp_path / 'merged'}", cwd=tmp_path, timeout=180)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert f"merged checkpoint: {tmp_path / 'merged'}" in merged.stdout
    assert_no_noise(merged)


def test_eval_from_an_adapter_takes_generation_options_as_kullm_generate_does(adapter, tmp_path):
    """``generation=greedy generation.max_new_tokens=4`` straight on kullm-eval's command line, no quoted list."""
    eval_set = tmp_path / "eval.jsonl"
    rows = [{"id": f"e{i}", "instruction": f"{i}번째 질문에 답하세요", "instances": [{"input": "", "output": "-"}]}
            for i in range(3)]  # fmt: skip
    eval_set.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "report"
    with ChatServer() as server:
        proc = run_script("kullm-eval", f"adapter={adapter}", f"eval_set={eval_set}", "generation=greedy",
                          "generation.max_new_tokens=4", f"judge.base_url={server.url}", "judge.model=fake",
                          f"output_dir={out}", "progress=false", cwd=tmp_path, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (responses,) = out.glob("*.responses.jsonl")
    answers = [json.loads(x) for x in responses.read_text(encoding="utf-8").splitlines()]
    assert [a["id"] for a in answers] == ["e0", "e1", "e2"]
    assert {(a["generation"]["num_beams"], a["generation"]["max_new_tokens"]) for a in answers} == {(1, 4)}
    assert_no_noise(proc)


@pytest.mark.slow
def test_the_first_run_on_an_empty_cache_says_it_builds_the_tiny_model_with_progress(tmp_path):
    env = {"KULLM_CACHE": str(tmp_path / "cache")}
    tiny = "model.tiny_shape={warmup_steps: 3}"  # a shape of its own: built in this empty cache, in seconds
    first = run_script("kullm-prepare", tiny, cwd=tmp_path, env=env, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    shown = screen(first)
    assert "building the tiny gpt_neox model once (later runs load it from" in shown
    assert re.search(r"building the tiny model: warm-up: 100%\|\S+\| 3/3 ", shown), shown[-2000:]
    assert_no_noise(first)
    again = run_script("kullm-prepare", tiny, cwd=tmp_path, env=env, timeout=240)
    assert again.returncode == 0 and "building the tiny" not in screen(again)


@pytest.mark.slow
def test_the_demo_ends_with_the_adapter_line_and_its_bar_shows_the_last_validation(tmp_path):
    """README's demo (``kullm-train experiment=smoke``, W&B offline as without a key), cut to 4 steps."""
    run = tmp_path / "run"
    proc = run_script("kullm-train", "experiment=smoke", "trainer.max_steps=4", "val_every_n_steps=2",
                      "callbacks.samples.num=0", f"hydra.run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}",
                      cwd=tmp_path, env={"WANDB_MODE": "offline"}, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = screen(proc)
    assert "wandb: Run summary:" in shown  # W&B's footer, before kullm's last line
    assert shown.strip().splitlines()[-1] == f"kullm-train: adapter saved to {run / 'adapter'}"
    final = json.loads((run / "result.json").read_text())["val_loss"]  # of the validation at step 4
    bar = [x for x in shown.splitlines() if x.startswith("train (optimizer steps): 100%")][-1]
    assert f"val_loss={final:.4f}," in bar, bar
    assert_no_noise(proc)
