# cython: language_level=3
"""Per-group kernels of the profiled objective for one grouping factor (DESIGN.md §2).

Storage: one flat array S holding, per group, the record [A_i | B_i | c_i] (row-major
q_i × q_i, q_i × p, q_i) at offset s_off[i]; A_i = Z_i'Z_i, B_i = Z_i'X_i, c_i = Z_i'y_i.
One record per group keeps a group's data in one place for the scattered row pass and
streams through memory in the group loops.
Λ_i = blockdiag(T, diag(θ_vc[comp[j]]) for the coordinates j ≥ k of group i), T k × k lower.

Three layers: `noexcept nogil` routines for one group, loops over groups that release the
GIL once, and Python-visible functions that allocate the work arrays first.
"""
import numpy as np

from libc.math cimport log
from libc.stdlib cimport free, malloc

from lmefast._dense cimport (
    Work, back_solve, factor_group, fixed_effects_step, i64, lines, minv_from_chol, work_alloc,
    work_free,
)
from lmefast._kernel cimport Kernel, KernelState, fill_factor_map
from lmefast._theta cimport FactorMap, factor_grad_to_theta, theta_to_factors
from lmefast._threads cimport run_chunks

from lmefast.parallel import check_threads

# Whether kernels built from now on take the small-block path where it applies (see "Small
# blocks" below; a constructor argument overrides it); the tests turn it off to compare with
# the general path.
SMALL_BLOCK_PATH = True


cdef struct Blocks:
    const double* S
    const i64* s_off
    const i64* q_off
    const i64* comp
    i64 m
    int k
    int p
    int qmax
    const double* T
    const double* tvc
    double* fac         # per-group factor cache [AΛ | L | Rzx | rzy] at offsets f_off, or NULL
    const i64* f_off


cdef inline void point_at_cache(Blocks* bl, i64 g, int q, Work* w) noexcept nogil:
    """Let w's AΛ, L, Rzx and rzy arrays be group g's slots of the factor cache."""
    w.AL = bl.fac + bl.f_off[g]
    w.L = w.AL + q * q
    w.R = w.L + q * q
    w.r = w.R + q * bl.p


cdef inline int obj_group(int q, int k, int p, const double* Ag, const double* T,
                          const double* tvc, const i64* cm, Work* w, double* logdet,
                          double* rr, double* RzxRzx, double* Rzxrzy) noexcept nogil:
    """One group's share of the objective: log|L_i|², rzy_i'rzy_i, Rzx_i'Rzx_i, Rzx_i'rzy_i."""
    cdef int i, l, l2
    cdef double acc
    if factor_group(q, k, p, Ag, Ag + q * q, Ag + q * q + q * p, T, tvc, cm, w) != 0:
        return 1
    for i in range(q):
        logdet[0] += 2.0 * log(w.L[i * q + i])
        rr[0] += w.r[i] * w.r[i]
        for l in range(p):
            acc = w.R[i * p + l]
            Rzxrzy[l] += acc * w.r[i]
            for l2 in range(l + 1):
                RzxRzx[l * p + l2] += acc * w.R[i * p + l2]
    return 0


cdef i64 objective_loop(Blocks* bl, Work* w, i64 g0, i64 g1, double* logdet, double* rr,
                        double* RzxRzx, double* Rzxrzy) noexcept nogil:
    """Σ log|L_i|², Σ rzy_i'rzy_i, Σ Rzx_i'Rzx_i (lower), Σ Rzx_i'rzy_i.  Returns 0 or 1 + group.

    Blocks of one, two or three random coefficients go through copies of the group routine
    with q and k fixed at compile time, so the compiler unrolls their loops."""
    cdef i64 g
    cdef int q, k = bl.k, p = bl.p, st
    cdef const double* Ag
    cdef const i64* cm
    cdef Work wg = w[0]
    for g in range(g0, g1):
        q = <int>(bl.q_off[g + 1] - bl.q_off[g])
        if q == 0:
            continue
        Ag = &bl.S[bl.s_off[g]]
        cm = &bl.comp[bl.q_off[g]] if bl.comp != NULL else NULL
        if bl.fac != NULL:
            point_at_cache(bl, g, q, &wg)
            w = &wg
        if q == k and k == 1:
            st = obj_group(1, 1, p, Ag, bl.T, bl.tvc, cm, w, logdet, rr, RzxRzx, Rzxrzy)
        elif q == k and k == 2:
            st = obj_group(2, 2, p, Ag, bl.T, bl.tvc, cm, w, logdet, rr, RzxRzx, Rzxrzy)
        elif q == k and k == 3:
            st = obj_group(3, 3, p, Ag, bl.T, bl.tvc, cm, w, logdet, rr, RzxRzx, Rzxrzy)
        else:
            st = obj_group(q, k, p, Ag, bl.T, bl.tvc, cm, w, logdet, rr, RzxRzx, Rzxrzy)
        if st != 0:
            return g + 1
    return 0


