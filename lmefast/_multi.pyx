# cython: language_level=3
"""Several grouping factors: the blocked Cholesky of DESIGN.md §2, all in C.

Terms sorted by levels, largest first. Block [1,1] is block-diagonal (one k1 × k1 block per
level i of the first factor) and is factored level by level; block [2,1] is sparse: level i
meets a few levels of the trailing factors ("pairs" P, each a k_j × k1 block A21_P of
Z_2'Z_1); block [2,2] (all trailing factors, q2 coordinates) is dense, receives the Schur
complement and is factored by LAPACK:

    L11_i L11_i' = T1'A11_iT1 + I,  Rzx1_i = L11_i⁻¹T1'B1_i,  rzy1_i = L11_i⁻¹T1'c1_i
    L21_P = (T_j'A21_P T1) L11_i⁻ᵀ
    L22 L22' = Λ2'A22Λ2 + I − Σ_P,P' L21_P L21_P'',  Rzx2 = L22⁻¹(Λ2'B2 − Σ L21_P Rzx1_i), ...

The gradient (DESIGN.md §2) needs the diagonal level blocks of Z'ZΛM⁻¹; the blocks of M⁻¹
it reads come from L11, L21 and P22 = (L22L22')⁻¹ (dpotri): with Z_P = L21_P L11_i⁻¹ and
Q_P = Σ_P' P22[P,P'] Z_P', (M⁻¹)21_P = −Q_P and (M⁻¹)11_ii = L11_i⁻ᵀL11_i⁻¹ + Σ_P Z_P'Q_P.

When every term is a random intercept (the genomics case `(1 | donor) + (1 | batch)`) the
kernel takes a scalar path ("Scalar terms" below) with the same caches and results; any term
with k > 1 takes the general one. Where, in addition, the first factor's levels have few
distinct sizes (a balanced design: every donor with six samples), the scalar path is collapsed
("Collapsed levels" below): the levels are summed once, by size, and an evaluation does not
loop over them at all.

Storage is row-major. The trailing block M22 lives behind lmefast._trailing (factorise, solve,
log-determinant, selected inverse P22): dense LAPACK now; the level loops do not see its storage.
θ → T goes through lmefast._theta; evaluate/minimize come from lmefast._kernel.Kernel.
"""
import numpy as np

from libc.math cimport floor, log, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from lmefast._dense cimport (
    Work, back_solve, chol_small, factor_group, fixed_effects_step, i64, minv_from_chol,
    work_alloc, work_free,
)
from lmefast._kernel cimport Kernel, KernelState, fill_factor_map
from lmefast._theta cimport FactorMap, factor_grad_to_theta, theta_to_factors
from lmefast._threads cimport chunkfun, run_chunks
from lmefast._trailing cimport (
    Trailing, trailing_add, trailing_clear, trailing_factor, trailing_inverse_at,
    trailing_invert, trailing_logdet, trailing_solve,
)

from lmefast.parallel import check_threads

# Whether kernels built from now on take the scalar path where it applies (a constructor
# argument overrides it); the tests turn it off to compare with the general path.
SCALAR_PATH = True
# Likewise for the collapsed scalar path ("Collapsed levels"), where it applies and pays: the
# sums by size cost less than half the level loop, and that loop does at least
# COLLAPSE_MIN_WORK multiply-adds per evaluation (below, the setup costs what it saves: a
# Penicillin fit is as fast either way).
COLLAPSED_PATH = True
COLLAPSE_MIN_WORK = 2000.0


cdef struct MultiCtx:
    KernelState st
    i64 m1
    int k1
    int p
    int q2
    int kmax
    int width
    # first factor records [A11 | B1 | c1] and the pairs
    const double* S1
    const i64* ptr
    const i64* pair_c0
    const int* pair_k
    const i64* pair_toff
    const i64* pair_voff
    const double* A21
    # trailing coordinates: their level block's start and size, their term's T in Tall
    const i64* bstart
    const int* bk
    const i64* btoff
    const int* bterm
    # A22 (all non-zeros), B2, c2
    i64 nnz22
    const i64* a22r
    const i64* a22c
    const double* a22v
    const double* B2
    const double* c2
    const double* XtX
    const double* Xty
    double yty
    double n
    bint reml
    # θ → T blocks of every term (Tall at fm.t_off, term j's k is fm.t_k[j])
    FactorMap fm
    # buffers
    double* Tall
    double* gTall
    Trailing tr           # M22: q2 × q2, behind lmefast._trailing
    double* R2x
    double* r2y
    double* L11c
    double* Rzx1c
    double* rzy1c
    double* L21c
    double* Rzxrzy
    double* rhs
    double* Cinv
    double* X1
    double* X2
    double* V1
    double* V2
    double* out1
    double* out2
    double* G1
    double* G2
    double* Mi
    # every term scalar (see "Scalar terms" below): the kernel takes the scalar path, with
    # lam2[r] = Λ2[r, r] for each trailing coordinate
    bint scalar
    double* lam2
    # the scalar path collapsed by level size (see "Collapsed levels"): nd sizes dval with
    # dcnt levels each (dfirst: the first such level), level i of size class lgroup[i];
    # m2 = q2 + p + 1 coordinates [b2 | X | y]; every m2 × m2 matrix row-major, lower triangle
    bint collapsed
    int m2
    i64 nd
    const double* dval
    const double* dcnt
    const i64* dfirst
    const i64* lgroup
    double* Md            # nd × m2 × m2: Σ u_i u_i' over the levels of each size
    double* Gd            # [Z2 X y]'[Z2 X y]
    double* Ud            # Σ_d w_d M_d at the last θ evaluated
    double* Sd            # scratch: S, its factor, its inverse
    double* Wd
    double* Qd
    # threads (st.nthreads): level ranges, and per thread its Work, scratch and partial sums
    i64* lbounds          # (nth + 1) level ranges of the first factor
    i64* rbounds          # (nth + 1) row ranges of M22 for the Schur update
    Work* ws
    double* tbuf          # per thread: [logdet, rr, Lx (p²), Rzxrzy (p), R2x (q2 p), r2y (q2),
    i64 tstride           #              G1 (k1²), G2 (q2 kmax), Z, Q (width k1 + 1 each), Mi]
    i64* tstat
    # the last θ whose factorisation (L11, L21, L22, β, r²) is still in the buffers:
    # a gradient asked for at that θ starts from it (the optimiser's line search asks so)
    double* last_theta
    double last_obj
    bint factored


cdef inline double lam(MultiCtx* c, i64 r, int a2) noexcept nogil:
    """Λ2[r, bstart[r] + a2] (zero above the diagonal of the block)."""
    cdef int a = <int>(r - c.bstart[r]), k = c.bk[r]
    return c.Tall[c.btoff[r] + a * k + a2] if a2 <= a else 0.0


cdef void build_trailing(MultiCtx* c) noexcept nogil:
    """M22 (lower) = Λ2'A22Λ2 + I,  R2x = Λ2'B2,  r2y = Λ2'c2."""
    cdef i64 e, r, col, rr, cc
    cdef int a, b, ar, ac, p = c.p, q2 = c.q2, l
    cdef double v
    trailing_clear(&c.tr)
    for e in range(c.nnz22):
        r = c.a22r[e]
        col = c.a22c[e]
        ar = <int>(r - c.bstart[r])
        ac = <int>(col - c.bstart[col])
        for a in range(ar + 1):
            rr = c.bstart[r] + a
            for b in range(ac + 1):
                cc = c.bstart[col] + b
                if rr >= cc:
                    trailing_add(&c.tr, rr, cc, lam(c, r, a) * c.a22v[e] * lam(c, col, b))
    for r in range(q2):
        trailing_add(&c.tr, r, r, 1.0)
        c.r2y[r] = 0.0
        for l in range(p):
            c.R2x[r * p + l] = 0.0
    for r in range(q2):
        ar = <int>(r - c.bstart[r])
        for a in range(ar + 1):
            rr = c.bstart[r] + a
            v = lam(c, r, a)
            c.r2y[rr] += v * c.c2[r]
            for l in range(p):
                c.R2x[rr * p + l] += v * c.B2[r * p + l]


cdef inline double* tb(MultiCtx* c, int t) noexcept nogil:
    return c.tbuf + t * c.tstride


