/* gemm_impl.h - GEMM helpers shared by the kernels (type-generic template).
 *
 * Row-major only.  gemm_rm computes C (m, n) = alpha * op(A) op(B) + beta * C
 * where op(A) is (m, k) and op(B) is (k, n); it handles the degenerate sizes
 * BLAS implementations disagree on (m, n or k equal to 0) so callers need not.
 */
#ifndef LORAC_GEMV_MAX_ROWS
#define LORAC_GEMV_MAX_ROWS 3 /* op(A) with at most this many rows: one GEMV per row */
#endif

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
            GEMV(CblasRowMajor, b_t ? CblasNoTrans : CblasTrans, (blasint)(b_t ? n : k), (blasint)(b_t ? k : n),
                 alpha, b, (blasint)ldb, a_t ? a + i : a + i * lda, (blasint)(a_t ? lda : 1), beta, c + i * ldc, 1);
        return;
    }
    if (n == 1) { /* c (m) = alpha op(A) b + beta c;  A stored (m, k), or (k, m) if a_t */
        GEMV(CblasRowMajor, a_t ? CblasTrans : CblasNoTrans, (blasint)(a_t ? k : m), (blasint)(a_t ? m : k),
             alpha, a, (blasint)lda, b, (blasint)(b_t ? 1 : ldb), beta, c, (blasint)ldc);
        return;
    }
    GEMM(CblasRowMajor, ta, tb, (blasint)m, (blasint)n, (blasint)k, alpha, a, (blasint)lda, b,
         (blasint)ldb, beta, c, (blasint)ldc);
}