cdef inline int grad_group(int q, int k, int p, const double* Ag, const double* T,
                           const double* tvc, const i64* cm, Work* w, double* F,
                           const double* beta, const double* Cinv, double kappa, bint reml,
                           double* gT, double* gvc, bint factored) noexcept nogil:
    """One group's share of ∂(objective)/∂Λ (see gradient_loop). With `factored`, w's AΛ,
    L, Rzx and rzy already hold this group's factor (the cache of the objective pass)."""
    cdef int i, j, a, l, l2
    cdef double acc
    cdef const double* Bg = Ag + q * q
    cdef const double* cg = Bg + q * p
    if not factored and factor_group(q, k, p, Ag, Bg, cg, T, tvc, cm, w) != 0:
        return 1
    # u = L⁻ᵀ (r − R β);  H = L⁻ᵀ R (in place in w.R)
    for i in range(q):
        acc = w.r[i]
        for l in range(p):
            acc = acc - w.R[i * p + l] * beta[l]
        w.u[i] = acc
    back_solve(q, 1, w.L, w.u)
    back_solve(q, p, w.L, w.R)
    # s = c − Bβ − AΛu
    for i in range(q):
        acc = cg[i]
        for l in range(p):
            acc = acc - Bg[i * p + l] * beta[l]
        for a in range(q):
            acc = acc - w.AL[i * q + a] * w.u[a]
        w.s[i] = acc
    minv_from_chol(q, w.L, w.Minv, w.tmp)
    if reml:
        # E = B − AΛH ; F = E C⁻¹
        for i in range(q):
            for l in range(p):
                acc = Bg[i * p + l]
                for a in range(q):
                    acc = acc - w.AL[i * q + a] * w.R[a * p + l]
                w.E[i * p + l] = acc
        for i in range(q):
            for l in range(p):
                acc = 0.0
                for l2 in range(p):
                    acc = acc + w.E[i * p + l2] * Cinv[l2 * p + l]
                F[i * p + l] = acc
    for i in range(k):
        for j in range(i + 1):
            acc = 0.0
            for a in range(q):
                acc = acc + w.AL[i * q + a] * w.Minv[a * q + j]
            acc = 2.0 * acc - 2.0 * kappa * w.s[i] * w.u[j]
            if reml:
                for l in range(p):
                    acc = acc - 2.0 * F[i * p + l] * w.R[j * p + l]
            gT[i * k + j] += acc
    for i in range(k, q):
        acc = 0.0
        for a in range(q):
            acc = acc + w.AL[i * q + a] * w.Minv[a * q + i]
        acc = 2.0 * acc - 2.0 * kappa * w.s[i] * w.u[i]
        if reml:
            for l in range(p):
                acc = acc - 2.0 * F[i * p + l] * w.R[i * p + l]
        gvc[cm[i]] += acc
    return 0


cdef i64 gradient_loop(Blocks* bl, Work* w, i64 g0, i64 g1, double* F, const double* beta,
                       const double* Cinv, double kappa, bint reml, double* gT,
                       double* gvc) noexcept nogil:
    """Accumulates ∂(objective)/∂Λ (DESIGN.md §2, gradient) over groups.

    With M_i = L_iL_i', u_i = L_i⁻ᵀ(rzy_i − Rzx_i β), s_i = c_i − B_iβ − A_iΛ_iu_i,
    H_i = L_i⁻ᵀRzx_i and E_i = B_i − A_iΛ_iH_i:
        ∂/∂Λ_i = 2 A_iΛ_iM_i⁻¹ − 2κ s_iu_i' − [REML] 2 E_i C⁻¹ H_i'
    gT (k × k, lower used) receives the T block summed over groups; gvc the diagonal
    entries of the variance-component coordinates summed per component.
    """
    cdef i64 g
    cdef int q, k = bl.k, p = bl.p, st
    cdef const double* Ag
    cdef const i64* cm
    cdef Work wg = w[0]
    cdef bint factored = bl.fac != NULL
    for g in range(g0, g1):
        q = <int>(bl.q_off[g + 1] - bl.q_off[g])
        if q == 0:
            continue
        Ag = &bl.S[bl.s_off[g]]
        cm = &bl.comp[bl.q_off[g]] if bl.comp != NULL else NULL
        if factored:
            point_at_cache(bl, g, q, &wg)
            w = &wg
        if q == k and k == 1:
            st = grad_group(1, 1, p, Ag, bl.T, bl.tvc, cm, w, F, beta, Cinv, kappa, reml, gT, gvc,
                            factored)
        elif q == k and k == 2:
            st = grad_group(2, 2, p, Ag, bl.T, bl.tvc, cm, w, F, beta, Cinv, kappa, reml, gT, gvc,
                            factored)
        elif q == k and k == 3:
            st = grad_group(3, 3, p, Ag, bl.T, bl.tvc, cm, w, F, beta, Cinv, kappa, reml, gT, gvc,
                            factored)
        else:
            st = grad_group(q, k, p, Ag, bl.T, bl.tvc, cm, w, F, beta, Cinv, kappa, reml, gT, gvc,
                            factored)
        if st != 0:
            return g + 1
    return 0


