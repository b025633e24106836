# The trailing block of the blocked Cholesky (DESIGN.md §2, several factors): the q2 × q2
# matrix M22 = Λ2'A22Λ2 + I − Σ L21L21' over every trailing coordinate, behind the few
# operations the level loops need of it. Dense LAPACK here (row-major, lower triangle); a
# sparse supernodal or GPU factorisation implements the same functions over its own storage.
from libc.math cimport log
from libc.string cimport memset

from lmefast._lapack cimport (
    chol_lower_rowmajor, inverse_from_chol_rowmajor, solve_lower_rowmajor,
)

ctypedef long long i64


cdef struct Trailing:
    int q
    double* M       # q × q row-major; its lower triangle holds the matrix, after
                    # trailing_factor its Cholesky factor, after trailing_invert the inverse


cdef inline void trailing_clear(Trailing* t) noexcept nogil:
    """Zero the lower triangle (nothing reads the upper one: half the memory traffic)."""
    cdef i64 r
    for r in range(t.q):
        memset(&t.M[r * t.q], 0, <size_t>(r + 1) * sizeof(double))


cdef inline void trailing_add(Trailing* t, i64 r, i64 c, double v) noexcept nogil:
    """M[r, c] += v for r ≥ c (the matrix is symmetric; only the lower triangle is kept)."""
    t.M[r * t.q + c] += v


cdef inline int trailing_factor(Trailing* t) noexcept nogil:
    """L L' = M in place. Returns 0, or j + 1 when the leading minor of order j + 1 is not
    positive definite."""
    return chol_lower_rowmajor(t.M, t.q)


cdef inline double trailing_logdet(const Trailing* t) noexcept nogil:
    """log|L|² from the factor."""
    cdef i64 r
    cdef double acc = 0.0
    for r in range(t.q):
        acc += 2.0 * log(t.M[r * t.q + r])
    return acc


cdef inline void trailing_solve(const Trailing* t, double* B, int ncol,
                                bint transposed) noexcept nogil:
    """B ← L⁻¹B (or L⁻ᵀB when transposed), B row-major q × ncol."""
    solve_lower_rowmajor(t.M, t.q, B, ncol, transposed)


cdef inline int trailing_invert(Trailing* t) noexcept nogil:
    """The factor becomes M⁻¹ where trailing_inverse_at reads it: the entries of the selected
    inverse (dense: all of them). Returns 0 or LAPACK's info."""
    return inverse_from_chol_rowmajor(t.M, t.q)


cdef inline double trailing_inverse_at(const Trailing* t, i64 r1, i64 r2) noexcept nogil:
    """(M⁻¹)[r1, r2] after trailing_invert, for entries in the pattern of M (and its diagonal
    blocks)."""
    return t.M[r1 * t.q + r2] if r1 >= r2 else t.M[r2 * t.q + r1]
