"""kernels/fp8.py: the saturating e4m3 / e5m2 casts against rounding to the grids the spec lists
(recipe-frontier.md 6, "FP8 grids"), built here from the formats' definitions."""

import numpy as np
import pytest
import torch

from kernels.fp8 import scaled_mm, to_e4m3, to_e5m2


def grid(subnormals, normals) -> np.ndarray:
    """Non-negative magnitudes and, for ties, whether each has an even mantissa."""
    values = [(0.0, True)] + subnormals + normals
    values.sort()
    return np.array([v for v, _ in values]), np.array([e for _, e in values])


E4M3 = grid([(k * 2.0**-9, k % 2 == 0) for k in range(1, 8)],
            [((1 + m / 8) * 2.0**e, m % 2 == 0) for e in range(-6, 9) for m in range(8) if (e, m) != (8, 7)])
E5M2 = grid([(k * 2.0**-16, k % 2 == 0) for k in range(1, 4)],
            [((1 + m / 4) * 2.0**e, m % 2 == 0) for e in range(-14, 16) for m in range(4)])


def round_to(values: np.ndarray, table) -> np.ndarray:
    """Round to nearest on the grid, ties to the even mantissa, saturating at the largest magnitude."""
    grid_values, even = table
    mag = np.minimum(np.abs(values), grid_values[-1])
    hi = np.clip(np.searchsorted(grid_values, mag), 1, len(grid_values) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - grid_values[lo], grid_values[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & even[hi])
    return np.sign(values) * np.where(pick_hi, grid_values[hi], grid_values[lo])


@pytest.mark.parametrize("cast, table, top", [(to_e4m3, E4M3, 448.0), (to_e5m2, E5M2, 57344.0)])
def test_casts_round_to_the_grid_and_saturate(cast, table, top):
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(4000) * 10.0 ** rng.uniform(-7, 5, 4000),  # every exponent, both signs
        (table[0][1:] + table[0][:-1]) / 2,  # exact ties between neighbours
        [top, top * 1.01, top * 1e3, -top * 7, 0.0],  # saturation
    ]).astype(np.float32)
    got = cast(torch.from_numpy(values)).float().numpy()
    np.testing.assert_array_equal(got, round_to(values.astype(np.float64), table).astype(np.float32))
    assert cast(torch.tensor([float("nan")])).float().isnan().all()


def test_scaled_mm_sums_exact_products_in_fp32():
    g = torch.Generator().manual_seed(1)
    a8, b8 = to_e4m3(torch.randn(5, 40, generator=g) * 30), to_e4m3(torch.randn(40, 3, generator=g) * 30)
    want = (0.25 * (a8.double() @ b8.double())).to(torch.bfloat16)
    assert torch.equal(scaled_mm(a8, b8, 0.25, torch.bfloat16), want)
