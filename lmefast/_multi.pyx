# cython: language_level=3
"""Kernels for several grouping factors: the blocked Cholesky of DESIGN.md §2.

Terms sorted by levels, largest first. Block [1,1] is block-diagonal (one k1 × k1 block per
level i of the first factor) and is factored level by level; block [2,1] is sparse: level i
meets a few levels of the trailing factors ("pairs", each a k_j × k1 block of Z_2'Z_1);
block [2,2] (all trailing factors, q2 coordinates) is dense and receives the Schur
complement updates −L21_i L21_i' here, then is factored by LAPACK in the caller.

Per level i of the first factor:
    L11_i L11_i' = T1'A11_iT1 + I,  Rzx1_i = L11_i⁻¹T1'B1_i,  rzy1_i = L11_i⁻¹T1'c1_i
    L21_P = (T_j' A21_P T1) L11_i⁻ᵀ for each pair P of level i
    M22 −= Σ_{P,P'} L21_P L21_P'' (lower triangle only),  R2x −= L21_P Rzx1_i,
    r2y −= L21_P rzy1_i
"""
from libc.math cimport log
from libc.stdlib cimport free, malloc

from lmefast._dense cimport (
    Work, back_solve, factor_group, i64, minv_from_chol, work_alloc, work_free,
)


def first_factor_pass(
    const double[::1] S1, int k1, int p,
    const i64[::1] ptr, const i64[::1] pair_c0, const int[::1] pair_k,
    const i64[::1] pair_toff, const i64[::1] pair_voff, const double[::1] A21,
    const double[::1] T1, const double[::1] Ttrail,
    double[:, ::1] M22, double[:, ::1] R2x, double[::1] r2y,
    double[::1] L11c, double[::1] Rzx1c, double[::1] rzy1c, double[::1] L21c,
    double[:, ::1] RzxRzx, double[::1] Rzxrzy,
):
    """The level loop of the first factor; returns (Σ log|L11_i|², Σ rzy1_i'rzy1_i, status).

    Caches L11_i, Rzx1_i, rzy1_i and every L21_P (layout of A21) for the solves that follow.
    status is 0 or 1 + the level whose block failed to factor."""
    cdef i64 m1 = ptr.shape[0] - 1, i, P, P2
    cdef int rec = k1 * k1 + k1 * p + k1
    cdef int a, b, c, l, kj, kj2, status = 0
    cdef double acc, logdet = 0.0, rr = 0.0
    cdef const double* A
    cdef const double* Tj
    cdef double* X
    cdef double* X2
    cdef double* Y
    cdef Work w
    cdef int kmax = 1
    for P in range(pair_k.shape[0]):
        if pair_k[P] > kmax:
            kmax = pair_k[P]
    if work_alloc(&w, k1 if k1 > kmax else kmax, p) != 0:
        work_free(&w)
        raise MemoryError()
    Y = w.tmp
    with nogil:
        for i in range(m1):
            A = &S1[i * rec]
            if factor_group(k1, k1, p, A, A + k1 * k1, A + k1 * k1 + k1 * p, &T1[0], NULL,
                            NULL, &w) != 0:
                status = <int>(i + 1)
                break
            for a in range(k1 * k1):
                L11c[i * k1 * k1 + a] = w.L[a]
            for a in range(k1 * p):
                Rzx1c[i * k1 * p + a] = w.R[a]
            for a in range(k1):
                rzy1c[i * k1 + a] = w.r[a]
                logdet += 2.0 * log(w.L[a * k1 + a])
                rr += w.r[a] * w.r[a]
                for l in range(p):
                    Rzxrzy[l] += w.R[a * p + l] * w.r[a]
                    for c in range(l + 1):
                        RzxRzx[l, c] += w.R[a * p + l] * w.R[a * p + c]
            for P in range(ptr[i], ptr[i + 1]):
                kj = pair_k[P]
                Tj = &Ttrail[pair_toff[P]]
                # Y = A21_P T1 (kj × k1)
                for a in range(kj):
                    for b in range(k1):
                        acc = 0.0
                        for c in range(b, k1):
                            acc = acc + A21[pair_voff[P] + a * k1 + c] * T1[c * k1 + b]
                        Y[a * k1 + b] = acc
                # X = T_j' Y, then X ← X L11⁻ᵀ (forward substitution on each row)
                X = &L21c[pair_voff[P]]
                for a in range(kj):
                    for b in range(k1):
                        acc = 0.0
                        for c in range(a, kj):
                            acc = acc + Tj[c * kj + a] * Y[c * k1 + b]
                        X[a * k1 + b] = acc
                    for b in range(k1):
                        acc = X[a * k1 + b]
                        for c in range(b):
                            acc = acc - X[a * k1 + c] * w.L[b * k1 + c]
                        X[a * k1 + b] = acc / w.L[b * k1 + b]
                # right-hand sides
                for a in range(kj):
                    acc = 0.0
                    for b in range(k1):
                        acc = acc + X[a * k1 + b] * w.r[b]
                    r2y[pair_c0[P] + a] -= acc
                    for l in range(p):
                        acc = 0.0
                        for b in range(k1):
                            acc = acc + X[a * k1 + b] * w.R[b * p + l]
                        R2x[pair_c0[P] + a, l] -= acc
            # Schur complement: M22 −= L21_P L21_P2' for pairs P ≥ P2 of this level
            for P in range(ptr[i], ptr[i + 1]):
                kj = pair_k[P]
                X = &L21c[pair_voff[P]]
                for P2 in range(ptr[i], P + 1):
                    kj2 = pair_k[P2]
                    X2 = &L21c[pair_voff[P2]]
                    for a in range(kj):
                        for c in range(kj2 if P2 != P else a + 1):
                            acc = 0.0
                            for b in range(k1):
                                acc = acc + X[a * k1 + b] * X2[c * k1 + b]
                            if pair_c0[P] + a >= pair_c0[P2] + c:   # lower triangle only
                                M22[pair_c0[P] + a, pair_c0[P2] + c] -= acc
                            else:
                                M22[pair_c0[P2] + c, pair_c0[P] + a] -= acc
    work_free(&w)
    for a in range(p):
        for c in range(a):
            RzxRzx[c, a] = RzxRzx[a, c]
    return logdet, rr, status


