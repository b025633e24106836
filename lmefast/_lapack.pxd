# Thin inline wrappers over scipy's LAPACK for row-major lower-triangular storage.
# A row-major q x q array read as column-major is its transpose, so the lower triangle of
# a row-major matrix is the upper triangle LAPACK sees.
from scipy.linalg.cython_lapack cimport dpotrf


cdef inline int chol_lower_rowmajor(double* a, int q) noexcept nogil:
    """Cholesky M = L L' in place on the row-major lower triangle; returns LAPACK's info."""
    cdef char uplo = b'U'
    cdef int n = q, lda = q, info = 0
    dpotrf(&uplo, &n, a, &lda, &info)
    return info


from scipy.linalg.cython_blas cimport dtrsm, dtrsv
from scipy.linalg.cython_lapack cimport dpotri


# For a row-major q × q array whose lower triangle holds L (so LAPACK sees U = L' in its
# upper triangle):

cdef inline void solve_lower_rowmajor(double* L, int q, double* B, int ncol,
                                      bint transposed) noexcept nogil:
    """B ← L⁻¹ B (or L⁻ᵀ B when transposed) for B row-major q × ncol."""
    cdef char side = b'R', uplo = b'U', transa = b'T' if not transposed else b'N'
    cdef char diag = b'N'
    cdef int m = ncol, n = q, lda = q, ldb = ncol
    cdef double one = 1.0
    if ncol == 1:
        transa = b'T' if not transposed else b'N'
        m = 1
        dtrsv(&uplo, &transa, &diag, &n, L, &lda, B, &m)
        return
    # B' (col-major ncol × q) ← B' U⁻¹ = (L⁻¹B)'  or  B' U⁻ᵀ = (L⁻ᵀB)'
    transa = b'N' if not transposed else b'T'
    dtrsm(&side, &uplo, &transa, &diag, &m, &n, &one, L, &lda, B, &ldb)


cdef inline int inverse_from_chol_rowmajor(double* L, int q) noexcept nogil:
    """L (row-major lower Cholesky factor of M) ← lower triangle of M⁻¹."""
    cdef char uplo = b'U'
    cdef int n = q, lda = q, info = 0
    dpotri(&uplo, &n, L, &lda, &info)
    return info