# --------------------------------------------------------------------------------------------
# Small blocks: the fast path
# --------------------------------------------------------------------------------------------
# When every group's block is a random intercept (q = k = 1) or a random intercept and slope
# (q = k = 2) with no variance components, and p ≤ SMALL_P, the group loops below replace
# objective_loop and gradient_loop. They need no Cholesky factor of M_i = Λ'A_iΛ + I: every
# quantity of obj_group and grad_group is a product with M_i⁻¹, written out for q ≤ 2:
#     Rzx_i'Rzx_i = V_i'M_i⁻¹V_i,  Rzx_i'rzy_i = V_i'M_i⁻¹w_i,  rzy_i'rzy_i = w_i'M_i⁻¹w_i,
#     log|L_i|² = log det M_i,  u_i = M_i⁻¹(w_i − V_iβ),  H_i = M_i⁻¹V_i,
# with V_i = Λ'B_i and w_i = Λ'c_i; for T = [t00 0; t10 t11],
#     AΛ = [a00t00 + a01t10  a01t11; a10t00 + a11t10  a11t11],
#     m00 = t00(AΛ)00 + t10(AΛ)10 + 1,  m10 = t11(AΛ)10,  m11 = t11(AΛ)11 + 1,
# and with ρ = m10/m00 and the Schur complement s = m11 − m10ρ (= L11², Cholesky's pivot):
#     det M_i = m00 s,  M_i⁻¹ = [1/m00 + ρ²/s  −ρ/s; −ρ/s  1/s].
# Two divisions per group and no square root; M_i fails where its Cholesky factor would
# (m00 or s not > 0) and an infinite m00 gives what the factor gives. The entries are scalars
# in registers, the p-long rows of V_i and M_i⁻¹V_i in arrays on the stack. log|L|² is
# summed as the log of running products of the det M_i (each ≥ 1: a log whenever the product
# passes LOGDET_BATCH, log m00 + log s for a det M_i outside [1/LOGDET_BATCH, LOGDET_BATCH]).
# There is no factor cache: the gradient pass forms M_i again from the records (cheaper than
# writing and reading a cache). For q = 2 the group routines also run as a copy with p = 3 a
# constant (y ~ x1 + x2 + (1 + x1 | g)), whose loops over p the compiler unrolls (~1.4× on
# that design). Copies for p = 1…4 of the whole loops cost the general loops their own
# specialised copies (the compiler's constant-propagation clones of factor_group, which it
# makes within a budget per module) and slowed them 1.3–1.6×: after adding any, check that
# `nm` on the module still lists factor_group's .constprop clones.
# The numbers equal the general loops' to rounding (tests/test_onefactor_small.py).

cdef enum:
    SMALL_P = 16        # fixed-effects columns the stack arrays hold

cdef double LOGDET_BATCH = 1e100


cdef struct Small2:
    double al00, al01, al10, al11   # AΛ
    double m00, s                   # m00 and the Schur complement m11 − m10²/m00 (= L11²)
    double mi00, mi10, mi11         # M⁻¹ (lower)
    double w0, w1                   # Λ'c
    double z0, z1                   # M⁻¹Λ'c


cdef inline int form2(int p, const double* Ag, const double* T, Small2* f, double* V0,
                      double* V1, double* Y0, double* Y1) noexcept nogil:
    """M_i and its products for q = k = 2: f, the rows V0, V1 of Λ'B_i and Y0, Y1 of
    M_i⁻¹Λ'B_i. Returns 0, or 1 or 2 when M_i is not positive definite (the column at which
    its Cholesky factor would fail: θ not finite)."""
    cdef const double* B = Ag + 4
    cdef const double* c = B + 2 * p
    cdef double t00 = T[0], t10 = T[2], t11 = T[3], m10, a, r, si, v0, v1
    cdef int l
    f.al00 = Ag[0] * t00 + Ag[1] * t10
    f.al01 = Ag[1] * t11
    f.al10 = Ag[2] * t00 + Ag[3] * t10
    f.al11 = Ag[3] * t11
    f.m00 = t00 * f.al00 + t10 * f.al10 + 1.0
    if not f.m00 > 0.0:
        return 1
    m10 = t11 * f.al10
    a = 1.0 / f.m00
    r = m10 * a
    f.s = t11 * f.al11 + 1.0 - m10 * r
    if not f.s > 0.0:
        return 2
    si = 1.0 / f.s
    f.mi00 = a + r * r * si
    f.mi10 = -r * si
    f.mi11 = si
    f.w0 = t00 * c[0] + t10 * c[1]
    f.w1 = t11 * c[1]
    f.z0 = f.mi00 * f.w0 + f.mi10 * f.w1
    f.z1 = f.mi10 * f.w0 + f.mi11 * f.w1
    for l in range(p):
        v0 = t00 * B[l] + t10 * B[p + l]
        v1 = t11 * B[p + l]
        V0[l] = v0
        V1[l] = v1
        Y0[l] = f.mi00 * v0 + f.mi10 * v1
        Y1[l] = f.mi10 * v0 + f.mi11 * v1
    return 0


cdef inline double add_logdet(double m, double s, double* prod) noexcept nogil:
    """log(m s) to be added now: 0.0 while m s goes into the running product *prod, the
    product's log once it passes LOGDET_BATCH, log m + log s when m s is out of range."""
    cdef double out, det = m * s
    if det > LOGDET_BATCH or det < 1.0 / LOGDET_BATCH:
        return log(m) + log(s)
    prod[0] = prod[0] * det
    if prod[0] > LOGDET_BATCH:
        out = log(prod[0])
        prod[0] = 1.0
        return out
    return 0.0