def first_factor_backsolve(
    int k1, int ncol, const i64[::1] ptr, const i64[::1] pair_c0, const int[::1] pair_k,
    const i64[::1] pair_voff, const double[::1] L11c, const double[::1] L21c,
    double[::1] X1, const double[:, ::1] X2,
):
    """X1_i ← L11_i⁻ᵀ (X1_i − Σ_P L21_P' X2[P]) for every level i (X1: m1 × k1 × ncol):
    the first-factor half of a solve with L' once the trailing half X2 is known."""
    cdef i64 m1 = ptr.shape[0] - 1, i, P
    cdef int a, b, l, kj
    cdef double v
    with nogil:
        for i in range(m1):
            for P in range(ptr[i], ptr[i + 1]):
                kj = pair_k[P]
                for a in range(kj):
                    for b in range(k1):
                        v = L21c[pair_voff[P] + a * k1 + b]
                        for l in range(ncol):
                            X1[(i * k1 + b) * ncol + l] -= v * X2[pair_c0[P] + a, l]
            back_solve(k1, ncol, &L11c[i * k1 * k1], &X1[i * k1 * ncol])


def apply_A(
    const double[::1] S1, int k1, int p, const i64[::1] ptr, const i64[::1] pair_c0,
    const int[::1] pair_k, const i64[::1] pair_voff, const double[::1] A21, int ncol,
    const double[::1] V1, const double[:, ::1] V2, double[::1] out1, double[:, ::1] out2,
):
    """(Z'Z V) without A22: out1_i = A11_i V1_i + Σ_P A21_P' V2[P];  out2[P] += A21_P V1_i.
    out1 is overwritten, out2 accumulated (the caller adds A22 V2)."""
    cdef i64 m1 = ptr.shape[0] - 1, i, P
    cdef int rec = k1 * k1 + k1 * p + k1, a, b, c, l, kj
    cdef double v, acc
    with nogil:
        for i in range(m1):
            for a in range(k1):
                for l in range(ncol):
                    acc = 0.0
                    for c in range(k1):
                        acc = acc + S1[i * rec + a * k1 + c] * V1[(i * k1 + c) * ncol + l]
                    out1[(i * k1 + a) * ncol + l] = acc
            for P in range(ptr[i], ptr[i + 1]):
                kj = pair_k[P]
                for a in range(kj):
                    for b in range(k1):
                        v = A21[pair_voff[P] + a * k1 + b]
                        for l in range(ncol):
                            out1[(i * k1 + b) * ncol + l] += v * V2[pair_c0[P] + a, l]
                            out2[pair_c0[P] + a, l] += v * V1[(i * k1 + b) * ncol + l]