cdef i64 level_factor_range(MultiCtx* c, int t, i64 i0, i64 i1) noexcept nogil:
    """Levels i0..i1 of the first factor (module docstring): caches L11, Rzx1, rzy1, L21, and
    adds log|L11|², rzy1'rzy1, Σ Rzx1'Rzx1 (lower), Σ Rzx1'rzy1 and −L21 Rzx1, −L21 rzy1 into
    thread t's partial sums. Returns 0 or 1 + the level that failed."""
    cdef i64 i, P
    cdef int k1 = c.k1, p = c.p, q2 = c.q2, rec = k1 * k1 + k1 * p + k1
    cdef int a, b, d, l, kj
    cdef double acc
    cdef const double* A
    cdef const double* Tj
    cdef const double* T1 = c.Tall
    cdef double* X
    cdef Work* w = &c.ws[t]
    cdef double* Y = w.tmp
    cdef double* part = tb(c, t)
    cdef double* Lxp = part + 2
    cdef double* Rzp = Lxp + p * p
    cdef double* R2xp = Rzp + p
    cdef double* r2yp = R2xp + <i64>q2 * p
    memset(part, 0, (2 + p * p + p + <i64>q2 * (p + 1)) * sizeof(double))
    for i in range(i0, i1):
        A = &c.S1[i * rec]
        if factor_group(k1, k1, p, A, A + k1 * k1, A + k1 * k1 + k1 * p, T1, NULL, NULL,
                        w) != 0:
            return i + 1
        for a in range(k1 * k1):
            c.L11c[i * k1 * k1 + a] = w.L[a]
        for a in range(k1 * p):
            c.Rzx1c[i * k1 * p + a] = w.R[a]
        for a in range(k1):
            c.rzy1c[i * k1 + a] = w.r[a]
            part[0] += 2.0 * log(w.L[a * k1 + a])
            part[1] += w.r[a] * w.r[a]
            for l in range(p):
                Rzp[l] += w.R[a * p + l] * w.r[a]
                for d in range(l + 1):
                    Lxp[l * p + d] += w.R[a * p + l] * w.R[a * p + d]
        for P in range(c.ptr[i], c.ptr[i + 1]):
            kj = c.pair_k[P]
            Tj = &c.Tall[c.pair_toff[P]]
            for a in range(kj):                       # Y = A21_P T1
                for b in range(k1):
                    acc = 0.0
                    for d in range(b, k1):
                        acc = acc + c.A21[c.pair_voff[P] + a * k1 + d] * T1[d * k1 + b]
                    Y[a * k1 + b] = acc
            X = &c.L21c[c.pair_voff[P]]
            for a in range(kj):                       # X = T_j'Y L11⁻ᵀ
                for b in range(k1):
                    acc = 0.0
                    for d in range(a, kj):
                        acc = acc + Tj[d * kj + a] * Y[d * k1 + b]
                    X[a * k1 + b] = acc
                for b in range(k1):
                    acc = X[a * k1 + b]
                    for d in range(b):
                        acc = acc - X[a * k1 + d] * w.L[b * k1 + d]
                    X[a * k1 + b] = acc / w.L[b * k1 + b]
            for a in range(kj):
                acc = 0.0
                for b in range(k1):
                    acc = acc + X[a * k1 + b] * w.r[b]
                r2yp[c.pair_c0[P] + a] -= acc
                for l in range(p):
                    acc = 0.0
                    for b in range(k1):
                        acc = acc + X[a * k1 + b] * w.R[b * p + l]
                    R2xp[(c.pair_c0[P] + a) * p + l] -= acc
    return 0


cdef void schur_rows(MultiCtx* c, i64 row0, i64 row1) noexcept nogil:
    """M22 −= Σ_P,P2 L21_P L21_P2' for the lower-triangle entries in rows row0..row1."""
    cdef i64 i, P, P2, r1, r2
    cdef int k1 = c.k1, q2 = c.q2, a, b, d, kj, kj2
    cdef double acc
    cdef double* X
    cdef double* X2
    for i in range(c.m1):
        for P in range(c.ptr[i], c.ptr[i + 1]):
            kj = c.pair_k[P]
            X = &c.L21c[c.pair_voff[P]]
            for P2 in range(c.ptr[i], P + 1):
                kj2 = c.pair_k[P2]
                X2 = &c.L21c[c.pair_voff[P2]]
                for a in range(kj):
                    for d in range(kj2 if P2 != P else a + 1):
                        r1 = c.pair_c0[P] + a
                        r2 = c.pair_c0[P2] + d
                        if r1 < r2:
                            r1, r2 = r2, r1
                        if r1 < row0 or r1 >= row1:
                            continue
                        acc = 0.0
                        for b in range(k1):
                            acc = acc + X[a * k1 + b] * X2[d * k1 + b]
                        trailing_add(&c.tr, r1, r2, -acc)


cdef void level_chunk(void* vc, int t) noexcept nogil:
    cdef MultiCtx* c = <MultiCtx*>vc
    c.tstat[t] = level_factor_range(c, t, c.lbounds[t], c.lbounds[t + 1])


cdef void schur_chunk(void* vc, int t) noexcept nogil:
    cdef MultiCtx* c = <MultiCtx*>vc
    schur_rows(c, c.rbounds[t], c.rbounds[t + 1])


cdef void grad_blocks_chunk(void* vc, int t) noexcept nogil:
    cdef MultiCtx* c = <MultiCtx*>vc
    grad_blocks_range(c, t, c.lbounds[t], c.lbounds[t + 1])


cdef i64 level_pass(MultiCtx* c, double* logdet, double* rr) noexcept nogil:
    """The first factor's levels in c.st.nthreads chunks (each a range of levels, own partial
    sums), then the Schur update of M22 (each chunk a range of rows). Σ Rzx1'Rzx1 goes into
    Lx (lower), Σ Rzx1'rzy1 into Rzxrzy. Returns 0 or 1 + the level that failed."""
    return chunked_level_pass(c, level_chunk, schur_chunk, logdet, rr)


cdef i64 chunked_level_pass(MultiCtx* c, chunkfun levels, chunkfun schur, double* logdet,
                            double* rr) noexcept nogil:
    """The levels in c.st.nthreads chunks (``levels``: each a range of levels with its own
    partial sums), the partial sums added, then the Schur update (``schur``: each chunk a
    range of rows of M22). Returns 0 or 1 + the level that failed."""
    cdef int t, nth = c.st.nthreads
    run_chunks(levels, c, nth)
    for t in range(nth):
        if c.tstat[t] != 0:
            return c.tstat[t]
    for t in range(nth):
        add_partials(c, tb(c, t), logdet, rr, True)
    run_chunks(schur, c, nth)
    return 0


cdef void add_partials(MultiCtx* c, const double* part, double* logdet, double* rr,
                       bint trailing) noexcept nogil:
    """One thread's partial sums [log|L11|², rzy1'rzy1, Lx (p²), Rzxrzy (p), and with
    ``trailing`` −L21Rzx1 (q2 p), −L21rzy1 (q2)] added into the totals."""
    cdef int p = c.p, l
    cdef i64 r
    logdet[0] += part[0]
    rr[0] += part[1]
    for l in range(p * p):
        c.st.Lx[l] += part[2 + l]
    for l in range(p):
        c.Rzxrzy[l] += part[2 + p * p + l]
    if trailing:
        for r in range(<i64>c.q2 * p):
            c.R2x[r] += part[2 + p * p + p + r]
        for r in range(c.q2):
            c.r2y[r] += part[2 + p * p + p + <i64>c.q2 * p + r]


cdef void backsolve_all(MultiCtx* c) noexcept nogil:
    """[u | H] = L⁻ᵀ [rzy − Rzx β | Rzx] into X1 (m1 × k1 × (1+p)) and X2 (q2 × (1+p)),
    with the trailing factor L22. Uses R2x/r2y (= Rzx2, rzy2) and the caches."""
    cdef int p = c.p, k1 = c.k1, q2 = c.q2, nc = p + 1, a, b, l, kj
    cdef i64 i, P, r
    cdef double acc, v
    for r in range(q2):
        acc = c.r2y[r]
        for l in range(p):
            acc = acc - c.R2x[r * p + l] * c.st.beta[l]
            c.X2[r * nc + 1 + l] = c.R2x[r * p + l]
        c.X2[r * nc] = acc
    trailing_solve(&c.tr, c.X2, nc, True)
    for i in range(c.m1):
        for b in range(k1):
            acc = c.rzy1c[i * k1 + b]
            for l in range(p):
                v = c.Rzx1c[(i * k1 + b) * p + l]
                acc = acc - v * c.st.beta[l]
                c.X1[(i * k1 + b) * nc + 1 + l] = v
            c.X1[(i * k1 + b) * nc] = acc
        for P in range(c.ptr[i], c.ptr[i + 1]):
            kj = c.pair_k[P]
            for a in range(kj):
                for b in range(k1):
                    v = c.L21c[c.pair_voff[P] + a * k1 + b]
                    for l in range(nc):
                        c.X1[(i * k1 + b) * nc + l] -= v * c.X2[(c.pair_c0[P] + a) * nc + l]
        back_solve(k1, nc, &c.L11c[i * k1 * k1], &c.X1[i * k1 * nc])