cdef inline int small2_value_group(int p, const double* Ag, const double* T, double* logdet,
                                   double* prod, double* rr, double* RzxRzx,
                                   double* Rzxrzy) noexcept nogil:
    """One group's share of small2_objective."""
    cdef int l, l2
    cdef Small2 f
    cdef double V0[SMALL_P]
    cdef double V1[SMALL_P]
    cdef double Y0[SMALL_P]
    cdef double Y1[SMALL_P]
    cdef double v0, v1
    if form2(p, Ag, T, &f, V0, V1, Y0, Y1) != 0:
        return 1
    logdet[0] += add_logdet(f.m00, f.s, prod)
    rr[0] += f.w0 * f.z0 + f.w1 * f.z1
    for l in range(p):
        v0 = V0[l]
        v1 = V1[l]
        Rzxrzy[l] += v0 * f.z0 + v1 * f.z1
        for l2 in range(l + 1):
            RzxRzx[l * p + l2] += v0 * Y0[l2] + v1 * Y1[l2]
    return 0


cdef i64 small2_objective(const Blocks* bl, i64 g0, i64 g1, double* acc) noexcept nogil:
    """objective_loop for q = k = 2 into acc = [log|L|², rr, RzxRzx (p × p, lower), Rzxrzy].
    p = 3 goes through a copy of the group routine with p a constant (as small2_gradient)."""
    cdef i64 g
    cdef int p = bl.p, st
    cdef double logdet = 0.0, prod = 1.0, rr = 0.0
    cdef double* RzxRzx = acc + 2
    cdef double* Rzxrzy = acc + 2 + p * p
    for g in range(g0, g1):
        if p == 3:
            st = small2_value_group(3, bl.S + bl.s_off[g], bl.T, &logdet, &prod, &rr, RzxRzx,
                                    Rzxrzy)
        else:
            st = small2_value_group(p, bl.S + bl.s_off[g], bl.T, &logdet, &prod, &rr, RzxRzx,
                                    Rzxrzy)
        if st != 0:
            return g + 1
    acc[0] += logdet + log(prod)
    acc[1] += rr
    return 0


cdef inline int small2_grad_group(int p, const double* Ag, const double* T, const double* beta,
                                  const double* Cinv, double kappa, bint reml,
                                  double* g3) noexcept nogil:
    """One group's share of small2_gradient, added to g3 = [∂/∂T00, ∂/∂T10, ∂/∂T11]."""
    cdef int l, l2
    cdef Small2 f
    cdef const double* B = Ag + 4
    cdef double V0[SMALL_P]
    cdef double V1[SMALL_P]
    cdef double H0[SMALL_P]
    cdef double H1[SMALL_P]
    cdef double E0[SMALL_P]
    cdef double E1[SMALL_P]
    cdef double u0, u1, s0, s1, f0, f1, b, ci, fh00, fh10, fh11
    if form2(p, Ag, T, &f, V0, V1, H0, H1) != 0:
        return 1
    u0 = f.z0
    u1 = f.z1
    s0 = Ag[4 + 2 * p]
    s1 = Ag[5 + 2 * p]
    for l in range(p):
        b = beta[l]
        u0 = u0 - H0[l] * b
        u1 = u1 - H1[l] * b
        s0 = s0 - B[l] * b
        s1 = s1 - B[p + l] * b
    s0 = s0 - f.al00 * u0 - f.al01 * u1
    s1 = s1 - f.al10 * u0 - f.al11 * u1
    g3[0] += 2.0 * (f.al00 * f.mi00 + f.al01 * f.mi10) - 2.0 * kappa * s0 * u0
    g3[1] += 2.0 * (f.al10 * f.mi00 + f.al11 * f.mi10) - 2.0 * kappa * s1 * u0
    g3[2] += 2.0 * (f.al10 * f.mi10 + f.al11 * f.mi11) - 2.0 * kappa * s1 * u1
    if reml and p > 0:
        # F_il = Σ_l2 E_il2 C⁻¹_l2l (C⁻¹ symmetric: its row l), summed into F_i·H_j at once
        for l2 in range(p):
            E0[l2] = B[l2] - f.al00 * H0[l2] - f.al01 * H1[l2]
            E1[l2] = B[p + l2] - f.al10 * H0[l2] - f.al11 * H1[l2]
        fh00 = 0.0
        fh10 = 0.0
        fh11 = 0.0
        for l in range(p):
            f0 = 0.0
            f1 = 0.0
            for l2 in range(p):
                ci = Cinv[l * p + l2]
                f0 = f0 + E0[l2] * ci
                f1 = f1 + E1[l2] * ci
            fh00 += f0 * H0[l]
            fh10 += f1 * H0[l]
            fh11 += f1 * H1[l]
        g3[0] -= 2.0 * fh00
        g3[1] -= 2.0 * fh10
        g3[2] -= 2.0 * fh11
    return 0


