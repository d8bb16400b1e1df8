/* lora_embedding_impl.h - LoRA Embedding forward and backward (template).
 * Shapes and conventions: see lora_embedding_decl.h and lora_embedding.h. */

void FN(lorac_embedding_forward)(const LoraEmbedding *E, real *u, ptrdiff_t ldu, real *y,
                                 ptrdiff_t ldy)
{
    const ptrdiff_t n = E->n, dim = E->dim, r = E->r;
    const ptrdiff_t *idx = E->idx;
    const real *w = E->w, *a = E->a, *b = E->b;

    /* y[i] = W0[idx[i]]  (n, dim) */
    for (ptrdiff_t i = 0; i < n && dim > 0; i++)
        memcpy(y + i * ldy, w + idx[i] * E->ldw, sizeof(real) * (size_t)dim);
    if (a == NULL || r == 0)
        return;

    /* u[i, k] = A[k, idx[i]]  (n, r) */
    for (ptrdiff_t i = 0; i < n; i++)
        for (ptrdiff_t k = 0; k < r; k++)
            u[i * ldu + k] = a[k * E->lda + idx[i]];
    /* y += scaling * u B^T */
    FN(gemm_rm)(CblasNoTrans, CblasTrans, n, dim, r, (real)E->scaling, u, ldu, b, E->ldb, 1, y, ldy);
}

int FN(lorac_embedding_backward)(const LoraEmbedding *E, const real *u, ptrdiff_t ldu,
                                 const real *g, ptrdiff_t ldg, const LoraEmbeddingGrads *G)
{
    const ptrdiff_t n = E->n, dim = E->dim, r = E->r, pad = E->padding_idx;
    const ptrdiff_t *idx = E->idx;
    const real *b = E->b;
    const real scaling = (real)E->scaling;
    real *dw = G->dw, *da = G->da, *db = G->db;
    const int lora = E->a != NULL && r > 0;
    real *gb = NULL;

    /* Allocate first: on failure nothing has been written. */
    if (lora && da && n > 0) {
        gb = malloc(sizeof(real) * (size_t)n * (size_t)r);
        if (!gb)
            return -1;
    }

    if (dw) { /* dW0[idx[i]] += g[i]  (num, dim) */
        for (ptrdiff_t i = 0; i < n; i++) {
            if (idx[i] == pad)
                continue;
            real *dw_row = dw + idx[i] * G->lddw;
            const real *g_row = g + i * ldg;
            for (ptrdiff_t j = 0; j < dim; j++)
                dw_row[j] += g_row[j];
        }
    }
    if (lora && db) /* dB += scaling * g^T u  (dim, r) */
        FN(gemm_rm)(CblasTrans, CblasNoTrans, dim, r, n, scaling, g, ldg, u, ldu, 1, db, G->lddb);
    if (gb) {
        /* gb = g B  (n, r);  dA[:, idx[i]] += scaling * gb[i] */
        FN(gemm_rm)(CblasNoTrans, CblasNoTrans, n, r, dim, 1, g, ldg, b, E->ldb, 0, gb, r);
        for (ptrdiff_t i = 0; i < n; i++) {
            if (idx[i] == pad)
                continue;
            real *da_col = da + idx[i];
            for (ptrdiff_t k = 0; k < r; k++)
                da_col[k * G->ldda] += scaling * gb[i * r + k];
        }
        free(gb);
    }
    return 0;
}
