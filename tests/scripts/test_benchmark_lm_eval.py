"""``python -m benchmarks.lm_eval_speed``: a small run end to end, both commands, its section in a report."""

import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_a_small_run_writes_its_section_with_the_same_numbers_from_both_commands(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# B\n\n<!-- bench:prep -->\nold prep\n<!-- /bench:prep -->\n\n## Reading the numbers\nnotes\n")
    args = ["--rows", "8", "--repeats", "1", "--shape", "tiny", "--batch-size", "4", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lm_eval_speed", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# B\n\n<!-- bench:prep -->\nold prep\n") and text.rstrip().endswith("notes")
    section = text[text.index("<!-- bench:lm_eval -->") : text.index("<!-- /bench:lm_eval -->")]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| speed_")]
    assert [r[0] for r in rows] == ["| speed_mc", "| speed_gen"]
    assert all(r[4].startswith("yes: {") and float(r[1]) > 0 and float(r[2]) > 0 for r in rows), section
