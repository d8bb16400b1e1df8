/* gemm_impl.h - GEMM helpers shared by the kernels (type-generic template).
 *
 * Row-major only.  gemm_rm computes C (m, n) = alpha * op(A) op(B) + beta * C
 * where op(A) is (m, k) and op(B) is (k, n); it handles the degenerate sizes
 * BLAS implementations disagree on (m, n or k equal to 0) so callers need not.
 * Short op(A) (a small batch) takes one of two faster routes, and k = 1 a
 * third, chosen by measurements with the bundled OpenBLAS 0.3.34 at one
 * thread (below), running its Haswell kernels.
 *
 * benchmarks/bench_gemm_routes.py re-measures the routes on the machine at
 * hand.  The choice depends on which kernels OpenBLAS picks for the CPU: on
 * an AMD EPYC where it picked SkylakeX (AVX-512) kernels, A B^T by panels
 * ran 1.5-1.9x faster than a GEMV per row for 2-3 rows at 1024 (at 4096: a
 * tie at 2 rows, 1.2x at 3) and 1.2x faster than plain GEMM at 64 rows,
 * while on that same machine with OPENBLAS_CORETYPE=Haswell these constants
 * were the fastest or within 6% but at 64 rows, 4096 (panels 1.7-1.9x
 * slower than GEMV at 2-3 rows at 1024; at 64 rows 1.06x slower than GEMM
 * at 1024, 0.84x at 4096).
 * They stay fixed: no benchmark target is at 2-3 or 33-64 rows, and a
 * per-CPU table would rest on one machine's figures.
 */
#ifndef LORAC_GEMV_MAX_ROWS
#define LORAC_GEMV_MAX_ROWS 3 /* op(A) with at most this many rows: one GEMV per row */
#endif
#ifndef LORAC_PANEL_MAX_ROWS
#define LORAC_PANEL_MAX_ROWS 32 /* A B^T with at most this many rows: panels of C^T (0: never) */
#endif
#define LORAC_GER_MIN_COLS 64            /* k = 1: rank-1 update for rows at least this long, */
#define LORAC_GER_ANY_COLS_MAX_ROWS 32   /* or for at most this many rows */
#define LORAC_PANEL_COLS 256   /* columns of C per panel */
#define LORAC_PANEL_MIN_DEPTH 128 /* k below this: plain GEMM (panels measured 1.6-2.1x slower at k = 16) */
#define LORAC_VECTOR_REALS (64 / (int)sizeof(real)) /* elements in a 512-bit vector */
#ifndef LORAC_K1_TRANSPOSED_ROW
#define LORAC_K1_TRANSPOSED_ROW 1 /* k = 1: a row b (1, n) passed as B^T (n, 1) (0: never; see gemm_rm) */
#endif

#ifndef LORAC_ALIAS_HELPERS
#define LORAC_ALIAS_HELPERS
/* 4K aliasing.  The axpy form of GEMV -- y (cols) = alpha M^T x + beta y for
 * M (rows, cols) row-major, which streams M row by row and re-reads and
 * re-writes y for each row -- slows down when y starts just after a row of M
 * (or a little before one) modulo 4 KiB: the CPU checks a load against
 * earlier stores on address bits 0-11 alone, so loads of M wait on stores to
 * y they do not depend on.  benchmarks/bench_gemm_routes.py --alias, with
 * OpenBLAS 0.3.34's Haswell kernels on a Zen 3 EPYC, one thread, float32
 * g (1, 1024) W0 (1024, 1024) (the input gradient of a one-row batch): y
 * 0-384 bytes after a row start 96-118 us, 64-128 bytes before one 94-102
 * us, elsewhere 77-86 us; moved, 75-85 us.  (At 4096, W0 streams from
 * memory and the difference is within noise.)  When M's row stride is a
 * multiple of 1 KiB its rows start at one to four offsets modulo 4 KiB and
 * a y in the window is worth moving (a copy of y each way); other strides
 * spread the row starts over every offset and no place is better. */
#define LORAC_ALIAS_BEFORE 256  /* bytes before a row start that are slow for y */
#define LORAC_ALIAS_AFTER 512   /* bytes after one */
#define LORAC_ALIAS_MIN_ROWS 16 /* fewer rows of M: the two copies of y cost about what they save */

/* The period (bytes) of M's row starts modulo 4 KiB when it is at least
 * 1 KiB, else 0: the lowest set bit of the row stride, at most 4096. */
static inline size_t lorac_alias_period(size_t row_bytes)
{
    size_t lowest = row_bytes & (~row_bytes + 1);
    size_t period = lowest == 0 || lowest > 4096 ? 4096 : lowest;
    return period >= 1024 ? period : 0;
}

