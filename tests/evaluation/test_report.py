"""The G-Eval report's numbers, against values computed by hand."""

import math

import pytest

from kullm.evaluation.geval import Criterion
from kullm.evaluation.report import markdown, scale, set_relative, summarize

A, B, C = Criterion("a", 0, 1, "A"), Criterion("b", 1, 3, "B"), Criterion("c", 1, 5, "C")
CRITERIA = [A, B, C]


def judged(scores, weighted=None):
    return {"status": "ok", "scores": dict(zip("abc", scores, strict=True)), "weighted": weighted}


def test_min_max_scaling_as_in_kullms_graph():
    assert scale(0, A) == 0 and scale(1, A) == 100
    assert scale(1, B) == 0 and scale(3, B) == 100 and scale(2, B) == 50  # score/max would say 33 and 67
    assert scale(1, C) == 0 and scale(4, C) == 75
    # KULLM's graph shows koVicuna at 26 and 29 on 1–3 criteria: possible only under min–max
    assert scale(1.52, B) == pytest.approx(26) and scale(1.58, B) == pytest.approx(29)


def test_overall_is_the_mean_of_scaled_criteria_and_relative_is_a_ratio():
    run = summarize("run", [judged((0, 1, 5)), judged((1, 1, 5)), judged((1, 1, 5))], CRITERIA, 3)
    assert run.means == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 5.0})
    assert run.scaled(A) == pytest.approx(200 / 3) and run.scaled(B) == 0 and run.scaled(C) == 100
    assert run.overall == pytest.approx((200 / 3 + 0 + 100) / 3)  # 55.56
    ref = summarize("ref", [judged((1, 3, 5)), judged((1, 3, 3))], CRITERIA, 2)
    assert ref.overall == pytest.approx((100 + 100 + 75) / 3)  # 91.67
    set_relative([run, ref], "ref")
    assert run.relative == pytest.approx(run.overall / ref.overall * 100) and ref.relative == pytest.approx(100)
    assert "55.6" in markdown([run, ref], CRITERIA, "ref")


def test_counts_failed_and_not_judged_items_without_scoring_them():
    run = summarize("run", [judged((1, 3, 5)), {"status": "failed", "scores": None}], CRITERIA, 4)
    assert (run.n_total, run.n_ok, run.n_failed, run.n_pending) == (4, 1, 1, 2)
    assert run.overall == pytest.approx(100)


def test_weighted_means_only_when_every_item_has_one():
    w1, w2 = {"a": 0.5, "b": 2.0, "c": 4.0}, {"a": 1.0, "b": 3.0, "c": 2.0}
    full = summarize("run", [judged((1, 2, 4), w1), judged((1, 3, 2), w2)], CRITERIA, 2)
    assert full.weighted == pytest.approx({"a": 0.75, "b": 2.5, "c": 3.0})
    partial = summarize("run", [judged((1, 2, 4), w1), judged((1, 3, 2))], CRITERIA, 2)
    assert partial.weighted == {"a": None, "b": None, "c": None}


def test_bootstrap_interval_has_the_asked_confidence():
    """Two items scoring 0 and 1: a resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 95%
    percentile interval is [0, 1] and the 40% one (30th–70th percentiles) is [0.5, 0.5]."""
    items = [judged((0, 1, 1)), judged((1, 1, 1))]
    wide = summarize("run", items, CRITERIA, 2, samples=4000, confidence=0.95, seed=1)
    narrow = summarize("run", items, CRITERIA, 2, samples=4000, confidence=0.40, seed=1)
    assert wide.ci["a"] == (0.0, 1.0)
    assert narrow.ci["a"] == (0.5, 0.5)
    assert narrow.overall_ci == pytest.approx((50 / 3, 50 / 3))  # only criterion a varies: 0.5 → 50, over 3


def test_counts_and_pending_are_exact():
    items = [judged((1, 3, 5)), judged((0, 1, 1)), {"status": "failed", "scores": None}]
    run = summarize("run", items, CRITERIA, 3)
    assert (run.n_ok, run.n_failed, run.n_pending) == (2, 1, 0)
    assert math.isnan(summarize("none", [], CRITERIA, 0).scaled(A))


def test_intervals_are_seeded_and_scaled_per_criterion_span():
    items = [judged((0, 1, 1)), judged((1, 3, 1)), judged((1, 2, 5)), judged((0, 3, 2))]
    one = summarize("run", items, CRITERIA, 4, samples=500, seed=7)
    assert summarize("run", items, CRITERIA, 4, samples=500, seed=7).overall_ci == one.overall_ci  # reproducible
    assert summarize("run", items, CRITERIA, 4, samples=500, seed=8).overall_ci != one.overall_ci
    two = [judged((0, 1, 1)), judged((0, 3, 1))]  # only b varies: its resampled mean is 1, 2 or 3
    ci = summarize("run", two, CRITERIA, 2, samples=4000, confidence=0.95, seed=1).overall_ci
    assert ci == pytest.approx((0.0, 100 / 3))  # b scaled by its span (3 - 1), averaged over three criteria
    assert markdown([one], CRITERIA).count(" [") >= len(CRITERIA) + 1


def test_relative_needs_a_reference_with_a_score():
    run = summarize("run", [judged((1, 3, 5))], CRITERIA, 1)
    empty = summarize("empty", [], CRITERIA, 3)
    set_relative([run, empty], "empty")
    assert run.relative is None and empty.relative is None  # nothing to divide by
    with pytest.raises(ValueError, match="reference run 'gpt4' is not among the runs"):
        set_relative([run], "gpt4")


