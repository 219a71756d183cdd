"""The GPU checks of issue #28 as one command: each step with its own time limit, one log, one JSON, a summary table.

    python scripts/gpu_wheels.py                 # here, once: the wheels the GPU image lacks, into gpu_wheels/
    python scripts/gpu_check.py --dry-run        # here, on the CPU: every command and config composed and checked
    python scripts/gpu_check.py --out "$OUT"     # on the lent GPU (the run tool, carry ["gpu_wheels"])
    python scripts/gpu_check.py --out "$OUT" --only quant:kullm_nf4,strategy:fsdp   # a rerun of some steps

Steps, in order (``--list`` prints them with their limits):

1. ``install``: the carried wheels, offline (``pip install --no-index --find-links gpu_wheels``), and kullm itself
   (editable, so that the ``kullm-train`` console script exists); ``env``: the machine and versions.
2. Speed on the ``polyglot-ko-1.3b`` shape (random weights), micro-batch 4 x 512, through the ``benchmarks``
   package's runners, one fresh process per variant: the seed as it ran (8-bit base, fp16 AMP, ``group_by_length``),
   the seed's best case (bf16), TRL's ``SFTTrainer`` with its packing, and kullm's fused head-only loss length-grouped
   (SDPA), packed (SDPA with a block mask) and with the blocks under ``torch.compile``. Trained tokens/s, MFU (4·N
   FLOPs per trained token), peak ``torch.cuda.max_memory_allocated``, ratios in the same run.
3. The ``polyglot-ko-12.8b`` shape with ``quant=nf4`` and ``quant=int8`` (a random checkpoint written first: a
   quantized base loads through ``from_pretrained``): a few steps, peak memory and tokens/s.
4. ``strategy=fsdp``, ``deepspeed_zero2`` and ``deepspeed_zero3`` with ``trainer.devices=1`` through ``kullm-train``
   (``experiment=smoke`` on the GPU): 4 steps with a checkpoint at 2, a resume from it, the exported adapter
   compared with the resumed run's and reloaded by PEFT.
5. The seed preset ``experiment=kullm-v2-polyglot-12.8b`` with the 1.3b shape (8-bit, fp16 AMP, DDP on one device,
   gradient checkpointing, ``final: best``): 4 steps, checkpoints, resume, export, reload.

A failed step is recorded with its exact error and the run goes on; a step that cannot finish inside the whole run's
budget (``--budget``, 470 s: under 8 minutes with the summary) is skipped and named, to rerun with ``--only``. Steps
whose wheel was not carried (see gpu_wheels/manifest.json) are skipped with the reason. ``--dry-run`` runs on the
CPU: the wheel manifest, both model shapes on the meta device, every benchmark variant's kullm config composed and
validated, and every ``kullm-train`` command through ``kullm-train ... --cfg job`` and ``config.validate``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the benchmarks package sits beside kullm/, outside the wheel

from benchmarks.report import markdown_table, summarize  # noqa: E402  (standard library only at import)
from benchmarks.runners import SEED_BEST, TRL_VARIANTS, VARIANTS  # noqa: E402

BUDGET_S = 470
MIN_STEP_S = 20  # a step that would get less than this is skipped, not started
CPU_SLOWER = 6  # --device cpu: limits scaled for a small CPU box
SMALL, LARGE = "polyglot-ko-1.3b", "polyglot-ko-12.8b"
SPEED = ["seed_as_ran", "seed_grouped", "trl_packed", "kullm_head", "kullm_packed_head", "kullm_head_compiled"]
QUANT = ["kullm_nf4", "kullm_int8"]
STRATEGIES = ["fsdp", "deepspeed_zero2", "deepspeed_zero3"]
PRESET = "kullm-v2-polyglot-12.8b"
SPEED_STEPS, QUANT_STEPS = 20, 5  # optimizer steps per benchmark run (the first untimed)
NF4_TARGET_MIB = 16 * 1024
# the packages each wheel group of gpu_wheels.py brings, and the module a step imports to use them
GROUP_MODULE = {"quant": "bitsandbytes", "trl": "trl", "deepspeed": "deepspeed"}


@dataclass
class Step:
    name: str
    what: str
    limit_s: int
    needs: tuple[str, ...] = ()  # wheel groups (gpu_wheels.py) this step cannot run without
    status: str = "pending"
    seconds: float = 0.0
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        needs = f"  [needs {', '.join(self.needs)}]" if self.needs else ""
        return f"{self.name:<36} {self.limit_s:4d} s  {self.what}{needs}"


def plan() -> list[Step]:
    """Every step, in the order they run."""
    steps = [
        Step("install", "carried wheels and kullm, offline", 90),
        Step("env", "machine and versions", 30),
        Step(f"setup:{SMALL}", "benchmark workload, tokenizer, 1.3b shape, FLOPs per token", 90),
    ]
    needs = {"seed_as_ran": ("quant",), **dict.fromkeys(TRL_VARIANTS, ("trl",))}
    for v in SPEED:
        limit = {"seed_as_ran": 90, "kullm_head_compiled": 120}.get(v, 60)  # a checkpoint to write; compiling
        steps.append(Step(f"speed:{v}", describe(v), limit, needs.get(v, ())))
    steps += [
        Step(f"setup:{LARGE}", "12.8b shape, FLOPs per token", 60),
        Step(f"checkpoint:{LARGE}", "random 12.8b checkpoint (bf16 shards) for the quantized bases", 120, ("quant",)),
    ]
    steps += [Step(f"quant:{v}", describe(v), 120, ("quant",)) for v in QUANT]
    for s in STRATEGIES:
        needs = ("deepspeed",) if s.startswith("deepspeed") else ()
        steps.append(Step(f"strategy:{s}", f"{s}, 1 device: train, checkpoint, resume, export, reload", 90, needs))
    steps.append(
        Step(f"preset:{PRESET}", "the seed preset, 1.3b shape: train, resume, export, reload", 120, ("quant",))
    )
    return steps


def describe(variant: str) -> str:
    return {
        "seed_as_ran": "the seed as it ran: 8-bit base, fp16 AMP, group_by_length",
        "seed_grouped": "the seed's best case: bf16, group_by_length",
        "trl_packed": "TRL SFTTrainer, bf16, packing",
        "kullm_head": "kullm: length-grouped, fused head-only loss, SDPA",
        "kullm_packed_head": "kullm: packed (SDPA block mask), fused head-only loss",
        "kullm_head_compiled": "kullm_head with torch.compile on the blocks",
        "kullm_nf4": "kullm_head on a 4-bit NF4 base, gradient checkpointing",
        "kullm_int8": "kullm_head on an LLM.int8 base, gradient checkpointing",
    }.get(variant, variant)


# --- the commands ----------------------------------------------------------------------------------------------


@dataclass
class Context:
    work: Path
    data: list[Path]
    wheels: Path
    overrides: list[str]
    device: str = "cuda"

    def checkpoint(self, model: str) -> Path:
        return self.work / f"checkpoint-{model}"

    def bench_work(self, model: str) -> Path:
        return self.work / f"bench-{model}"


def bench_argv(ctx: Context, model: str, variants: list[str]) -> list[str]:
    """``python -m benchmarks`` arguments of one model's runs (the spec its children read)."""
    steps = SPEED_STEPS if model == SMALL else QUANT_STEPS
    return [
        "--data",
        *map(str, ctx.data),
        "--device",
        "cuda",
        "--model",
        model,
        "--shape-only",
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--cutoff-len",
        "512",
        "--repeats",
        "1",
        "--no-prep",
        "--variants",
        ",".join(variants),
        "--work",
        str(ctx.bench_work(model)),
        "--checkpoint",
        str(ctx.checkpoint(model)),
        "--out",
        str(ctx.work / f"bench-{model}.md"),
    ]


