# θ ↔ covariance factors: the one map from the optimisation parameter to the T blocks of Λ
# (DESIGN.md §1), shared by every kernel. A structured covariance (a non-linear map from θ to
# T, with its chain rule for the gradient) replaces these two functions and nothing else.
from libc.string cimport memset

ctypedef long long i64


cdef struct FactorMap:
    int nt              # entries of θ
    const int* term     # per entry: its term, its row and column in that term's T
    const int* row
    const int* col
    const i64* t_off    # per term: offset of its T (k × k, row-major) in the blocks array
    const int* t_k      # per term: k
    i64 size            # length of the blocks array (t_off of one past the last term)


cdef inline void theta_to_factors(const FactorMap* fm, const double* theta,
                                  double* T) noexcept nogil:
    """T (every term's k × k lower-triangular block, laid out at t_off) from θ; entries that
    no θ sets are zero."""
    cdef int l, j
    memset(T, 0, <size_t>fm.size * sizeof(double))
    for l in range(fm.nt):
        j = fm.term[l]
        T[fm.t_off[j] + fm.row[l] * fm.t_k[j] + fm.col[l]] = theta[l]


cdef inline void factor_grad_to_theta(const FactorMap* fm, const double* gT,
                                      double* grad) noexcept nogil:
    """∂/∂θ from ∂/∂T (laid out as T): the chain rule of theta_to_factors."""
    cdef int l, j
    for l in range(fm.nt):
        j = fm.term[l]
        grad[l] = gT[fm.t_off[j] + fm.row[l] * fm.t_k[j] + fm.col[l]]
