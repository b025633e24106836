# cython: language_level=3
"""Projected BFGS for min f(θ) subject to θ ≥ lower, in C: for the few (≤ ~100) θ of a model.

Variables at their bound whose gradient points outward are held fixed; the inverse Hessian
approximation H acts on the others; steps are projected onto the bounds and accepted by an
Armijo backtracking search (safeguarded quadratic interpolation). Stops when
max |projected gradient| < gtol, when the predicted decrease g'Hg falls below the objective's
rounding level max(gtol², 1e-12 |f|), or when f stops decreasing.

The objective is a C function (fg, ctx): the one-factor kernel runs with no Python in the
loop; any Python callable goes through a trampoline (`minimize_bounded`).
"""
import numpy as np

from libc.math cimport fabs, isfinite, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

RETURN_MESSAGES = {
    0: "projected gradient below tolerance",
    1: "predicted decrease below tolerance",
    2: "objective stopped decreasing",
    3: "maximum iterations reached",
    4: "line search failed",
    5: "objective not finite at the start",
    6: "interrupted by the callback",
    -1: "out of memory",
}


cdef inline double dmax(double a, double b) noexcept nogil:
    return a if a > b else b


cdef inline double dmin(double a, double b) noexcept nogil:
    return a if a < b else b


cdef int bfgs_bounded(objfun fg, void* ctx, int d, double* x, const double* lower,
                      double gtol, int maxiter, double* f_out, double* g_out, double* f0_out,
                      double* H_out, int* n_iter, object on_iter, bint lazy_grad=False,
                      const double* H0=NULL) noexcept:
    """Minimise; x holds the start and receives the result, f0_out the objective at the
    start, H_out (d × d) the final inverse-Hessian approximation. Returns a RETURN_MESSAGES
    code. With lazy_grad, line-search trial points are evaluated without the gradient, which
    is asked for (fg with the same x again) only once a point is accepted: for objectives
    whose gradient costs more than the objective and that keep their factorisation. H0, when
    given, is the initial inverse Hessian (e.g. from a finite-difference Hessian): the first
    step is then a Newton step, not a scaled gradient step."""
    cdef double* H = <double*>malloc((d * d + 6 * d + 1) * sizeof(double))
    cdef double* g
    cdef double* step
    cdef double* xn
    cdef double* gn
    cdef double* s
    cdef double* yv
    cdef double f, fn, slope, t, sy, yy, yHy, rho, pgmax, decrease, ratio, ns, ny, tmp
    cdef int i, j, it, ls, stall = 0, first = 1, code = 3, ok
    cdef bint is_free
    cdef bint has_cb = on_iter is not None
    if H == NULL:
        return -1
    g = H + d * d
    step = g + d
    xn = step + d
    gn = xn + d
    s = gn + d
    yv = s + d
    n_iter[0] = 0
    with nogil:
        for i in range(d):
            x[i] = dmax(x[i], lower[i])
        ok = fg(ctx, x, &f, g)
    f0_out[0] = f
    if ok != 0 or not isfinite(f):
        f_out[0] = f
        memcpy(g_out, g, d * sizeof(double))
        free(H)
        return 5
    if H0 != NULL:
        memcpy(H, H0, d * d * sizeof(double))
        first = 0
    else:
        for i in range(d * d):
            H[i] = 0.0
        for i in range(d):
            H[i * d + i] = 1.0
    # the whole loop runs without the GIL (threads fitting other responses run meanwhile);
    # it is taken only for the callback
    with nogil:
        for it in range(1, maxiter + 1):
            # projected gradient and step on the free variables
            pgmax = 0.0
            slope = 0.0
            for i in range(d):
                is_free = not (x[i] <= lower[i] and g[i] > 0.0)
                if is_free:
                    pgmax = dmax(pgmax, fabs(g[i]))
            for i in range(d):
                step[i] = 0.0
                if not (x[i] <= lower[i] and g[i] > 0.0):
                    for j in range(d):
                        if not (x[j] <= lower[j] and g[j] > 0.0):
                            step[i] -= H[i * d + j] * g[j]
                slope += step[i] * g[i]
            if pgmax < gtol:
                code = 0
                n_iter[0] = it - 1
                break
            if not slope < 0.0:
                for i in range(d * d):
                    H[i] = 0.0
                slope = 0.0
                for i in range(d):
                    H[i * d + i] = 1.0
                    step[i] = 0.0 if (x[i] <= lower[i] and g[i] > 0.0) else -g[i]
                    slope += step[i] * g[i]
                first = 1
            if -slope < dmax(gtol * gtol, 1e-12 * dmax(1.0, fabs(f))):
                code = 1
                n_iter[0] = it - 1
                break
            t = 1.0
            if first:
                # without curvature information yet: a step of at most 1 in every coordinate
                tmp = 0.0
                for i in range(d):
                    tmp = dmax(tmp, fabs(step[i]))
                if tmp > 1.0:
                    for i in range(d):
                        step[i] /= tmp
                    slope /= tmp
            if first or it == 1:
                # no first step moves a variable more than 90% of the way to its bound (a
                # variance parameter pushed onto zero is a saddle the gradient cannot leave)
                for i in range(d):
                    if step[i] < 0.0 and isfinite(lower[i]) and x[i] > lower[i]:
                        t = dmin(t, 0.9 * (x[i] - lower[i]) / -step[i])
            code = 4
            for ls in range(60):
                for i in range(d):
                    xn[i] = dmax(x[i] + t * step[i], lower[i])
                ok = fg(ctx, xn, &fn, NULL if lazy_grad else gn)
                if ok == 0 and isfinite(fn):
                    tmp = 0.0
                    for i in range(d):
                        tmp += g[i] * (xn[i] - x[i])
                    if fn <= f + 1e-4 * tmp:
                        if lazy_grad and fg(ctx, xn, &fn, gn) != 0:
                            break
                        code = 3
                        break
                    ratio = 0.5 * (-slope) * t / dmax(fn - f - slope * t, 1e-300)
                    t *= dmax(0.1, dmin(0.5, ratio))
                else:
                    t *= 0.5
            if code == 4:
                n_iter[0] = it
                break
            # BFGS update of the inverse Hessian
            sy = 0.0
            yy = 0.0
            ns = 0.0
            for i in range(d):
                s[i] = xn[i] - x[i]
                yv[i] = gn[i] - g[i]
                sy += s[i] * yv[i]
                yy += yv[i] * yv[i]
                ns += s[i] * s[i]
            if first and sy > 0.0:
                for i in range(d * d):
                    H[i] = 0.0
                for i in range(d):
                    H[i * d + i] = sy / yy
                first = 0
            if sy > 1e-12 * sqrt(ns) * sqrt(yy):
                rho = 1.0 / sy
                # step ← H y (reuse), yHy
                yHy = 0.0
                for i in range(d):
                    tmp = 0.0
                    for j in range(d):
                        tmp += H[i * d + j] * yv[j]
                    step[i] = tmp
                    yHy += yv[i] * tmp
                for i in range(d):
                    for j in range(d):
                        H[i * d + j] += (sy + yHy) * rho * rho * s[i] * s[j] \
                            - rho * (step[i] * s[j] + s[i] * step[j])
            decrease = f - fn
            memcpy(x, xn, d * sizeof(double))
            memcpy(g, gn, d * sizeof(double))
            f = fn
            n_iter[0] = it
            if has_cb:
                with gil:
                    try:
                        on_iter(it, np.array(<double[:d]>x), f)
                    except StopIteration:
                        code = 6
                if code == 6:
                    break
            stall = stall + 1 if decrease <= 1e-14 * dmax(1.0, fabs(f)) else 0
            if stall >= 3:
                code = 2
                break
    f_out[0] = f
    memcpy(g_out, g, d * sizeof(double))
    memcpy(H_out, H, d * d * sizeof(double))
    free(H)
    return code