cdef void residual_parts(MultiCtx* c) noexcept nogil:
    """V = Λ[u | H];  out = [c − Bβ | B] − Z'Z V  (= [s | E]) into out1, out2."""
    cdef int p = c.p, k1 = c.k1, q2 = c.q2, nc = p + 1, rec = k1 * k1 + k1 * p + k1
    cdef int a, b, l, kj, ar, ac
    cdef i64 i, P, r, e, col
    cdef double acc, v
    cdef const double* A
    cdef const double* T1 = c.Tall
    for i in range(c.m1):
        for a in range(k1):
            for l in range(nc):
                acc = 0.0
                for b in range(a + 1):
                    acc = acc + T1[a * k1 + b] * c.X1[(i * k1 + b) * nc + l]
                c.V1[(i * k1 + a) * nc + l] = acc
    for r in range(q2):
        ar = <int>(r - c.bstart[r])
        for l in range(nc):
            acc = 0.0
            for b in range(ar + 1):
                acc = acc + lam(c, r, b) * c.X2[(c.bstart[r] + b) * nc + l]
            c.V2[r * nc + l] = acc
    for r in range(q2):
        acc = c.c2[r]
        for l in range(p):
            acc = acc - c.B2[r * p + l] * c.st.beta[l]
            c.out2[r * nc + 1 + l] = c.B2[r * p + l]
        c.out2[r * nc] = acc
    for e in range(c.nnz22):
        r = c.a22r[e]
        col = c.a22c[e]
        for l in range(nc):
            c.out2[r * nc + l] -= c.a22v[e] * c.V2[col * nc + l]
    for i in range(c.m1):
        A = &c.S1[i * rec]
        for a in range(k1):
            acc = A[k1 * k1 + k1 * p + a]
            for l in range(p):
                acc = acc - A[k1 * k1 + a * p + l] * c.st.beta[l]
                c.out1[(i * k1 + a) * nc + 1 + l] = A[k1 * k1 + a * p + l]
            c.out1[(i * k1 + a) * nc] = acc
            for l in range(nc):
                acc = 0.0
                for b in range(k1):
                    acc = acc + A[a * k1 + b] * c.V1[(i * k1 + b) * nc + l]
                c.out1[(i * k1 + a) * nc + l] -= acc
        for P in range(c.ptr[i], c.ptr[i + 1]):
            kj = c.pair_k[P]
            for a in range(kj):
                for b in range(k1):
                    v = c.A21[c.pair_voff[P] + a * k1 + b]
                    for l in range(nc):
                        c.out1[(i * k1 + b) * nc + l] -= v * c.V2[(c.pair_c0[P] + a) * nc + l]
                        c.out2[(c.pair_c0[P] + a) * nc + l] -= v * c.V1[(i * k1 + b) * nc + l]


cdef void level_inverse_block(MultiCtx* c, i64 i, double* Z, double* Q, double* Mi,
                              double* tmp) noexcept nogil:
    """Level i of the first factor: Z_P = L21_P L11_i⁻¹, Q_P = Σ_P2 P22[P, P2] Z_P2 (so that
    (M⁻¹)21_P = −Q_P) and Mi = (M⁻¹)11_ii = L11_i⁻ᵀL11_i⁻¹ + Σ_P Z_P'Q_P. The trailing block holds P22."""
    cdef int k1 = c.k1, a, b, d, kj, kj2, row, row2
    cdef i64 P, P2
    cdef double acc, wv
    cdef const double* L = &c.L11c[i * k1 * k1]
    row = 0
    for P in range(c.ptr[i], c.ptr[i + 1]):       # Z_P = L21_P L11⁻¹
        kj = c.pair_k[P]
        for a in range(kj):
            for b in range(k1 - 1, -1, -1):
                acc = c.L21c[c.pair_voff[P] + a * k1 + b]
                for d in range(b + 1, k1):
                    acc = acc - Z[(row + a) * k1 + d] * L[d * k1 + b]
                Z[(row + a) * k1 + b] = acc / L[b * k1 + b]
        row = row + kj
    row = 0
    for P in range(c.ptr[i], c.ptr[i + 1]):       # Q_P = Σ_P2 P22[P, P2] Z_P2
        kj = c.pair_k[P]
        for a in range(kj):
            for b in range(k1):
                Q[(row + a) * k1 + b] = 0.0
            row2 = 0
            for P2 in range(c.ptr[i], c.ptr[i + 1]):
                kj2 = c.pair_k[P2]
                for d in range(kj2):
                    wv = trailing_inverse_at(&c.tr, c.pair_c0[P] + a, c.pair_c0[P2] + d)
                    for b in range(k1):
                        Q[(row + a) * k1 + b] += wv * Z[(row2 + d) * k1 + b]
                row2 = row2 + kj2
        row = row + kj
    minv_from_chol(k1, L, Mi, tmp)
    row = 0
    for P in range(c.ptr[i], c.ptr[i + 1]):       # (M⁻¹)11_ii += Σ Z_P'Q_P
        kj = c.pair_k[P]
        for a in range(k1):
            for b in range(k1):
                acc = 0.0
                for d in range(kj):
                    acc = acc + Z[(row + d) * k1 + a] * Q[(row + d) * k1 + b]
                Mi[a * k1 + b] += acc
        row = row + kj


cdef void grad_blocks_range(MultiCtx* c, int t, i64 i0, i64 i1) noexcept nogil:
    """Levels i0..i1: their parts of the diagonal blocks of Z'ZΛM⁻¹ (G1 for the first factor,
    G2 at row r, column b of r's block for the trailing ones) into thread t's G1, G2.
    The trailing block holds P22."""
    cdef int k1 = c.k1, p = c.p, rec = k1 * k1 + k1 * p + k1, kmax = c.kmax
    cdef int a, b, d, e, kj, kj2, row, row2, ar, ac
    cdef i64 i, P, P2, r, col, cb
    cdef double acc, wv
    cdef double* G1 = tb(c, t) + 2 + p * p + p + <i64>c.q2 * (p + 1)
    cdef double* G2 = G1 + k1 * k1
    cdef double* Z = G2 + <i64>c.q2 * kmax
    cdef double* Q = Z + c.width * k1 + 1
    cdef double* Mi = Q + c.width * k1 + 1
    cdef double* tmp = Mi + k1 * k1
    cdef double* W = tmp + k1 * k1
    cdef const double* L
    cdef const double* A11
    cdef const double* Tj
    cdef const double* T1 = c.Tall
    memset(G1, 0, (k1 * k1 + <i64>c.q2 * kmax) * sizeof(double))
    for i in range(i0, i1):
        A11 = &c.S1[i * rec]
        level_inverse_block(c, i, Z, Q, Mi, tmp)
        for a in range(k1):                           # G1 += A11 T1 (M⁻¹)11_ii
            for b in range(k1):
                acc = 0.0
                for d in range(b, k1):
                    acc = acc + A11[a * k1 + d] * T1[d * k1 + b]
                W[a * k1 + b] = acc
        for a in range(k1):
            for b in range(k1):
                acc = 0.0
                for d in range(k1):
                    acc = acc + W[a * k1 + d] * Mi[d * k1 + b]
                G1[a * k1 + b] += acc
        row = 0
        for P in range(c.ptr[i], c.ptr[i + 1]):
            kj = c.pair_k[P]
            Tj = &c.Tall[c.pair_toff[P]]
            for a in range(k1):                       # G1 −= A21_P' T_j Q_P
                for b in range(k1):
                    acc = 0.0
                    for d in range(kj):
                        for e in range(d, kj):
                            acc = acc + c.A21[c.pair_voff[P] + e * k1 + a] * Tj[e * kj + d] \
                                * Q[(row + d) * k1 + b]
                    G1[a * k1 + b] -= acc
            for a in range(kj):                       # G2[P] −= A21_P T1 Q_P'
                for d in range(k1):
                    acc = 0.0
                    for e in range(d, k1):
                        acc = acc + c.A21[c.pair_voff[P] + a * k1 + e] * T1[e * k1 + d]
                    tmp[d] = acc
                for b in range(kj):
                    acc = 0.0
                    for d in range(k1):
                        acc = acc + tmp[d] * Q[(row + b) * k1 + d]
                    G2[(c.pair_c0[P] + a) * kmax + b] -= acc
            row = row + kj


cdef void grad_blocks(MultiCtx* c) noexcept nogil:
    """G1, G2 = the diagonal blocks of Z'ZΛM⁻¹ (first factor; trailing), the level loop on
    c.st.nthreads threads with private sums."""
    cdef int t, nth = c.st.nthreads, k1 = c.k1, p = c.p, kmax = c.kmax, b, d, ac
    cdef i64 l, e, r, col, cb
    cdef double wv
    cdef double* G1t
    if c.scalar:
        run_chunks(scalar_grad_chunk, c, nth)
    else:
        run_chunks(grad_blocks_chunk, c, nth)
    memset(c.G1, 0, (k1 * k1 + <i64>c.q2 * kmax) * sizeof(double))
    for t in range(nth):
        G1t = tb(c, t) + 2 + p * p + p + <i64>c.q2 * (p + 1)
        for l in range(k1 * k1 + <i64>c.q2 * kmax):
            c.G1[l] += G1t[l]
    # + diagonal blocks of A22 Λ2 P22: entry (r, b) = Σ_col A22[r, col] Σ_a' Λ2[col, s+a'] P22[s+a', start(r)+b]
    for e in range(c.nnz22):
        r = c.a22r[e]
        col = c.a22c[e]
        ac = <int>(col - c.bstart[col])
        for d in range(ac + 1):
            wv = c.a22v[e] * lam(c, col, d)
            cb = c.bstart[col] + d
            for b in range(c.bk[r]):
                c.G2[r * kmax + b] += wv * trailing_inverse_at(&c.tr, cb, c.bstart[r] + b)




