/* lora_branch_impl.h - the input side of a LoRA branch, with dropout
 * (type-generic template of static helpers for LoRA kernels).
 *
 *   down:           x (n, in), A (R, in) -> u (n, R) = drop(x) A^T
 *   down_backward:  gb (n, R), A (R, in) -> dx (n, in) += scaling * drop'(gb A)
 *                                           dA (R, in) += scaling * gb^T drop(x)
 * drop(x) = x * mask * keep_scale with mask (n, in) uint8, contiguous; mask
 * NULL means no dropout (then x is used in place, no scratch).  With a mask,
 * drop(x) is materialised LORAC_BRANCH_BLOCK_ROWS rows at a time in `scratch`
 * (LORAC_BRANCH_BLOCK_ROWS * in elements, allocated by the caller so that a
 * kernel can allocate everything before it writes anything).
 */

#ifndef LORAC_BRANCH_BLOCK_ROWS
#define LORAC_BRANCH_BLOCK_ROWS 64
#endif
#ifndef LORAC_BACKWARD_BLOCK_ROWS
#define LORAC_BACKWARD_BLOCK_ROWS 64 /* rows of g per block of a backward's adapter products */
#endif

/* x (rows, in) with row stride ldx, mask (rows, in) -> out (rows, in) contiguous
 * out = x * mask * keep_scale  (x * 0 keeps NaN as NaN, as torch's dropout). */
static void FN(branch_dropout)(ptrdiff_t rows, ptrdiff_t in, const real *x, ptrdiff_t ldx,
                               const uint8_t *mask, real keep_scale, real *out)
{
    for (ptrdiff_t i = 0; i < rows; i++)
        for (ptrdiff_t j = 0; j < in; j++)
            out[i * in + j] = x[i * ldx + j] * ((real)mask[i * in + j] * keep_scale);
}

/* x (n, in), mask, A (R, in) -> u (n, R) = drop(x) A^T */
static void FN(branch_down)(ptrdiff_t n, ptrdiff_t in, ptrdiff_t rank, const real *x, ptrdiff_t ldx,
                            const uint8_t *mask, real keep_scale, const real *a, ptrdiff_t lda,
                            real *u, ptrdiff_t ldu, real *scratch)
{
    if (!mask) {
        FN(gemm_rm)(CblasNoTrans, CblasTrans, n, rank, in, 1, x, ldx, a, lda, 0, u, ldu);
        return;
    }
    for (ptrdiff_t i0 = 0; i0 < n; i0 += LORAC_BRANCH_BLOCK_ROWS) {
        ptrdiff_t rows = n - i0 < LORAC_BRANCH_BLOCK_ROWS ? n - i0 : LORAC_BRANCH_BLOCK_ROWS;
        FN(branch_dropout)(rows, in, x + i0 * ldx, ldx, mask + i0 * in, keep_scale, scratch);
        FN(gemm_rm)(CblasNoTrans, CblasTrans, rows, rank, in, 1, scratch, in, a, lda, 0,
                    u + i0 * ldu, ldu);
    }
}

/* gb (n, R), A (R, in), x (n, in), mask -> dx (n, in) += scaling * drop'(gb A),
 * dA (R, in) += scaling * gb^T drop(x); dx or da NULL: skipped. */
static void FN(branch_down_backward)(ptrdiff_t n, ptrdiff_t in, ptrdiff_t rank, real scaling,
                                     const real *gb, ptrdiff_t ldgb, const real *x, ptrdiff_t ldx,
                                     const uint8_t *mask, real keep_scale, const real *a,
                                     ptrdiff_t lda, real *dx, ptrdiff_t lddx, real *da,
                                     ptrdiff_t ldda, real *scratch)
{
    if (!mask) {
        if (dx) /* dx += scaling * gb A */
            FN(gemm_rm)(CblasNoTrans, CblasNoTrans, n, in, rank, scaling, gb, ldgb, a, lda, 1, dx, lddx);
        if (da) /* dA += scaling * gb^T x */
            FN(gemm_rm)(CblasTrans, CblasNoTrans, rank, in, n, scaling, gb, ldgb, x, ldx, 1, da, ldda);
        return;
    }
    for (ptrdiff_t i0 = 0; i0 < n; i0 += LORAC_BRANCH_BLOCK_ROWS) {
        ptrdiff_t rows = n - i0 < LORAC_BRANCH_BLOCK_ROWS ? n - i0 : LORAC_BRANCH_BLOCK_ROWS;
        const real *gb_blk = gb + i0 * ldgb;
        const uint8_t *mask_blk = mask + i0 * in;
        if (dx) { /* dx += drop'(scaling * gb A) */
            FN(gemm_rm)(CblasNoTrans, CblasNoTrans, rows, in, rank, scaling, gb_blk, ldgb, a, lda, 0,
                        scratch, in);
            for (ptrdiff_t i = 0; i < rows; i++) {
                real *dx_row = dx + (i0 + i) * lddx;
                for (ptrdiff_t j = 0; j < in; j++)
                    dx_row[j] += scratch[i * in + j] * ((real)mask_blk[i * in + j] * keep_scale);
            }
        }
        if (da) { /* dA += scaling * gb^T drop(x) */
            FN(branch_dropout)(rows, in, x + i0 * ldx, ldx, mask_blk, keep_scale, scratch);
            FN(gemm_rm)(CblasTrans, CblasNoTrans, rank, in, rows, scaling, gb_blk, ldgb, scratch, in,
                        1, da, ldda);
        }
    }
}