def _two_runs():
    from kullm.evaluation.report import RunStats

    run = RunStats("mine", 5, 3, 1, 1, means={"a": 0.5, "b": 2.0, "c": 4.25}, ci={"a": (0.25, 0.75), "b": (1.5, 2.5)},
                   weighted={"a": 0.5, "b": 2.125, "c": None}, overall=60.4167, overall_ci=(50.0, 70.25),
                   relative=120.5, notes=["2 replies unparsed"])  # fmt: skip
    ref = RunStats("ref", 5, 5, 0, 0, means={"a": 1.0, "b": 1.5, "c": 3.0}, overall=50.0, overall_ci=(45.0, 55.0),
                   relative=100.0)  # fmt: skip
    return [run, ref]


def test_the_markdown_report_exactly():
    """The whole text a user reads: warnings first, raw means with intervals (– where there is none), the 0–100
    table with the overall interval and the relative score, then the probability-weighted means."""
    text = markdown(_two_runs(), CRITERIA, "ref", header="judge: gpt-4o")
    assert text == (
        "# G-Eval report\n\njudge: gpt-4o\n\n"
        "> **WARNING (mine)**: 2 replies unparsed\n\n"
        "## Mean scores (95% bootstrap interval)\n\n"
        "| run | judged | failed | not judged | a (0 - 1) | b (1 - 3) | c (1 - 5) |\n"
        "|---|---|---|---|---|---|---|\n"
        "| mine | 3 | 1 | 1 | 0.50 [0.25, 0.75] | 2.00 [1.50, 2.50] | 4.25 [–, –] |\n"
        "| ref | 5 | 0 | 0 | 1.00 [–, –] | 1.50 [–, –] | 3.00 [–, –] |\n\n"
        "## Scaled to 0–100 ((mean − min) / (max − min) × 100, as in KULLM's graph)\n\n"
        "| run | A | B | C | overall [95% CI] | relative to ref (%) |\n"
        "|---|---|---|---|---|---|\n"
        "| mine | 50.0 | 50.0 | 81.2 | 60.4 [50.0, 70.2] | 120.5 |\n"
        "| ref | 100.0 | 25.0 | 50.0 | 50.0 [45.0, 55.0] | 100.0 |\n\n"
        "## G-Eval probability-weighted means\n\n"
        "| run | a (0 - 1) | b (1 - 3) | c (1 - 5) |\n"
        "|---|---|---|---|\n"
        "| mine | 0.500 | 2.125 | – |\n"
        "| ref | – | – | – |\n"
    )
    plain = markdown(_two_runs()[1:], CRITERIA)  # no header, no warning, no reference, no weighted means
    assert plain.startswith("# G-Eval report\n\n## Mean scores") and "| relative (%) |" in plain
    assert "probability-weighted" not in plain
    full = _two_runs()[1]
    full.weighted = {"a": 1.0, "b": 1.5, "c": 3.0}  # every value present: the section is shown
    assert markdown([full], CRITERIA).endswith("| run | a (0 - 1) | b (1 - 3) | c (1 - 5) |\n|---|---|---|---|\n"
                                               "| ref | 1.000 | 1.500 | 3.000 |\n")  # fmt: skip


def test_the_csv_rows_and_file_exactly(tmp_path):
    from kullm.evaluation.report import csv_rows, write_csv

    rows = csv_rows(_two_runs()[:1], CRITERIA)
    assert [r["criterion"] for r in rows] == ["a", "b", "c", "overall"]
    assert rows[1] == {"run": "mine", "criterion": "b", "label": "B", "min": 1, "max": 3, "n": 3, "mean": 2.0,
                       "ci_low": 1.5, "ci_high": 2.5, "scaled": 50.0, "weighted_mean": 2.125,
                       "relative": None}  # fmt: skip
    assert rows[3] == {"run": "mine", "criterion": "overall", "label": "Overall", "min": 0, "max": 100, "n": 3,
                       "mean": 60.4167, "ci_low": 50.0, "ci_high": 70.25, "scaled": 60.4167, "weighted_mean": None,
                       "relative": 120.5}  # fmt: skip
    from kullm.evaluation.report import RunStats

    empty = RunStats("빈 실행", 2, 0, 0, 2)  # nothing judged yet: no mean, NaN overall
    write_csv([*_two_runs()[:1], empty], CRITERIA, tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_bytes().decode("utf-8").split("\r\n")  # csv's own line ends, untranslated
    assert lines[0] == "run,criterion,label,min,max,n,mean,ci_low,ci_high,scaled,weighted_mean,relative"
    assert lines[3] == "mine,c,C,1,5,3,4.25,,,81.25,,"  # no interval, no weighted mean: empty cells, not "None"
    assert lines[4] == "mine,overall,Overall,0,100,3,60.4167,50.0,70.25,60.4167,,120.5"
    assert lines[5] == "빈 실행,a,A,0,1,0,,,,,,"  # NaN is an empty cell too, not "nan"
    assert lines[8] == "빈 실행,overall,Overall,0,100,0,,,,,," and lines[9] == ""


def test_report_files_replace_links_planted_in_their_place_and_never_write_through_them(tmp_path):
    from kullm.evaluation.report import write_report

    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "report"
    out.mkdir()
    for name in ("report.md", "report.csv", "report.png"):
        (outside / name).write_text("someone else's file", encoding="utf-8")
        (out / name).symlink_to(outside / name)
    paths = write_report(_two_runs()[:1], CRITERIA, out)
    for name, path in zip(("report.md", "report.csv", "report.png"), paths.values(), strict=True):
        assert (outside / name).read_text(encoding="utf-8") == "someone else's file"
        assert not path.is_symlink() and path.stat().st_size > 0
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.md", "report.png"]  # no temporaries