cdef i64 small2_gradient(const Blocks* bl, i64 g0, i64 g1, const double* beta,
                         const double* Cinv, double kappa, bint reml, double* gT) noexcept nogil:
    """gradient_loop for q = k = 2: adds ∂/∂T (k × k, lower) to gT. Per group, as in grad_group,
    u = M⁻¹Λ'(c − Bβ), H = M⁻¹Λ'B, s = c − Bβ − AΛu, E = B − AΛH, F = E C⁻¹ and
        ∂/∂T_ij += 2 (AΛM⁻¹)_ij − 2κ s_i u_j − [REML] 2 F_i·H_j.
    p = 3 (y ~ x1 + x2 + (1 + x1 | g)) goes through a copy of the group routine with p a
    constant: the compiler unrolls its loops over p."""
    cdef i64 g
    cdef int p = bl.p, st
    cdef double g3[3]
    g3[0] = 0.0
    g3[1] = 0.0
    g3[2] = 0.0
    for g in range(g0, g1):
        if p == 3:
            st = small2_grad_group(3, bl.S + bl.s_off[g], bl.T, beta, Cinv, kappa, reml, g3)
        else:
            st = small2_grad_group(p, bl.S + bl.s_off[g], bl.T, beta, Cinv, kappa, reml, g3)
        if st != 0:
            return g + 1
    gT[0] += g3[0]
    gT[2] += g3[1]
    gT[3] += g3[2]
    return 0


cdef i64 small1_objective(const Blocks* bl, i64 g0, i64 g1, double* acc) noexcept nogil:
    """objective_loop for q = k = 1 (a random intercept): with m_i = t²a_i + 1,
    Rzx_i'Rzx_i = t²B_i'B_i/m_i, Rzx_i'rzy_i = t²B_i'c_i/m_i, rzy_i² = t²c_i²/m_i."""
    cdef i64 g
    cdef int l, l2, p = bl.p
    cdef const double* Ag
    cdef double V[SMALL_P]
    cdef double t = bl.T[0], m, inv, w, z, v, y
    cdef double logdet = 0.0, prod = 1.0, rr = 0.0
    cdef double* RzxRzx = acc + 2
    cdef double* Rzxrzy = acc + 2 + p * p
    for g in range(g0, g1):
        Ag = bl.S + bl.s_off[g]
        m = t * (Ag[0] * t) + 1.0
        if not m > 0.0:
            return g + 1
        inv = 1.0 / m
        logdet += add_logdet(m, 1.0, &prod)
        w = t * Ag[1 + p]
        z = w * inv
        rr += w * z
        for l in range(p):
            v = t * Ag[1 + l]
            V[l] = v
            Rzxrzy[l] += v * z
            y = v * inv
            for l2 in range(l + 1):
                RzxRzx[l * p + l2] += y * V[l2]
    acc[0] += logdet + log(prod)
    acc[1] += rr
    return 0


cdef i64 small1_gradient(const Blocks* bl, i64 g0, i64 g1, const double* beta,
                         const double* Cinv, double kappa, bint reml, double* gT) noexcept nogil:
    """gradient_loop for q = k = 1: with m = t²a + 1, u = t(c − Bβ)/m, H = tB/m,
    s = c − Bβ − atu, E = B − atH, ∂/∂t += 2at/m − 2κsu − [REML] 2 E C⁻¹ H'."""
    cdef i64 g
    cdef int l, l2, p = bl.p
    cdef const double* Ag
    cdef double H[SMALL_P]
    cdef double E[SMALL_P]
    cdef double t = bl.T[0], al, m, inv, u, s, b, f0, fh, g00 = 0.0
    for g in range(g0, g1):
        Ag = bl.S + bl.s_off[g]
        al = Ag[0] * t
        m = t * al + 1.0
        if not m > 0.0:
            return g + 1
        inv = 1.0 / m
        s = Ag[1 + p]
        for l in range(p):
            b = beta[l]
            H[l] = t * Ag[1 + l] * inv
            s = s - Ag[1 + l] * b
        u = t * s * inv
        s = s - al * u
        g00 += 2.0 * al * inv - 2.0 * kappa * s * u
        if reml and p > 0:
            for l2 in range(p):
                E[l2] = Ag[1 + l2] - al * H[l2]
            fh = 0.0
            for l in range(p):
                f0 = 0.0
                for l2 in range(p):
                    f0 = f0 + E[l2] * Cinv[l * p + l2]
                fh += f0 * H[l]
            g00 -= 2.0 * fh
    gT[0] += g00
    return 0


cdef struct EvalCtx:
    KernelState st
    Blocks bl
    FactorMap fm        # θ → [T (k × k) | θ_vc (one 1 × 1 block per component)]
    const double* XtX
    const double* Xty
    double yty
    double n
    bint reml
    int p
    int k
    int nvc
    double* T           # followed by tvc
    double* tvc
    double* gT          # followed by gvc
    double* gvc
    double* Rzxrzy
    double* rhs
    double* Cinv
    # threads: group ranges [bounds[t], bounds[t+1]), one Work, F buffer and accumulator
    # record [logdet, rr, RzxRzx (p×p), Rzxrzy (p), gT (k×k), gvc] per thread
    i64* bounds
    Work* ws
    double* Fs
    int f_stride
    double* accs
    int acc_stride
    i64* stats
    double kappa
    int small           # 1 or 2: every group's block is q = k = small, no variance
                        # components (the small-block path); 0: the general loops