# ---------------------------------------------------------------------------------------------
# Scalar terms: the fast path
#
# When every term is a random intercept (k = 1 for the first factor and for every trailing
# one; the genomics case `(1 | donor) + (1 | batch)`), T1 = t1 and Λ2 = diag(lam2) are
# scalars per coordinate, each level's record is [a | B1 (p) | c1], each pair P holds one
# number A21[P] at index P and one trailing coordinate pair_c0[P], and the formulas of the
# module docstring become, per level i:
#
#     L11_i = √(t1² a_i + 1),  Rzx1_i = t1 B1_i / L11_i,  rzy1_i = t1 c1_i / L11_i,
#     L21_P = lam2[r] A21[P] t1 / L11_i   (r = pair_c0[P]),
#     M22[r, r'] −= L21_P L21_P'           for the pairs P, P' of level i.
#
# The caches (L11c, Rzx1c, rzy1c, L21c) have the general layout, so everything that reads
# them (modes, conditional variances) works unchanged. The path also assumes each level's
# pairs are in increasing order of their trailing coordinate (pair_keys sorts them): the
# Schur update then writes row pair_c0[P] only. The constructor checks all of this and takes
# the general path otherwise.

cdef void scalar_trailing(MultiCtx* c) noexcept nogil:
    """build_trailing for scalar terms: lam2, M22 (lower) = Λ2A22Λ2 + I, R2x = Λ2B2,
    r2y = Λ2c2."""
    cdef i64 e, r, col
    cdef int p = c.p, l
    cdef double v
    for r in range(c.q2):
        c.lam2[r] = c.Tall[c.btoff[r]]
    trailing_clear(&c.tr)
    for e in range(c.nnz22):
        r = c.a22r[e]
        col = c.a22c[e]
        if r >= col:
            trailing_add(&c.tr, r, col, c.lam2[r] * c.a22v[e] * c.lam2[col])
    for r in range(c.q2):
        trailing_add(&c.tr, r, r, 1.0)
        v = c.lam2[r]
        c.r2y[r] = v * c.c2[r]
        for l in range(p):
            c.R2x[r * p + l] = v * c.B2[r * p + l]


cdef i64 scalar_levels(MultiCtx* c, i64 i0, i64 i1, double* part, double* R2x, double* r2y,
                       bint schur) noexcept nogil:
    """level_factor_range for scalar terms: levels i0..i1 add log|L11|², rzy1'rzy1, Σ Rzx1'Rzx1
    (lower) and Σ Rzx1'rzy1 into part = [logdet, rr, Lx (p²), Rzxrzy (p)], and −L21 Rzx1,
    −L21 rzy1 into R2x, r2y; with schur, also the Schur update of M22 (levels in order).
    Returns 0 or 1 + the level that failed."""
    cdef i64 i, P, P2, p0, p1, r
    cdef int p = c.p, l, d, rec = 2 + c.p
    cdef double t1 = c.Tall[0], L, s, rz, x, dd, prod = 1.0, logs = 0.0
    cdef const double* A
    cdef double* Lxp = part + 2
    cdef double* Rzp = Lxp + p * p
    cdef double* R
    for i in range(i0, i1):
        A = &c.S1[i * rec]
        dd = t1 * t1 * A[0] + 1.0
        if not dd > 0.0:
            return i + 1
        # Σ log(dd) as the log of running products (one log per many levels); dd ≥ 1
        if dd < 1e100:
            prod = prod * dd
            if prod > 1e200:
                logs = logs + log(prod)
                prod = 1.0
        else:
            logs = logs + log(dd)
        L = sqrt(dd)
        c.L11c[i] = L
        s = t1 / L
        rz = s * A[1 + p]
        c.rzy1c[i] = rz
        part[1] += rz * rz
        R = &c.Rzx1c[i * p]
        for l in range(p):
            R[l] = s * A[1 + l]
        for l in range(p):
            Rzp[l] += R[l] * rz
            for d in range(l + 1):
                Lxp[l * p + d] += R[l] * R[d]
        p0 = c.ptr[i]
        p1 = c.ptr[i + 1]
        for P in range(p0, p1):
            r = c.pair_c0[P]
            x = c.lam2[r] * c.A21[P] * s
            c.L21c[P] = x
            r2y[r] -= x * rz
            for l in range(p):
                R2x[r * p + l] -= x * R[l]
            if schur:
                for P2 in range(p0, P):
                    trailing_add(&c.tr, r, c.pair_c0[P2], -x * c.L21c[P2])
                trailing_add(&c.tr, r, r, -x * x)
    part[0] += logs + log(prod)
    return 0


cdef void scalar_schur_rows(MultiCtx* c, i64 row0, i64 row1) noexcept nogil:
    """schur_rows for scalar terms (rows row0..row1 of M22, levels in order)."""
    cdef i64 i, P, P2, p0, p1, r
    cdef double x
    for i in range(c.m1):
        p0 = c.ptr[i]
        p1 = c.ptr[i + 1]
        for P in range(p0, p1):
            r = c.pair_c0[P]
            if r < row0:
                continue
            if r >= row1:
                break
            x = c.L21c[P]
            for P2 in range(p0, P):
                trailing_add(&c.tr, r, c.pair_c0[P2], -x * c.L21c[P2])
            trailing_add(&c.tr, r, r, -x * x)


cdef void scalar_level_chunk(void* vc, int t) noexcept nogil:
    cdef MultiCtx* c = <MultiCtx*>vc
    cdef double* part = tb(c, t)
    cdef int p = c.p
    cdef double* R2xp = part + 2 + p * p + p
    memset(part, 0, (2 + p * p + p + <i64>c.q2 * (p + 1)) * sizeof(double))
    c.tstat[t] = scalar_levels(c, c.lbounds[t], c.lbounds[t + 1], part, R2xp,
                               R2xp + <i64>c.q2 * p, False)


cdef void scalar_schur_chunk(void* vc, int t) noexcept nogil:
    cdef MultiCtx* c = <MultiCtx*>vc
    scalar_schur_rows(c, c.rbounds[t], c.rbounds[t + 1])


cdef i64 scalar_level_pass(MultiCtx* c, double* logdet, double* rr) noexcept nogil:
    """level_pass for scalar terms. One thread: the levels write R2x, r2y and M22 directly.
    Several: level ranges with partial sums, then the Schur update by ranges of rows."""
    cdef int nth = c.st.nthreads, p = c.p
    cdef i64 status
    cdef double* part
    if nth == 1:
        part = tb(c, 0)
        memset(part, 0, (2 + p * p + p) * sizeof(double))
        status = scalar_levels(c, 0, c.m1, part, c.R2x, c.r2y, True)
        if status != 0:
            return status
        add_partials(c, part, logdet, rr, False)
        return 0
    return chunked_level_pass(c, scalar_level_chunk, scalar_schur_chunk, logdet, rr)


cdef void scalar_solve_residuals(MultiCtx* c) noexcept nogil:
    """backsolve_all then residual_parts for scalar terms, in one pass over the levels:
    X = [u | H] = L⁻ᵀ[rzy − Rzx β | Rzx], V = ΛX, out = [c − Bβ | B] − Z'Z V."""
    cdef int p = c.p, nc = c.p + 1, rec = 2 + c.p, l, d
    cdef i64 i, P, r, e, p0, p1
    cdef double t1 = c.Tall[0], acc, v, a, il
    cdef const double* A
    cdef const double* y
    cdef double* x
    cdef double* v1
    cdef double* o
    cdef double* o2
    for r in range(c.q2):
        acc = c.r2y[r]
        for l in range(p):
            acc = acc - c.R2x[r * p + l] * c.st.beta[l]
            c.X2[r * nc + 1 + l] = c.R2x[r * p + l]
            c.out2[r * nc + 1 + l] = c.B2[r * p + l]
        c.X2[r * nc] = acc
        acc = c.c2[r]
        for l in range(p):
            acc = acc - c.B2[r * p + l] * c.st.beta[l]
        c.out2[r * nc] = acc
    trailing_solve(&c.tr, c.X2, nc, True)
    for r in range(c.q2):
        for l in range(nc):
            c.V2[r * nc + l] = c.lam2[r] * c.X2[r * nc + l]
    for e in range(c.nnz22):
        r = c.a22r[e]
        y = &c.V2[c.a22c[e] * nc]
        for l in range(nc):
            c.out2[r * nc + l] -= c.a22v[e] * y[l]
    for i in range(c.m1):
        x = &c.X1[i * nc]
        v1 = &c.V1[i * nc]
        o = &c.out1[i * nc]
        A = &c.S1[i * rec]
        p0 = c.ptr[i]
        p1 = c.ptr[i + 1]
        il = 1.0 / c.L11c[i]
        a = A[0]
        # each entry summed in a register over the level's pairs (l outer, pairs inner)
        for l in range(nc):
            if l == 0:
                acc = c.rzy1c[i]
                for d in range(p):
                    acc = acc - c.Rzx1c[i * p + d] * c.st.beta[d]
            else:
                acc = c.Rzx1c[i * p + l - 1]
            for P in range(p0, p1):
                acc = acc - c.L21c[P] * c.X2[c.pair_c0[P] * nc + l]
            x[l] = acc * il
            v1[l] = t1 * x[l]
        for l in range(nc):
            if l == 0:
                acc = A[1 + p]
                for d in range(p):
                    acc = acc - A[1 + d] * c.st.beta[d]
            else:
                acc = A[l]
            acc = acc - a * v1[l]
            for P in range(p0, p1):
                acc = acc - c.A21[P] * c.V2[c.pair_c0[P] * nc + l]
            o[l] = acc
        for P in range(p0, p1):
            v = c.A21[P]
            o2 = &c.out2[c.pair_c0[P] * nc]
            for l in range(nc):
                o2[l] -= v * v1[l]