cdef struct PyCtx:
    void* func
    void* errors
    int d
    int failed


cdef int py_trampoline(void* ctx, const double* x, double* f, double* g) noexcept nogil:
    """Calls the Python objective. Once it has raised, no further call is made (every point
    fails, so the line search ends) and minimize_bounded raises the exception."""
    cdef PyCtx* c = <PyCtx*>ctx
    if c.failed:
        return 1
    with gil:
        try:
            val, grad = (<object>c.func)(np.array(<double[:c.d]>x), g != NULL)
            f[0] = val
            if g != NULL:
                grad = np.ascontiguousarray(grad, dtype=np.float64)
                for i in range(c.d):
                    g[i] = grad[i]
            return 0
        except BaseException as exc:
            (<object>c.errors).append(exc)
            c.failed = 1
            return 1


def minimize_bounded(fg, x0, lower, double gtol=1e-9, int maxiter=500, on_iter=None,
                     H0=None, bint lazy_grad=False):
    """Projected BFGS on a Python objective fg(x, want_grad) → (f, gradient or None), from
    the inverse Hessian H0 (identity when None); lazy_grad as in bfgs_bounded.

    Returns (x, f, g, f at x0, inverse-Hessian approximation, iterations, return code); see
    RETURN_MESSAGES. An exception raised by fg is raised again once the C loop has ended
    (fg should return an infinite f for points where the objective is not defined)."""
    cdef double[::1] x = np.array(x0, dtype=np.float64)
    cdef double[::1] lo = np.ascontiguousarray(lower, dtype=np.float64)
    cdef int d = x.shape[0]
    cdef double[::1] g = np.zeros(max(d, 1))
    cdef double f = 0.0, f0 = 0.0
    cdef double[:, ::1] H = np.zeros((max(d, 1), max(d, 1)))
    cdef int n_iter = 0, code
    cdef PyCtx ctx
    errors = []
    ctx.func = <void*>fg
    ctx.errors = <void*>errors
    ctx.d = d
    ctx.failed = 0
    cdef double[:, ::1] H_in
    if d == 0:
        val, _ = fg(np.zeros(0), True)
        return np.zeros(0), float(val), np.zeros(0), float(val), np.zeros((0, 0)), 0, 0
    H_in = np.eye(d) if H0 is None else np.ascontiguousarray(H0, dtype=np.float64).reshape(d, d)
    code = bfgs_bounded(py_trampoline, &ctx, d, &x[0], &lo[0], gtol, maxiter, &f, &g[0], &f0,
                        &H[0, 0], &n_iter, on_iter, lazy_grad,
                        NULL if H0 is None else &H_in[0, 0])
    if errors:
        raise errors[0]
    return np.asarray(x), f, np.asarray(g[:d]), f0, np.asarray(H), n_iter, code
