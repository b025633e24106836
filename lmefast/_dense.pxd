# Small dense linear algebra shared by the kernels: one group's (or one level's) block.
# Inline functions over row-major arrays; work arrays in one padded allocation per thread.
from libc.math cimport log, sqrt
from libc.stdlib cimport free, malloc

from lmefast._lapack cimport chol_lower_rowmajor

ctypedef long long i64


cdef enum:
    SMALL_Q = 8



cdef struct Work:
    double* block # the one allocation holding all of the below (cache-line padded)
    double* AL    # q × q   A Λ
    double* L     # q × q   Cholesky factor of Λ'AΛ + I (lower)
    double* R     # q × p   Rzx = L⁻¹ Λ'B, later H = L⁻ᵀ Rzx
    double* r     # q       rzy = L⁻¹ Λ'c
    double* u     # q       spherical conditional mode
    double* s     # q       Z'V⁻¹(y - Xβ)
    double* Minv  # q × q
    double* E     # q × p
    double* tmp   # q × q


cdef inline size_t lines(size_t n) noexcept nogil:
    """n doubles rounded up to whole 64-byte cache lines."""
    return (n + 7) // 8 * 8


cdef inline int work_alloc(Work* w, int qmax, int p) noexcept nogil:
    """One block per Work, padded by a cache line on both sides and between arrays, so that
    threads writing their own Work never share a cache line."""
    cdef size_t qq = lines(<size_t>qmax * qmax), qp = lines(<size_t>qmax * (p if p > 0 else 1))
    cdef size_t q1 = lines(<size_t>qmax + 1)
    cdef double* base = <double*>malloc((4 * qq + 2 * qp + 3 * q1 + 24) * sizeof(double))
    w.block = base
    if base == NULL:
        return -1
    base = <double*>((<size_t>base + 64 + 63) // 64 * 64)
    w.AL = base
    w.L = w.AL + qq
    w.Minv = w.L + qq
    w.tmp = w.Minv + qq
    w.R = w.tmp + qq
    w.E = w.R + qp
    w.r = w.E + qp
    w.u = w.r + q1
    w.s = w.u + q1
    return 0


cdef inline void work_free(Work* w) noexcept nogil:
    free(w.block)
    w.block = NULL


cdef inline int factor_group(
    int q, int k, int p,
    const double* A, const double* B, const double* c,
    const double* T, const double* tvc, const i64* comp,
    Work* w,
) noexcept nogil:
    """AL = AΛ; L L' = Λ'AΛ + I; R = L⁻¹Λ'B; r = L⁻¹Λ'c.  Returns 0 or a LAPACK code."""
    cdef int i, j, a, l
    cdef double acc, d
    cdef double* AL = w.AL
    cdef double* L = w.L
    cdef double* R = w.R
    cdef double* r = w.r
    # AL = A Λ
    for i in range(q):
        for j in range(k):
            acc = 0.0
            for a in range(j, k):
                acc = acc + A[i * q + a] * T[a * k + j]
            AL[i * q + j] = acc
        for j in range(k, q):
            AL[i * q + j] = A[i * q + j] * tvc[comp[j]]
    # M = Λ' AL + I (lower triangle), Λ'B and Λ'c
    for i in range(k):
        for j in range(i + 1):
            acc = 0.0
            for a in range(i, k):
                acc = acc + T[a * k + i] * AL[a * q + j]
            L[i * q + j] = acc
        for l in range(p):
            acc = 0.0
            for a in range(i, k):
                acc = acc + T[a * k + i] * B[a * p + l]
            R[i * p + l] = acc
        acc = 0.0
        for a in range(i, k):
            acc = acc + T[a * k + i] * c[a]
        r[i] = acc
    for i in range(k, q):
        d = tvc[comp[i]]
        for j in range(i + 1):
            L[i * q + j] = d * AL[i * q + j]
        for l in range(p):
            R[i * p + l] = d * B[i * p + l]
        r[i] = d * c[i]
    for i in range(q):
        L[i * q + i] += 1.0
        for j in range(i + 1, q):
            L[i * q + j] = 0.0
    # Cholesky
    if q > SMALL_Q:
        i = chol_lower_rowmajor(L, q)
        if i != 0:
            return i
        for i in range(q):
            for j in range(i + 1, q):
                L[i * q + j] = 0.0
    else:
        for j in range(q):
            acc = L[j * q + j]
            for a in range(j):
                acc = acc - L[j * q + a] * L[j * q + a]
            if not acc > 0.0:
                return j + 1
            acc = sqrt(acc)
            L[j * q + j] = acc
            for i in range(j + 1, q):
                d = L[i * q + j]
                for a in range(j):
                    d = d - L[i * q + a] * L[j * q + a]
                L[i * q + j] = d / acc
    # forward solves L R = Λ'B, L r = Λ'c
    for i in range(q):
        d = 1.0 / L[i * q + i]
        for a in range(i):
            acc = L[i * q + a]
            if acc != 0.0:
                for l in range(p):
                    R[i * p + l] -= acc * R[a * p + l]
                r[i] -= acc * r[a]
        for l in range(p):
            R[i * p + l] *= d
        r[i] *= d
    return 0


cdef inline void back_solve(int q, int p, const double* L, double* X) noexcept nogil:
    """X ← L⁻ᵀ X for X of shape q × p (row-major)."""
    cdef int i, a, l
    cdef double d, acc
    for i in range(q - 1, -1, -1):
        d = 1.0 / L[i * q + i]
        for l in range(p):
            X[i * p + l] *= d
        for a in range(i):
            acc = L[i * q + a]
            if acc != 0.0:
                for l in range(p):
                    X[a * p + l] -= acc * X[i * p + l]


cdef inline void minv_from_chol(int q, const double* L, double* Minv, double* tmp) noexcept nogil:
    """Minv = (L L')⁻¹ using tmp (q × q) as L⁻¹."""
    cdef int i, j, a
    cdef double acc
    for j in range(q):
        for i in range(q):
            tmp[i * q + j] = 0.0
        tmp[j * q + j] = 1.0 / L[j * q + j]
        for i in range(j + 1, q):
            acc = 0.0
            for a in range(j, i):
                acc = acc + L[i * q + a] * tmp[a * q + j]
            tmp[i * q + j] = -acc / L[i * q + i]
    for i in range(q):
        for j in range(i + 1):
            acc = 0.0
            for a in range(i, q):
                acc = acc + tmp[a * q + i] * tmp[a * q + j]
            Minv[i * q + j] = acc
            Minv[j * q + i] = acc


cdef inline int chol_small(int p, double* C) noexcept nogil:
    """In-place lower Cholesky of a row-major p × p matrix (upper part zeroed); 0 or j+1."""
    cdef int i, j, a
    cdef double acc, d
    if p > SMALL_Q:
        i = chol_lower_rowmajor(C, p)
        for a in range(p):
            for j in range(a + 1, p):
                C[a * p + j] = 0.0
        return i
    for j in range(p):
        acc = C[j * p + j]
        for a in range(j):
            acc = acc - C[j * p + a] * C[j * p + a]
        if not acc > 0.0:
            return j + 1
        acc = sqrt(acc)
        C[j * p + j] = acc
        for i in range(j + 1, p):
            d = C[i * p + j]
            for a in range(j):
                d = d - C[i * p + a] * C[j * p + a]
            C[i * p + j] = d / acc
        for i in range(j + 1, p):
            C[j * p + i] = 0.0
    return 0




cdef inline i64 fixed_effects_step(int p, const double* XtX, const double* Xty, double yty,
                                   double rr, double logdet, bint reml, double n,
                                   double* Lx, const double* Rzxrzy, double* rhs, double* beta,
                                   double* r2_out, double* obj_out) noexcept nogil:
    """The p × p end of the profiled objective, shared by the kernels.

    On entry Lx holds Σ Rzx'Rzx (lower triangle); on exit its lower Cholesky factor
    Lx Lx' = X'X − Σ Rzx'Rzx, β̂ solves Lx Lx' β = X'y − Σ Rzx'rzy, r² = y'y − Σ rzy'rzy − β̂'rhs,
    and the objective is log|L|² + dof (1 + log(2π r²/dof)) (+ log|Lx|² for REML).
    Returns 0, −j when the factor fails at column j, −(p+1) when r² ≤ 0."""
    cdef int i, j, a
    cdef double acc, r2, dof, obj
    for i in range(p):
        for j in range(i + 1):
            Lx[i * p + j] = XtX[i * p + j] - Lx[i * p + j]
    i = chol_small(p, Lx) if p > 0 else 0
    if i != 0:
        return -i
    for i in range(p):
        rhs[i] = Xty[i] - Rzxrzy[i]
        beta[i] = rhs[i]
    for i in range(p):
        acc = beta[i]
        for a in range(i):
            acc = acc - Lx[i * p + a] * beta[a]
        beta[i] = acc / Lx[i * p + i]
    for i in range(p - 1, -1, -1):
        acc = beta[i]
        for a in range(i + 1, p):
            acc = acc - Lx[a * p + i] * beta[a]
        beta[i] = acc / Lx[i * p + i]
    r2 = yty - rr
    for i in range(p):
        r2 = r2 - beta[i] * rhs[i]
    r2_out[0] = r2
    if not r2 > 0.0:
        return -(p + 1)
    dof = n - p if reml else n
    obj = logdet + dof * (1.0 + 1.8378770664093453 + log(r2 / dof))
    if reml:
        for i in range(p):
            obj = obj + 2.0 * log(Lx[i * p + i])
    obj_out[0] = obj
    return 0
