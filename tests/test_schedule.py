"""speedrun/schedule.py: record #89's plan against the record's own schedule values (golden steps.json, every
step 0..1390), the Sub3Min plan against speedrun.config's functions, and `speedrun schedule`."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from speedrun import config, schedule
from speedrun.config import RunConfig, get_preset

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_record89_plan_equals_the_records_schedule_at_every_step(golden89):
    """At the golden's tiny sizes (block 32, batch / 32, lengths / 4): every value the record's schedule
    produced, at every step, bit for bit (MTP weights are stored as the record's fp32 tensors)."""
    cfg = golden89.run_config()
    rows = golden89.steps_json["schedule"]
    assert len(rows) == cfg.train.num_steps + 1 == 1391
    assert golden89.steps_json["split_step"] == schedule.split_step(cfg) == 921
    assert [list(b) for b in golden89.steps_json["stage_boundaries"]] == [list(b) for b in schedule.stage_bounds(cfg)]
    previous = None
    for row in rows:
        p = schedule.plan(cfg, row["step"])
        where = f"step {row['step']}"
        assert p.stage == row["stage"], where
        assert p.stage_frac == row["stage_frac"], where
        assert p.lr_mul == row["lr_multiplier"], where
        assert p.momentum == row["muon_momentum"], where
        assert p.adam_step == row["adam_step"], where
        assert p.untie == row["split_embed_step"], where
        assert p.training == row["training_step"], where
        assert p.window_blocks[0] == row["ws_short_blocks"], where
        final_long = row["ws_long_blocks_final_eval"] or row["ws_long_blocks"]
        assert p.window_blocks[1] == final_long, where
        if row["ws_long_blocks_final_eval"] is None:
            assert p.window_tokens == (row["ws_short_tokens_tiny"], row["ws_long_tokens_tiny"]), where
        assert p.batch_tokens == row["batch_size_tokens_tiny"], where
        assert p.max_doc_len == row["train_max_seq_len_tiny"], where
        assert p.attn_scale == row["yarn_attn_scale"] == row["yarn_paired_attn_scale"], where
        assert len(p.mtp_weights) == len(row["mtp_weights"]), where
        np.testing.assert_allclose(np.float32(p.mtp_weights), row["mtp_weights"], rtol=0, atol=1e-12, err_msg=where)
        reconfigured = previous is not None and (previous.batch_tokens, previous.max_doc_len) != (
            p.batch_tokens, p.max_doc_len)
        assert reconfigured == row["loader_reconfigured"], where
        assert (p.yarn is not None) == (previous is not None and p.training and
                                        previous.window_blocks[1] != p.window_blocks[1]), where
        previous = p


def test_record89_preset_has_the_records_full_size_values(golden89):
    """The preset's full-size batches, document lengths and windows are the record's (the golden rows carry
    the upstream values next to the tiny ones)."""
    cfg = get_preset("record89")
    for row in golden89.steps_json["schedule"]:
        p = schedule.plan(cfg, row["step"])
        assert p.batch_tokens == row["batch_size_tokens_upstream"]
        assert p.max_doc_len == row["train_max_seq_len_upstream"]
        if row["ws_long_blocks_final_eval"] is None:
            assert p.window_tokens == (row["ws_short_tokens_upstream"], row["ws_long_tokens_upstream"])


def test_record89_plan_matches_the_spec_tables():
    """Values the spec (recipe-frontier.md 1.3, 2.8, 4.2-4.4) lists, independent of the golden data."""
    cfg = get_preset("record89")
    steps = (0, 150, 459, 460, 551, 919, 920, 921, 922, 1000, 1341, 1379, 1380, 1389, 1390)
    p = {s: schedule.plan(cfg, s) for s in steps}
    assert [p[s].tokens_per_rank for s in (0, 460, 920, 1380)] == [16384, 32768, 49152, 49152]
    assert [p[s].cu_slots for s in (0, 460, 920)] == [64, 96, 128]
    assert schedule.cu_seqlens_slots(262_144) == 896 and schedule.cu_seqlens_slots(512) == 128
    assert schedule.cu_seqlens_slots(100) == 128
    assert p[459].lr_mul == 1.0 and p[551].lr_mul == 1.52
    assert p[919].lr_mul == pytest.approx(0.912766, abs=1e-6) and p[920].lr_mul == pytest.approx(1.027778, abs=1e-6)
    assert p[1000].lr_mul == pytest.approx(0.875121, abs=1e-6) and p[1379].lr_mul == pytest.approx(0.151908, abs=1e-6)
    assert p[1380].lr_mul == p[1389].lr_mul == 0.15
    assert p[0].momentum == 0.85 and p[150].momentum == pytest.approx(0.9) and p[1000].momentum == 0.95
    assert p[1341].momentum == pytest.approx(0.948) and p[1389].momentum == pytest.approx(0.852)
    assert [round(p[s].attn_scale, 6) for s in (0, 460, 920, 1380, 1390)] == [0.1, 0.116946, 0.127518, 0.131778,
                                                                            0.131778]
    assert [p[s].yarn for s in (460, 920, 1380)] == [(384, 896), (896, 1408), (1408, 1664)]
    assert p[1390].yarn is None and p[1390].window_tokens == (768, 2560)
    assert p[459].mtp_weights[2] == pytest.approx(0.25 / 460)
    assert p[921].tied and p[921].untie and p[921].adam_step and not p[922].tied
    assert schedule.plan(cfg, 15).fp8_bootstrap and not schedule.plan(cfg, 16).fp8_bootstrap
    validated = [s for s in range(1391) if schedule.plan(cfg, s).validate]
    assert validated == [0, 250, 500, 750, 1000, 1250, 1390]
    assert sum(schedule.plan(cfg, s).adam_step for s in range(1391)) == 695
    assert schedule.warmup_steps(cfg) == [0, 1, 458, 459, 460, 461, 918, 919, 920, 921, 1378, 1379, 1380, 1381]
    trained = sum(schedule.plan(cfg, s).batch_tokens for s in range(1390))
    assert trained == 365_690_880


@pytest.mark.parametrize("preset", ["sub3min", "sub3min-tiny", "tiny-adamw"])
def test_step_count_plan_is_the_config_schedule(preset):
    cfg = get_preset(preset)
    for step in range(0, cfg.train.num_steps + 1, 7):
        p = schedule.plan(cfg, step)
        assert p.lr_mul == config.lr_multiplier(step, cfg)
        if cfg.optim.kind == "muon_adam":
            assert p.momentum == pytest.approx(config.muon_momentum(step, cfg), abs=1e-15)
            long_blocks, short_blocks = config.window_blocks(step, cfg)
            assert p.window_blocks == (short_blocks, long_blocks)
        assert p.adam_step == (step < cfg.train.num_steps)


def test_plan_rejects_steps_outside_the_run():
    cfg = get_preset("record89")
    for bad in (-1, 1391, 2.0, True, "3"):
        with pytest.raises(ValueError, match="step must be an int"):
            schedule.plan(cfg, bad)


def test_staged_config_round_trips_through_json_and_is_checked():
    cfg = get_preset("record89")
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="past the staged schedule"):
        RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "num_steps": 1391}})
    stages = cfg.to_dict()["schedule"]["stages"]
    bad_stage = {**stages[0], "mtp_end": [1.0]}
    with pytest.raises(ValueError, match="one weight per"):
        RunConfig.from_dict({**cfg.to_dict(), "schedule": {**cfg.to_dict()["schedule"],
                                                          "stages": [bad_stage, *stages[1:]]}})
    # An old run log (no schedule section) still reads.
    old = get_preset("sub3min").to_dict()
    del old["schedule"]
    assert RunConfig.from_dict(old) == get_preset("sub3min")


