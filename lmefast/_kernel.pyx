# cython: language_level=3
"""What every kernel shows to Python, written once.

A kernel is a C objective `fg(ctx, θ, &f, grad or NULL)` (lmefast._bfgs.objfun) over a
context whose first member is a KernelState (β̂, Lx, r², log|L|², status, counters). A
subclass builds its context and sets `fg`, `ctx` and `st`; this class gives it `evaluate`,
`minimize` (the projected BFGS of lmefast._bfgs, with no Python in the loop), `n_evals` and
`n_threads`. A new kernel (weights, GLMM, a sparse trailing block) writes only its context,
its objective and gradient, and its constructor.

Status codes (KernelState.status): 0; 1 + the index of the block (group, level) whose factor
is not positive definite; −j when the fixed-effects factor fails at column j; −(p+1) when
r² ≤ 0; −(p+2) when the gradient's inverse fails.
"""
import numpy as np

cimport numpy as cnp
from libc.string cimport memcpy

from lmefast._bfgs cimport bfgs_bounded
from lmefast._theta cimport FactorMap

cnp.import_array()


cdef class Kernel:
    """Base of the kernels (see the module docstring); not constructed by itself."""

    @property
    def n_evals(self):
        """Objective evaluations so far (a gradient at the last θ evaluated is not counted)."""
        return self.st.n_evals

    @property
    def n_threads(self):
        """Threads (chunks of work) of the group or level loops."""
        return self.st.nthreads

    def evaluate(self, theta, bint want_grad=False):
        """θ → (objective, r², log|L|², status, β̂, Lx, gradient or None)."""
        cdef cnp.ndarray th
        if (type(theta) is np.ndarray and cnp.PyArray_TYPE(theta) == cnp.NPY_DOUBLE
                and cnp.PyArray_NDIM(theta) == 1 and cnp.PyArray_IS_C_CONTIGUOUS(theta)):
            th = theta
        else:
            th = np.ascontiguousarray(theta, dtype=np.float64)
            if th.ndim != 1:
                th = th.reshape(-1) if th.ndim == 0 else None
                if th is None:
                    raise ValueError("θ must be one-dimensional")
        cdef int nt = self.st.nt, p = self.st.p
        if th.shape[0] != nt:
            raise ValueError(f"θ must have {nt} entries, got {th.shape[0]}")
        # the outputs are made here, with NumPy's C functions: at a few µs per evaluation of a
        # small design, making them through Python calls cost as much as the evaluation
        cdef cnp.npy_intp dims[2]
        dims[0] = p
        dims[1] = p
        cdef cnp.ndarray beta = cnp.PyArray_EMPTY(1, dims, cnp.NPY_DOUBLE, 0)
        cdef cnp.ndarray Lx = cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 0)
        dims[0] = nt
        cdef cnp.ndarray g = cnp.PyArray_ZEROS(1, dims, cnp.NPY_DOUBLE, 0) if want_grad else None
        cdef double f = np.nan
        cdef double* thp = <double*>cnp.PyArray_DATA(th) if nt > 0 else NULL
        cdef double* gp = <double*>cnp.PyArray_DATA(g) if want_grad else NULL
        cdef double dummy = 0.0
        if want_grad and nt == 0:
            gp = &dummy
        with nogil:
            self.fg(self.ctx, thp, &f, gp)
        if p > 0:
            memcpy(cnp.PyArray_DATA(beta), self.st.beta, p * sizeof(double))
            memcpy(cnp.PyArray_DATA(Lx), self.st.Lx, <size_t>p * p * sizeof(double))
        return (f, self.st.r2, self.st.logdet, self.st.status, beta, Lx, g)

    def evaluate_points(self, points):
        """Each row of ``points`` (K × n_theta) evaluated in turn, without gradients:
        (r² (K), log|L|² (K), status (K), Lx (K × p × p)), one call for a stencil of
        finite differences."""
        cdef double[:, ::1] pts = np.ascontiguousarray(points, dtype=np.float64)
        cdef int nt = self.st.nt, p = self.st.p, K = pts.shape[0], k, a
        if pts.shape[1] != nt:
            raise ValueError(f"points must have {nt} columns, got {pts.shape[1]}")
        r2_np = np.empty(K)
        logdet_np = np.empty(K)
        status_np = np.empty(K, dtype=np.int64)
        Lx_np = np.zeros((K, p, p))
        cdef double[::1] r2 = r2_np, logdet = logdet_np
        cdef long long[::1] status = status_np
        cdef double[:, :, ::1] Lx = Lx_np
        cdef double f = 0.0
        with nogil:
            for k in range(K):
                self.fg(self.ctx, &pts[k, 0] if nt > 0 else NULL, &f, NULL)
                r2[k] = self.st.r2
                logdet[k] = self.st.logdet
                status[k] = self.st.status
                for a in range(p * p):
                    Lx[k, a // p, a % p] = self.st.Lx[a]
        return r2_np, logdet_np, status_np, Lx_np

    def minimize(self, theta0, lower, double gtol=1e-9, int maxiter=500, on_iter=None,
                 bint at_theta=False):
        """Projected BFGS from θ0: returns (θ, f, gradient, f at θ0, inverse-Hessian
        approximation, iterations, return code: lmefast._bfgs.RETURN_MESSAGES), and with
        ``at_theta`` what ``evaluate`` gives at θ without the gradient (evaluated once more in
        C, so that the caller needs no call of its own)."""
        cdef double[::1] x = np.array(theta0, dtype=np.float64)
        cdef double[::1] lo = np.ascontiguousarray(lower, dtype=np.float64)
        cdef int d = x.shape[0]
        if d != self.st.nt or lo.shape[0] != d:
            raise ValueError(f"θ0 and lower must have {self.st.nt} entries, got {d} and "
                             f"{lo.shape[0]}")
        cdef double[::1] g = np.zeros(d)
        cdef double f = 0.0, f0 = 0.0
        cdef double[:, ::1] H = np.zeros((d, d))
        cdef int n_iter = 0, code
        code = bfgs_bounded(self.fg, self.ctx, d, &x[0], &lo[0], gtol, maxiter, &f, &g[0],
                            &f0, &H[0, 0], &n_iter, on_iter, self.st.lazy_grad)
        if not at_theta:
            return np.asarray(x), f, np.asarray(g), f0, np.asarray(H), n_iter, code
        cdef double fx = np.nan
        cdef int p = self.st.p
        with nogil:
            self.fg(self.ctx, &x[0] if d > 0 else NULL, &fx, NULL)
        beta = np.array(<double[:p]>self.st.beta) if p > 0 else np.zeros(0)
        Lx = np.array(<double[:p * p]>self.st.Lx).reshape(p, p) if p > 0 else np.zeros((0, 0))
        at = (fx, self.st.r2, self.st.logdet, self.st.status, beta, Lx)
        return np.asarray(x), f, np.asarray(g), f0, np.asarray(H), n_iter, code, at


cdef void fill_factor_map(FactorMap* fm, const int[::1] term, const int[::1] row,
                          const int[::1] col, const i64[::1] t_off, const int[::1] t_k):
    """fm over these arrays (θ entry l sets T_term[l][row[l], col[l]]; term j's T is t_k[j]
    square at t_off[j]); the caller keeps the arrays alive."""
    fm.nt = term.shape[0]
    fm.term = &term[0] if term.shape[0] > 0 else NULL
    fm.row = &row[0] if row.shape[0] > 0 else NULL
    fm.col = &col[0] if col.shape[0] > 0 else NULL
    fm.t_off = &t_off[0]
    fm.t_k = &t_k[0]
    fm.size = t_off[t_off.shape[0] - 1]
