# cython: language_level=3
"""The one pass over the rows: per-group cross-products A_i = Z_i'Z_i, B_i = Z_i'X_i, c_i = Z_i'y_i.

Rows need not be sorted: each row adds into its group's record [A_i | B_i | c_i] of S
(offsets s_off), one contiguous region per group (DESIGN.md §2). A row's random-effects
design is dense in the k random-coefficient columns and sparse in the variance-component
columns: entry e of row r sits at coordinate vc_coord[e, r] of its group's block with value
vc_val[e, r] (value 0 means the row has no entry there).
"""
import numpy as np

from libc.stdlib cimport free, malloc

from lmefast._threads cimport run_chunks

from lmefast.parallel import check_threads

ctypedef long long i64

cdef extern from *:
    """
    #if defined(__GNUC__)
    #define LMEFAST_PREFETCH(p) __builtin_prefetch((p), 1, 1)
    #else
    #define LMEFAST_PREFETCH(p) ((void)0)
    #endif
    """
    void LMEFAST_PREFETCH(const void* p) noexcept nogil

# rows ahead whose group record is prefetched: the records are scattered over a large array,
# so without it each row waits for a cache miss
cdef enum:
    PREFETCH_AHEAD = 16


cdef void accumulate_range(
    const double* y, const double* X, const double* Zre, const i64* gcode, i64 n, int p, int k,
    const i64* q_off, const i64* s_off, const i64* vc_coord, const double* vc_val, int ne,
    double* S, i64 g_lo, i64 g_hi, int* coord, double* val,
) noexcept nogil:
    """Rows whose group code is in [g_lo, g_hi) add z z', z x', z y into their group's record."""
    cdef i64 r, g
    cdef int e, e2, nz, q, l, ci
    cdef double v, yr
    cdef double* A_g
    cdef double* B_g
    cdef double* c_g
    cdef const double* x
    cdef const double* z
    cdef i64 g2
    if ne == 0:
        # random coefficients only: every group's block is k × k
        for r in range(n):
            if r + PREFETCH_AHEAD < n:
                g2 = gcode[r + PREFETCH_AHEAD]
                if g_lo <= g2 < g_hi:
                    LMEFAST_PREFETCH(&S[s_off[g2]])
                    LMEFAST_PREFETCH(&S[s_off[g2]] + 8)
            g = gcode[r]
            if g < g_lo or g >= g_hi:
                continue
            A_g = &S[s_off[g]]
            B_g = A_g + k * k
            c_g = B_g + k * p
            x = &X[r * p]
            z = &Zre[r * k]
            yr = y[r]
            for e in range(k):
                v = z[e]
                c_g[e] += v * yr
                for l in range(p):
                    B_g[e * p + l] += v * x[l]
                for e2 in range(k):
                    A_g[e * k + e2] += v * z[e2]
        return
    for r in range(n):
        g = gcode[r]
        if g < g_lo or g >= g_hi:
            continue
        q = <int>(q_off[g + 1] - q_off[g])
        nz = 0
        for e in range(k):
            v = Zre[r * k + e]
            if v != 0.0:
                coord[nz] = e
                val[nz] = v
                nz = nz + 1
        for e in range(ne):
            v = vc_val[e * n + r]
            if v != 0.0:
                coord[nz] = <int>vc_coord[e * n + r]
                val[nz] = v
                nz = nz + 1
        A_g = &S[s_off[g]]
        B_g = A_g + q * q
        c_g = B_g + q * p
        x = &X[r * p]
        yr = y[r]
        for e in range(nz):
            ci = coord[e]
            v = val[e]
            c_g[ci] += v * yr
            for l in range(p):
                B_g[ci * p + l] += v * x[l]
            for e2 in range(nz):
                A_g[ci * q + coord[e2]] += v * val[e2]


cdef struct RowPass:
    const double* y
    const double* X
    const double* Zre
    const i64* gcode
    i64 n
    int p
    int k
    const i64* q_off
    const i64* s_off
    const i64* vc_coord
    const double* vc_val
    int ne
    double* S
    const i64* bounds     # chunk t: the groups [bounds[t], bounds[t + 1])
    int* coord            # per chunk: width ints and doubles of scratch
    double* val
    int width


cdef void row_chunk(void* vctx, int t) noexcept nogil:
    cdef RowPass* c = <RowPass*>vctx
    accumulate_range(c.y, c.X, c.Zre, c.gcode, c.n, c.p, c.k, c.q_off, c.s_off, c.vc_coord,
                     c.vc_val, c.ne, c.S, c.bounds[t], c.bounds[t + 1], c.coord + t * c.width,
                     c.val + t * c.width)


def accumulate(
    const double[::1] y, const double[:, ::1] X, const double[:, ::1] Zre,
    const i64[::1] gcode, const i64[::1] q_off, const i64[::1] s_off,
    const i64[:, ::1] vc_coord, const double[:, ::1] vc_val,
    double[::1] S, n_threads=1,
):
    """Adds every row's z z', z x', z y into its group's record (S zeroed by the caller).

    With n_threads > 1 each thread owns a contiguous range of groups (no two threads write
    the same record) and scans all rows, keeping those of its groups (lmefast._threads)."""
    cdef i64 n = y.shape[0], m = q_off.shape[0] - 1
    cdef int p = X.shape[1], k = Zre.shape[1], ne = vc_coord.shape[0]
    cdef int nth = <int>min(check_threads(n_threads), max(m, 1))
    cdef int width = k + ne + 1
    cdef int* coord = <int*>malloc(nth * width * sizeof(int))
    cdef double* val = <double*>malloc(nth * width * sizeof(double))
    cdef i64[::1] bounds = np.searchsorted(
        np.asarray(s_off), np.asarray(s_off)[-1] * np.arange(nth + 1) / nth).astype(np.int64)
    cdef const double* Xp = &X[0, 0] if X.shape[0] > 0 and p > 0 else NULL
    cdef const double* Zp = &Zre[0, 0] if Zre.shape[0] > 0 and k > 0 else NULL
    cdef const i64* vcp = &vc_coord[0, 0] if ne > 0 and n > 0 else NULL
    cdef const double* vvp = &vc_val[0, 0] if ne > 0 and n > 0 else NULL
    if n == 0 or m == 0:
        free(coord)
        free(val)
        return
    bounds[0] = 0
    bounds[nth] = m
    if coord == NULL or val == NULL:
        free(coord)
        free(val)
        raise MemoryError()
    cdef RowPass c
    c.y = &y[0]
    c.X = Xp
    c.Zre = Zp
    c.gcode = &gcode[0]
    c.n = n
    c.p = p
    c.k = k
    c.q_off = &q_off[0]
    c.s_off = &s_off[0]
    c.vc_coord = vcp
    c.vc_val = vvp
    c.ne = ne
    c.S = &S[0]
    c.bounds = &bounds[0]
    c.coord = coord
    c.val = val
    c.width = width
    with nogil:
        run_chunks(row_chunk, &c, nth)
    free(coord)
    free(val)
