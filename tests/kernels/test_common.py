"""kernels/common.py: the CPU interpreter's tile knob and thread limit."""

import pytest
import torch

import kernels.common as common


def test_interpreter_tile_default_and_checks(monkeypatch):
    assert common.interpreter_tile() == common.DEFAULT_INTERPRETER_TILE == 32
    for bad in (16, 48, 1024, 64.0, True, "64"):
        monkeypatch.setattr(common, "INTERPRETER_TILE", bad)
        with pytest.raises(ValueError, match="INTERPRETER_TILE"):
            common.interpreter_tile()


def test_interpreter_block_cuts_to_the_dimension(monkeypatch):
    assert [common.interpreter_block(n) for n in (0, 1, 20, 33, 100, 5000)] == [32] * 6  # the default: 32
    monkeypatch.setattr(common, "INTERPRETER_TILE", 256)
    assert [common.interpreter_block(n) for n in (0, 1, 32, 33, 100, 128, 129, 5000)] == [32, 32, 32, 64, 128,
                                                                                         128, 256, 256]


def test_use_large_interpreter_tiles(monkeypatch):
    monkeypatch.setattr(common, "INTERPRETER_TILE", common.INTERPRETER_TILE)  # restored after the test
    assert common.use_large_interpreter_tiles() == 32
    assert common.INTERPRETER_TILE == common.LARGE_INTERPRETER_TILE
    assert common.use_large_interpreter_tiles(64) == common.LARGE_INTERPRETER_TILE
    with pytest.raises(ValueError, match="power of two"):
        common.use_large_interpreter_tiles(100)
    assert common.INTERPRETER_TILE == 64  # unchanged by the refused value


def test_limit_interpreter_threads_restores():
    before = torch.get_num_threads()
    blas = common._openblas_thread_setters()
    blas_before = [get() for get, _ in blas]
    restore = common.limit_interpreter_threads(1)
    try:
        assert torch.get_num_threads() == 1
        assert all(get() == 1 for get, _ in blas)
    finally:
        restore()
    assert torch.get_num_threads() == before
    assert [get() for get, _ in blas] == blas_before


def test_interpreter_settings_for_model_runs_are_restored():
    tile, threads = common.INTERPRETER_TILE, torch.get_num_threads()
    with common.interpreter_settings_for_model_runs(torch.device("cpu")):
        if common.interpreting():
            assert common.INTERPRETER_TILE == common.LARGE_INTERPRETER_TILE and torch.get_num_threads() == 1
    assert (common.INTERPRETER_TILE, torch.get_num_threads()) == (tile, threads)
    with pytest.raises(KeyError):  # restored when the block raises, too
        with common.interpreter_settings_for_model_runs(torch.device("cpu")):
            raise KeyError("x")
    assert (common.INTERPRETER_TILE, torch.get_num_threads()) == (tile, threads)