cdef void obj_chunk(void* vc, int t) noexcept nogil:
    cdef EvalCtx* c = <EvalCtx*>vc
    cdef double* a = c.accs + t * c.acc_stride
    cdef int l, p = c.p
    for l in range(2 + p * p + p):
        a[l] = 0.0
    if c.small == 2:
        c.stats[t] = small2_objective(&c.bl, c.bounds[t], c.bounds[t + 1], a)
    elif c.small == 1:
        c.stats[t] = small1_objective(&c.bl, c.bounds[t], c.bounds[t + 1], a)
    else:
        c.stats[t] = objective_loop(&c.bl, &c.ws[t], c.bounds[t], c.bounds[t + 1], a, a + 1,
                                    a + 2, a + 2 + p * p)


cdef void grad_chunk(void* vc, int t) noexcept nogil:
    cdef EvalCtx* c = <EvalCtx*>vc
    cdef int p = c.p, k = c.k, l
    cdef double* a = c.accs + t * c.acc_stride + 2 + p * p + p
    for l in range(k * k + c.nvc):
        a[l] = 0.0
    if c.small == 2:
        c.stats[t] = small2_gradient(&c.bl, c.bounds[t], c.bounds[t + 1], c.st.beta, c.Cinv,
                                     c.kappa, c.reml, a)
        return
    if c.small == 1:
        c.stats[t] = small1_gradient(&c.bl, c.bounds[t], c.bounds[t + 1], c.st.beta, c.Cinv,
                                     c.kappa, c.reml, a)
        return
    c.stats[t] = gradient_loop(&c.bl, &c.ws[t], c.bounds[t], c.bounds[t + 1],
                               c.Fs + t * c.f_stride, c.st.beta, c.Cinv, c.kappa, c.reml,
                               a, a + k * k)


cdef i64 first_failure(EvalCtx* c) noexcept nogil:
    cdef int t
    for t in range(c.st.nthreads):
        if c.stats[t] != 0:
            return c.stats[t]
    return 0


cdef int eval_theta(void* vctx, const double* theta, double* f, double* grad) noexcept nogil:
    """θ → objective (and ∂/∂θ when grad is not NULL). Returns 0, or 1 with the status set
    (lmefast._kernel). The group loops run in c.st.nthreads chunks, each over its own range of
    groups with its own work arrays (lmefast._threads); partial sums are added after."""
    cdef EvalCtx* c = <EvalCtx*>vctx
    cdef int l, t, p = c.p, k = c.k, nth = c.st.nthreads
    cdef double dof, obj, rr = 0.0, logdet = 0.0
    cdef double* part
    cdef i64 status
    c.st.n_evals += 1
    theta_to_factors(&c.fm, theta, c.T)
    run_chunks(obj_chunk, c, nth)
    status = first_failure(c)
    for l in range(p * p):
        c.st.Lx[l] = 0.0
    for l in range(p):
        c.Rzxrzy[l] = 0.0
    for t in range(nth):
        part = c.accs + t * c.acc_stride
        logdet += part[0]
        rr += part[1]
        for l in range(p * p):
            c.st.Lx[l] += part[2 + l]
        for l in range(p):
            c.Rzxrzy[l] += part[2 + p * p + l]
    c.st.logdet = logdet
    if status == 0:
        status = fixed_effects_step(p, c.XtX, c.Xty, c.yty, rr, logdet, c.reml, c.n, c.st.Lx,
                                    c.Rzxrzy, c.rhs, c.st.beta, &c.st.r2, &obj)
    c.st.status = status
    if status != 0:
        return 1
    dof = c.n - p if c.reml else c.n
    f[0] = obj
    if grad == NULL:
        return 0
    if p > 0:
        minv_from_chol(p, c.st.Lx, c.Cinv, c.Fs)
    c.kappa = dof / c.st.r2
    run_chunks(grad_chunk, c, nth)
    c.st.status = first_failure(c)
    if c.st.status != 0:
        return 1
    for l in range(k * k + c.nvc):
        c.gT[l] = 0.0
    for t in range(nth):
        part = c.accs + t * c.acc_stride + 2 + p * p + p
        for l in range(k * k + c.nvc):
            c.gT[l] += part[l]
    factor_grad_to_theta(&c.fm, c.gT, grad)
    return 0