cdef void scalar_grad_range(MultiCtx* c, int t, i64 i0, i64 i1) noexcept nogil:
    """grad_blocks_range for scalar terms: with Z_P = L21_P / L11_i and
    Q_P = Σ_P' P22[P, P'] Z_P', (M⁻¹)11_ii = 1/L11_i² + Σ_P Z_P Q_P,
    G1 += a_i t1 (M⁻¹)11_ii − Σ_P A21[P] lam2[r] Q_P and G2[r] −= A21[P] t1 Q_P."""
    cdef int p = c.p, rec = 2 + c.p
    cdef i64 i, P, P2, p0, p1, r
    cdef double t1 = c.Tall[0], il, mi, g1 = 0.0, q
    cdef double* G1 = tb(c, t) + 2 + p * p + p + <i64>c.q2 * (p + 1)
    cdef double* G2 = G1 + 1
    cdef double* Z = G2 + c.q2
    memset(G1, 0, (1 + <i64>c.q2) * sizeof(double))
    for i in range(i0, i1):
        il = 1.0 / c.L11c[i]
        p0 = c.ptr[i]
        p1 = c.ptr[i + 1]
        for P in range(p0, p1):
            Z[P - p0] = c.L21c[P] * il
        mi = il * il
        for P in range(p0, p1):
            r = c.pair_c0[P]
            q = 0.0
            for P2 in range(p0, P + 1):
                q = q + trailing_inverse_at(&c.tr, r, c.pair_c0[P2]) * Z[P2 - p0]
            for P2 in range(P + 1, p1):
                q = q + trailing_inverse_at(&c.tr, c.pair_c0[P2], r) * Z[P2 - p0]
            mi = mi + Z[P - p0] * q
            g1 = g1 - c.A21[P] * c.lam2[r] * q
            G2[r] -= c.A21[P] * t1 * q
        g1 = g1 + c.S1[i * rec] * t1 * mi
    G1[0] = g1


cdef void scalar_grad_chunk(void* vc, int t) noexcept nogil:
    cdef MultiCtx* c = <MultiCtx*>vc
    scalar_grad_range(c, t, c.lbounds[t], c.lbounds[t + 1])


cdef void assemble_gradient(MultiCtx* c, double kappa, double* grad) noexcept nogil:
    """Per term: Σ over its levels of 2 G − 2κ s u' − [REML] 2 F H' (F = E C⁻¹), then θ's entries."""
    cdef int p = c.p, k1 = c.k1, nc = p + 1, a, b, l, l2, kj, j
    cdef i64 i, r, s0
    cdef double acc, f
    memset(c.gTall, 0, c.fm.size * sizeof(double))
    for a in range(k1):
        for b in range(k1):
            c.gTall[a * k1 + b] = 2.0 * c.G1[a * k1 + b]
    for i in range(c.m1):
        for a in range(k1):
            for b in range(k1):
                acc = -2.0 * kappa * c.out1[(i * k1 + a) * nc] * c.X1[(i * k1 + b) * nc]
                if c.reml:
                    for l in range(p):
                        f = 0.0
                        for l2 in range(p):
                            f = f + c.out1[(i * k1 + a) * nc + 1 + l2] * c.Cinv[l2 * p + l]
                        acc = acc - 2.0 * f * c.X1[(i * k1 + b) * nc + 1 + l]
                c.gTall[a * k1 + b] += acc
    for r in range(c.q2):
        j = c.bterm[r]
        kj = c.bk[r]
        a = <int>(r - c.bstart[r])
        s0 = c.bstart[r]
        for b in range(kj):
            acc = 2.0 * c.G2[r * c.kmax + b] - 2.0 * kappa * c.out2[r * nc] * c.X2[(s0 + b) * nc]
            if c.reml:
                for l in range(p):
                    f = 0.0
                    for l2 in range(p):
                        f = f + c.out2[r * nc + 1 + l2] * c.Cinv[l2 * p + l]
                    acc = acc - 2.0 * f * c.X2[(s0 + b) * nc + 1 + l]
            c.gTall[c.fm.t_off[j] + a * kj + b] += acc
    factor_grad_to_theta(&c.fm, c.gTall, grad)


# -- Collapsed levels ---------------------------------------------------------------------------
# On the scalar path level i of the first factor (size a_i = A11_i) adds, with w = t1²/(t1²a_i + 1)
# and u_i = [A21_i (on the trailing coordinates it meets) | B1_i | c1_i], the m2 × m2 matrix
# w u_i u_i' to [Λ2 | I | 1](A − ·)[Λ2 | I | 1] (the Schur update of M22, −L21Rzx1, −L21rzy1,
# Σ Rzx1'Rzx1, Σ Rzx1'rzy1, Σ rzy1²) and log(t1²a_i + 1) to log|L|². w depends on i only
# through a_i: with the sums M_d = Σ u_i u_i' over the levels of each distinct size d (made
# once; their y row again for each response), an evaluation adds Σ_d w_d M_d, nd terms instead
# of m1 levels. With S = Λ̃(G − Σ_d w_d M_d)Λ̃ + Ĩ (G = [Z2 X y]'[Z2 X y], Λ̃ = diag(Λ2, 1),
# Ĩ the identity on b2), the objective is Σ_d n_d log(t1²d + 1) + a sum of log-determinants
# of leading blocks of S (REML: log|S_bX| + (n − p) log(|S|/|S_bX|); ML: log|S_bb| +
# n log(|S|/|S_bX|)), so its gradient is Σ_B c_B tr(S_B⁻¹ ∂S_B): m2 × m2 work, no levels.

cdef inline double sym(const double* A, int m, int a, int b) noexcept nogil:
    """A[a, b] of a symmetric matrix kept in its lower triangle (row-major m × m)."""
    return A[a * m + b] if a >= b else A[b * m + a]


cdef void collapsed_response(MultiCtx* c) noexcept nogil:
    """The y row of G and of every M_d, from the response parts (c1, c2, X'y, y'y)."""
    cdef int m2 = c.m2, q2 = c.q2, p = c.p, rec = 2 + c.p, y = c.m2 - 1, l
    cdef i64 i, P, g
    cdef double cy
    cdef double* row
    cdef const double* A
    for g in range(c.nd):
        memset(&c.Md[(g * m2 + y) * m2], 0, m2 * sizeof(double))
    for i in range(c.m1):
        A = &c.S1[i * rec]
        cy = A[1 + p]
        row = &c.Md[(c.lgroup[i] * m2 + y) * m2]
        for P in range(c.ptr[i], c.ptr[i + 1]):
            row[c.pair_c0[P]] += cy * c.A21[P]
        for l in range(p):
            row[q2 + l] += cy * A[1 + l]
        row[y] += cy * cy
    row = &c.Gd[y * m2]
    for l in range(q2):
        row[l] = c.c2[l]
    for l in range(p):
        row[q2 + l] = c.Xty[l]
    row[y] = c.yty


cdef void collapsed_design(MultiCtx* c) noexcept nogil:
    """G and the M_d (all rows), once per kernel."""
    cdef int m2 = c.m2, q2 = c.q2, p = c.p, rec = 2 + c.p, l, l2
    cdef i64 i, P, P2, e, r
    cdef double v
    cdef double* M
    cdef const double* A
    memset(c.Md, 0, <size_t>c.nd * m2 * m2 * sizeof(double))
    memset(c.Gd, 0, <size_t>m2 * m2 * sizeof(double))
    for i in range(c.m1):
        A = &c.S1[i * rec]
        M = &c.Md[c.lgroup[i] * m2 * m2]
        for P in range(c.ptr[i], c.ptr[i + 1]):
            r = c.pair_c0[P]
            v = c.A21[P]
            for P2 in range(c.ptr[i], P + 1):      # pairs in increasing coordinate
                M[r * m2 + c.pair_c0[P2]] += v * c.A21[P2]
            for l in range(p):
                M[(q2 + l) * m2 + r] += A[1 + l] * v
        for l in range(p):
            for l2 in range(l + 1):
                M[(q2 + l) * m2 + q2 + l2] += A[1 + l] * A[1 + l2]
    for e in range(c.nnz22):
        if c.a22r[e] >= c.a22c[e]:
            c.Gd[c.a22r[e] * m2 + c.a22c[e]] += c.a22v[e]
    for r in range(q2):
        for l in range(p):
            c.Gd[(q2 + l) * m2 + r] = c.B2[r * p + l]
    for l in range(p):
        for l2 in range(l + 1):
            c.Gd[(q2 + l) * m2 + q2 + l2] = c.XtX[l * p + l2]
    collapsed_response(c)


