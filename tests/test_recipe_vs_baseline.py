"""What the recipe buys: on the CPU track, preset `tiny` (the speedrun recipe) reaches the track's target in
fewer steps than preset `tiny-adamw` (nanoGPT's recipe at the same size, on the same data, with the same
300-step budget).

The recipe's side is the suite's shared real run of the tiny preset (conftest.py: tiny_track_run, which
validates at steps 0, 150 and 300 on the track's 131,072 val tokens); the baseline trains here on the same data
with the same validation. The recipe must cross the target at some validation step; the baseline must
not have crossed it by then, and must be behind at every validation after step 0.
"""

from __future__ import annotations

import json

import pytest
import torch

import speedrun.train as train_mod
from speedrun import dist
from speedrun.cli import build_parser


def _curve(json_path) -> tuple[list[dict], float]:
    facts = json.loads(json_path.read_text())
    return facts["val_curve"], facts["target_val_loss"]


@pytest.mark.slow
def test_recipe_reaches_the_target_in_fewer_steps_than_adamw(tmp_path, tiny_track_run):
    data_root, logs = tiny_track_run
    (recipe_json,) = logs.glob("*.json")
    recipe_curve, target = _curve(recipe_json)
    assert target is not None
    recipe_steps = [p["step"] for p in recipe_curve if p["val_loss"] <= target]
    assert recipe_steps, f"the recipe never reached {target}: {recipe_curve}"

    args = build_parser().parse_args(["train", "--preset", "tiny-adamw", "--data", str(data_root / "synth"),
                                       "--val-every", "150"])
    cfg = train_mod.resolve_config(args, cuda=False)
    env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg, data_dir, manifest = train_mod.prepare_data(cfg, env)
    baseline_target = train_mod.get_track(cfg.track).target(train_mod.data_floor(manifest, cfg.data.val_tokens))
    assert baseline_target == target  # same track, same data, same val tokens
    result = train_mod.train(cfg, env, data_dir, target, cfg.track, log_dir=tmp_path, echo=False)
    baseline_curve, _ = _curve(result.json_path)
    assert [p["step"] for p in baseline_curve] == [p["step"] for p in recipe_curve]
    baseline_steps = [p["step"] for p in baseline_curve if p["val_loss"] <= target]
    assert not baseline_steps or baseline_steps[0] > recipe_steps[0], (
        f"tiny-adamw reached {target} at step {baseline_steps[0]}, the recipe at {recipe_steps[0]}")
    baseline = {p["step"]: p["val_loss"] for p in baseline_curve}
    assert all(p["val_loss"] < baseline[p["step"]] for p in recipe_curve if p["step"] > 0), baseline_curve