cdef class OneFactorKernel(Kernel):
    """The profiled objective of one grouping factor, held in C: θ in, objective out.

    Owns the work buffers; `evaluate` for one θ, `minimize` runs the projected BFGS of
    lmefast._bfgs entirely in C (both from lmefast._kernel.Kernel). With n_threads > 1 the
    groups are split into that many contiguous ranges of about equal work (OpenMP).
    `small_block_path` (default: the module's SMALL_BLOCK_PATH) False keeps a design of small
    blocks on the general loops."""

    cdef EvalCtx c
    cdef object keep
    cdef double* buf
    cdef int n_work

    def __cinit__(self, const double[::1] S, const i64[::1] s_off, const i64[::1] q_off,
                  const i64[::1] comp, int k, int p, int qmax, const double[::1] XtX,
                  const double[::1] Xty, double yty, double n, bint reml,
                  const i64[::1] tril_r, const i64[::1] tril_c, int nvc, n_threads=1,
                  small_block_path=None):
        cdef int pp = p if p > 0 else 1, kk = k if k > 0 else 1
        cdef int qq = qmax if qmax > pp else pp
        cdef int t, nth = check_threads(n_threads)
        cdef i64 m = q_off.shape[0] - 1
        cdef size_t total
        self.keep = [S, s_off, q_off, comp, XtX, Xty]
        self.buf = NULL
        self.n_work = 0
        self.c.ws = NULL
        self.c.bounds = NULL
        self.c.stats = NULL
        self.fg = eval_theta
        self.ctx = &self.c
        self.st = &self.c.st
        if nth > m:
            nth = <int>(m if m > 0 else 1)
        self.c.st.nthreads = nth
        self.c.st.lazy_grad = False
        fill_blocks(&self.c.bl, S, s_off, q_off, comp, k, p, qmax)
        # θ's map: the tril entries of T (term 0), then one 1 × 1 term per component
        ntri = tril_r.shape[0]
        th_term = np.concatenate([np.zeros(ntri, np.int32), np.arange(1, nvc + 1, dtype=np.int32)])
        th_row = np.concatenate([np.asarray(tril_r), np.zeros(nvc, np.int64)]).astype(np.int32)
        th_col = np.concatenate([np.asarray(tril_c), np.zeros(nvc, np.int64)]).astype(np.int32)
        t_k = np.concatenate([[k], np.ones(nvc)]).astype(np.int32)
        t_off = np.concatenate([[0], k * k + np.arange(nvc + 1)]).astype(np.int64)
        fill_factor_map(&self.c.fm, th_term, th_row, th_col, t_off, t_k)
        self.keep += [th_term, th_row, th_col, t_off, t_k]
        qs = np.diff(np.asarray(q_off))
        if small_block_path is None:
            small_block_path = SMALL_BLOCK_PATH
        self.c.small = 0
        if (small_block_path and nvc == 0 and k in (1, 2) and p <= SMALL_P and m > 0
                and bool(np.all(qs == k))):
            self.c.small = k
        # factor cache (general path): the objective pass leaves each group's AΛ, L, Rzx, rzy
        # for the gradient pass, which then does not factor again
        cdef double[::1] fac
        cdef i64[::1] f_off_v
        if self.c.small == 0:
            f_off = np.zeros(m + 1, dtype=np.int64)
            np.cumsum(2 * qs * qs + qs * (p + 1), out=f_off[1:])
            fac = np.empty(max(int(f_off[-1]), 1))
            f_off_v = f_off
            self.c.bl.fac = &fac[0]
            self.c.bl.f_off = &f_off_v[0]
            self.keep += [fac, f_off]
        self.c.ws = <Work*>malloc(nth * sizeof(Work))
        self.c.bounds = <i64*>malloc((nth + 1) * sizeof(i64))
        self.c.stats = <i64*>malloc(nth * sizeof(i64))
        if self.c.ws == NULL or self.c.bounds == NULL or self.c.stats == NULL:
            raise MemoryError()
        for t in range(nth):
            self.c.ws[t].block = NULL
        for t in range(nth):
            self.n_work += 1
            if work_alloc(&self.c.ws[t], qmax, p) != 0:
                raise MemoryError()
        # split the groups where the record offsets (≈ work) cross t/nth of the total
        split = np.searchsorted(np.asarray(s_off), np.asarray(s_off)[-1] * np.arange(nth + 1) / nth)
        split[0] = 0
        split[nth] = m
        for t in range(nth + 1):
            self.c.bounds[t] = split[t]
        self.c.f_stride = <int>lines(qq * pp)
        self.c.acc_stride = ((2 + pp * pp + pp + kk * kk + nvc + 1) // 8 + 1) * 8
        total = (2 * (kk * kk + nvc + 1) + 3 * pp + 2 * pp * pp
                 + nth * (self.c.f_stride + self.c.acc_stride) + 16)
        self.buf = <double*>malloc(total * sizeof(double))
        if self.buf == NULL:
            raise MemoryError()
        self.c.T = self.buf
        self.c.tvc = self.c.T + k * k
        self.c.gT = self.c.T + kk * kk + nvc + 1
        self.c.gvc = self.c.gT + k * k
        self.c.st.beta = self.c.gT + kk * kk + nvc + 1
        self.c.Rzxrzy = self.c.st.beta + pp
        self.c.rhs = self.c.Rzxrzy + pp
        self.c.st.Lx = self.c.rhs + pp
        self.c.Cinv = self.c.st.Lx + pp * pp
        # per-thread F buffers (written per group in the REML gradient) start on a cache line:
        # not sharing one with each other or with Cinv, which every thread reads per group
        self.c.Fs = <double*>((<size_t>(self.c.Cinv + pp * pp) + 63) // 64 * 64)
        # per-thread accumulators start on a cache line and take whole lines
        self.c.accs = <double*>((<size_t>(self.c.Fs + nth * self.c.f_stride) + 63) // 64 * 64)
        self.c.bl.T = self.c.T
        self.c.bl.tvc = self.c.tvc
        self.c.XtX = &XtX[0] if XtX.shape[0] > 0 else NULL
        self.c.Xty = &Xty[0] if Xty.shape[0] > 0 else NULL
        self.c.yty = yty
        self.c.n = n
        self.c.reml = reml
        self.c.p = p
        self.c.k = k
        self.c.nvc = nvc
        self.c.st.p = p
        self.c.st.nt = ntri + nvc
        self.c.st.n_evals = 0

    @property
    def small_block_path(self):
        """Whether evaluations take the small-block path (every block a random intercept, or a
        random intercept and slope; no variance components)."""
        return self.c.small != 0

    def set_response(self, const double[::1] S, const double[::1] Xty, double yty):
        """Another response on the same design, in place (no new buffers): the records S
        (the same layout and length as before: only the c_i parts differ), X'y and y'y."""
        if S.shape[0] != (<object>self.keep[0]).shape[0] or Xty.shape[0] != (<object>self.keep[5]).shape[0]:
            raise ValueError("set_response: the records or X'y differ in size from the design's")
        self.keep[0] = S
        self.keep[5] = Xty
        self.c.bl.S = &S[0] if S.shape[0] > 0 else NULL
        self.c.Xty = &Xty[0] if Xty.shape[0] > 0 else NULL
        self.c.yty = yty

    def __dealloc__(self):
        cdef int t
        if self.c.ws != NULL:
            for t in range(self.n_work):
                work_free(&self.c.ws[t])
        free(self.c.ws)
        free(self.c.bounds)
        free(self.c.stats)
        free(self.buf)


cdef void fill_blocks(Blocks* bl, const double[::1] S, const i64[::1] s_off,
                      const i64[::1] q_off, const i64[::1] comp, int k, int p, int qmax):
    bl.S = &S[0] if S.shape[0] > 0 else NULL
    bl.s_off = &s_off[0]
    bl.q_off = &q_off[0]
    bl.comp = &comp[0] if comp.shape[0] > 0 else NULL
    bl.m = q_off.shape[0] - 1
    bl.k = k
    bl.p = p
    bl.qmax = qmax
    bl.T = NULL
    bl.tvc = NULL
    bl.fac = NULL
    bl.f_off = NULL


cdef inline void lam_left(int q, int k, int ncol, const double* T, const double* tvc,
                          const i64* comp, const double* X, double* out) noexcept nogil:
    """out = Λ_i X for X of shape q × ncol (row-major)."""
    cdef int i, a, l
    cdef double acc, d
    for i in range(k):
        for l in range(ncol):
            acc = 0.0
            for a in range(i + 1):
                acc = acc + T[i * k + a] * X[a * ncol + l]
            out[i * ncol + l] = acc
    for i in range(k, q):
        d = tvc[comp[i]]
        for l in range(ncol):
            out[i * ncol + l] = d * X[i * ncol + l]


def modes_pass(
    const double[::1] S, const i64[::1] s_off, const i64[::1] q_off, const i64[::1] a_off,
    const i64[::1] comp,
    int k, int p, int qmax,
    const double[::1] T, const double[::1] tvc, const double[::1] beta,
    double[::1] b, double[::1] condvar,
):
    """Conditional modes b_i = Λ_i L_i⁻ᵀ(rzy_i − Rzx_iβ) and Λ_iM_i⁻¹Λ_i' (times σ² by the caller).

    b has one entry per coordinate (offsets q_off), condvar one q_i × q_i block per group
    (offsets a_off).
    """
    cdef i64 m = q_off.shape[0] - 1
    cdef i64 g
    cdef int q, i, j, l, status = 0
    cdef double acc
    cdef Work w
    cdef const double* Tp = &T[0] if T.shape[0] > 0 else NULL
    cdef const double* tv = &tvc[0] if tvc.shape[0] > 0 else NULL
    cdef const i64* cm
    cdef const double* Ag
    cdef double* cv
    if work_alloc(&w, qmax, p) != 0:
        work_free(&w)
        raise MemoryError()
    with nogil:
        for g in range(m):
            q = <int>(q_off[g + 1] - q_off[g])
            if q == 0:
                continue
            cm = &comp[q_off[g]]
            Ag = &S[s_off[g]]
            if factor_group(q, k, p, Ag, Ag + q * q, Ag + q * q + q * p, Tp, tv, cm, &w) != 0:
                status = <int>(g + 1)
                break
            for i in range(q):
                acc = w.r[i]
                for l in range(p):
                    acc = acc - w.R[i * p + l] * beta[l]
                w.u[i] = acc
            back_solve(q, 1, w.L, w.u)
            lam_left(q, k, 1, Tp, tv, cm, w.u, &b[q_off[g]])
            minv_from_chol(q, w.L, w.Minv, w.tmp)
            lam_left(q, k, q, Tp, tv, cm, w.Minv, w.tmp)       # tmp = Λ M⁻¹
            for i in range(q):                                   # AL = (Λ M⁻¹)'
                for j in range(q):
                    w.AL[i * q + j] = w.tmp[j * q + i]
            cv = &condvar[a_off[g]]
            lam_left(q, k, q, Tp, tv, cm, w.AL, cv)             # Λ (Λ M⁻¹)'
    work_free(&w)
    return status