cdef i64 collapsed_pass(MultiCtx* c, double* logdet, double* rr) noexcept nogil:
    """scalar_trailing + scalar_level_pass by level sizes: M22 (lower), R2x, r2y, and into
    Lx, Rzxrzy, rr and logdet the first factor's sums. Returns 0 or 1 + a level that failed."""
    cdef int m2 = c.m2, q2 = c.q2, p = c.p, y = c.m2 - 1, a, b, l, l2
    cdef i64 g, e
    cdef double t2 = c.Tall[0] * c.Tall[0], dd, w, logs = 0.0
    cdef double* U = c.Ud
    cdef const double* M
    for a in range(q2):
        c.lam2[a] = c.Tall[c.btoff[a]]
    memset(U, 0, <size_t>m2 * m2 * sizeof(double))
    for g in range(c.nd):
        dd = t2 * c.dval[g] + 1.0
        if not dd > 0.0:
            return c.dfirst[g] + 1
        logs += c.dcnt[g] * log(dd)
        w = t2 / dd
        M = &c.Md[g * m2 * m2]
        for a in range(m2):
            for e in range(a * m2, a * m2 + a + 1):
                U[e] += w * M[e]
    logdet[0] += logs
    for a in range(q2):
        for b in range(a + 1):
            c.tr.M[a * q2 + b] = c.lam2[a] * c.lam2[b] * (c.Gd[a * m2 + b] - U[a * m2 + b])
        c.tr.M[a * q2 + a] += 1.0
        for l in range(p):
            c.R2x[a * p + l] = c.lam2[a] * (c.Gd[(q2 + l) * m2 + a] - U[(q2 + l) * m2 + a])
        c.r2y[a] = c.lam2[a] * (c.Gd[y * m2 + a] - U[y * m2 + a])
    for l in range(p):
        for l2 in range(l + 1):
            c.st.Lx[l * p + l2] += U[(q2 + l) * m2 + q2 + l2]
        c.Rzxrzy[l] += U[y * m2 + q2 + l]
    rr[0] += U[y * m2 + y]
    return 0


cdef int collapsed_gradient(MultiCtx* c, double* grad) noexcept nogil:
    """∂/∂θ on the collapsed path from Ud (the last θ evaluated): see "Collapsed levels"."""
    cdef int m2 = c.m2, q2 = c.q2, p = c.p, a, b, k, nb = c.q2 + c.p
    cdef i64 g
    cdef double t1 = c.Tall[0], t2, dd, acc, s1, s2, s3, cb, cx, ca, gt = 0.0
    cdef double n = c.n
    cdef double* S = c.Sd
    cdef double* W = c.Wd
    cdef double* Q = c.Qd
    cdef double* lt = c.Sd + <i64>m2 * m2          # Λ̃'s diagonal
    cdef const double* M
    t2 = t1 * t1
    for a in range(m2):
        lt[a] = c.lam2[a] if a < q2 else 1.0
    # K = G − U (kept in Q's upper part is not possible: S holds S, W its inverse factor)
    for a in range(m2):
        for b in range(a + 1):
            S[a * m2 + b] = lt[a] * lt[b] * (c.Gd[a * m2 + b] - c.Ud[a * m2 + b])
        if a < q2:
            S[a * m2 + a] += 1.0
        for b in range(a + 1, m2):
            S[a * m2 + b] = 0.0
    if chol_small(m2, S) != 0:
        c.st.status = -(p + 2)
        return 1
    # W = L⁻¹ (lower)
    for b in range(m2):
        W[b * m2 + b] = 1.0 / S[b * m2 + b]
        for a in range(b + 1, m2):
            acc = 0.0
            for k in range(b, a):
                acc = acc + S[a * m2 + k] * W[k * m2 + b]
            W[a * m2 + b] = -acc / S[a * m2 + a]
    # Q = Σ_B c_B S_B⁻¹ (padded), S_B⁻¹ = W_B'W_B over the leading blocks B = b2, [b2 X], all
    if c.reml:
        cb, cx, ca = 0.0, 1.0 - (n - p), n - p
    else:
        cb, cx, ca = 1.0, -n, n
    for a in range(m2):
        for b in range(a + 1):
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            for k in range(a, m2):
                if k < q2:
                    s1 = s1 + W[k * m2 + a] * W[k * m2 + b]
                elif k < nb:
                    s2 = s2 + W[k * m2 + a] * W[k * m2 + b]
                else:
                    s3 = s3 + W[k * m2 + a] * W[k * m2 + b]
            acc = ca * (s1 + s2 + s3)
            if a < nb:
                acc = acc + cx * (s1 + s2)
            if a < q2:
                acc = acc + cb * s1
            Q[a * m2 + b] = acc
    # θ of the first factor: Σ_d n_d 2t d/(t²d + 1) − Σ_d w_d' tr(Λ̃QΛ̃ M_d), w_d' = 2t/(t²d + 1)²
    for g in range(c.nd):
        dd = t2 * c.dval[g] + 1.0
        M = &c.Md[g * m2 * m2]
        acc = 0.0
        for a in range(m2):
            for b in range(a):
                acc = acc + 2.0 * lt[a] * lt[b] * Q[a * m2 + b] * M[a * m2 + b]
            acc = acc + lt[a] * lt[a] * Q[a * m2 + a] * M[a * m2 + a]
        gt += c.dcnt[g] * 2.0 * t1 * c.dval[g] / dd - 2.0 * t1 / (dd * dd) * acc
    memset(c.gTall, 0, c.fm.size * sizeof(double))
    c.gTall[0] = gt
    # each trailing coordinate r: ∂S/∂λ_r = E_r KΛ̃ + Λ̃KE_r, tr(Q ·) = 2 Σ_b K[r, b] λ̃_b Q[b, r]
    for a in range(q2):
        acc = 0.0
        for b in range(m2):
            acc = acc + (sym(c.Gd, m2, a, b) - sym(c.Ud, m2, a, b)) * lt[b] * sym(Q, m2, b, a)
        c.gTall[c.btoff[a]] += 2.0 * acc
    factor_grad_to_theta(&c.fm, c.gTall, grad)
    return 0


cdef int multi_eval(void* vctx, const double* theta, double* f, double* grad) noexcept nogil:
    """θ → objective (and ∂/∂θ when grad is not NULL); 0, or 1 with c.st.status set."""
    cdef MultiCtx* c = <MultiCtx*>vctx
    cdef int l, j, p = c.p, q2 = c.q2, info
    cdef double logdet = 0.0, rr = 0.0, obj = 0.0
    cdef i64 status, r
    cdef bint same = c.factored and grad != NULL
    for l in range(c.st.nt):
        if theta[l] != c.last_theta[l]:
            same = False
    if same:
        f[0] = c.last_obj
        return gradient_part(c, grad)
    c.st.n_evals += 1
    c.factored = False
    theta_to_factors(&c.fm, theta, c.Tall)
    memset(c.st.Lx, 0, p * p * sizeof(double) + 8)
    memset(c.Rzxrzy, 0, p * sizeof(double) + 8)
    if c.collapsed:
        status = collapsed_pass(c, &logdet, &rr)
    elif c.scalar:
        scalar_trailing(c)
        status = scalar_level_pass(c, &logdet, &rr)
    else:
        build_trailing(c)
        status = level_pass(c, &logdet, &rr)
    if status == 0:
        info = trailing_factor(&c.tr)
        if info != 0:
            status = c.m1 + info      # the trailing block (reported as a level index beyond m1)
    if status == 0:
        logdet += trailing_logdet(&c.tr)
        if p > 0:
            trailing_solve(&c.tr, c.R2x, p, False)
        trailing_solve(&c.tr, c.r2y, 1, False)
        for r in range(q2):
            rr += c.r2y[r] * c.r2y[r]
            for l in range(p):
                c.Rzxrzy[l] += c.R2x[r * p + l] * c.r2y[r]
                for j in range(l + 1):
                    c.st.Lx[l * p + j] += c.R2x[r * p + l] * c.R2x[r * p + j]
        c.st.logdet = logdet
        status = fixed_effects_step(p, c.XtX, c.Xty, c.yty, rr, logdet, c.reml, c.n, c.st.Lx,
                                    c.Rzxrzy, c.rhs, c.st.beta, &c.st.r2, &obj)
    c.st.status = status
    if status != 0:
        return 1
    f[0] = obj
    for l in range(c.st.nt):
        c.last_theta[l] = theta[l]
    c.last_obj = obj
    c.factored = True
    if grad == NULL:
        return 0
    return gradient_part(c, grad)


