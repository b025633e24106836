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
