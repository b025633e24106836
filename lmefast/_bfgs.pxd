ctypedef int (*objfun)(void* ctx, const double* x, double* f, double* g) noexcept nogil

cdef int bfgs_bounded(objfun fg, void* ctx, int d, double* x, const double* lower,
                      double gtol, int maxiter, double* f_out, double* g_out, double* f0_out,
                      double* H_out, int* n_iter, object on_iter, bint lazy_grad=*,
                      const double* H0=*) noexcept
