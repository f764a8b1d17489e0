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


def pytest_configure(config):
    """Under pytest-xdist (./run.sh test runs two workers on what is often a 2-core machine) every worker and the
    processes its tests start compute on one thread: with a thread per core, the two workers' idle torch/BLAS
    threads spin on each other's cores (in one run a 10 s test took 320 s)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        from kernels.common import limit_interpreter_threads

        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # for the subprocesses
            os.environ[name] = "1"
        limit_interpreter_threads(1)  # for this process, whose torch and numpy may be loaded already


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    import torch

    _group_for_workers(items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _group_for_workers(items):
    """How pytest-xdist shares the suite between the workers of `./run.sh test` (`-n 2 --dist loadgroup
    --no-loadscope-reorder`: groups are handed out in this order): a file's tests stay on one worker, so its
    module fixtures are built once; the tests of the shared real run (tiny_track_run) form one group, and it
    goes first, because it is the longest chain of the suite (~7 minutes)."""
    shares_run = [item for item in items if "tiny_track_run" in getattr(item, "fixturenames", ())]
    for item in items:
        item.add_marker(pytest.mark.xdist_group("tiny_track_run" if item in shares_run else item.path.stem))
    items[:] = shares_run + [item for item in items if item not in shares_run]


@pytest.fixture(scope="session")
def tiny_track_run(tmp_path_factory):
    """Real runs on the CPU track, as a user runs them: the synthetic language generated into a temporary data
    root, then `speedrun train --preset sub3min-tiny --val-every 150` (the recipe) and, at the same time in a
    second process, the same with `--preset tiny-adamw` (nanoGPT's recipe, the baseline that
    tests/test_recipe_vs_baseline.py compares with), each on one thread: ~7 minutes for both on 2 cores
    beside the other worker. A validation on the track's 131,072 tokens takes ~4.6 s here, so the presets'
    cadence of 50 would add 20 s to each run. Returns (data_root, logs_dir, baseline_logs_dir); each logs
    folder holds one run's .txt and .json. Shared by the slow tests that need a real on-track run, so the
    suite pays for it once."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny_track")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    data = root / "data"
    synth = subprocess.run([sys.executable, "-m", "speedrun.cli", "data", "synth", "--out", str(data / "synth")],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert synth.returncode == 0, synth.stderr
    runs = {}
    for preset in ("sub3min-tiny", "tiny-adamw"):
        output = root / f"{preset}.out"
        with open(output, "w") as out:
            runs[preset] = output, subprocess.Popen(
                [sys.executable, "-m", "speedrun.cli", "train", "--preset", preset, "--data", str(data / "synth"),
                 "--val-every", "150", "--log-dir", str(root / preset), "--quiet"],
                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    for preset, (output, process) in runs.items():
        # the trainer exits 1 on a run that ends above the target, as the baseline does (its test checks that)
        assert process.wait() == (0 if preset == "sub3min-tiny" else 1), output.read_text()
    return data, root / "sub3min-tiny", root / "tiny-adamw"


@pytest.fixture
def synthetic_track_data(monkeypatch):
    """The tiny-cpu track's validation data as the synthetic run logs (tests/synthetic_records.py) claim it,
    in place of the real track's (speedrun/tracks.py), for tests of the leaderboard on those logs."""
    from synthetic_records import SYNTH_FLOOR, SYNTH_VAL_SHA256

    from speedrun.tracks import TRACKS

    monkeypatch.setitem(TRACKS, "tiny-cpu", dataclasses.replace(TRACKS["tiny-cpu"], data_floor=SYNTH_FLOOR,
                                                                 val_data_sha256=SYNTH_VAL_SHA256))
