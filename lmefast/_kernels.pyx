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


cdef void obj_chunk(void* vc, int t) noexcept nogil:
    cdef EvalCtx* c = <EvalCtx*>vc
    cdef double* a = c.accs + t * c.acc_stride
    cdef int l, p = c.p
    for l in range(2 + p * p + p):
        a[l] = 0.0
    c.stats[t] = objective_loop(&c.bl, &c.ws[t], c.bounds[t], c.bounds[t + 1], a, a + 1,
                                a + 2, a + 2 + p * p)


cdef void grad_chunk(void* vc, int t) noexcept nogil:
    cdef EvalCtx* c = <EvalCtx*>vc
    cdef int p = c.p, k = c.k, l
    cdef double* a = c.accs + t * c.acc_stride + 2 + p * p + p
    for l in range(k * k + c.nvc):
        a[l] = 0.0
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
    groups are split into that many contiguous ranges of about equal work (OpenMP)."""

    cdef EvalCtx c
    cdef object keep
    cdef double* buf
    cdef int n_work

    def __cinit__(self, const double[::1] S, const i64[::1] s_off, const i64[::1] q_off,
                  const i64[::1] comp, int k, int p, int qmax, const double[::1] XtX,
                  const double[::1] Xty, double yty, double n, bint reml,
                  const i64[::1] tril_r, const i64[::1] tril_c, int nvc, n_threads=1):
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
        # factor cache: the objective pass leaves each group's AΛ, L, Rzx, rzy for the
        # gradient pass, which then does not factor again
        qs = np.diff(np.asarray(q_off))
        f_off = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(2 * qs * qs + qs * (p + 1), out=f_off[1:])
        cdef double[::1] fac = np.empty(max(int(f_off[-1]), 1))
        cdef i64[::1] f_off_v = f_off
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
