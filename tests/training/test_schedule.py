"""The learning-rate schedule equals transformers' (what the seed's HF Trainer used), step by step."""

import math

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from kullm.training.module import lr_factor

HF = {
    "linear": lambda opt, w, t: get_linear_schedule_with_warmup(opt, w, t),
    "cosine": lambda opt, w, t: get_cosine_schedule_with_warmup(opt, w, t),
    "constant": lambda opt, w, t: get_constant_schedule_with_warmup(opt, w),
}


@pytest.mark.parametrize("schedule", sorted(HF))
@pytest.mark.parametrize(("warmup", "total"), [(100, 1000), (0, 50), (7, 31)])
def test_every_step_matches_transformers(schedule, warmup, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = HF[schedule](opt, warmup, total)
    for step in range(total):
        assert lr_factor(step, warmup=warmup, total=total, schedule=schedule) == pytest.approx(
            hf.get_last_lr()[0], abs=1e-12
        ), step
        opt.step()
        hf.step()


def test_hand_computed_points():
    # the seed recipe: 100 warmup steps, then linear to 0
    assert lr_factor(0, warmup=100, total=1100, schedule="linear") == 0.0
    assert lr_factor(50, warmup=100, total=1100, schedule="linear") == 0.5
    assert lr_factor(100, warmup=100, total=1100, schedule="linear") == 1.0
    assert lr_factor(600, warmup=100, total=1100, schedule="linear") == 0.5
    assert lr_factor(600, warmup=100, total=1100, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(350, warmup=100, total=1100, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(1100, warmup=100, total=1100, schedule="cosine", floor=0.1) == pytest.approx(0.1)
    assert lr_factor(600, warmup=100, total=1100, schedule="linear", floor=0.2) == pytest.approx(0.6)
    assert lr_factor(900, warmup=100, total=1100, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="cosine, linear or constant"):
        lr_factor(200, warmup=100, total=1100, schedule="step")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (9, 10)])
def test_the_decay_ends_at_the_floor_and_stays_there(schedule, warmup, total):
    """At the last step (also right after a one-step decay) and past it (a run longer than estimated): the floor."""
    for step in (total, total + 5):
        assert lr_factor(step, warmup=warmup, total=total, schedule=schedule, floor=0.1) == pytest.approx(0.1)
    # halfway through the decay: floor + (1 - floor) / 2
    assert lr_factor(50, warmup=0, total=100, schedule=schedule, floor=0.1) == pytest.approx(0.55)
