"""An installed wheel, used from an empty folder: it carries the bundled samples (data/sample, data/sample_chat) as
package data, conf/ finds them there (``${kullm_data:…}``), and the sets scripts/download_data.py fetches stay out."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from kullm.config import DATA_DIR, ROOT


def test_the_checkout_reads_its_data_folder():
    assert DATA_DIR == ROOT / "data"
    assert not (ROOT / "kullm" / "assets" / "data").exists()  # only a wheel has it


@pytest.mark.timeout(300)
def test_kullm_prepare_from_an_installed_wheel_reads_the_bundled_sample(tmp_path):
    src, wheels, site, work = tmp_path / "src", tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "outputs", "build", "gpu_wheels", "*.egg-info",
                                                             "__pycache__", "kullm-v1", "kullm-v2", "raw"))  # fmt: skip
    downloaded = src / "data" / "eval" / "user_oriented_instructions_eval.jsonl"  # as download_data.py leaves it
    downloaded.parent.mkdir(exist_ok=True)
    downloaded.touch()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   timeout=240)  # fmt: skip
    (wheel,) = wheels.glob("kullm-*.whl")
    shipped = sorted(n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("kullm/assets/data/"))
    bundled = sorted(f"kullm/assets/data/{p.relative_to(ROOT / 'data').as_posix()}"
                     for p in (ROOT / "data").glob("sample*/*"))  # fmt: skip
    assert bundled and shipped == bundled
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=240)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the wheel's kullm first, as in a venv
    proc = subprocess.run(
        [str(site / "bin" / "kullm-prepare"), f"hydra.run.dir={work}/run", f"data.cache_dir={tmp_path}/cache"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((work / "run" / "data_stats.json").read_text(encoding="utf-8"))
    assert stats["source"] == str(site / "kullm" / "assets" / "data" / "sample")
    assert stats["eval_set"] is None  # not fetched for a wheel: no overlap check, as in a fresh checkout
    from datasets import load_from_disk

    dataset = load_from_disk(str(work / "run" / "dataset"))
    assert len(dataset["train"]) > 0 and len(dataset["validation"]) > 0
    assert {"input_ids", "labels", "attention_mask"} <= set(dataset["train"].column_names)
