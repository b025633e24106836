"""The construction path's shortcuts give what the plain computations give: the pass over the rows
for every block size it has a special copy of, sorted or shuffled rows; X'X, X'y, y'y taken from
the front end's column moments; the group codes of integer and string labels."""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast import _crossprods
from lmefast._testing import random_slopes
from lmefast.crossprods import compute_crossprods, record_offsets
from lmefast.spec import build_layout


def reference_records(y: np.ndarray, X: np.ndarray, Z: np.ndarray, codes: np.ndarray, m: int
                      ) -> np.ndarray:
    """[A_i | B_i | c_i] per group from dense products."""
    out = []
    for g in range(m):
        rows = codes == g
        Zi, Xi, yi = Z[rows], X[rows], y[rows]
        out.append(np.concatenate([(Zi.T @ Zi).ravel(), (Zi.T @ Xi).ravel(), Zi.T @ yi]))
    return np.concatenate(out)


def row_pass(y: np.ndarray, X: np.ndarray, Z: np.ndarray, codes: np.ndarray, m: int,
             n_threads: int = 1) -> np.ndarray:
    layout = build_layout(codes, m, Z.shape[1], [])
    s_off = record_offsets(layout, X.shape[1])
    S = np.zeros(int(s_off[-1]))
    _crossprods.accumulate(y, X, Z, codes, layout.q_off, s_off, layout.vc_coord, layout.vc_val, S,
                           n_threads)
    return S


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_row_pass_for_every_block_size(k: int, p: int) -> None:
    """Each size with its own copy of the loop (k ≤ 2, p ≤ 4: the current record held while
    its group's rows follow each other) and the general loop around them agree with dense
    products, for rows in random order, sorted by group, and in several runs per group, on one
    and two threads."""
    rng = np.random.default_rng(10 * k + p)
    m, n = 40, 600
    codes = rng.integers(0, m, n).astype(np.int64)
    X = rng.normal(size=(n, p))
    Z = rng.normal(size=(n, k)) + 1.0
    y = rng.normal(size=n)
    ref = reference_records(y, X, Z, codes, m)
    order = np.argsort(codes, kind="stable")
    # each group in three runs of consecutive rows (sorted within each third of the rows)
    runs = np.concatenate([third[np.argsort(codes[third], kind="stable")]
                           for third in np.array_split(np.arange(n), 3)])
    for threads in (1, 2):
        shuffled = row_pass(y, X, Z, codes, m, threads)
        np.testing.assert_allclose(shuffled, ref, rtol=1e-12, atol=1e-12)
        for rows in (order, runs):
            reordered = row_pass(y[rows], np.ascontiguousarray(X[rows]), np.ascontiguousarray(Z[rows]),
                                 codes[rows], m, threads)
            np.testing.assert_allclose(reordered, shuffled, rtol=1e-12, atol=1e-12)


def test_row_pass_with_empty_groups_and_one_row_groups() -> None:
    rng = np.random.default_rng(3)
    m = 7
    codes = np.array([0, 0, 2, 5, 5, 5, 2, 6], dtype=np.int64)   # groups 1, 3, 4 have no rows
    X, Z, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2)), rng.normal(size=8)
    np.testing.assert_allclose(row_pass(y, X, Z, codes, m), reference_records(y, X, Z, codes, m),
                               rtol=1e-12, atol=1e-12)


def test_gram_from_the_front_end_equals_the_pass_over_the_rows() -> None:
    """X'X, X'y, y'y from the moments the front end computed for its checks are those of the
    rows; a spec with other rows (dataclasses.replace) computes its own."""
    df = random_slopes(3000, 150, seed=4)
    spec = lmefast.mixedlm("y ~ x1 + x2", df, groups="g", re_formula="~x1").spec
    assert spec.known_gram() is not None
    cp = compute_crossprods(spec, 1)
    plain = compute_crossprods(replace(spec, row_gram=None), 1)
    assert replace(spec, row_gram=None).known_gram() is None
    np.testing.assert_allclose(cp.XtX, spec.X.T @ spec.X, rtol=1e-12)
    np.testing.assert_allclose(cp.Xty, spec.X.T @ spec.y, rtol=1e-12)
    np.testing.assert_allclose(cp.yty, spec.y @ spec.y, rtol=1e-12)
    np.testing.assert_allclose(cp.XtX, plain.XtX, rtol=1e-12)
    np.testing.assert_allclose(cp.S, plain.S, rtol=1e-12)
    other = replace(spec, y=np.ascontiguousarray(2.0 * spec.y))
    assert other.known_gram() is None
    np.testing.assert_allclose(compute_crossprods(other, 1).yty, 4.0 * cp.yty, rtol=1e-12)


