import os
import shutil

# Kernel tests run under Triton's CPU interpreter when there is no CUDA GPU. It must be chosen before
# triton is imported; ./run.sh sets it too, this covers a bare `pytest`.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"


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