/* Whether y (an address) falls in the slow window around M's row starts. */
static inline int lorac_in_alias_window(const void *y, const void *m, size_t period)
{
    size_t offset = (size_t)((uintptr_t)y - (uintptr_t)m) % period;
    return offset < LORAC_ALIAS_AFTER || offset >= period - LORAC_ALIAS_BEFORE;
}

/* Bytes after a row start, modulo the period, at the middle of the fast
 * stretch, rounded down to a cache line. */
static inline size_t lorac_alias_target(size_t period)
{
    return (LORAC_ALIAS_AFTER + (period - LORAC_ALIAS_BEFORE - LORAC_ALIAS_AFTER) / 2) / 64 * 64;
}
#endif

/* y = alpha op(M) x + beta y, M (rows, cols) row-major with leading
 * dimension ld, y with stride incy.  The axpy form (op = transpose: y has
 * cols elements) of at least LORAC_ALIAS_MIN_ROWS rows, y contiguous, runs on
 * a copy of y placed away from M's row starts when y sits in the 4K-aliasing
 * window (above); if that copy cannot be had it runs in place, just slower. */
static inline void FN(gemv_rm)(enum CBLAS_TRANSPOSE trans, ptrdiff_t rows, ptrdiff_t cols, real alpha,
                               const real *m, ptrdiff_t ld, const real *x, ptrdiff_t incx, real beta,
                               real *y, ptrdiff_t incy)
{
    const ptrdiff_t len = trans == CblasTrans ? cols : rows;
    const size_t period = trans == CblasTrans ? lorac_alias_period((size_t)ld * sizeof(real)) : 0;
    char *room = NULL;
    real *out = y;
    if (period && incy == 1 && rows >= LORAC_ALIAS_MIN_ROWS && len > 0 && (uintptr_t)m % sizeof(real) == 0 &&
        lorac_in_alias_window(y, m, period) &&
        (room = malloc(sizeof(real) * (size_t)len + period))) {
        size_t shift = (size_t)((uintptr_t)m + lorac_alias_target(period) - (uintptr_t)room) % period;
        out = (real *)(room + shift);
        memcpy(out, y, sizeof(real) * (size_t)len);
    }
    GEMV(CblasRowMajor, trans, (blasint)rows, (blasint)cols, alpha, m, (blasint)ld, x, (blasint)incx, beta,
         out, (blasint)(out == y ? incy : 1));
    if (out != y)
        memcpy(y, out, sizeof(real) * (size_t)len);
    free(room);
}

/* C (m, n) = alpha A B^T + beta C for a short A (m, k) against a wide
 * B (n, k), e.g. a small batch through W0 (out, in): computed panel by panel
 * as C^T[j:j+256] = B[j:j+256] A^T into a small buffer, then transposed into
 * C.  OpenBLAS 0.3.34 runs that orientation faster: sgemm (16, 1024, 1024)
 * 0.80x the time of the plain call, (8, ..) 0.70x, (32, ..) 0.92x; at 4096
 * 0.88-0.92x for m = 16-32 and neutral at m = 4; (128, 1024, 1024) 1.08x,
 * hence m <= 32.  (The (k, n) layout, A B, is already fast: panels measured
 * 1.3-2x slower there, so only A B^T takes this route.)  Returns 0 without
 * writing anything if the buffer cannot be had: the caller does plain GEMM. */
static inline int FN(gemm_nt_by_panels)(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, real alpha,
                                        const real *a, ptrdiff_t lda, const real *b, ptrdiff_t ldb,
                                        real beta, real *c, ptrdiff_t ldc)
{
    real *panel = malloc(sizeof(real) * LORAC_PANEL_COLS * (size_t)m);
    if (!panel)
        return 0;
    for (ptrdiff_t j = 0; j < n; j += LORAC_PANEL_COLS) {
        const ptrdiff_t cols = n - j < LORAC_PANEL_COLS ? n - j : LORAC_PANEL_COLS;
        /* panel (cols, m) = alpha * B[j:j+cols] A^T */
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)cols, (blasint)m, (blasint)k, alpha,
             b + j * ldb, (blasint)ldb, a, (blasint)lda, 0, panel, (blasint)m);
        /* C[:, j:j+cols] = panel^T + beta C[:, j:j+cols]  (beta = 0: C is not read) */
        for (ptrdiff_t i = 0; i < m; i++) {
            real *ci = c + i * ldc + j;
            if (beta == 0)
                for (ptrdiff_t q = 0; q < cols; q++)
                    ci[q] = panel[q * m + i];
            else
                for (ptrdiff_t q = 0; q < cols; q++)
                    ci[q] = panel[q * m + i] + beta * ci[q];
        }
    }
    free(panel);
    return 1;
}