@pytest.mark.parametrize("case", ["scaled", "dropped", "weights", "offset", "drop_missing"])
def test_gram_shortcut_matches_plain_cross_products(case: str) -> None:
    """Where the engine's rows are not the user's (scaled or dropped columns, prior weights, an
    offset, dropped rows) the cross-products are still those of the engine's rows."""
    df = random_slopes(2000, 100, seed=5)
    kw: dict = {}
    formula = "y ~ x1 + x2"
    if case == "scaled":
        df = df.assign(x2=df.x2 * 1e4)
    elif case == "dropped":
        df = df.assign(x3=2.0 * df.x1)
        formula = "y ~ x1 + x2 + x3"
    elif case == "weights":
        kw["weights"] = np.linspace(0.5, 2.0, len(df))
    elif case == "offset":
        kw["offset"] = np.linspace(-1.0, 1.0, len(df))
    else:
        df.loc[[3, 17], "x2"] = np.nan
        kw["missing"] = "drop"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = lmefast.mixedlm(formula, df, groups="g", re_formula="~x1", **kw).spec
    cp = compute_crossprods(spec, 1)
    plain = compute_crossprods(replace(spec, row_gram=None), 1)
    np.testing.assert_allclose(cp.XtX, plain.XtX, rtol=1e-12)
    np.testing.assert_allclose(cp.Xty, plain.Xty, rtol=1e-12)
    np.testing.assert_allclose(cp.yty, plain.yty, rtol=1e-12)
    np.testing.assert_allclose(cp.XtX, spec.X.T @ spec.X, rtol=1e-10)


def test_integer_and_string_group_labels_give_the_same_fit() -> None:
    ints = random_slopes(4000, 200, seed=6)
    strs = random_slopes(4000, 200, seed=6, string_keys=True)
    a = lmefast.mixedlm("y ~ x1 + x2", ints, groups="g", re_formula="~x1").fit()
    b = lmefast.mixedlm("y ~ x1 + x2", strs, groups="g", re_formula="~x1").fit()
    np.testing.assert_allclose(a.llf, b.llf, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a.fe_params), np.asarray(b.fe_params), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(a.cov_re), np.asarray(b.cov_re), rtol=1e-8)


def test_sorted_and_shuffled_rows_give_the_same_fit() -> None:
    df = random_slopes(4000, 200, seed=7)
    ordered = df.sort_values("g", kind="stable").reset_index(drop=True)
    a = lmefast.mixedlm("y ~ x1 + x2", df, groups="g", re_formula="~x1").fit()
    b = lmefast.mixedlm("y ~ x1 + x2", ordered, groups="g", re_formula="~x1").fit()
    np.testing.assert_allclose(a.llf, b.llf, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a.fe_params), np.asarray(b.fe_params), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(a.cov_re), np.asarray(b.cov_re), rtol=1e-8)