cdef int gradient_part(MultiCtx* c, double* grad) noexcept nogil:
    """∂/∂θ from the factorisation in the buffers (which it consumes: the trailing factor
    becomes P22)."""
    cdef int p = c.p
    c.factored = False
    if c.collapsed:
        return collapsed_gradient(c, grad)
    if p > 0:
        minv_from_chol(p, c.st.Lx, c.Cinv, c.Mi)
    if c.scalar:
        scalar_solve_residuals(c)
    else:
        backsolve_all(c)
        residual_parts(c)
    if trailing_invert(&c.tr) != 0:
        c.st.status = -(p + 2)
        return 1
    grad_blocks(c)
    assemble_gradient(c, (c.n - p if c.reml else c.n) / c.st.r2, grad)
    return 0


cdef void split_ranges(const i64* ptr, i64 m1, i64 q2, int nth, i64* lb, i64* rb) noexcept nogil:
    """Thread chunks: level ranges lb balanced by levels + pairs (level i ends at work
    ptr[i] + i), and row ranges rb of M22's lower triangle (row r holds r + 1 entries: split
    at q2 √(t/nth))."""
    cdef int t
    cdef i64 i = 0
    cdef double target
    lb[0] = 0
    rb[0] = 0
    for t in range(1, nth):
        target = <double>(ptr[m1] + m1) * t / nth
        while i < m1 and ptr[i] + i < target:
            i += 1
        lb[t] = i
        rb[t] = <i64>floor(q2 * sqrt(<double>t / nth))
    lb[nth] = m1
    rb[nth] = q2


cdef bint scalar_layout(const MultiCtx* c, const int* t_k, int n_terms) noexcept nogil:
    """Whether the scalar path applies (see "Scalar terms"): every term of one coefficient,
    pair P's block at index P, and each level's pairs in increasing trailing coordinate."""
    cdef i64 i, P
    cdef int j
    if c.k1 != 1:
        return False
    for j in range(n_terms):
        if t_k[j] != 1:
            return False
    for i in range(c.m1):
        for P in range(c.ptr[i], c.ptr[i + 1]):
            if c.pair_voff[P] != P or (P > c.ptr[i] and c.pair_c0[P] <= c.pair_c0[P - 1]):
                return False
    return True


def _scalar_layout(int k1, const int[::1] t_k, const i64[::1] ptr, const i64[::1] pair_c0,
                   const i64[::1] pair_voff) -> bool:
    """scalar_layout on these arrays (for the tests)."""
    cdef MultiCtx c
    c.k1 = k1
    c.m1 = ptr.shape[0] - 1
    c.ptr = &ptr[0]
    c.pair_c0 = &pair_c0[0] if pair_c0.shape[0] else NULL
    c.pair_voff = &pair_voff[0] if pair_voff.shape[0] else NULL
    return scalar_layout(&c, &t_k[0], t_k.shape[0])