def strategy_overrides(ctx: Context, strategy: str) -> list[str]:
    """``kullm-train`` overrides of a strategy check: the smoke preset on the GPU, a checkpoint every 2 steps."""
    return [
        "experiment=smoke",
        f"trainer={'gpu' if ctx.device == 'cuda' else 'cpu'}",
        f"strategy={strategy}",
        "trainer.devices=1",
        "trainer.max_steps=4",
        "lora.lora_dropout=0.0",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.monitor=train/loss",
        "callbacks.checkpoint.save_top_k=-1",
        "callbacks.samples.num=0",
        "trainer.limit_val_batches=0",
        "logger=csv",
        f"data.cache_dir={ctx.work / 'processed'}",
        *ctx.overrides,
    ]


def preset_overrides(ctx: Context, tokenizer: str) -> list[str]:
    """The seed preset as it is, but the 1.3b shape (random weights from a checkpoint: its base is 8-bit), one
    device, the bundled sample, a 16-example batch and 4 steps with a validation and a checkpoint every 2."""
    if ctx.device == "cpu":  # a rehearsal of the step's own checks here: the tiny model, full precision, no 8-bit
        model = ["model=tiny", "quant=none", "trainer=cpu", "strategy=auto", "model.dtype=float32"]
        model.append("trainer.precision=32-true")
    else:
        model = [f"model={SMALL}", f"model.name_or_path={ctx.checkpoint(SMALL)}", f"model.tokenizer={tokenizer}"]
    return [
        f"experiment={PRESET}",
        *model,
        f"data.path={ctx.data[0]}",
        "data.val_set_size=8",
        f"data.cache_dir={ctx.work / 'processed'}",
        "trainer.devices=1",
        "trainer.max_steps=4",
        "batch_size=16",
        "val_every_n_steps=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.samples.num=0",
        "logger=csv",
        *ctx.overrides,
    ]


