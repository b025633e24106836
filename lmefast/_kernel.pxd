# The Python face shared by every kernel (lmefast/_kernel.pyx).
from lmefast._bfgs cimport objfun
from lmefast._theta cimport FactorMap

ctypedef long long i64


cdef struct KernelState:
    # what the shared wrappers read of a kernel's context: its first member
    int nt              # entries of θ
    int p               # fixed-effects columns
    int nthreads
    bint lazy_grad      # the kernel keeps its factorisation: the optimiser may ask for the
                        # gradient only at accepted points
    double* beta        # β̂ (p) and the fixed-effects factor Lx (p × p) of the last evaluation
    double* Lx
    double r2
    double logdet
    i64 status
    long n_evals


cdef class Kernel:
    cdef objfun fg
    cdef void* ctx
    cdef KernelState* st


cdef void fill_factor_map(FactorMap* fm, const int[::1] term, const int[::1] row,
                          const int[::1] col, const i64[::1] t_off, const int[::1] t_k)
