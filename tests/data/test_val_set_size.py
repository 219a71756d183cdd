"""``data.val_set_size``: a count or a fraction of the records, a warning when it holds out much of a small file,
and the split sizes printed by ``kullm-train`` as ``kullm-prepare`` prints them."""

import json
import re

import pytest
from console_scripts import run_script

from kullm.config import ConfigError, compose, validate
from kullm.data.preprocess import split_records
from kullm.data.records import Record
from kullm.data.sources import DataError


def twelve_rows(tmp_path):
    path = tmp_path / "twelve.jsonl"
    rows = [{"id": f"r{i}", "instruction": f"질문 {i}번", "output": f"답변 {i}입니다."} for i in range(12)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_fraction_holds_out_that_share_of_the_records_rounded_up():
    recs = [Record(str(i), "q", "", "a") for i in range(100)]
    assert [len(s) for s in split_records(recs, 0.05, seed=0)] == [95, 5]
    assert [len(s) for s in split_records(recs[:12], 0.05, seed=0)] == [11, 1]
    assert [len(s) for s in split_records(recs[:12], 8, seed=0)] == [4, 8]
    assert [len(s) for s in split_records(recs[:12], 0.0, seed=0)] == [12, 0]
    with pytest.raises(DataError, match=r"^val_set_size=0.99 \(12 rows\) leaves no training rows: only 12 records"):
        split_records(recs[:12], 0.99, seed=0)


def test_the_default_holds_out_a_fraction_and_kullm_presets_keep_2000_rows():
    assert compose("train", ["output_dir=/tmp/unused"]).data.val_set_size == 0.05
    for data in ("kullm-v1", "kullm-v2"):
        assert compose("train", [f"data={data}", "output_dir=/tmp/unused"]).data.val_set_size == 2000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "data.val_set_size=-1: must be at least 0"),
        ("-0.1", "data.val_set_size=-0.1: must be at least 0"),
        ("1.0", "data.val_set_size=1.0: a fraction must lie below 1; a count of rows is an integer"),
        ("2.5", "data.val_set_size=2.5: a fraction must lie below 1; a count of rows is an integer"),
        ("true", "data.val_set_size=True: expected float, got bool"),
    ],
)
def test_a_bad_val_set_size_is_refused_naming_it(value, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        validate(compose("train", ["output_dir=/tmp/unused", f"data.val_set_size={value}"]))


@pytest.mark.slow
def test_a_val_set_size_of_1_5_is_one_line_from_kullm_train(tmp_path):
    res = run_script("kullm-train", "experiment=smoke", "data.val_set_size=1.5", cwd=tmp_path, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        "kullm-train: data.val_set_size=1.5: a fraction must lie below 1; a count of rows is an integer"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kullm_train_prints_the_split_and_warns_when_most_of_a_small_file_is_held_out(tmp_path):
    args = ("experiment=smoke", f"data.path={twelve_rows(tmp_path)}", "trainer.max_steps=1", "logger=none",
            "callbacks.samples.num=0", f"data.cache_dir={tmp_path}/cache")  # fmt: skip
    res = run_script("kullm-train", *args, "data.val_set_size=8", cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = res.stdout + res.stderr
    assert "kullm-train: 4 training and 8 validation examples (data.val_set_size=8)" in printed
    warned = [x for x in printed.splitlines() if "holds out" in x]
    assert len(warned) == 1 and warned[0].endswith(
        "data.val_set_size=8 holds out 8 of 12 records (67%) for validation, leaving 4 to train on: "
        "give a smaller count or a fraction (e.g. data.val_set_size=0.05)"
    )


@pytest.mark.timeout(300)
def test_kullm_prepare_holds_out_the_default_fraction_of_a_small_file_without_a_warning(tmp_path):
    res = run_script("kullm-prepare", f"data.path={twelve_rows(tmp_path)}", f"data.cache_dir={tmp_path}/cache",
                     cwd=tmp_path, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"train: kept +11\n", res.stdout) and re.search(r"validation: kept +1\n", res.stdout)
    assert "holds out" not in res.stdout + res.stderr