def test_schedule_command_prints_the_plan():
    env = {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "speedrun.cli", "schedule", "--preset", "record89"], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "untimed warm-up steps: [0, 1, 458" in out and "365,690,880" in out
    rows = {int(line.split()[0]): line for line in out.splitlines() if line[:5].strip().isdigit()}
    assert {0, 16, 250, 300, 460, 552, 920, 921, 922, 1341, 1380, 1390} <= rows.keys()
    assert "yarn=384->896" in rows[460] and "untie_after_update" in rows[921] and "final validation" in rows[1390]
    lines = subprocess.run([sys.executable, "-m", "speedrun.cli", "schedule", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 1391
    assert json.loads(lines[921])["untie"] is True
    bad = subprocess.run([sys.executable, "-m", "speedrun.cli", "schedule", "--every", "0"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "positive integer" in bad.stderr


def test_presets_are_named_after_their_records_and_earlier_names_still_work():
    assert list(config.PRESETS)[0] == config.DEFAULT_GPU_PRESET == "record89"  # the frontier is the GPU race
    assert config.DEFAULT_CPU_PRESET == "sub3min-tiny"  # the tiny-cpu record's recipe
    for name, cfg in ((n, get_preset(n)) for n in config.PRESETS):
        assert cfg.preset == name and name in config.FOLLOWS
    for old, new in config.PRESET_ALIASES.items():
        assert get_preset(old) == get_preset(new)  # the same recipe, under its new name
        logged = {**get_preset(new).to_dict(), "preset": old}  # a committed run log says the old name
        assert RunConfig.from_dict(logged).preset == old
    assert config.preset_names() == [*config.PRESETS, "gpt2-124m", "tiny"]
    with pytest.raises(ValueError, match="unknown preset 'gpt2'.*earlier names: gpt2-124m = sub3min"):
        get_preset("gpt2")
