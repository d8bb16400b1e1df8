/* lora_merged_linear_impl.h - LoRA MergedLinear forward, backward and merge
 * (template).  Shapes and conventions: see lora_merged_linear_decl.h and
 * lora_merged_linear.h.  The base layer (x W0^T + bias and its gradients) is
 * the Linear kernel without adapter; the input side of the branch comes from
 * lora_branch_impl.h; only the per-group B side is specific to this layer. */

/* The Linear view of the base layer: same x, W0 and bias, no adapter. */
static LoraLinear FN(merged_base)(const LoraMergedLinear *M)
{
    LoraLinear L = {
        .n = M->n, .in = M->in, .out = M->out, .r = 0,
        .w_in_out = M->w_in_out, .scaling = 0, .keep_scale = 1,
        .x = M->x, .ldx = M->ldx, .w = M->w, .ldw = M->ldw, .bias = M->bias,
        .a = NULL, .lda = 1, .b = NULL, .ldb = 1, .mask = NULL,
    };
    return L;
}

static int FN(merged_has_adapter)(const LoraMergedLinear *M)
{
    return M->a != NULL && M->r > 0 && M->n_enabled > 0;
}

int FN(lorac_merged_linear_forward)(const LoraMergedLinear *M, real *u, ptrdiff_t ldu, real *y,
                                    ptrdiff_t ldy)
{
    const ptrdiff_t n = M->n, in = M->in, r = M->r, og = M->out / M->groups;
    const ptrdiff_t rank = M->n_enabled * r;
    const real *b = M->b;
    const int lora = FN(merged_has_adapter)(M);
    real *scratch = NULL;
    if (lora && M->mask && n > 0 && in > 0) {
        scratch = malloc(sizeof(real) * (size_t)LORAC_BRANCH_BLOCK_ROWS * (size_t)in);
        if (!scratch)
            return -1;
    }

    /* y = x W0^T + bias  (n, out): no adapter, so no allocation, cannot fail */
    const LoraLinear base = FN(merged_base)(M);
    FN(lorac_linear_forward)(&base, NULL, 1, y, ldy);
    if (!lora)
        return 0;

    /* u = drop(x) A^T  (n, E r): every group at once */
    FN(branch_down)(n, in, rank, M->x, M->ldx, M->mask, (real)M->keep_scale, M->a, M->lda, u, ldu,
                    scratch);
    free(scratch);
    /* y[:, block] += scaling * u_e B_e^T  (n, og) per enabled group */
    for (ptrdiff_t e = 0; e < M->n_enabled; e++)
        FN(gemm_rm)(CblasNoTrans, CblasTrans, n, og, r, (real)M->scaling, u + e * r, ldu,
                    b + e * og * M->ldb, M->ldb, 1, y + M->enabled[e] * og, ldy);
    return 0;
}

int FN(lorac_merged_linear_backward)(const LoraMergedLinear *M, const real *u, ptrdiff_t ldu,
                                     const real *g, ptrdiff_t ldg, const LoraLinearGrads *G)
{
    const ptrdiff_t n = M->n, in = M->in, r = M->r, og = M->out / M->groups;
    const ptrdiff_t rank = M->n_enabled * r;
    const real *b = M->b;
    const real scaling = (real)M->scaling;
    real *dx = G->dx, *da = G->da, *db = G->db;
    const int lora = FN(merged_has_adapter)(M);
    const int need_gb = lora && (dx || da) && n > 0;
    const int need_drop = need_gb && M->mask && in > 0;
    const ptrdiff_t block = n < LORAC_BACKWARD_BLOCK_ROWS ? n : LORAC_BACKWARD_BLOCK_ROWS;
    real *gb = NULL, *scratch = NULL;

    /* Allocate every scratch first: on failure nothing has been written. */
    if (need_gb)
        gb = malloc(sizeof(real) * (size_t)block * (size_t)rank);
    if (need_drop)
        scratch = malloc(sizeof(real) * (size_t)LORAC_BRANCH_BLOCK_ROWS * (size_t)in);
    if ((need_gb && !gb) || (need_drop && !scratch)) {
        free(gb);
        free(scratch);
        return -1;
    }
    /* dx = g W0, dW0, dbias: the Linear kernel without adapter (it allocates
     * before writing, so a failure here still leaves everything untouched) */
    const LoraLinear base = FN(merged_base)(M);
    const LoraLinearGrads base_grads = {
        .dx = dx, .lddx = G->lddx, .dw = G->dw, .lddw = G->lddw, .dbias = G->dbias,
        .da = NULL, .ldda = 1, .db = NULL, .lddb = 1,
    };
    if (FN(lorac_linear_backward)(&base, NULL, 1, g, ldg, &base_grads) != 0) {
        free(gb);
        free(scratch);
        return -1;
    }
    if (!lora)
        return 0;

    /* A block of rows at a time, as the Linear backward: each block of g is
     * read from memory once and from cache by each product that needs it. */
    for (ptrdiff_t i0 = 0; i0 < n; i0 += block) {
        const ptrdiff_t rows = n - i0 < block ? n - i0 : block;
        for (ptrdiff_t e = 0; e < M->n_enabled; e++) {
            const real *g_e = g + i0 * ldg + M->enabled[e] * og; /* (rows, og), row stride ldg */
            if (db) /* dB_e += scaling * g_e^T u_e  (og, r) */
                FN(gemm_rm)(CblasTrans, CblasNoTrans, og, r, rows, scaling, g_e, ldg, u + i0 * ldu + e * r,
                            ldu, 1, db + e * og * G->lddb, G->lddb);
            if (gb) /* gb_e = g_e B_e  (rows, r) */
                FN(gemm_rm)(CblasNoTrans, CblasNoTrans, rows, r, og, 1, g_e, ldg, b + e * og * M->ldb,
                            M->ldb, 0, gb + e * r, rank);
        }
        if (gb) /* dx += scaling * drop'(gb A);  dA += scaling * gb^T drop(x) */
            FN(branch_down_backward)(rows, in, rank, scaling, gb, rank, (const real *)M->x + i0 * M->ldx,
                                     M->ldx, M->mask ? M->mask + i0 * in : NULL, (real)M->keep_scale, M->a,
                                     M->lda, dx ? dx + i0 * G->lddx : NULL, G->lddx, da, G->ldda, scratch);
    }
    free(gb);
    free(scratch);
    return 0;
}

void FN(lorac_merged_linear_merge)(const LoraMergedLinear *M, double alpha, real *w, ptrdiff_t ldw)
{
    const ptrdiff_t r = M->r, og = M->out / M->groups;
    const real *a = M->a, *b = M->b;
    if (!FN(merged_has_adapter)(M))
        return;
    for (ptrdiff_t e = 0; e < M->n_enabled; e++) {
        /* block enabled[e]: rows of W0 (out, in), columns of W0 (in, out) */
        const ptrdiff_t offset = M->w_in_out ? M->enabled[e] * og : M->enabled[e] * og * ldw;
        FN(lorac_linear_merge)(og, M->in, r, M->w_in_out, alpha, a + e * r * M->lda, M->lda,
                               b + e * og * M->ldb, M->ldb, w + offset, ldw);
    }
}
