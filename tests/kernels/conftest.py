import pytest

import kernels.common


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so unwritten elements fail the comparison."""
    monkeypatch.setattr(kernels.common, "POISON_OUTPUTS", True)


@pytest.fixture
def interpreter_tile(request, monkeypatch):
    """The kernels' tile edge under the CPU interpreter for this test, by name (parametrize with
    indirect=True): "default" (kernels.common.INTERPRETER_TILE: small, so small shapes reach the multi-tile
    paths) or "large" (LARGE_INTERPRETER_TILE, what model-level runs use: tiles as large as the problem or
    larger, masked). Returns the tile edge; on a GPU it changes nothing."""
    name = getattr(request, "param", "default")
    if name == "large":
        monkeypatch.setattr(kernels.common, "INTERPRETER_TILE", kernels.common.LARGE_INTERPRETER_TILE)
    elif name != "default":
        raise ValueError(f"interpreter_tile must be 'default' or 'large', got {name!r}")
    return kernels.common.INTERPRETER_TILE
