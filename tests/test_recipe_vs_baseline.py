"""What the recipe buys: on the CPU track, preset `tiny` (the speedrun recipe) reaches the track's target in
fewer steps than preset `tiny-adamw` (nanoGPT's recipe at the same size, on the same data, with the same
300-step budget).

Both sides are the suite's shared real runs (conftest.py: tiny_track_run, which trains both presets side by
side, validating at steps 0, 150 and 300 on the track's 131,072 val tokens). The recipe must cross the target
at some validation step; the baseline must not have crossed it by then, and must be behind at every
validation after step 0.
"""

from __future__ import annotations

import json

import pytest


def _facts(logs) -> dict:
    (json_path,) = logs.glob("*.json")
    return json.loads(json_path.read_text())


@pytest.mark.slow
def test_recipe_reaches_the_target_in_fewer_steps_than_adamw(tiny_track_run):
    _, recipe_logs, baseline_logs = tiny_track_run
    recipe, baseline = _facts(recipe_logs), _facts(baseline_logs)
    assert (recipe["preset"], baseline["preset"]) == ("sub3min-tiny", "tiny-adamw")
    target = recipe["target_val_loss"]
    assert target is not None
    # same track, same data, same val tokens
    assert (baseline["track"], baseline["target_val_loss"], baseline["data"]) == (
        recipe["track"], target, recipe["data"])
    recipe_curve, baseline_curve = recipe["val_curve"], baseline["val_curve"]
    recipe_steps = [p["step"] for p in recipe_curve if p["val_loss"] <= target]
    assert recipe_steps, f"the recipe never reached {target}: {recipe_curve}"
    assert [p["step"] for p in baseline_curve] == [p["step"] for p in recipe_curve]
    baseline_steps = [p["step"] for p in baseline_curve if p["val_loss"] <= target]
    assert not baseline_steps or baseline_steps[0] > recipe_steps[0], (
        f"tiny-adamw reached {target} at step {baseline_steps[0]}, the recipe at {recipe_steps[0]}")
    losses = {p["step"]: p["val_loss"] for p in baseline_curve}
    assert all(p["val_loss"] < losses[p["step"]] for p in recipe_curve if p["step"] > 0), baseline_curve
