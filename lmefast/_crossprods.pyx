# cython: language_level=3
"""The one pass over the rows: per-group cross-products A_i = Z_i'Z_i, B_i = Z_i'X_i, c_i = Z_i'y_i.

Rows need not be sorted: each row adds into its group's record [A_i | B_i | c_i] of S
(offsets s_off), one contiguous region per group (DESIGN.md §2). A row's random-effects
design is dense in the k random-coefficient columns and sparse in the variance-component
columns: entry e of row r sits at coordinate vc_coord[e, r] of its group's block with value
vc_val[e, r] (value 0 means the row has no entry there).
"""
from libc.stdlib cimport free, malloc

ctypedef long long i64


def accumulate(
    const double[::1] y, const double[:, ::1] X, const double[:, ::1] Zre,
    const i64[::1] gcode, const i64[::1] q_off, const i64[::1] s_off,
    const i64[:, ::1] vc_coord, const double[:, ::1] vc_val,
    double[::1] S,
):
    """Adds every row's z z', z x', z y into its group's record (S zeroed by the caller)."""
    cdef i64 n = y.shape[0], r, g
    cdef int p = X.shape[1], k = Zre.shape[1], ne = vc_coord.shape[0]
    cdef int e, e2, nz, q, l, ci
    cdef double v, yr
    cdef double* A_g
    cdef double* B_g
    cdef double* c_g
    cdef const double* x
    cdef const double* z
    cdef int* coord = <int*>malloc((k + ne + 1) * sizeof(int))
    cdef double* val = <double*>malloc((k + ne + 1) * sizeof(double))
    if coord == NULL or val == NULL:
        free(coord)
        free(val)
        raise MemoryError()
    with nogil:
        if ne == 0:
            # random coefficients only: every group's block is k × k
            for r in range(n):
                A_g = &S[s_off[gcode[r]]]
                B_g = A_g + k * k
                c_g = B_g + k * p
                x = &X[r, 0]
                z = &Zre[r, 0]
                yr = y[r]
                for e in range(k):
                    v = z[e]
                    c_g[e] += v * yr
                    for l in range(p):
                        B_g[e * p + l] += v * x[l]
                    for e2 in range(k):
                        A_g[e * k + e2] += v * z[e2]
        else:
            for r in range(n):
                g = gcode[r]
                q = <int>(q_off[g + 1] - q_off[g])
                nz = 0
                for e in range(k):
                    v = Zre[r, e]
                    if v != 0.0:
                        coord[nz] = e
                        val[nz] = v
                        nz = nz + 1
                for e in range(ne):
                    v = vc_val[e, r]
                    if v != 0.0:
                        coord[nz] = <int>vc_coord[e, r]
                        val[nz] = v
                        nz = nz + 1
                A_g = &S[s_off[g]]
                B_g = A_g + q * q
                c_g = B_g + q * p
                x = &X[r, 0]
                yr = y[r]
                for e in range(nz):
                    ci = coord[e]
                    v = val[e]
                    c_g[ci] += v * yr
                    for l in range(p):
                        B_g[ci * p + l] += v * x[l]
                    for e2 in range(nz):
                        A_g[ci * q + coord[e2]] += v * val[e2]
    free(coord)
    free(val)
