/* gemm_impl.h - GEMM helpers shared by the kernels (type-generic template).
 *
 * Row-major only.  gemm_rm computes C (m, n) = alpha * op(A) op(B) + beta * C
 * where op(A) is (m, k) and op(B) is (k, n); it handles the degenerate sizes
 * BLAS implementations disagree on (m, n or k equal to 0) so callers need not.
 */
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
    GEMM(CblasRowMajor, ta, tb, (blasint)m, (blasint)n, (blasint)k, alpha, a, (blasint)lda, b,
         (blasint)ldb, beta, c, (blasint)ldc);
}
