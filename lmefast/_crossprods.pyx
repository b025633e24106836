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
    #define LMEFAST_ALWAYS_INLINE inline __attribute__((always_inline))
    #else
    #define LMEFAST_PREFETCH(p) ((void)0)
    #define LMEFAST_ALWAYS_INLINE inline
    #endif
    /* rows ahead whose group record is prefetched: the records are scattered over a large
       array, so without it each row waits for a cache miss */
    #define LMEFAST_PREFETCH_AHEAD 16
    #define LMEFAST_RUN_RECORD_MAX 14

    /* The pass over the rows without variance components: each row's z z', z x', z y into
       its group's record [A | B | c] at S + s_off[g]. Row r's z is at Z + r*zs; rows (or NULL)
       lists the rows to read (all with group codes in [g_lo, g_hi) when given), else rows
       0..n_iter-1 whose codes are outside [g_lo, g_hi) are skipped.

       Two loops, both always inlined so that where k and p are literals the compiler makes a
       copy per block size (loops unrolled): lmefast_coef_rows_mem adds each row into the
       record in memory (rows in any order); lmefast_coef_rows_run holds the current group's
       record in local variables while consecutive rows belong to it (rows sorted by group: a
       stream, no round trip through memory per row), written back when the group changes. In
       both each entry receives the same additions in the same order. */
    #define LMEFAST_ROW_LOOP_HEAD                                                              \
        for (long long ii = 0; ii < n_iter; ii++) {                                            \
            if (ii + LMEFAST_PREFETCH_AHEAD < n_iter) {                                        \
                long long g2 = gcode[rows ? rows[ii + LMEFAST_PREFETCH_AHEAD]                  \
                                          : ii + LMEFAST_PREFETCH_AHEAD];                      \
                if (g_lo <= g2 && g2 < g_hi) {                                                 \
                    const double* rec2 = S + s_off[g2];                                        \
                    for (int o = 0; o < nrec; o += 8)   /* every cache line of the record */   \
                        LMEFAST_PREFETCH(rec2 + o);                                            \
                    LMEFAST_PREFETCH(rec2 + nrec - 1);                                         \
                }                                                                              \
            }                                                                                  \
            long long r = rows ? rows[ii] : ii;                                                \
            long long g = gcode[r];                                                            \
            if (g < g_lo || g >= g_hi)                                                         \
                continue;

    #define LMEFAST_COEF_ARGS                                                                  \
        const double* y, const double* X, const double* Z, long long zs,                       \
        const long long* gcode, double* S, const long long* s_off, long long g_lo,             \
        long long g_hi, const long long* rows, long long n_iter, const int k, const int p

    static LMEFAST_ALWAYS_INLINE void lmefast_coef_rows_mem(LMEFAST_COEF_ARGS)
    {
        const int nrec = k * k + k * p + k;
        LMEFAST_ROW_LOOP_HEAD
            double* A = S + s_off[g];
            double* B = A + k * k;
            double* c = B + k * p;
            const double* x = X + r * p;
            const double* z = Z + r * zs;
            double yr = y[r];
            for (int e = 0; e < k; e++) {
                double v = z[e];
                c[e] += v * yr;
                for (int l = 0; l < p; l++) B[e * p + l] += v * x[l];
                for (int e2 = 0; e2 < k; e2++) A[e * k + e2] += v * z[e2];
            }
        }
    }

    static LMEFAST_ALWAYS_INLINE void lmefast_coef_rows_run(LMEFAST_COEF_ARGS)
    {
        const int nA = k * k, nB = k * p, nrec = k * k + k * p + k;
        double acc[LMEFAST_RUN_RECORD_MAX];
        double* R = NULL;
        long long cur = -1;
        LMEFAST_ROW_LOOP_HEAD
            if (g != cur) {
                if (R)
                    for (int e = 0; e < nrec; e++) R[e] = acc[e];
                R = S + s_off[g];
                for (int e = 0; e < nrec; e++) acc[e] = R[e];
                cur = g;
            }
            const double* x = X + r * p;
            const double* z = Z + r * zs;
            double yr = y[r];
            for (int e = 0; e < k; e++) {
                double v = z[e];
                acc[nA + nB + e] += v * yr;
                for (int l = 0; l < p; l++) acc[nA + e * p + l] += v * x[l];
                for (int e2 = 0; e2 < k; e2++) acc[e * k + e2] += v * z[e2];
            }
        }
        if (R)
            for (int e = 0; e < nrec; e++) R[e] = acc[e];
    }

    /* Whether rows mostly follow a row of their own group: at least half of the first 1024
       rows read (rows sorted, or grouped, by group), where holding the record pays. */
    static int lmefast_rows_in_runs(const long long* gcode, const long long* rows, long long n_iter)
    {
        long long m = n_iter < 1024 ? n_iter : 1024, same = 0;
        for (long long ii = 1; ii < m; ii++)
            same += gcode[rows ? rows[ii] : ii] == gcode[rows ? rows[ii - 1] : ii - 1];
        return m > 1 && 2 * same >= m;
    }

    /* The pass for any k and p: a copy of the loops per common size (k <= 2, p <= 4, the
       record at most LMEFAST_RUN_RECORD_MAX values), the general loop in memory otherwise. */
    static void lmefast_coef_pass(LMEFAST_COEF_ARGS)
    {
        int runs = lmefast_rows_in_runs(gcode, rows, n_iter);
    #define LMEFAST_SIZE(K, P)                                                                 \
        if (k == K && p == P) {                                                                \
            if (runs)                                                                          \
                lmefast_coef_rows_run(y, X, Z, zs, gcode, S, s_off, g_lo, g_hi, rows, n_iter, K, P); \
            else                                                                               \
                lmefast_coef_rows_mem(y, X, Z, zs, gcode, S, s_off, g_lo, g_hi, rows, n_iter, K, P); \
            return;                                                                            \
        }
        LMEFAST_SIZE(1, 1) LMEFAST_SIZE(1, 2) LMEFAST_SIZE(1, 3) LMEFAST_SIZE(1, 4)
        LMEFAST_SIZE(2, 1) LMEFAST_SIZE(2, 2) LMEFAST_SIZE(2, 3) LMEFAST_SIZE(2, 4)
    #undef LMEFAST_SIZE
        lmefast_coef_rows_mem(y, X, Z, zs, gcode, S, s_off, g_lo, g_hi, rows, n_iter, k, p);
    }
    """
    enum: PREFETCH_AHEAD "LMEFAST_PREFETCH_AHEAD"
    void LMEFAST_PREFETCH(const void* p) noexcept nogil
    void coef_pass "lmefast_coef_pass" (
        const double* y, const double* X, const double* Z, i64 zs, const i64* gcode, double* S,
        const i64* s_off, i64 g_lo, i64 g_hi, const i64* rows, i64 n_iter, int k, int p,
    ) noexcept nogil


cdef enum:
    PREFETCH_LINES = 8    # cache lines of a record with variance components prefetched at most


cdef void accumulate_range(
    const double* y, const double* X, const double* Zre, i64 zs, const i64* gcode, i64 n, int p, int k,
    const i64* q_off, const i64* s_off, const i64* vc_coord, const double* vc_val, int ne,
    double* S, i64 g_lo, i64 g_hi, int* coord, double* val, const i64* rows, i64 n_rows,
) noexcept nogil:
    """Rows whose group code is in [g_lo, g_hi) add z z', z x', z y into their group's record
    (row r's z at Zre + r·zs: Zre may be columns of X).
    With ``rows`` (not NULL): only those n_rows rows, all of them in the range (a thread's own
    rows, in increasing order: each group's rows are added in the same order as without)."""
    cdef i64 r, g, ii, n_iter = n_rows if rows != NULL else n
    cdef int e, e2, nz, q, l, ci
    cdef double v, yr
    cdef double* A_g
    cdef double* B_g
    cdef double* c_g
    cdef const double* x
    if ne == 0:
        # random coefficients only: every group's block is k × k (lmefast_coef_pass)
        coef_pass(y, X, Zre, zs, gcode, S, s_off, g_lo, g_hi, rows, n_iter, k, p)
        return
    cdef i64 g2, o, o_end
    for ii in range(n_iter):
        if ii + PREFETCH_AHEAD < n_iter:
            # the record of a row ahead, its first PREFETCH_LINES cache lines (a row touches
            # parts of a large record only)
            g2 = gcode[rows[ii + PREFETCH_AHEAD] if rows != NULL else ii + PREFETCH_AHEAD]
            if g_lo <= g2 < g_hi:
                o = s_off[g2]
                o_end = min(s_off[g2 + 1], o + 8 * PREFETCH_LINES)
                while o < o_end:
                    LMEFAST_PREFETCH(&S[o])
                    o += 8
                LMEFAST_PREFETCH(&S[o_end - 1])
        r = rows[ii] if rows != NULL else ii
        g = gcode[r]
        if g < g_lo or g >= g_hi:
            continue
        q = <int>(q_off[g + 1] - q_off[g])
        nz = 0
        for e in range(k):
            v = Zre[r * zs + e]
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
    i64 zs                # Zre's row stride (doubles)
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
    const i64* rows       # NULL, or chunk t's rows at rows[row_off[t]:row_off[t + 1]]
    const i64* row_off


cdef void row_chunk(void* vctx, int t) noexcept nogil:
    cdef RowPass* c = <RowPass*>vctx
    if c.rows != NULL:
        accumulate_range(c.y, c.X, c.Zre, c.zs, c.gcode, c.n, c.p, c.k, c.q_off, c.s_off, c.vc_coord,
                         c.vc_val, c.ne, c.S, c.bounds[t], c.bounds[t + 1], c.coord + t * c.width,
                         c.val + t * c.width, c.rows + c.row_off[t], c.row_off[t + 1] - c.row_off[t])
    else:
        accumulate_range(c.y, c.X, c.Zre, c.zs, c.gcode, c.n, c.p, c.k, c.q_off, c.s_off, c.vc_coord,
                         c.vc_val, c.ne, c.S, c.bounds[t], c.bounds[t + 1], c.coord + t * c.width,
                         c.val + t * c.width, NULL, 0)


cdef void rows_by_chunk(const i64* gcode, i64 n, const i64* chunk_of_group, int nth,
                        i64* row_off, i64* rows) noexcept nogil:
    """Each chunk's rows (a counting sort of the rows by chunk, stable: increasing row order
    within a chunk), so that a thread reads its own rows only, not every row."""
    cdef i64 r
    cdef int t
    for t in range(nth + 1):
        row_off[t] = 0
    for r in range(n):
        row_off[chunk_of_group[gcode[r]] + 1] += 1
    for t in range(nth):
        row_off[t + 1] += row_off[t]
    cdef i64* fill = <i64*>malloc(nth * sizeof(i64))
    if fill == NULL:
        return
    for t in range(nth):
        fill[t] = row_off[t]
    for r in range(n):
        t = <int>chunk_of_group[gcode[r]]
        rows[fill[t]] = r
        fill[t] += 1
    free(fill)


def accumulate(
    const double[::1] y, const double[:, ::1] X, Z,
    const i64[::1] gcode, const i64[::1] q_off, const i64[::1] s_off,
    const i64[:, ::1] vc_coord, const double[:, ::1] vc_val,
    double[::1] S, n_threads=1,
):
    """Adds every row's z z', z x', z y into its group's record (S zeroed by the caller).
    Z (n × k): C-ordered, or any rows of consecutive values (e.g. columns a..a+k−1 of X, a
    view: no copy of them).

    With n_threads > 1 each thread owns a contiguous range of groups (no two threads write
    the same record) and scans all rows, keeping those of its groups (lmefast._threads)."""
    Z = np.asarray(Z, dtype=float)
    if Z.ndim != 2 or Z.shape[0] != y.shape[0]:
        raise ValueError(f"Z must be {y.shape[0]} × k, got shape {Z.shape}")
    if (Z.shape[1] > 1 and Z.strides[1] != sizeof(double)) or Z.strides[0] % sizeof(double):
        Z = np.ascontiguousarray(Z)
    cdef const double[:, :] Zre = Z
    cdef i64 zs = Zre.strides[0] // sizeof(double)
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
    c.zs = zs
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
    c.rows = NULL
    c.row_off = NULL
    cdef i64[::1] rows_arr, row_off_arr, chunk_of
    if nth > 1:
        # each chunk reads only its own rows (listed once, in row order): each group's rows are
        # still added in increasing row order, so the sums are those of one thread, bit for bit
        chunk_of = np.repeat(np.arange(nth, dtype=np.int64), np.diff(np.asarray(bounds)))
        rows_arr = np.empty(n, dtype=np.int64)
        row_off_arr = np.empty(nth + 1, dtype=np.int64)
        with nogil:
            rows_by_chunk(&gcode[0], n, &chunk_of[0], nth, &row_off_arr[0], &rows_arr[0])
        if row_off_arr[nth] == n:
            c.rows = &rows_arr[0]
            c.row_off = &row_off_arr[0]
    with nogil:
        run_chunks(row_chunk, &c, nth)
    free(coord)
    free(val)




cdef enum:
    MOMENT_MAX_K = 8      # column_moments: up to this many columns in C, above numpy
    MOMENT_BLOCK = 256    # rows transposed into a column buffer at a time

#: column_moments makes its one pass in C for up to this many columns (numpy above)
MOMENT_COLUMNS = MOMENT_MAX_K


cdef inline double _dot4(const double* a, const double* b, Py_ssize_t m) noexcept nogil:
    """Σ a_i b_i with four independent partial sums (no chain of dependent additions)."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= m:
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        i += 4
    while i < m:
        s0 += a[i] * b[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef inline double _sum4(const double* a, Py_ssize_t m) noexcept nogil:
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= m:
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        i += 4
    while i < m:
        s0 += a[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef inline void _extremes4(const double* a, Py_ssize_t m, double* lo, double* hi) noexcept nogil:
    """lo = min(lo, a), hi = max(hi, a) with four independent running extremes (no chain of
    dependent comparisons), each starting from lo and hi; a value that is not smaller (larger)
    never replaces one (a NaN in a is never taken; a NaN in lo stays)."""
    cdef double l0 = lo[0], l1 = lo[0], l2 = lo[0], l3 = lo[0]
    cdef double h0 = hi[0], h1 = hi[0], h2 = hi[0], h3 = hi[0]
    cdef double v
    cdef Py_ssize_t i = 0
    while i + 4 <= m:
        v = a[i]
        l0 = v if v < l0 else l0
        h0 = v if v > h0 else h0
        v = a[i + 1]
        l1 = v if v < l1 else l1
        h1 = v if v > h1 else h1
        v = a[i + 2]
        l2 = v if v < l2 else l2
        h2 = v if v > h2 else h2
        v = a[i + 3]
        l3 = v if v < l3 else l3
        h3 = v if v > h3 else h3
        i += 4
    while i < m:
        v = a[i]
        l0 = v if v < l0 else l0
        h0 = v if v > h0 else h0
        i += 1
    l0 = l1 if l1 < l0 else l0
    l0 = l2 if l2 < l0 else l0
    lo[0] = l3 if l3 < l0 else l0
    h0 = h1 if h1 > h0 else h0
    h0 = h2 if h2 > h0 else h0
    hi[0] = h3 if h3 > h0 else h0


def column_moments(const double[:, :] A, const double[:] y=None, bint extremes=True):
    """(column sums, A'A, column minima, column maxima) of an n × k matrix (any strides) in one
    pass over its rows: the statistics the centring/scaling map and the rank checks need,
    without the n × k temporaries of numpy (or BLAS calls, slow for a handful of columns).
    With ``y`` (n values), the moments of [A | y]: X'X, X'y and y'y of the pass over the
    rows in one go. ``extremes=False`` skips the minima and maxima (returned as NaN). Rows
    are moved in blocks into a column buffer, whose sums and dot
    products run with independent partial sums (the order of addition is fixed: the same
    numbers on any machine of the same kind). Above MOMENT_MAX_K columns: numpy."""
    cdef Py_ssize_t n = A.shape[0], k = A.shape[1], kk, i, j, l, r0, m
    cdef bint with_y = y is not None
    if with_y and y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} values, A {n} rows")
    kk = k + 1 if with_y else k
    if kk == 0 or n == 0 or kk > MOMENT_MAX_K:
        arr = np.column_stack([np.asarray(A), np.asarray(y)]) if with_y else np.asarray(A)
        if n == 0:
            return arr.sum(axis=0), arr.T @ arr, np.full(kk, np.inf), np.full(kk, -np.inf)
        return arr.sum(axis=0), arr.T @ arr, arr.min(axis=0), arr.max(axis=0)
    cdef double sums[MOMENT_MAX_K]
    cdef double lo[MOMENT_MAX_K]
    cdef double hi[MOMENT_MAX_K]
    cdef double v
    cdef double gram[MOMENT_MAX_K][MOMENT_MAX_K]
    cdef double buf[MOMENT_MAX_K][MOMENT_BLOCK]
    cdef Py_ssize_t s0 = A.strides[0] // sizeof(double), s1 = A.strides[1] // sizeof(double)
    cdef Py_ssize_t sy = y.strides[0] // sizeof(double) if with_y else 0
    cdef const double* base = &A[0, 0] if k > 0 else NULL
    cdef const double* yb = &y[0] if with_y else NULL
    cdef const double* r
    for j in range(kk):
        sums[j] = 0.0
        v = A[0, j] if j < k else y[0]
        lo[j] = v
        hi[j] = v
        for l in range(kk):
            gram[j][l] = 0.0
    with nogil:
        r0 = 0
        while r0 < n:
            m = min(<Py_ssize_t>MOMENT_BLOCK, n - r0)
            for i in range(m):
                r = base + (r0 + i) * s0
                for j in range(k):
                    buf[j][i] = r[j * s1]
            if with_y:
                for i in range(m):
                    buf[k][i] = yb[(r0 + i) * sy]
            for j in range(kk):
                if extremes:
                    _extremes4(buf[j], m, &lo[j], &hi[j])
                sums[j] += _sum4(buf[j], m)
                for l in range(j + 1):
                    gram[j][l] += _dot4(buf[j], buf[l], m)
            r0 += m
    sums_arr = np.array([sums[j] for j in range(kk)])
    gram_arr = np.zeros((kk, kk))
    for j in range(kk):
        for l in range(j + 1):
            gram_arr[j, l] = gram_arr[l, j] = gram[j][l]
    if not extremes:
        return sums_arr, gram_arr, np.full(kk, np.nan), np.full(kk, np.nan)
    return (sums_arr, gram_arr, np.array([lo[j] for j in range(kk)]),
            np.array([hi[j] for j in range(kk)]))


def integer_codes(const i64[::1] values, i64 top):
    """Group codes of non-negative integer keys all below ``top``: (codes, labels), codes
    0..m−1 in increasing key order, labels the keys present. One pass marks the keys present,
    one numbers them, one codes the rows (a copy of the keys when they are 0..m−1 already)."""
    cdef Py_ssize_t n = values.shape[0], i
    cdef i64 j, m = 0
    code_of_arr = np.zeros(top, dtype=np.int64)
    cdef i64[::1] code_of = code_of_arr
    with nogil:
        for i in range(n):
            code_of[values[i]] = 1
        for j in range(top):
            if code_of[j]:
                code_of[j] = m
                m += 1
            else:
                code_of[j] = -1
    if m == top:
        return np.array(values, dtype=np.int64), np.arange(top, dtype=np.int64)
    codes_arr = np.empty(n, dtype=np.int64)
    cdef i64[::1] codes = codes_arr
    with nogil:
        for i in range(n):
            codes[i] = code_of[values[i]]
    return codes_arr, np.nonzero(code_of_arr >= 0)[0].astype(np.int64)


cdef enum:
    INTERLEAVE_BLOCK = 512    # rows written at a time: the block of the matrix stays in cache


def rows_from_columns(list columns, Py_ssize_t n):
    """The n × k C-ordered matrix of k columns (float arrays of n values, or None for a column of
    ones), written block of rows by block: each cache line of the matrix is filled once (a copy
    column by column fills every line k times)."""
    cdef Py_ssize_t k = len(columns), j, i, r0, m
    out = np.empty((n, k))
    if n == 0 or k == 0:
        return out
    cols = [None if c is None else np.ascontiguousarray(c, dtype=float) for c in columns]
    for j in range(k):
        if cols[j] is not None and cols[j].shape[0] != n:
            raise ValueError(f"column {j} has {cols[j].shape[0]} values, not {n}")
    cdef double[:, ::1] X = out
    cdef double* base = &X[0, 0]
    cdef const double[::1] col
    cdef const double** src = <const double**>malloc(k * sizeof(double*))
    if src == NULL:
        raise MemoryError()
    for j in range(k):
        if cols[j] is None:
            src[j] = NULL
        else:
            col = cols[j]
            src[j] = &col[0]
    with nogil:
        r0 = 0
        while r0 < n:
            m = min(<Py_ssize_t>INTERLEAVE_BLOCK, n - r0)
            for j in range(k):
                if src[j] == NULL:
                    for i in range(m):
                        base[(r0 + i) * k + j] = 1.0
                else:
                    for i in range(m):
                        base[(r0 + i) * k + j] = src[j][r0 + i]
            r0 += m
    free(src)
    return out


def column_sums(const double[:, :] A):
    """Σ_i A[i, :], the rows added one after another (numpy's order for a sum over axis 0 of
    two or more columns; a single column numpy sums pairwise), in one pass over a strided view
    without numpy's buffering of it."""
    cdef Py_ssize_t n = A.shape[0], k = A.shape[1], i, j
    out = np.zeros(k)
    cdef double[::1] s = out
    with nogil:
        for i in range(n):
            for j in range(k):
                s[j] += A[i, j]
    return out
