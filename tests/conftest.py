import os
import shutil

# Kernel tests run under Triton's CPU interpreter when there is no CUDA GPU. It must be chosen before
# triton is imported; ./run.sh sets it too, this covers a bare `pytest`.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def golden89():
    """../shared/reference/golden/record89-tiny as a tests/golden.py ``Golden``; skips when absent."""
    from golden import GOLDEN89, Golden

    if not (GOLDEN89 / "config.json").is_file():
        pytest.skip("../shared/reference/golden/record89-tiny is absent (a user's fresh clone has no ../shared)")
    return Golden(GOLDEN89)


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data (the GPT-2 vocabulary and a FineWeb text sample); skips when absent."""
    if not (SHARED_DATA / "tiktoken-cache").is_dir():
        pytest.skip("../shared/data is absent (a user's fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture
def tiktoken_cache(shared_data, monkeypatch) -> pathlib.Path:
    """Point tiktoken at the shared offline vocabulary."""
    cache = shared_data / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_track_run(tmp_path_factory):
    """One real run of the `tiny` preset on the CPU track, as a user runs it: the synthetic language
    generated into a temporary data root, then `speedrun train --preset sub3min-tiny --val-every 150` (about 3
    minutes on 2 cores; a validation on the track's 131,072 tokens takes ~4.6 s here, so the preset's cadence
    of 50 would add 20 s to this run and as much to the AdamW baseline that shares it). Returns (data_root,
    logs_dir); logs_dir holds the run's .txt and .json. Shared by the slow tests that need a real on-track run,
    so the suite pays for it once."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny_track")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    data, logs = root / "data", root / "logs"
    synth = subprocess.run([sys.executable, "-m", "speedrun.cli", "data", "synth", "--out", str(data / "synth")],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert synth.returncode == 0, synth.stderr
    train = subprocess.run([sys.executable, "-m", "speedrun.cli", "train", "--preset", "sub3min-tiny", "--data",
                            str(data / "synth"), "--val-every", "150", "--log-dir", str(logs), "--quiet"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stdout + train.stderr
    return data, logs


@pytest.fixture
def synthetic_track_data(monkeypatch):
    """The tiny-cpu track's validation data as the synthetic run logs (tests/synthetic_records.py) claim it,
    in place of the real track's (speedrun/tracks.py), for tests of the leaderboard on those logs."""
    from synthetic_records import SYNTH_FLOOR, SYNTH_VAL_SHA256

    from speedrun.tracks import TRACKS

    monkeypatch.setitem(TRACKS, "tiny-cpu", dataclasses.replace(TRACKS["tiny-cpu"], data_floor=SYNTH_FLOOR,
                                                                 val_data_sha256=SYNTH_VAL_SHA256))