@pytest.mark.parametrize("column", ["y", "x2"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_bad_value_is_still_named(column: str, bad: float) -> None:
    """One pass gives the checks and the moments: a NaN or infinite value still raises the
    error naming its column, for arrays as for formulas."""
    df = random_slopes(500, 50, seed=8)
    y = df["y"].to_numpy().copy()
    X = np.column_stack([np.ones(len(df)), df["x1"], df["x2"]])
    if column == "y":
        y[10] = bad
    else:
        X[10, 2] = bad
    with pytest.raises(lmefast.SpecificationError, match="response" if column == "y" else "x3|column"):
        lmefast.MixedLM(y, X, df["g"].to_numpy(), exog_names=["const", "x1", "x3"])


def test_huge_finite_values_are_not_taken_for_infinite() -> None:
    """A column whose sum overflows has no bad value: no error (the check by element decides)."""
    rng = np.random.default_rng(9)
    n = 200
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    big = np.full(n, 1.5e308)
    big[::2] = 1.0e308
    Z = np.column_stack([np.ones(n), big])
    y = rng.normal(size=n)
    g = np.repeat(np.arange(20), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lmefast.MixedLM(y, X, g, exog_re=Z)
        except lmefast.SpecificationError as exc:
            assert "NaN or infinite" not in str(exc)
    frame = pd.DataFrame({"y": y, "x": X[:, 1], "g": g})
    lmefast.mixedlm("y ~ x", frame, groups="g")


@pytest.mark.parametrize("keys", [[2, 1, 0, 1], [5, 5, 0, 9], [0], [7, 3, 3, 12, 7, 40]])
def test_integer_group_codes_are_pandas_sorted_codes(keys: list[int]) -> None:
    from lmefast.structure import factorize_groups

    s = pd.Series(np.array(keys, dtype=np.int64))
    codes, labels = factorize_groups(s)
    ref_codes, ref_labels = pd.factorize(s, sort=True)
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(labels, np.asarray(ref_labels))
    codes[:] = -5                          # the codes are the model's own, not a view of the data
    assert s.min() >= 0


def test_rows_from_columns_is_the_column_stack() -> None:
    rng = np.random.default_rng(11)
    for n in (0, 1, 511, 512, 513, 2000):
        cols = [rng.normal(size=n), None, rng.integers(0, 5, n).astype(float)]
        ref = np.column_stack([np.ones(n) if c is None else c for c in cols]) if n else np.empty((0, 3))
        out = _crossprods.rows_from_columns(cols, n)
        assert out.flags.c_contiguous and out.shape == (n, 3)
        np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="values"):
        _crossprods.rows_from_columns([np.ones(3)], 4)


def test_column_sums_of_strided_views() -> None:
    S = np.random.default_rng(12).normal(size=(1000, 12)) * 1e3
    for A in (S[:, :4], S[:, 3:5], S[:0, :4], S[::3, 5:10], S[:, 7:8]):
        np.testing.assert_allclose(_crossprods.column_sums(A), A.sum(axis=0), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_layout_without_components_is_the_general_one(k: int) -> None:
    """The layout of random coefficients only equals the general construction's with a variance
    component that has no entries."""
    import scipy.sparse as sp

    codes = np.random.default_rng(13).integers(0, 50, 1000)
    a = build_layout(codes, 50, k, [])
    b = build_layout(codes, 50, k, [sp.csr_matrix((1000, 1))])
    for field in ("q_off", "a_off", "comp", "col"):
        assert getattr(a, field).dtype == getattr(b, field).dtype
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.vc_coord.shape == (0, 1000) and a.vc_val.shape == (0, 1000)


@pytest.mark.parametrize(("first", "k"), [(0, 1), (0, 2), (1, 2), (2, 2), (0, 4), (1, 3)])
def test_row_pass_reads_random_effects_columns_inside_x(first: int, k: int) -> None:
    """Z given as columns first..first+k−1 of X (a view, rows p values apart) gives the records
    of the same columns copied."""
    rng = np.random.default_rng(14)
    n, m, p = 3000, 120, 4
    X, y = rng.normal(size=(n, p)), rng.normal(size=n)
    codes = rng.integers(0, m, n).astype(np.int64)
    for rows in (np.arange(n), np.argsort(codes, kind="stable")):
        Xr, yr, cr = np.ascontiguousarray(X[rows]), y[rows], codes[rows]
        view = Xr[:, first:first + k]
        assert not view.flags.c_contiguous or k == p
        np.testing.assert_allclose(row_pass(yr, Xr, view, cr, m),
                                   row_pass(yr, Xr, np.ascontiguousarray(view), cr, m),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::lmefast.SingularFitWarning")   # no slope on x2 in the data
@pytest.mark.parametrize(("formula", "re_formula", "view"), [
    ("y ~ x1 + x2", "~x1", True),        # [1, x1] side by side in X
    ("y ~ x2 + x1", "~x1", False),       # [1, x1] not side by side: its own matrix
    ("y ~ x1 + x2", "~x1 + x2", True),
    ("y ~ 0 + x1 + x2", "~0 + x2", True),
    ("y ~ x1 + x2", "~np.exp(x1)", False),
])
def test_random_design_inside_the_fixed_design_gives_the_same_fit(formula: str, re_formula: str,
                                                                  view: bool) -> None:
    """Random-effects columns that the fixed-effects design holds side by side are a view of it
    (their statistics taken from X's): the same model as with a copy of them."""
    df = random_slopes(3000, 150, seed=15)
    model = lmefast.mixedlm(formula, df, groups="g", re_formula=re_formula)
    Z = model.spec.Zre
    assert np.shares_memory(Z, model.spec.X) == view
    copied = lmefast.MixedLM(df["y"], pd.DataFrame(model.spec.X, columns=model.exog_names),
                             df["g"], exog_re=np.array(Z), exog_re_names=model.exog_re_names)
    a, b = model.fit(), copied.fit()
    np.testing.assert_allclose(a.llf, b.llf, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a.fe_params), np.asarray(b.fe_params), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(a.cov_re), np.asarray(b.cov_re), rtol=1e-8, atol=1e-12)


def test_exog_as_its_own_random_design() -> None:
    """MixedLM(y, X, g, X): the random design is exog itself; a bad value is still named."""
    df = random_slopes(1000, 50, seed=16)
    X = np.column_stack([np.ones(len(df)), df["x1"]])
    same = lmefast.MixedLM(df["y"].to_numpy(), X, df["g"].to_numpy(), X).fit()
    copy = lmefast.MixedLM(df["y"].to_numpy(), X, df["g"].to_numpy(), X.copy()).fit()
    np.testing.assert_allclose(same.llf, copy.llf, rtol=1e-12)
    X[5, 1] = np.nan
    with pytest.raises(lmefast.SpecificationError, match="exog"):
        lmefast.MixedLM(df["y"].to_numpy(), X, df["g"].to_numpy(), X)


def test_column_extremes_over_block_boundaries() -> None:
    """The minima and maxima of column_moments (four running extremes per column) are the
    columns' own, for lengths around its blocks of rows; a NaN after the first row is never
    taken, one in the first row stays."""
    rng = np.random.default_rng(17)
    for n in (1, 2, 3, 4, 5, 255, 256, 257, 1023, 1029):
        A = rng.normal(size=(n, 3)) * 10.0 ** rng.integers(-3, 4, 3)
        _, _, lo, hi = _crossprods.column_moments(A)
        np.testing.assert_array_equal(lo, A.min(axis=0))
        np.testing.assert_array_equal(hi, A.max(axis=0))
    A = rng.normal(size=(600, 2))
    A[300, 0] = np.nan
    A[0, 1] = np.nan
    _, _, lo, hi = _crossprods.column_moments(A)
    assert lo[0] == np.nanmin(A[:, 0]) and hi[0] == np.nanmax(A[:, 0])
    assert np.isnan(lo[1]) and np.isnan(hi[1])


def test_layout_shortcuts_equal_the_sorting_construction() -> None:
    """Variance-component layouts: the keys (group, column) numbered by a table and an
    indicator design's one entry per row give the arrays of the sorting construction."""
    import scipy.sparse as sp

    from lmefast import spec as spec_module

    rng = np.random.default_rng(18)
    n, m = 2000, 90
    codes = rng.integers(0, m, n)
    keys = codes * 4 + rng.integers(0, 4, n)
    for top in (m * 4, 10 ** 9):
        uniq, inv = spec_module._unique_keys(keys, top)
        ref_uniq, ref_inv = np.unique(keys, return_inverse=True)
        np.testing.assert_array_equal(uniq, ref_uniq)
        np.testing.assert_array_equal(inv, ref_inv)
    levels = rng.integers(0, 3, n)
    indicator = sp.csr_matrix((np.ones(n), levels, np.arange(n + 1)), shape=(n, 3))
    dense = np.zeros((n, 3))
    dense[np.arange(n), levels] = 1.0
    some = np.arange(0, n, 7)
    dense[some, (levels[some] + 1) % 3] = 2.5          # some rows with two entries
    one = build_layout(codes, m, 1, [indicator])
    two = build_layout(codes, m, 1, [sp.csr_matrix(dense)])
    rows = np.arange(n)
    # one entry per row: slot 0 holds each row's coordinate and value
    assert one.vc_coord.shape == (1, n)
    np.testing.assert_array_equal(one.vc_val[0], np.ones(n))
    # the same entries listed in another order take the sorting construction: same arrays
    back = rows[::-1].copy()
    coord_ref, val_ref = spec_module.row_entries(back, one.vc_coord[0][back], one.vc_val[0][back], n)
    np.testing.assert_array_equal(coord_ref, one.vc_coord)
    np.testing.assert_array_equal(val_ref, one.vc_val)
    assert two.vc_coord.shape == (2, n)
    # every row's entries, whatever their slots, are the design's non-zeros of that row
    for r in rng.integers(0, n, 50):
        got = sorted(v for v in two.vc_val[:, r] if v != 0)
        assert got == sorted(v for v in dense[r] if v != 0)


def test_row_pass_with_components_on_threads_and_orders() -> None:
    """Records with a variance component (rows of one or two entries): one or two threads, rows
    shuffled or sorted, the same records (the pass itself uses one thread on two cores)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(19)
    n, m, p = 4000, 150, 3
    codes = rng.integers(0, m, n).astype(np.int64)
    X, y = rng.normal(size=(n, p)), rng.normal(size=n)
    Z = np.ones((n, 1))
    V = np.zeros((n, 3))
    V[np.arange(n), rng.integers(0, 3, n)] = 1.0
    V[::5, 2] += 0.5
    out = []
    for rows in (np.arange(n), np.argsort(codes, kind="stable")):
        lay = build_layout(codes[rows], m, 1, [sp.csr_matrix(V[rows])])
        s_off = record_offsets(lay, p)
        for threads in (1, 2):
            S = np.zeros(int(s_off[-1]))
            _crossprods.accumulate(y[rows], np.ascontiguousarray(X[rows]), Z, codes[rows], lay.q_off,
                                   s_off, lay.vc_coord, lay.vc_val, S, threads)
            out.append(S)
    for S in out[1:]:
        np.testing.assert_allclose(S, out[0], rtol=1e-12, atol=1e-12)
