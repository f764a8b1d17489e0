import pytest
from kernel_testing import TRITON_RUNS, WHY_NOT

import kernels.common
from kernels.common import interpreting


@pytest.fixture(autouse=True)
def skip_triton_where_it_cannot_run(request):
    """A case parametrized with ``variant="triton"`` is skipped where the Triton kernels cannot run
    (kernel_testing.TRITON_RUNS), e.g. on a CPU machine with TRITON_INTERPRET unset."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("variant") == "triton" and not TRITON_RUNS:
        pytest.skip(WHY_NOT)


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
    if name == "large" and not interpreting():
        pytest.skip("the large interpreter tile is a CPU-interpreter setting: on a GPU this case repeats the default")
    if name == "large":
        monkeypatch.setattr(kernels.common, "INTERPRETER_TILE", kernels.common.LARGE_INTERPRETER_TILE)
    elif name != "default":
        raise ValueError(f"interpreter_tile must be 'default' or 'large', got {name!r}")
    return kernels.common.INTERPRETER_TILE
