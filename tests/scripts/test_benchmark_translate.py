"""``python -m benchmarks.translate``: a small run end to end against the fake servers, its section in a report."""

import subprocess
import sys

from helpers import ROOT


def test_a_small_run_writes_its_section_and_kullm_beats_the_sequential_loop(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# B\n\n<!-- bench:prep -->\nold prep\n<!-- /bench:prep -->\n\n## Reading the numbers\nnotes\n")
    args = ["--rows", "200", "--per-text-rows", "12", "--latency", "0.05", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.translate", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# B\n\n<!-- bench:prep -->\nold prep\n") and text.rstrip().endswith("notes")
    section = text[text.index("<!-- bench:translate -->") : text.index("<!-- /bench:translate -->")]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "`" in line]
    variants = ["sequential", "kullm", "kullm_over", "sequential", "kullm", "sequential", "kullm"]
    assert [r[1] for r in rows] == [f"`{v}`" for v in variants]
    rate = {(r[0], r[1]): float(r[2]) for r in rows}
    # 12 texts one per request at 0.05 s each (>= 0.6 s) against one request of 12 texts: far faster, on any box
    seed_loop = next(k for k in rate if "seed's loop" in k[0] and k[1] == "`sequential`")
    assert rate[(seed_loop[0], "`kullm`")] > 2 * rate[seed_loop]