def kullm_train() -> list[str]:
    """The installed ``kullm-train`` console script (beside this interpreter, or on PATH)."""
    beside = Path(sys.executable).parent / "kullm-train"
    found = str(beside) if beside.exists() else shutil.which("kullm-train")
    if not found:
        raise RuntimeError("kullm-train is not installed: pip install --no-deps --no-build-isolation -e .")
    return [found]


def child_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "KULLM_CACHE": str(ctx.work / "kullm-cache"),
            "HF_HOME": str(ctx.work / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
    )
    return env


# --- running a command under a time limit ----------------------------------------------------------------------


def run_limited(cmd: list[str], limit: float, log, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Run ``cmd`` in its own process group, output appended to ``log``; past ``limit`` seconds the whole group is
    killed (the step's own children too: a kullm-train left running would hold the GPU) and 124 returned."""
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        try:  # SIGKILL at once: kullm-train answers SIGTERM by saving a checkpoint first, on the GPU's time
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return 124


# --- step bodies (each runs in its own process: ``--step NAME``) ------------------------------------------------


def step_env(ctx: Context) -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "lightning", "accelerate", "datasets", "hydra-core", "trl",
                 "bitsandbytes", "deepspeed", "triton", "flash-attn", "liger-kernel", "cut-cross-entropy"):  # fmt: skip
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_mib=props.total_memory // 2**20, capability=f"{props.major}.{props.minor}")
    print(json.dumps(out, indent=1))
    return out


def step_setup(ctx: Context, model: str) -> dict[str, Any]:
    """The benchmark spec of ``model`` (workload, tokenizer, shape) and its FLOPs per trained token."""
    from benchmarks.__main__ import parse_args, prepare
    from benchmarks.measure import base_params, peak_flops

    variants = [v for v in (SPEED if model == SMALL else QUANT) if v not in TRL_VARIANTS or has("trl")]
    args = parse_args(bench_argv(ctx, model, variants))
    prepare(args, bench_argv(ctx, model, variants))
    n, peak = base_params(args.shape), peak_flops()
    out = {"params": n, "peak_flops": peak, "flops_per_token": 4 * n / peak if peak else None}
    out.update(tokenizer=args.tokenizer, rows=args.rows)
    (ctx.bench_work(model) / "setup.json").write_text(json.dumps(out))
    return out


def step_speed(ctx: Context, model: str, variant: str) -> dict[str, Any]:
    """One benchmark variant in its own process, as ``python -m benchmarks`` runs it."""
    from benchmarks.measure import run_child

    work = ctx.bench_work(model)
    if not (work / "spec.json").is_file():
        raise RuntimeError(f"setup:{model} did not finish: no {work / 'spec.json'}")
    res = run_child(None, variant, 0, work)
    if "error" in res:
        raise RuntimeError(res["error"])
    return {k: v for k, v in res.items() if k not in ("shapes", "step_seconds")}


def step_checkpoint(ctx: Context, model: str) -> dict[str, Any]:
    from benchmarks.measure import random_checkpoint
    from benchmarks.runners import model_shape

    args = argparse.Namespace(model=model)
    t0 = time.perf_counter()
    folder = random_checkpoint(model_shape(args), ctx.checkpoint(model))
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"folder": str(folder), "bytes": size, "seconds": time.perf_counter() - t0}