cdef class MultiKernel(Kernel):
    """The profiled objective for several grouping factors, held in C (see the module
    docstring): `evaluate` for one θ and `minimize` (lmefast._bfgs with no Python in the loop)
    from lmefast._kernel.Kernel; `modes` and `conditional_variances` at θ. `scalar_path`
    (default: the module's SCALAR_PATH) False keeps a design of scalar terms on the general
    path."""

    cdef MultiCtx c
    cdef object keep
    cdef double* buf
    cdef object ckeep        # the collapsed path's arrays (level sizes and their classes)
    cdef double* cbuf

    def __cinit__(self, cp, tuple arrays, int k1, int p, int q2, int kmax, int width,
                  const int[::1] th_term, const int[::1] th_row, const int[::1] th_col,
                  const i64[::1] t_off, const int[::1] t_k, bint reml, n_threads=1,
                  scalar_path=None, collapse=None):
        cdef const double[::1] S1 = cp.S1
        cdef const i64[::1] ptr = cp.ptr
        cdef const i64[::1] pair_c0 = cp.pair_c0
        cdef const int[::1] pair_k = cp.pair_k
        cdef const i64[::1] pair_voff = cp.pair_voff
        cdef const double[::1] A21 = cp.A21
        cdef const double[::1] B2 = np.ascontiguousarray(cp.B2).ravel()
        cdef const double[::1] c2 = cp.c2
        cdef const double[::1] XtX = np.ascontiguousarray(cp.XtX).ravel()
        cdef const double[::1] Xty = np.ascontiguousarray(cp.Xty)
        cdef const i64[::1] pair_toff = arrays[0]
        cdef const i64[::1] bstart = arrays[1]
        cdef const int[::1] bk = arrays[2]
        cdef const i64[::1] btoff = arrays[3]
        cdef const int[::1] bterm = arrays[4]
        cdef const i64[::1] a22r = arrays[5]
        cdef const i64[::1] a22c = arrays[6]
        cdef const double[::1] a22v = arrays[7]
        cdef i64 m1 = ptr.shape[0] - 1
        cdef int nc = p + 1, pp = p if p > 0 else 1
        cdef size_t ttot = <size_t>t_off[t_off.shape[0] - 1], total
        cdef int t, nth = check_threads(n_threads)
        self.buf = NULL
        self.cbuf = NULL
        self.c.collapsed = False
        self.c.ws = NULL
        self.c.tbuf = NULL
        self.c.tstat = NULL
        self.c.lbounds = NULL
        self.c.st.nthreads = 0
        self.fg = multi_eval
        self.ctx = &self.c
        self.st = &self.c.st
        self.keep = (cp, arrays, S1, ptr, pair_c0, pair_k, pair_voff, A21, B2, c2, XtX, Xty,
                     th_term, th_row, th_col, t_off, t_k)
        c = &self.c
        c.m1 = m1
        c.k1 = k1
        c.p = p
        c.q2 = q2
        c.st.nt = th_term.shape[0]
        c.st.p = p
        c.st.lazy_grad = True
        c.kmax = kmax
        c.width = width
        c.S1 = &S1[0]
        c.ptr = &ptr[0]
        c.pair_c0 = &pair_c0[0] if pair_c0.shape[0] else NULL
        c.pair_k = &pair_k[0] if pair_k.shape[0] else NULL
        c.pair_toff = &pair_toff[0] if pair_toff.shape[0] else NULL
        c.pair_voff = &pair_voff[0] if pair_voff.shape[0] else NULL
        c.A21 = &A21[0] if A21.shape[0] else NULL
        c.bstart = &bstart[0]
        c.bk = &bk[0]
        c.btoff = &btoff[0]
        c.bterm = &bterm[0]
        c.nnz22 = a22r.shape[0]
        c.a22r = &a22r[0] if a22r.shape[0] else NULL
        c.a22c = &a22c[0] if a22c.shape[0] else NULL
        c.a22v = &a22v[0] if a22v.shape[0] else NULL
        c.B2 = &B2[0] if B2.shape[0] else NULL
        c.c2 = &c2[0]
        c.XtX = &XtX[0] if XtX.shape[0] else NULL
        c.Xty = &Xty[0] if Xty.shape[0] else NULL
        c.yty = cp.yty
        c.n = cp.n
        c.reml = reml
        fill_factor_map(&c.fm, th_term, th_row, th_col, t_off, t_k)
        c.st.n_evals = 0
        # threads: balanced level ranges (by levels + pairs) and row ranges of the lower
        # triangle of M22 (row r holds r + 1 entries: split at q2 √(t/nth))
        # (made in C: fit_many makes one kernel per response)
        nth = max(1, min(nth, m1))
        c.ws = <Work*>malloc(nth * sizeof(Work))
        c.tstat = <i64*>malloc(nth * sizeof(i64))
        c.lbounds = <i64*>malloc(2 * (nth + 1) * sizeof(i64))
        if c.ws == NULL or c.tstat == NULL or c.lbounds == NULL:
            raise MemoryError()
        c.rbounds = c.lbounds + nth + 1
        split_ranges(c.ptr, m1, q2, nth, c.lbounds, c.rbounds)
        for t in range(nth):
            c.ws[t].block = NULL
        c.st.nthreads = nth
        for t in range(nth):
            if work_alloc(&c.ws[t], k1 if k1 > kmax else kmax, p) != 0:
                raise MemoryError()
        c.tstride = ((2 + pp * pp + pp + <i64>q2 * (p + 1) + k1 * k1 + <i64>q2 * kmax
                      + 2 * (<i64>width * k1 + 1) + 3 * <i64>(k1 if k1 > pp else pp) ** 2)
                     // 8 + 2) * 8
        c.tbuf = <double*>malloc((nth * c.tstride + 8) * sizeof(double))
        if c.tbuf == NULL:
            raise MemoryError()
        total = (2 * ttot + <size_t>q2 * q2 + <size_t>q2 * pp + q2
                 + m1 * (<size_t>k1 * k1 + <size_t>k1 * pp + k1) + A21.shape[0]
                 + 3 * pp + 2 * <size_t>pp * pp
                 + 3 * (<size_t>m1 * k1 * nc + <size_t>q2 * nc)
                 + k1 * k1 + <size_t>q2 * kmax
                 + 3 * <size_t>(k1 if k1 > pp else pp) ** 2 + th_term.shape[0] + q2 + 64)
        self.buf = <double*>malloc(total * sizeof(double))
        if self.buf == NULL:
            raise MemoryError()
        c.Tall = self.buf
        c.gTall = c.Tall + ttot
        c.tr.q = q2
        c.tr.M = c.gTall + ttot
        c.R2x = c.tr.M + <size_t>q2 * q2
        c.r2y = c.R2x + <size_t>q2 * pp
        c.L11c = c.r2y + q2
        c.Rzx1c = c.L11c + m1 * k1 * k1
        c.rzy1c = c.Rzx1c + m1 * k1 * pp
        c.L21c = c.rzy1c + m1 * k1
        c.st.Lx = c.L21c + A21.shape[0]
        c.Cinv = c.st.Lx + pp * pp
        c.st.beta = c.Cinv + pp * pp
        c.Rzxrzy = c.st.beta + pp
        c.rhs = c.Rzxrzy + pp
        c.X1 = c.rhs + pp
        c.V1 = c.X1 + m1 * k1 * nc
        c.out1 = c.V1 + m1 * k1 * nc
        c.X2 = c.out1 + m1 * k1 * nc
        c.V2 = c.X2 + <size_t>q2 * nc
        c.out2 = c.V2 + <size_t>q2 * nc
        c.G1 = c.out2 + <size_t>q2 * nc
        c.G2 = c.G1 + k1 * k1
        c.Mi = c.G2 + <size_t>q2 * kmax
        c.last_theta = c.Mi + 3 * (k1 if k1 > pp else pp) ** 2
        c.lam2 = c.last_theta + th_term.shape[0]
        c.factored = False
        if scalar_path is None:
            scalar_path = SCALAR_PATH
        c.scalar = bool(scalar_path) and scalar_layout(c, &t_k[0], t_k.shape[0])
        if collapse is None:
            collapse = COLLAPSED_PATH
        if c.scalar and collapse:
            self._collapse(cp)

    cdef _collapse(self, cp):
        """Take the collapsed path ("Collapsed levels") where it pays (COLLAPSE_MIN_WORK): the
        sums by level size cost less than half the levels' work per evaluation, within 256 MB."""
        cdef MultiCtx* c = &self.c
        cdef int p = c.p, m2 = c.q2 + c.p + 1
        cdef i64 nd, i
        cdef double pairs, levels_work = 0.5 * c.m1 * p * (p + 1)
        if m2 > 1024 or c.m1 == 0:
            return
        for i in range(c.m1):
            pairs = <double>(c.ptr[i + 1] - c.ptr[i])
            levels_work += 0.5 * pairs * (pairs + 1) + (pairs + 1) * (p + 1)
        if levels_work < COLLAPSE_MIN_WORK:
            return
        sizes = np.asarray(cp.S1)[0:c.m1 * (2 + p):2 + p]
        vals, first, inv, cnt = np.unique(sizes, return_index=True, return_inverse=True,
                                          return_counts=True)
        nd = vals.shape[0]
        collapsed_work = 0.5 * nd * m2 * (m2 + 1) + m2 * m2
        if not 2.0 * collapsed_work < levels_work or nd * m2 * m2 * 8 > 2 ** 28:
            return
        cdef const double[::1] dval = np.ascontiguousarray(vals, dtype=np.float64)
        cdef const double[::1] dcnt = np.ascontiguousarray(cnt, dtype=np.float64)
        cdef const i64[::1] dfirst = np.ascontiguousarray(first, dtype=np.int64)
        cdef const i64[::1] lgroup = np.ascontiguousarray(inv.ravel(), dtype=np.int64)
        self.ckeep = (dval, dcnt, dfirst, lgroup)
        self.cbuf = <double*>malloc(((nd + 5) * <size_t>m2 * m2 + m2 + 8) * sizeof(double))
        if self.cbuf == NULL:
            raise MemoryError()
        c.m2 = m2
        c.nd = nd
        c.dval = &dval[0]
        c.dcnt = &dcnt[0]
        c.dfirst = &dfirst[0]
        c.lgroup = &lgroup[0]
        c.Md = self.cbuf
        c.Gd = c.Md + nd * m2 * m2
        c.Ud = c.Gd + m2 * m2
        c.Wd = c.Ud + m2 * m2
        c.Qd = c.Wd + m2 * m2
        c.Sd = c.Qd + m2 * m2          # S (m2²) and Λ̃'s diagonal (m2)
        collapsed_design(c)
        c.collapsed = True

    @property
    def scalar_path(self):
        """Whether evaluations take the scalar path (every term a random intercept)."""
        return bool(self.c.scalar)

    @property
    def collapsed_path(self):
        """Whether evaluations take the collapsed scalar path (levels summed by size)."""
        return bool(self.c.collapsed)

    def set_response(self, cp):
        """Another response on the same design, in place (no new buffers): the first factor's
        records S1 (only their c parts differ), the trailing Z'y, X'y and y'y of ``cp``."""
        cdef const double[::1] S1 = cp.S1
        cdef const double[::1] c2 = cp.c2
        cdef const double[::1] Xty = np.ascontiguousarray(cp.Xty)
        old = self.keep
        if (S1.shape[0] != (<object>old[2]).shape[0] or c2.shape[0] != (<object>old[9]).shape[0]
                or Xty.shape[0] != (<object>old[11]).shape[0]):
            raise ValueError("set_response: the records, Z'y or X'y differ in size from the design's")
        self.keep = (cp, old[1], S1) + old[3:9] + (c2, old[10], Xty) + old[12:]
        self.c.S1 = &S1[0]
        self.c.c2 = &c2[0]
        self.c.Xty = &Xty[0] if Xty.shape[0] else NULL
        self.c.yty = cp.yty
        self.c.factored = False
        if self.c.collapsed:
            collapsed_response(&self.c)

    def __dealloc__(self):
        cdef int t
        if self.c.ws != NULL:
            for t in range(self.c.st.nthreads):
                work_free(&self.c.ws[t])
        free(self.c.ws)
        free(self.c.tstat)
        free(self.c.lbounds)
        free(self.c.tbuf)
        free(self.buf)
        free(self.cbuf)

    cdef _levels_at(self, double[::1] th):
        """Evaluate at θ with the level caches filled (the collapsed path keeps none), and
        leave nothing for a gradient to reuse."""
        cdef double f = 0.0
        cdef bint collapsed = self.c.collapsed
        self.c.collapsed = False
        with nogil:
            multi_eval(&self.c, &th[0], &f, NULL)
        self.c.collapsed = collapsed
        self.c.factored = False
        if self.c.st.status != 0:
            raise FloatingPointError("the objective cannot be evaluated at this θ")

    def conditional_variances(self, theta):
        """Diagonal level blocks of M⁻¹ at θ: the first factor's (m1 × k1 × k1) and, for every
        trailing coordinate r, row r of its level's block of P22 (q2 × kmax, first k columns).
        The caller scales by σ² and multiplies by Λ: condVar = σ² Λ M⁻¹ Λ'."""
        cdef double[::1] th = np.ascontiguousarray(theta, dtype=np.float64)
        cdef int k1 = self.c.k1, b, kmax = self.c.kmax
        cdef i64 i, r, m1 = self.c.m1, q2 = self.c.q2
        cdef double[:, :, ::1] M1 = np.empty((m1, k1, k1))
        cdef double[:, ::1] B2 = np.zeros((q2, kmax))
        cdef double* Z = tb(&self.c, 0) + 2 + self.c.p * self.c.p + self.c.p \
            + q2 * (self.c.p + 1) + k1 * k1 + q2 * kmax
        cdef double* Q = Z + self.c.width * k1 + 1
        cdef double* Mi = Q + self.c.width * k1 + 1
        self._levels_at(th)
        with nogil:
            trailing_invert(&self.c.tr)
            for i in range(m1):
                level_inverse_block(&self.c, i, Z, Q, Mi, Mi + k1 * k1)
                for b in range(k1 * k1):
                    M1[i, b // k1, b % k1] = Mi[b]
            for r in range(q2):
                for b in range(self.c.bk[r]):
                    B2[r, b] = trailing_inverse_at(&self.c.tr, r, self.c.bstart[r] + b)
        return np.asarray(M1), np.asarray(B2)

    def modes(self, theta):
        """Conditional modes at θ: (b1 as m1 × k1, b2 as q2)."""
        cdef double[::1] th = np.ascontiguousarray(theta, dtype=np.float64)
        cdef int nc = self.c.p + 1, k1 = self.c.k1
        cdef i64 m1 = self.c.m1
        self._levels_at(th)
        with nogil:
            backsolve_all(&self.c)
            residual_parts(&self.c)
        V1 = np.array(<double[:m1 * k1 * nc]>self.c.V1).reshape(m1, k1, nc)[:, :, 0]
        V2 = np.array(<double[:self.c.q2 * nc]>self.c.V2).reshape(self.c.q2, nc)[:, 0]
        return V1.copy(), V2.copy()
