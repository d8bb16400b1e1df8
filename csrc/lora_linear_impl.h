/* lora_linear_impl.h - LoRA Linear forward, backward and merge (template).
 * Shapes and conventions: see lora_linear_decl.h and DESIGN.md.  The input
 * side of the LoRA branch (u = drop(x) A^T and its backward, with dropout)
 * comes from lora_branch_impl.h, shared with MergedLinear. */

int FN(lorac_linear_forward)(const LoraLinear *L, real *u, ptrdiff_t ldu, real *y, ptrdiff_t ldy)
{
    const ptrdiff_t n = L->n, in = L->in, out = L->out, r = L->r;
    const real *x = L->x, *w = L->w, *bias = L->bias, *a = L->a, *b = L->b;
    const real scaling = (real)L->scaling, keep_scale = (real)L->keep_scale;
    const int lora = a != NULL && r > 0;
    real *scratch = NULL;
    if (lora && L->mask && n > 0 && in > 0) {
        scratch = malloc(sizeof(real) * (size_t)LORAC_BRANCH_BLOCK_ROWS * (size_t)in);
        if (!scratch)
            return -1;
    }

    /* The adapter's products come before the base product: right after a
     * backward (which ends on A and B) A and B are still in cache, and the
     * stream through W0 would evict them. */
    if (lora) /* u = drop(x) A^T  (n, r) */
        FN(branch_down)(n, in, r, x, L->ldx, L->mask, keep_scale, a, L->lda, u, ldu, scratch);
    free(scratch);

    /* y = bias; y += scaling * u B^T; y += x W0^T */
    real beta = 0;
    if (bias) {
        for (ptrdiff_t i = 0; i < n; i++)
            memcpy(y + i * ldy, bias, sizeof(real) * (size_t)out);
        beta = 1;
    }
    if (lora) {
        FN(gemm_rm)(CblasNoTrans, CblasTrans, n, out, r, scaling, u, ldu, b, L->ldb, beta, y, ldy);
        beta = 1;
    }
    FN(gemm_rm)(CblasNoTrans, L->w_in_out ? CblasNoTrans : CblasTrans, n, out, in, 1, x, L->ldx,
                w, L->ldw, beta, y, ldy);
    return 0;
}

/* g (rows, out) -> acc (out) += column sums, in double. */
static void FN(add_column_sums)(ptrdiff_t rows, ptrdiff_t out, const real *g, ptrdiff_t ldg, double *acc)
{
    for (ptrdiff_t i = 0; i < rows; i++)
        for (ptrdiff_t j = 0; j < out; j++)
            acc[j] += (double)g[i * ldg + j];
}

int FN(lorac_linear_backward)(const LoraLinear *L, const real *u, ptrdiff_t ldu, const real *g,
                              ptrdiff_t ldg, const LoraLinearGrads *G)
{
    const ptrdiff_t n = L->n, in = L->in, out = L->out, r = L->r;
    const real *x = L->x, *w = L->w, *a = L->a, *b = L->b;
    const real scaling = (real)L->scaling, keep_scale = (real)L->keep_scale;
    real *dx = G->dx, *dw = G->dw, *dbias = G->dbias, *da = G->da, *db = G->db;
    const int lora = a != NULL && r > 0;
    const int need_gb = lora && (dx || da) && n > 0;
    const int need_drop = need_gb && L->mask && in > 0;
    const ptrdiff_t block = n < LORAC_BACKWARD_BLOCK_ROWS ? n : LORAC_BACKWARD_BLOCK_ROWS;
    real *gb = NULL, *scratch = NULL;
    double *colsum = NULL;

    /* Allocate every scratch first: on failure nothing has been written. */
    if (need_gb)
        gb = malloc(sizeof(real) * (size_t)block * (size_t)r);
    if (need_drop)
        scratch = malloc(sizeof(real) * (size_t)LORAC_BRANCH_BLOCK_ROWS * (size_t)in);
    if (dbias && out > 0)
        colsum = calloc((size_t)out, sizeof(double));
    if ((need_gb && !gb) || (need_drop && !scratch) || (dbias && out > 0 && !colsum)) {
        free(gb);
        free(scratch);
        free(colsum);
        return -1;
    }

    if (dw) { /* dW0 += g^T x (out, in), or x^T g (in, out) */
        if (L->w_in_out)
            FN(gemm_rm)(CblasTrans, CblasNoTrans, in, out, n, 1, x, L->ldx, g, ldg, 1, dw, G->lddw);
        else
            FN(gemm_rm)(CblasTrans, CblasNoTrans, out, in, n, 1, g, ldg, x, L->ldx, 1, dw, G->lddw);
    }
    if (dx) /* dx = g W0  (n, in) */
        FN(gemm_rm)(CblasNoTrans, L->w_in_out ? CblasTrans : CblasNoTrans, n, in, out, 1, g, ldg,
                    w, L->ldw, 0, dx, G->lddx);

    /* The bias gradient and the adapter's products, a block of rows at a
     * time: a block of g is read from memory once and then from cache by
     * each product that needs it (whole-batch products streamed g three
     * times, x and dx once more each).  They come after the stream through
     * W0, so that the next forward finds A and B still in cache. */
    for (ptrdiff_t i0 = 0; i0 < n; i0 += block) {
        const ptrdiff_t rows = n - i0 < block ? n - i0 : block;
        const real *g_blk = g + i0 * ldg;
        if (colsum)
            FN(add_column_sums)(rows, out, g_blk, ldg, colsum);
        if (lora && db) /* dB += scaling * g^T u  (out, r) */
            FN(gemm_rm)(CblasTrans, CblasNoTrans, out, r, rows, scaling, g_blk, ldg, u + i0 * ldu, ldu, 1,
                        db, G->lddb);
        if (gb) {
            real *dx_blk = dx ? dx + i0 * G->lddx : NULL;
            /* gb = g B  (rows, r) */
            FN(gemm_rm)(CblasNoTrans, CblasNoTrans, rows, r, out, 1, g_blk, ldg, b, L->ldb, 0, gb, r);
            /* dx += scaling * drop'(gb A);  dA += scaling * gb^T drop(x) */
            FN(branch_down_backward)(rows, in, r, scaling, gb, r, x + i0 * L->ldx, L->ldx,
                                     L->mask ? L->mask + i0 * in : NULL, keep_scale, a, L->lda, dx_blk,
                                     G->lddx, da, G->ldda, scratch);
        }
    }
    if (colsum)
        for (ptrdiff_t j = 0; j < out; j++)
            dbias[j] += (real)colsum[j];
    free(gb);
    free(scratch);
    free(colsum);
    return 0;
}

void FN(lorac_linear_merge)(ptrdiff_t out, ptrdiff_t in, ptrdiff_t r, int w_in_out, double alpha,
                            const real *a, ptrdiff_t lda, const real *b, ptrdiff_t ldb,
                            real *w, ptrdiff_t ldw)
{
    if (w_in_out) /* W0 (in, out) += alpha * A^T B^T */
        FN(gemm_rm)(CblasTrans, CblasTrans, in, out, r, alpha, a, lda, b, ldb, 1, w, ldw);
    else /* W0 (out, in) += alpha * B A */
        FN(gemm_rm)(CblasNoTrans, CblasNoTrans, out, in, r, alpha, b, ldb, a, lda, 1, w, ldw);
}
