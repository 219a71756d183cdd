"""Download the wheels the lent GPU machine lacks, for ``scripts/gpu_check.py`` to install offline there.

    python scripts/gpu_wheels.py                 # into gpu_wheels/ (git-ignored), pinned by constraints.txt
    python scripts/gpu_wheels.py --check         # only the size check and the manifest of what is already there

The GPU image has torch, transformers, peft, lightning, triton, accelerate, pyarrow and pandas (and their own
dependencies: numpy, huggingface-hub, safetensors, tokenizers, pyyaml, psutil, jinja2, ...) but nothing can be
downloaded there, and what the machine receives (the repository plus carried folders) must fit 64 MiB. This takes
exactly the missing packages, for CPython 3.12 on x86-64 manylinux, by plain ``pip download --no-deps`` at the
versions of constraints.txt, in groups a step of gpu_check.py needs:

- ``base``: hydra-core, omegaconf, antlr4-python3-runtime, datasets and its small dependencies (dill, multiprocess,
  xxhash, fsspec within datasets' bound), setuptools (to install kullm itself, editable, offline);
- ``trl``: TRL's SFTTrainer, for the speed comparison;
- ``quant``: bitsandbytes (the seed's 8-bit base, quant=nf4/int8);
- ``deepspeed``: DeepSpeed, an sdist built on the GPU machine (``--no-build-isolation`` against its torch), and its
  dependencies (pydantic, hjson, msgpack, ninja, py-cpuinfo, einops).

antlr4-python3-runtime 4.9.3 (the version hydra-core pins) exists only as an sdist; it is pure Python, so it is
built into a wheel here. When the total does not fit beside the repository, the groups are dropped in the order
deepspeed, trl, quant, and the script says which. ``gpu_wheels/manifest.json`` lists what was carried and dropped;
gpu_check.py reads it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 << 20  # what the GPU machine receives: the working tree plus carried folders
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64", "any"]
# group -> packages, in the order a failing budget drops groups (last first): base is never dropped
GROUPS: dict[str, list[str]] = {
    "base": [
        "hydra-core",
        "omegaconf",
        "antlr4-python3-runtime",
        "datasets",
        "dill",
        "multiprocess",
        "xxhash",
        "fsspec",
        "setuptools",
    ],
    "quant": ["bitsandbytes"],
    "trl": ["trl"],
    "deepspeed": [
        "deepspeed",
        "pydantic",
        "pydantic-core",
        "annotated-types",
        "typing-inspection",
        "typing-extensions",
        "hjson",
        "msgpack",
        "ninja",
        "py-cpuinfo",
        "einops",
    ],
}
DROP_ORDER = ["deepspeed", "trl", "quant"]
SDIST_ONLY = {"antlr4-python3-runtime": "wheel", "deepspeed": "sdist"}  # built here into a wheel | carried as is
MANIFEST = "manifest.json"


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """``name -> version`` from the lock; of two marker lines for one name, the one for Python 3.12."""
    out: dict[str, str] = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;]+)\s*(;.*)?$", line.strip())
        if not m:
            continue
        name, version, marker = m.group(1).lower(), m.group(2), m.group(3) or ""
        if re.search(r"python_full_version < '3\.([0-9]|1[0-2])'", marker):  # a pin for older Pythons only
            continue
        out[name] = version
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def owner(filename: str) -> str:
    """The package a wheel or sdist file name belongs to (normalized)."""
    stem = filename.removesuffix(".tar.gz").removesuffix(".whl")
    return normalize(stem.split("-")[0])


def tree_bytes() -> int:
    """The bytes of what travels besides carried folders: tracked files and untracked ones git does not ignore."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def download(name: str, version: str, dest: Path) -> list[Path]:
    """``pip download --no-deps`` of one pinned package for CPython 3.12 x86-64 into ``dest``; the files it saved."""
    before = set(dest.iterdir())
    tags = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    kind = SDIST_ONLY.get(name)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), f"{name}=={version}"]
    if kind:
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:", *tags, *(x for p in PLATFORMS for x in ("--platform", p))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
        raise RuntimeError(f"pip download {name}=={version}: {last[-1] if last else 'failed'}")
    saved = sorted(set(dest.iterdir()) - before)
    if kind == "wheel":  # pure Python: its wheel is the same on every interpreter
        sdist = saved[0]
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), str(sdist)],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            raise RuntimeError(f"pip wheel {sdist.name}: {build.stderr.strip().splitlines()[-1]}")
        sdist.unlink()
        saved = sorted(set(dest.iterdir()) - before)
    return saved


