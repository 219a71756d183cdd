"""scripts/plant_bugs.py stays runnable: each planted bug's line is still in its file, once, and its tests exist."""

import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import plant_bugs  # noqa: E402


@pytest.mark.parametrize("bug", plant_bugs.BUGS, ids=lambda b: b.what[:40])
def test_each_planted_bug_still_applies(bug):
    text = (ROOT / bug.path).read_text(encoding="utf-8")
    assert text.count(bug.old) == 1, f"{bug.path}: the line to plant the bug in moved"
    assert bug.new != bug.old
    for test in bug.tests:
        path, _, name = test.partition("::")
        source = (ROOT / path).read_text(encoding="utf-8")
        assert not name or f"def {name}(" in source, test
