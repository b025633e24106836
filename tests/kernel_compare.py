"""Two kernels' answers at one θ, compared: the tests of a kernel's fast path against its
general one share this (tests/test_multi_collapsed.py, tests/test_onefactor_small.py)."""
from __future__ import annotations

import numpy as np


def assert_same_evaluation(got: tuple, want: tuple, rtol: float) -> tuple:
    """``Kernel.evaluate`` tuples (objective, r², log|L|², status, β̂, Lx, gradient) of two
    kernels at the same θ: status 0 in both, the rest but the gradient equal to ``rtol``
    (β̂ and Lx relative to their largest entry). Returns the two gradients (None without)."""
    f1, r2_1, ld1, s1, b1, Lx1, g1 = got
    f2, r2_2, ld2, s2, b2, Lx2, g2 = want
    assert s1 == s2 == 0
    np.testing.assert_allclose(ld1, ld2, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(f1, f2, rtol=rtol)
    np.testing.assert_allclose(r2_1, r2_2, rtol=rtol)
    if b2.size:
        np.testing.assert_allclose(b1, b2, rtol=rtol, atol=rtol * np.abs(b2).max())
        np.testing.assert_allclose(Lx1, Lx2, rtol=rtol, atol=rtol * np.abs(Lx2).max())
    return g1, g2