def existing(dest: Path, name: str, version: str) -> list[Path]:
    want = normalize(name)
    return [
        p
        for p in dest.iterdir()
        if p.suffix in (".whl", ".gz") and owner(p.name) == want and f"-{version}" in p.name.replace("_", "-")
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "gpu_wheels", help="the folder to fill (default: gpu_wheels/)")
    p.add_argument("--check", action="store_true", help="no download: size check and manifest of what is there")
    args = p.parse_args(argv)
    versions = pins()
    args.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {}
    errors: dict[str, str] = {}
    for group, names in GROUPS.items():
        files[group] = []
        for name in names:
            version = versions.get(normalize(name))
            if version is None:
                errors[group] = f"{name} is not pinned in constraints.txt"
                break
            have = existing(args.out, name, version)
            if not have and not args.check:
                try:
                    have = download(name, version, args.out)
                except RuntimeError as e:
                    errors[group] = str(e)
                    break
            if not have:
                errors[group] = f"{name}=={version} not downloaded"
                break
            files[group] += have
            for f in have:
                print(f"gpu_wheels: {group:<9} {f.name:<75} {f.stat().st_size / 2**20:6.2f} MiB", flush=True)
    tree = tree_bytes()
    size = {g: sum(f.stat().st_size for f in fs) for g, fs in files.items()}
    dropped = {g: e for g, e in errors.items()}
    if "base" in dropped:
        print(f"gpu_wheels: the base group is incomplete: {dropped['base']}", file=sys.stderr)
        return 1

    def total() -> int:
        return tree + sum(s for g, s in size.items() if g not in dropped)

    for group in DROP_ORDER:
        if total() <= LIMIT:
            break
        if group not in dropped:
            dropped[group] = f"does not fit: {total() / 2**20:.1f} MiB with it, over the 64 MiB limit"
    for group, why in dropped.items():
        for f in files.get(group, []):
            f.unlink()
        print(f"gpu_wheels: DROPPED {group}: {why}", flush=True)
    carried = {g: [f.name for f in fs] for g, fs in files.items() if g not in dropped}
    manifest = {
        "python": "cp312-manylinux-x86_64",
        "groups": carried,
        "dropped": dropped,
        "bytes": {g: size[g] for g in carried},
        "repository_bytes": tree,
        "total_bytes": total(),
        "limit_bytes": LIMIT,
        "deepspeed_build": "sdist: pip install --no-build-isolation on the GPU machine (needs its torch)"
        if "deepspeed" in carried
        else None,
    }
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    stray = [f.name for f in args.out.iterdir() if f.name != MANIFEST and f.name not in sum(carried.values(), [])]
    for name in stray:  # a file of an older pin or a dropped group: it would only take room
        (args.out / name).unlink()
    print(
        "gpu_wheels: "
        + ", ".join(f"{g} {size[g] / 2**20:.2f} MiB" for g in carried)
        + f"; repository {tree / 2**20:.2f} MiB; total {total() / 2**20:.2f} MiB of 64 MiB"
        + (f" (fits, {(LIMIT - total()) / 2**20:.2f} MiB to spare)" if total() <= LIMIT else " (DOES NOT FIT)"),
        flush=True,
    )
    return 0 if total() <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