def tee(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, list[str]]:
    """Run ``cmd`` with its output passed on line by line (to the log, live); its exit code and last lines."""
    print("$ " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    tail: deque[str] = deque(maxlen=40)
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.strip():
            tail.append(line.rstrip())
    sys.stdout.flush()
    return proc.wait(), list(tail)


def checkpoint_at(run: Path, step: int) -> Path:
    """The Lightning checkpoint a run saved at ``step`` (named ``step000002.ckpt``, or with the monitored value when
    it is a validation metric: ``step000002-val_loss_6.72.ckpt``); a file, or a folder under DeepSpeed."""
    found = sorted((run / "checkpoints").glob(f"step{step:06d}*.ckpt"))
    if not found:
        raise RuntimeError(f"no checkpoint of step {step} in {run / 'checkpoints'}")
    return found[0]


def train_and_resume(ctx: Context, name: str, overrides: list[str], base) -> dict[str, Any]:
    """``kullm-train`` to step 4 (checkpoints at 2 and 4, the final adapter exported), again from step 2's checkpoint,
    the two runs' step-4 adapters compared, and the exported one verified and reloaded by PEFT onto ``base()``."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from kullm.adapter import verify_adapter

    out: dict[str, Any] = {}
    runs = {"run": ctx.work / name / "run", "resumed": ctx.work / name / "resumed"}
    for key, folder in runs.items():
        extra = [f"ckpt_path={checkpoint_at(runs['run'], 2)}"] if key == "resumed" else []
        cmd = [*kullm_train(), *overrides, *extra, f"hydra.run.dir={folder}"]
        t0 = time.perf_counter()
        rc, tail = tee(cmd, env=child_env(ctx), cwd=ctx.work)
        out[f"{key}_s"] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            said = [ln for ln in tail if ln.startswith("kullm-train: ")]
            raise RuntimeError(f"{key}: " + (said or tail or [f"exit {rc}"])[-1])
        out[f"{key}_adapter_params"] = verify_adapter(folder / "adapter")
    # the adapter folder beside each run's step-4 checkpoint: the final one may be the best, not the last (final: best)
    got = {k: load_file(checkpoint_at(runs[k], 4).with_suffix("") / "adapter_model.safetensors") for k in runs}
    if got["run"].keys() != got["resumed"].keys():
        raise RuntimeError("the resumed run's step-4 adapter holds other tensors than the run's")
    diff = max((got["run"][k].float() - got["resumed"][k].float()).abs().max().item() for k in got["run"])
    out["resume_max_abs_diff"] = diff
    if not diff <= 1e-3:
        raise RuntimeError(f"resumed from step 2, the step-4 adapter differs from the run's by up to {diff:.3g}")
    exported = load_file(runs["run"] / "adapter" / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(base(), str(runs["run"] / "adapter"))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    for k, v in exported.items():
        if not torch.equal(loaded[k].to(v.device, v.dtype), v):
            raise RuntimeError(f"reloaded adapter: {k} differs from the file")
    ids = torch.tensor([[2, 5, 7, 9, 11, 13]], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("reloaded adapter: non-finite logits")
    out["reload"] = f"{len(exported)} tensors equal, logits finite"
    return out


def step_strategy(ctx: Context, strategy: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from kullm.tiny import build_tiny

    def base():
        return AutoModelForCausalLM.from_pretrained(str(build_tiny())).to(ctx.device)  # fp32, as kullm trains it

    return train_and_resume(ctx, f"strategy-{strategy}", strategy_overrides(ctx, strategy), base)


def step_preset(ctx: Context) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.measure import random_checkpoint
    from benchmarks.runners import model_shape, tokenizer_path

    if ctx.device == "cpu":
        from kullm.tiny import build_tiny

        folder, dtype = build_tiny(), torch.float32
    else:
        shape = model_shape(argparse.Namespace(model=SMALL))
        folder, dtype = random_checkpoint(shape, ctx.checkpoint(SMALL)), torch.float16

    def base():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(ctx.device)

    return train_and_resume(ctx, "preset", preset_overrides(ctx, tokenizer_path()), base)


def run_step(ctx: Context, name: str) -> dict[str, Any]:
    kind, _, arg = name.partition(":")
    if kind == "env":
        return step_env(ctx)
    if kind == "setup":
        return step_setup(ctx, arg)
    if kind == "speed":
        return step_speed(ctx, SMALL, arg)
    if kind == "checkpoint":
        return step_checkpoint(ctx, arg)
    if kind == "quant":
        return step_speed(ctx, LARGE, arg)
    if kind == "strategy":
        return step_strategy(ctx, arg)
    if kind == "preset":
        return step_preset(ctx)
    raise ValueError(f"unknown step {name}")


# --- install (in the parent: nothing imported) ------------------------------------------------------------------


def manifest(wheels: Path) -> dict[str, Any]:
    path = wheels / "manifest.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def install_commands(ctx: Context, groups: dict[str, list[str]]) -> list[tuple[str, list[str], dict[str, str]]]:
    """``(what, command, extra env)`` for each carried group, then kullm itself; all offline."""
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(ctx.wheels)]
    pip += ["--disable-pip-version-check", "--no-warn-script-location"]

    def names(files: list[str]) -> list[str]:
        return sorted({f.split("-")[0].replace("_", "-").lower() for f in files})

    out = []
    for group in ("base", "quant", "trl"):
        if group in groups:
            out.append((group, [*pip, *names(groups[group])], {}))
    out.append(("kullm", [*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], {}))
    if "deepspeed" in groups:  # an sdist: built here against the machine's torch, no ops compiled ahead of time
        out.append(("deepspeed", [*pip, "--no-build-isolation", *names(groups["deepspeed"])], {"DS_BUILD_OPS": "0"}))
    return out


def install(ctx: Context, step: Step, log, deadline: float) -> None:
    info = manifest(ctx.wheels)
    if not info:
        raise RuntimeError(f"no {ctx.wheels / 'manifest.json'}: run scripts/gpu_wheels.py and carry gpu_wheels")
    done, failed = [], {}
    for what, cmd, extra in install_commands(ctx, info["groups"]):
        env = {**os.environ, **extra}
        rc = run_limited(cmd, max(1.0, deadline - time.monotonic()), log, env=env)
        if rc != 0 and what == "base":  # the image's versions may not satisfy a bound: the carried wheels as they are
            rc = run_limited([*cmd, "--no-deps"], max(1.0, deadline - time.monotonic()), log, env=env)
        if rc == 0:
            done.append(what)
        else:
            failed[what] = f"pip exit {rc}" + (" (time limit)" if rc == 124 else "")
    importlib.invalidate_caches()
    step.result = {"installed": done, "failed": failed, "dropped": info.get("dropped", {})}
    if failed.get("base") or failed.get("kullm"):
        raise RuntimeError(f"install: {failed}")


def has(group_or_module: str) -> bool:
    module = GROUP_MODULE.get(group_or_module, group_or_module)
    importlib.invalidate_caches()
    return importlib.util.find_spec(module) is not None


# --- the parent: schedule, record, summarize --------------------------------------------------------------------


def run_all(ctx: Context, steps: list[Step], out: Path, budget: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + budget
    with open(out / "gpu_check.log", "a", encoding="utf-8") as log:
        log.write(f"\n=== gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')} budget {budget:.0f} s\n")
        for step in steps:
            left = deadline - time.monotonic()
            reason = skip_reason(ctx, step, steps, left)
            if reason:
                step.status = f"skipped: {reason}"
                report(step, log)
                continue
            limit = min(step.limit_s * (CPU_SLOWER if ctx.device == "cpu" else 1), left)
            log.write(f"\n--- {step.name} (limit {limit:.0f} s)\n")
            log.flush()
            t0 = time.monotonic()
            try:
                if step.name == "install":
                    install(ctx, step, log, t0 + limit)
                    step.status = "pass"
                else:
                    result = ctx.work / "steps" / f"{step.name.replace(':', '_')}.json"
                    result.unlink(missing_ok=True)
                    cmd = [sys.executable, __file__, "--step", step.name, "--work", str(ctx.work), "--result"]
                    cmd += [str(result), "--data", *map(str, ctx.data)]
                    cmd += [x for o in ctx.overrides for x in ("--override", o)] + ["--device", ctx.device]
                    rc = run_limited(cmd, limit, log, env=child_env(ctx), cwd=ctx.work)
                    record = json.loads(result.read_text()) if result.is_file() else {}
                    step.result = record.get("result", {})
                    if rc == 124:
                        step.status, step.error = "timeout", f"killed after {limit:.0f} s"
                    elif rc != 0 or record.get("error"):
                        step.status, step.error = "fail", record.get("error") or f"exit {rc}"
                    else:
                        step.status = "pass"
            except Exception as e:  # noqa: BLE001 - a step's failure is recorded, the run goes on
                step.status, step.error = "fail", f"{type(e).__name__}: {e}"
            step.seconds = round(time.monotonic() - t0, 1)
            report(step, log)
            write_json(out, steps, time.monotonic() - start)
        summary = summarize_run(ctx, steps, time.monotonic() - start)
        log.write("\n" + summary + "\n")
    (out / "gpu_check.md").write_text(summary + "\n", encoding="utf-8")
    write_json(out, steps, time.monotonic() - start)
    print(summary, flush=True)


def skip_reason(ctx: Context, step: Step, steps: list[Step], left: float) -> str:
    if left < MIN_STEP_S:
        return f"budget ({left:.0f} s left)"
    if step.name == "install" and ctx.device == "cpu":
        return "--device cpu"
    by_name = {s.name: s for s in steps}
    if step.name != "install" and by_name.get("install", Step("", "", 0, status="pass")).status.startswith("fail"):
        return "install failed"
    for group in step.needs:
        if not has(group):
            why = manifest(ctx.wheels).get("dropped", {}).get(group)
            return f"{GROUP_MODULE[group]} not installed" + (f" (gpu_wheels dropped it: {why})" if why else "")
    kind, _, arg = step.name.partition(":")
    if kind in ("speed", "quant"):
        setup = by_name.get(f"setup:{SMALL if kind == 'speed' else LARGE}")
        if setup and setup.status != "pass":
            return f"{setup.name} {setup.status}"
    if kind == "quant":
        ckpt = by_name.get(f"checkpoint:{LARGE}")
        if ckpt and ckpt.status != "pass":
            return f"{ckpt.name} {ckpt.status}"
    return ""


def report(step: Step, log) -> None:
    line = f"gpu_check: {step.name:<36} {step.status:<8} {step.seconds:6.1f} s  {step.error[:160]}"
    log.write(line + "\n")
    log.flush()
    print(line, flush=True)


def write_json(out: Path, steps: list[Step], elapsed: float) -> None:
    data = {"elapsed_s": round(elapsed, 1), "steps": [asdict(s) for s in steps]}
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")


def summarize_run(ctx: Context, steps: list[Step], elapsed: float) -> str:
    """The step table, the speed and quantization tables (the benchmarks report's), and the targets."""
    by = {s.name: s for s in steps}
    env = by.get("env", Step("", "", 0)).result
    lines = [
        f"## GPU: {env.get('gpu', 'no GPU')} ({elapsed / 60:.1f} min)\n",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("gpu", "gpu_mib")) + "\n",
        "| step | what | status | s | error |",
        "|---|---|---|---:|---|",
    ]
    for s in steps:
        lines.append(f"| {s.name} | {s.what} | {s.status} | {s.seconds:.0f} | {s.error[:200].replace('|', '/')} |")
    for model, names, baseline in ((SMALL, SPEED, SEED_BEST), (LARGE, QUANT, QUANT[0])):
        kind = "speed" if model == SMALL else "quant"
        results = [
            {**by[f"{kind}:{v}"].result, "variant": v, "repeat": 0}
            for v in names
            if by.get(f"{kind}:{v}") and by[f"{kind}:{v}"].status == "pass"
        ]
        if not results:
            continue
        ran = [r["variant"] for r in results]
        base = baseline if baseline in ran else ran[0]
        setup = by[f"setup:{model}"].result
        rows = summarize(results, ran, base)
        lines += [
            "",
            f"### `{model}` shape, micro-batch 4 x 512\n",
            markdown_table(rows, "cuda", setup.get("flops_per_token"), base),
        ]
        if model == SMALL:
            lines.append(targets(results, setup.get("flops_per_token")))
        else:
            nf4 = next((r for r in results if r["variant"] == "kullm_nf4"), None)
            if nf4:
                mib = nf4["cuda_max_alloc_mib"]
                verdict = "met" if mib <= NF4_TARGET_MIB else f"missed by {(mib - NF4_TARGET_MIB) / 1024:.1f} GiB"
                lines.append(f"- 12.8b + nf4 peak: {mib / 1024:.1f} GiB (target ≤ 16 GiB: {verdict})")
    skipped = [s.name for s in steps if s.status.startswith("skipped: budget") or s.status == "timeout"]
    if skipped:
        lines.append(f'\nRerun: `python scripts/gpu_check.py --out "$OUT" --only {",".join(skipped)}`')
    return "\n".join(lines)


def targets(results: list[dict[str, Any]], flops_per_token: float | None) -> str:
    """Issue #28's speed targets for kullm's fastest variant here."""
    tok = {r["variant"]: r["trained_tok_s"] for r in results}
    kullm = {v: t for v, t in tok.items() if v.startswith("kullm")}
    if not kullm:
        return ""
    best = max(kullm, key=kullm.get)
    out = [f"\nTargets, kullm's fastest here (`{best}`):"]
    for other, want in (("seed_as_ran", 2.0), (SEED_BEST, 1.3)):
        if other in tok:
            ratio = kullm[best] / tok[other]
            out.append(f"- ÷ `{other}`: {ratio:.2f}× (target ≥ {want}×: {'met' if ratio >= want else 'missed'})")
    trl = [tok[v] for v in TRL_VARIANTS if v in tok]
    if trl:
        ratio = kullm[best] / max(trl)
        out.append(f"- ÷ TRL's best: {ratio:.2f}× (target > 1×: {'met' if ratio > 1 else 'missed'})")
    if flops_per_token:
        mfu = kullm[best] * flops_per_token
        out.append(f"- MFU: {100 * mfu:.1f}% (target ≥ 45%: {'met' if mfu >= 0.45 else 'missed'})")
    return "\n".join(out)


# --- dry run (the CPU, here) ------------------------------------------------------------------------------------


def dry_run(ctx: Context, steps: list[Step], budget: float) -> int:
    """Compose every command and config the steps would run, without running any; 1 on any problem."""
    from omegaconf import OmegaConf

    from benchmarks.__main__ import parse_args
    from benchmarks.measure import param_split
    from benchmarks.runners import kullm_overrides, model_shape
    from kullm.config import compose, validate

    problems: list[str] = []
    t0 = time.perf_counter()
    info = manifest(ctx.wheels)
    if info:
        carried = ", ".join(f"{g} {b / 2**20:.1f} MiB" for g, b in info["bytes"].items())
        print(f"dry-run: gpu_wheels: {carried}; total {info['total_bytes'] / 2**20:.1f} MiB of 64 MiB")
        for group, why in info.get("dropped", {}).items():
            print(f"dry-run: gpu_wheels dropped {group}: {why}")
        for what, cmd, _ in install_commands(ctx, info["groups"]):
            print(f"dry-run: install {what}: {shlex.join(cmd)}")
    else:
        print(f"dry-run: no {ctx.wheels / 'manifest.json'} yet: run scripts/gpu_wheels.py before the GPU run")
    shapes = {}
    for model in (SMALL, LARGE):
        shape = shapes[model] = model_shape(argparse.Namespace(model=model))
        body, head, embed = param_split(shape)
        n = body + head + embed
        print(f"dry-run: {model}: {n / 1e9:.2f} B parameters (meta device), {4 * n / 1e9:.1f} GFLOP per trained token")
    tokenizer = str(ctx.work / "tokenizer")  # composed only: the tiny tokenizer is built on the GPU machine
    for model, variants in ((SMALL, SPEED), (LARGE, QUANT)):
        argv = bench_argv(ctx, model, variants)
        args = parse_args(argv)  # a typo in the bench's own options fails here
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            problems.append(f"benchmarks has no variant {unknown}")
            continue
        args.shape, args.tokenizer, args.checkpoint = shapes[model], tokenizer, ctx.checkpoint(model)
        args.data = ctx.work / "data.jsonl"
        for v in variants:
            if "overrides" not in VARIANTS[v]:
                print(f"dry-run: {model} {v}: {describe(v)} (HF Trainer / TRL: no kullm config)")
                continue
            overrides = [*kullm_overrides(args, v, ctx.work / v), *ctx.overrides]
            try:
                validate(compose("train", overrides))
                print(f"dry-run: {model} {v}: kullm config composed and validated ({len(overrides)} overrides)")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{model} {v}: {type(e).__name__}: {e}")
    commands = {f"strategy:{s}": strategy_overrides(ctx, s) for s in STRATEGIES}
    commands[f"preset:{PRESET}"] = preset_overrides(ctx, tokenizer)
    jobs = []
    for name, overrides in commands.items():
        resumed = [f"ckpt_path={ctx.work / name / 'run' / 'checkpoints' / 'step000002.ckpt'}"]
        for key, extra in (("run", []), ("resumed", resumed)):
            full = [*overrides, *extra, f"hydra.run.dir={ctx.work / name / key}"]
            try:
                cfg = compose("train", [f"output_dir={ctx.work / name / key}", *overrides, *extra])
                validate(cfg)
                if name.startswith("preset") and key == "run":
                    keep = OmegaConf.select(cfg, "quant.mode"), cfg.trainer.precision, cfg.gradient_checkpointing
                    print(f"dry-run: {name}: quant {keep[0]}, precision {keep[1]}, gradient_checkpointing {keep[2]}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{name} ({key}): {type(e).__name__}: {e}")
            if key == "run":  # the resumed command differs by ckpt_path only: composed above
                jobs.append((f"{name} ({key})", [*kullm_train(), *full, "--cfg", "job"]))
    ctx.work.mkdir(parents=True, exist_ok=True)

    def cfg_job(job: tuple[str, list[str]]) -> tuple[str, subprocess.CompletedProcess]:
        env = child_env(ctx)
        env.pop("PYTHONPATH")  # as users run it: the installed console script, from a folder of theirs
        return job[0], subprocess.run(job[1], capture_output=True, text=True, env=env, cwd=ctx.work, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, proc in pool.map(cfg_job, jobs):
            if proc.returncode != 0:
                last = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit {proc.returncode}"]
                problems.append(f"{name}: kullm-train --cfg job: {last[-1]}")
            else:
                print(f"dry-run: {name}: kullm-train --cfg job ok")
    total = sum(s.limit_s for s in steps)
    print(f"dry-run: {len(steps)} steps, limits {total} s in all, run budget {budget:.0f} s (later steps skipped)")
    for s in steps:
        print(f"dry-run:   {s.line()}")
    for p in problems:
        print(f"dry-run: PROBLEM {p}", file=sys.stderr)
    print(f"dry-run: {'failed' if problems else 'ok'} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if problems else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true", help="compose and check every command here, run nothing")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check", help="log, JSON and summary")
    p.add_argument("--work", type=Path, default=Path("/tmp/kullm-gpu-check"), help="scratch: runs, checkpoints")
    p.add_argument("--wheels", type=Path, default=ROOT / "gpu_wheels", help="the carried wheels (gpu_wheels.py)")
    p.add_argument("--data", type=Path, nargs="+", default=[ROOT / "data" / "sample"], help="rows to train on")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps (default 470)")
    p.add_argument("--only", default="", help="comma list of steps to run (install and setups are added)")
    p.add_argument("--override", action="append", default=[], help="a Hydra override for every kullm run")
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: no install, for trying this script's own checks here (e.g. --only strategy:fsdp)",
    )
    p.add_argument("--list", action="store_true", help="print the steps and their limits")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select(steps: list[Step], only: str) -> list[Step]:
    if not only:
        return steps
    wanted = {s.strip() for s in only.split(",") if s.strip()}
    unknown = wanted - {s.name for s in steps}
    if unknown:
        raise SystemExit(f"gpu_check: unknown steps {sorted(unknown)}; --list shows them")
    if any(w.startswith("speed:") for w in wanted):
        wanted.add(f"setup:{SMALL}")
    if any(w.startswith("quant:") for w in wanted):
        wanted |= {f"setup:{LARGE}", f"checkpoint:{LARGE}"}
    wanted |= {"install", "env"}
    return [s for s in steps if s.name in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context(
        work=args.work.resolve(),
        data=[p.resolve() for p in args.data],
        wheels=args.wheels.resolve(),
        overrides=args.override,
        device=args.device,
    )
    if args.step:  # a child: one step, its result written as JSON for the parent
        record: dict[str, Any] = {}
        try:
            record["result"] = run_step(ctx, args.step)
        except Exception as e:  # noqa: BLE001 - the parent records the exact error and goes on
            import traceback

            traceback.print_exc()
            record["error"] = f"{type(e).__name__}: {e}"
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(record, default=str))
        return 1 if "error" in record else 0
    steps = select(plan(), args.only)
    if args.list:
        for s in steps:
            print(s.line())
        return 0
    if args.dry_run:
        return dry_run(ctx, steps, args.budget)
    run_all(ctx, steps, args.out, args.budget)
    failed = [s for s in steps if s.status in ("fail", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
