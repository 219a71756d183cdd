"""Measurement shared by every path: per-step token counts and clocks (:class:`Meter`), memory, the FLOP model
(parameters of a shape on the meta device, the seed's FLOP ceiling, GPU peaks), and one fresh subprocess per run."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import ROOT

IGNORE_INDEX = -100
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


class Meter:
    """Per-micro-batch token counts and per-optimizer-step end times."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.pending = [0, 0, 0]  # trained, non-pad, slots since the last step end
        self.shapes: list[list[int]] = []
        self.steps: list[tuple[float, float, int, int, int]] = []  # wall, CPU time, trained, non-pad, slots

    def batch(self, labels, attention_mask) -> None:
        self.pending[0] += int((labels[:, 1:] != IGNORE_INDEX).sum())
        has_mask = attention_mask is not None and attention_mask.dim() == 2
        self.pending[1] += int(attention_mask.sum()) if has_mask else labels.numel()  # padding-free: no pad
        self.pending[2] += labels.numel()
        self.shapes.append(list(labels.shape))

    def step_end(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.steps.append((time.perf_counter(), time.process_time(), *self.pending))
        self.pending = [0, 0, 0]

    def result(self) -> dict[str, Any]:
        if len(self.steps) < 2:
            raise RuntimeError(f"need at least 2 optimizer steps to time, got {len(self.steps)}")
        timed = self.steps[1:]
        seconds = self.steps[-1][0] - self.steps[0][0]
        cpu_seconds = self.steps[-1][1] - self.steps[0][1]
        trained, nonpad, slots = (sum(s[k] for s in timed) for k in (2, 3, 4))
        return {
            "steps": len(self.steps),
            "timed_steps": len(timed),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "trained_tok_cpu_s": trained / cpu_seconds if cpu_seconds > 0 else float("nan"),
            "shapes": self.shapes,
            "step_seconds": [b[0] - a[0] for a, b in zip(self.steps, self.steps[1:], strict=False)],
            "trained_tokens": trained,
            "nonpad_tokens": nonpad,
            "slots": slots,
            "trained_tok_s": trained / seconds,
            "nonpad_tok_s": nonpad / seconds,
            "pad_frac": 1 - nonpad / slots if slots else 0.0,
        }


def memory(device: str, rss_before: float) -> dict[str, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    out = {"peak_rss_mib": peak, "rss_before_train_mib": rss_before}
    if device == "cuda":
        import torch

        out["cuda_max_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measured(device: str, fit):
    """``fit()`` (one variant's training) and the memory it used: ``(its result, memory(...))``."""
    rss_before = current_rss_mib()
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = fit()
    return result, memory(device, rss_before)


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def base_params(shape: dict[str, Any]) -> int:
    """N: parameters of the base model of this shape (built on the meta device, no memory)."""
    return sum(param_split(shape))


def param_split(shape: dict[str, Any]) -> tuple[int, int, int]:
    """(transformer body matmul weights, LM head, input embedding) parameter counts of this shape."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**shape))
    head = sum(p.numel() for p in model.get_output_embeddings().parameters())
    embed = sum(p.numel() for p in model.get_input_embeddings().parameters())
    return sum(p.numel() for p in model.parameters()) - head - embed, head, embed


def random_checkpoint(shape: dict[str, Any], folder: Path, dtype: str = "bfloat16", device: str | None = None) -> Path:
    """A GPT-NeoX checkpoint of ``shape`` with random weights in ``folder``, written once (kept when already there).

    For the variants whose base loads through ``from_pretrained`` (an 8-bit or 4-bit base: ``shape_only`` builds
    in memory and cannot quantize): weights N(0, 0.02), norms 1, biases 0, drawn on ``device`` (the GPU when there is
    one: 12.8b's 25 GB would take minutes on a CPU) and written in safetensors shards of about 2 GB with their index.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = GPTNeoXConfig(**shape)
    config.dtype = dtype
    with torch.device("meta"):
        names = {k: v.shape for k, v in GPTNeoXForCausalLM(config).state_dict().items()}
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")  # scratch weights: renamed, not fsynced
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    total = size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, dims in names.items():
        t = torch.empty(dims, dtype=getattr(torch, dtype), device=device)
        if name.endswith("bias"):
            t.zero_()
        elif t.dim() == 1:  # layer norm weights
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        shard[name] = t.cpu()
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= 2 << 30:
            flush()
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    config.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def flop_ceiling(shape: dict[str, Any], seed_row: dict[str, Any]) -> float:
    """How many times fewer FLOPs per trained token than the seed the minimum needs, on the seed's own batches.

    Per token, forward 2·N and the activation-gradient half of backward 2·N (LoRA: no weight gradients for the
    frozen base; the adapter's own are negligible): 4·N. The seed runs body and head on every tensor slot
    (padding included: ``slots``); the minimum runs the body on non-pad tokens and the head on trained tokens only.
    Attention's sequence-quadratic term and the embedding lookup are left out (small at these lengths).
    """
    body, head, _ = param_split(shape)
    slots, nonpad, trained = seed_row["slots"], seed_row["nonpad_tokens"], seed_row["trained_tokens"]
    return (body + head) * slots / (body * nonpad + head * trained)


def peak_flops() -> float | None:
    """Dense bf16 peak of the visible GPU (FLOP/s), from its name; None when unknown."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return tflops * 1e12 if tflops else None


def run_child(args: argparse.Namespace, variant: str, repeat: int, work: Path) -> dict[str, Any]:
    result_path = work / f"{variant}-{repeat}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--child",
        variant,
        "--result",
        str(result_path),
        "--spec",
        str(work / "spec.json"),
        "--out-dir",
        str(work / f"{variant}-{repeat}"),
    ]
    if variant == "prep":
        cmd = cmd[:-2]  # no output folder
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(work))
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        print(f"bench: {variant} (repeat {repeat}) failed:\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"variant": variant, "repeat": repeat, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    res = json.loads(result_path.read_text())
    res.update(variant=variant, repeat=repeat, wall_s=wall, loadavg=(load0, load1))
    if variant == "prep":
        return res
    print(
        f"bench: {variant:<18} repeat {repeat}: {res['trained_tok_s']:8.1f} trained tok/s, "
        f"{res['nonpad_tok_s']:8.1f} non-pad tok/s, pad {100 * res['pad_frac']:4.1f}%, "
        f"peak RSS {res['peak_rss_mib']:.0f} MiB ({wall:.0f} s, load {load0:.1f}->{load1:.1f})",
        flush=True,
    )
    return res


def child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HOME": str(work / "hf"),
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    return env