def first_factor_grad_blocks(
    const double[::1] S1, int k1, int p, const i64[::1] ptr, const i64[::1] pair_c0,
    const int[::1] pair_k, const i64[::1] pair_voff, const i64[::1] pair_toff,
    const double[::1] A21, const double[::1] L11c, const double[::1] L21c,
    const double[::1] T1, const double[::1] Ttrail, const double[:, ::1] P22, int width,
    double[::1] G1, double[:, ::1] G2,
):
    """The parts of the diagonal blocks of G = Z'ZΛM⁻¹ that involve the first factor.

    With Z_P = L21_P L11_i⁻¹, Q_P = Σ_P' P22[P, P'] Z_P' (so (M⁻¹)21 = −Q) and
    (M⁻¹)11_ii = L11_i⁻ᵀL11_i⁻¹ + Σ_P Z_P'Q_P:
        G1 += A11_i T1 (M⁻¹)11_ii − Σ_P A21_P' T_j Q_P         (summed over levels, k1 × k1)
        G2[P's block] −= A21_P T1 Q_P'                           (row c, column b of its block)
    `width` is the largest Σ_P k_j of a level (rows of the Z and Q work arrays). Only the upper
    triangle of P22 is read."""
    cdef i64 m1 = ptr.shape[0] - 1, i, P, P2
    cdef int rec = k1 * k1 + k1 * p + k1, a, b, c, d, kj, kj2, row, row2
    cdef i64 r1, r2
    cdef double acc
    cdef double* Z = <double*>malloc((width * k1 + 1) * sizeof(double))
    cdef double* Q = <double*>malloc((width * k1 + 1) * sizeof(double))
    cdef double* Mi = <double*>malloc((k1 * k1 * 3 + 1) * sizeof(double))
    cdef double* tmp
    cdef double* W
    cdef const double* L
    cdef const double* A11
    cdef const double* Tj
    if Z == NULL or Q == NULL or Mi == NULL:
        free(Z); free(Q); free(Mi)
        raise MemoryError()
    tmp = Mi + k1 * k1
    W = tmp + k1 * k1
    with nogil:
        for i in range(m1):
            L = &L11c[i * k1 * k1]
            A11 = &S1[i * rec]
            # Z_P = L21_P L11⁻¹ (each row: solve z L11 = l by back substitution)
            row = 0
            for P in range(ptr[i], ptr[i + 1]):
                kj = pair_k[P]
                for a in range(kj):
                    for b in range(k1 - 1, -1, -1):
                        acc = L21c[pair_voff[P] + a * k1 + b]
                        for c in range(b + 1, k1):
                            acc = acc - Z[(row + a) * k1 + c] * L[c * k1 + b]
                        Z[(row + a) * k1 + b] = acc / L[b * k1 + b]
                row = row + kj
            # Q_P = Σ_P' P22[P, P'] Z_P'
            row = 0
            for P in range(ptr[i], ptr[i + 1]):
                kj = pair_k[P]
                for a in range(kj):
                    for b in range(k1):
                        acc = 0.0
                        row2 = 0
                        for P2 in range(ptr[i], ptr[i + 1]):
                            kj2 = pair_k[P2]
                            for c in range(kj2):
                                r1 = pair_c0[P] + a
                                r2 = pair_c0[P2] + c
                                acc = acc + (P22[r2, r1] if r1 >= r2 else P22[r1, r2]) \
                                    * Z[(row2 + c) * k1 + b]
                            row2 = row2 + kj2
                        Q[(row + a) * k1 + b] = acc
                row = row + kj
            # (M⁻¹)11_ii
            minv_from_chol(k1, L, Mi, tmp)
            row = 0
            for P in range(ptr[i], ptr[i + 1]):
                kj = pair_k[P]
                for a in range(k1):
                    for b in range(k1):
                        acc = 0.0
                        for c in range(kj):
                            acc = acc + Z[(row + c) * k1 + a] * Q[(row + c) * k1 + b]
                        Mi[a * k1 + b] += acc
                row = row + kj
            # W = A11 T1, G1 += W Mi
            for a in range(k1):
                for b in range(k1):
                    acc = 0.0
                    for c in range(b, k1):
                        acc = acc + A11[a * k1 + c] * T1[c * k1 + b]
                    W[a * k1 + b] = acc
            for a in range(k1):
                for b in range(k1):
                    acc = 0.0
                    for c in range(k1):
                        acc = acc + W[a * k1 + c] * Mi[c * k1 + b]
                    G1[a * k1 + b] += acc
            row = 0
            for P in range(ptr[i], ptr[i + 1]):
                kj = pair_k[P]
                Tj = &Ttrail[pair_toff[P]]
                # G1 −= A21_P' T_j Q_P   (k1 × kj)(kj × kj)(kj × k1)
                for a in range(k1):
                    for b in range(k1):
                        acc = 0.0
                        for c in range(kj):
                            for d in range(c, kj):
                                acc = acc + A21[pair_voff[P] + d * k1 + a] * Tj[d * kj + c] \
                                    * Q[(row + c) * k1 + b]
                        G1[a * k1 + b] -= acc
                # G2[P] −= A21_P T1 Q_P'   (kj × k1)(k1 × k1)(k1 × kj)
                for a in range(kj):
                    for c in range(k1):
                        acc = 0.0
                        for d in range(c, k1):
                            acc = acc + A21[pair_voff[P] + a * k1 + d] * T1[d * k1 + c]
                        tmp[c] = acc
                    for b in range(kj):
                        acc = 0.0
                        for c in range(k1):
                            acc = acc + tmp[c] * Q[(row + b) * k1 + c]
                        G2[pair_c0[P] + a, b] -= acc
                row = row + kj
    free(Z)
    free(Q)
    free(Mi)