static inline void FN(gemm_rm)(enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb,
                               ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, real alpha,
                               const real *a, ptrdiff_t lda, const real *b, ptrdiff_t ldb,
                               real beta, real *c, ptrdiff_t ldc)
{
    if (m == 0 || n == 0)
        return;
    if (k == 0 || alpha == 0) {
        if (beta == 1)
            return;
        for (ptrdiff_t i = 0; i < m; i++)
            for (ptrdiff_t j = 0; j < n; j++)
                c[i * ldc + j] = beta == 0 ? (real)0 : beta * c[i * ldc + j];
        return;
    }
    /* Up to three rows, or one column: GEMV streams the matrix once per row,
     * where GEMM would first pack it (a full extra copy of W0 for a one-row
     * batch).  Measured with OpenBLAS 0.3.34, one thread, sgemm (m, 4096,
     * 4096) vs m sgemv: m = 2: 0.54x the time, m = 3: 0.69x, m = 4: 1.28x
     * (at 1024: 0.31x, 0.35x, 0.75x), hence LORAC_GEMV_MAX_ROWS = 3. */
    const int a_t = ta == CblasTrans, b_t = tb == CblasTrans;
    if ((m <= LORAC_GEMV_MAX_ROWS || n == 1) && beta == 0) { /* c may hold garbage (even NaN): clear it */
        for (ptrdiff_t i = 0; i < m; i++)
            for (ptrdiff_t j = 0; j < n; j++)
                c[i * ldc + j] = 0;
        beta = 1;
    }
    if (m <= LORAC_GEMV_MAX_ROWS) { /* row i: c_i (n) = alpha op(B)^T a_i + beta c_i;  B (k, n), or (n, k) if b_t */
        for (ptrdiff_t i = 0; i < m; i++)
            FN(gemv_rm)(b_t ? CblasNoTrans : CblasTrans, b_t ? n : k, b_t ? k : n, alpha, b, ldb,
                        a_t ? a + i : a + i * lda, a_t ? lda : 1, beta, c + i * ldc, 1);
        return;
    }
    if (n == 1) { /* c (m) = alpha op(A) b + beta c;  A stored (m, k), or (k, m) if a_t */
        FN(gemv_rm)(a_t ? CblasTrans : CblasNoTrans, a_t ? k : m, a_t ? m : k, alpha, a, lda, b,
                    b_t ? 1 : ldb, beta, c, ldc);
        return;
    }
    /* k = 1 (a one-row batch's weight gradients): c += alpha a b^T is a rank-1
     * update.  Measured, sger vs sgemm k = 1, one thread: 0.3-0.7x the time
     * for rows of n >= 64 or for m <= 32 rows (dA (16, 1024): 0.55x; dger
     * 0.3-0.9x), but many short rows favour GEMM (dB (1024, 16): sger 2.6x,
     * (4096, 32) 1.2x), hence the test. */
    if (k == 1 && beta == 1 && (n >= LORAC_GER_MIN_COLS || m <= LORAC_GER_ANY_COLS_MAX_ROWS)) {
        GER(CblasRowMajor, (blasint)m, (blasint)n, alpha, a, (blasint)(a_t ? 1 : lda), b,
            (blasint)(b_t ? ldb : 1), c, (blasint)ldc);
        return;
    }
    /* Any other k = 1 (dB += g^T u for a one-row batch: many rows of r
     * columns): the row b (1, n) is equally B^T stored (n, 1) with ld 1.
     * OpenBLAS 0.3.34's SkylakeX small-matrix GEMM runs that form 1.6-3.6x
     * faster when n is not a whole number of 512-bit vectors: sgemm dB
     * (1024, 8) 2.1 us against 6.8, (4096, 8) 9.7 against 35, likewise for
     * n = 4-24 at 256-4096 rows (n = 3: 0.6-1.1x the time), and dgemm for
     * n of 4, 12 and 20.  It is up to 2x slower when n is a whole number of
     * vectors (n = 16: 2.1 us against 1.1).  Its Haswell kernels run both
     * forms alike (0.9-1.1x but for one cell each way).  The route saves a
     * one-row r = 8 training step at 1024 about 5 us (of ~145); re-measured
     * by benchmarks/bench_gemm_routes.py. */
    if (LORAC_K1_TRANSPOSED_ROW && k == 1 && !b_t && n >= 3 && n % LORAC_VECTOR_REALS != 0) {
        GEMM(CblasRowMajor, ta, CblasTrans, (blasint)m, (blasint)n, 1, alpha, a, (blasint)lda, b, 1,
             beta, c, (blasint)ldc);
        return;
    }
    if (!a_t && b_t && m <= LORAC_PANEL_MAX_ROWS && k >= LORAC_PANEL_MIN_DEPTH &&
        FN(gemm_nt_by_panels)(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc))
        return;
    GEMM(CblasRowMajor, ta, tb, (blasint)m, (blasint)n, (blasint)k, alpha, a, (blasint)lda, b,
         (blasint)ldb, beta, c, (blasint)ldc);
}
