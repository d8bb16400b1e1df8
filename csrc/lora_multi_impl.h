/* lora_multi_impl.h - mixed-batch LoRA forward for Linear / MergedLinear and
 * Embedding (template).  Shapes and conventions: see lora_multi_decl.h and
 * lora_multi.h. */

#ifndef LORAC_MULTI_IMPL_COMMON
#define LORAC_MULTI_IMPL_COMMON
/* ids (n) in [-1, k) -> start (k + 1), order (n): the rows of adapter j are
 * order[start[j] .. start[j + 1]), ascending (a stable counting sort); rows
 * with id -1 are left out. */
static void multi_group_rows(ptrdiff_t n, ptrdiff_t k, const ptrdiff_t *ids, ptrdiff_t *start,
                             ptrdiff_t *order)
{
    for (ptrdiff_t j = 0; j <= k; j++)
        start[j] = 0;
    for (ptrdiff_t i = 0; i < n; i++)
        if (ids[i] >= 0)
            start[ids[i] + 1]++;
    for (ptrdiff_t j = 0; j < k; j++)
        start[j + 1] += start[j];
    /* fill with a moving cursor per adapter, then shift the cursors back */
    for (ptrdiff_t i = 0; i < n; i++)
        if (ids[i] >= 0)
            order[start[ids[i]]++] = i;
    for (ptrdiff_t j = k; j > 0; j--)
        start[j] = start[j - 1];
    start[0] = 0;
}

/* rows (m): are they m consecutive batch rows? */
static int multi_is_run(const ptrdiff_t *rows, ptrdiff_t m)
{
    for (ptrdiff_t i = 1; i < m; i++)
        if (rows[i] != rows[0] + i)
            return 0;
    return 1;
}
#endif

/* Scratch of one mixed-batch call, allocated before anything is written. */
typedef struct {
    ptrdiff_t *start, *order;
    real *xs, *u, *ys;
} FN(MultiScratch);

static void FN(multi_scratch_free)(FN(MultiScratch) *s)
{
    free(s->start);
    free(s->order);
    free(s->xs);
    free(s->u);
    free(s->ys);
}

/* start (k + 1), order (n), xs (block, in), u (block, u_cols), ys (block, out). */
static int FN(multi_scratch_alloc)(FN(MultiScratch) *s, ptrdiff_t n, ptrdiff_t k, ptrdiff_t block,
                                   ptrdiff_t in, ptrdiff_t u_cols, ptrdiff_t out)
{
    s->start = malloc(sizeof(ptrdiff_t) * (size_t)(k + 1));
    s->order = malloc(sizeof(ptrdiff_t) * (size_t)(n > 0 ? n : 1));
    s->xs = malloc(sizeof(real) * (size_t)(block * in > 0 ? block * in : 1));
    s->u = malloc(sizeof(real) * (size_t)(block * u_cols > 0 ? block * u_cols : 1));
    s->ys = malloc(sizeof(real) * (size_t)(block * out > 0 ? block * out : 1));
    if (!s->start || !s->order || !s->xs || !s->u || !s->ys) {
        FN(multi_scratch_free)(s);
        return -1;
    }
    return 0;
}

/* ys (m, out) -> y[rows[i], cols of the enabled blocks] += ys[i, same cols] */
static void FN(multi_scatter_add)(ptrdiff_t m, const ptrdiff_t *rows, ptrdiff_t og, ptrdiff_t n_enabled,
                                  const ptrdiff_t *enabled, const real *ys, ptrdiff_t ldys, real *y,
                                  ptrdiff_t ldy)
{
    for (ptrdiff_t i = 0; i < m; i++) {
        real *y_row = y + rows[i] * ldy;
        const real *ys_row = ys + i * ldys;
        for (ptrdiff_t e = 0; e < n_enabled; e++) {
            const ptrdiff_t c0 = enabled[e] * og;
            for (ptrdiff_t j = c0; j < c0 + og; j++)
                y_row[j] += ys_row[j];
        }
    }
}

/* One block of m rows (batch rows `rows`) of adapter `ad`:
 * x_g (m, in), A (E r, in) -> u (m, E r);  per enabled group e:
 * y[rows, block enabled[e]] += s * u_e B_e^T  (m, og). */
static void FN(multi_linear_block)(const LoraMultiLinear *M, const LoraAdapterRef *ad, const ptrdiff_t *rows,
                                   ptrdiff_t m, FN(MultiScratch) *s, real *y, ptrdiff_t ldy)
{
    const ptrdiff_t in = M->in, out = M->out, og = M->out / M->groups, r = ad->r;
    const ptrdiff_t ucols = M->n_enabled * r;
    const real *x = M->x, *a = ad->a, *b = ad->b;
    const real scaling = (real)ad->scaling;
    if (m <= LORAC_MULTI_ROW_GEMV_MAX) {
        /* a few rows: per row, shrink and expand as GEMVs straight from x's row
         * into y's row (GEMM would pack A and B for a handful of rows) */
        for (ptrdiff_t i = 0; i < m; i++) {
            const real *x_row = x + rows[i] * M->ldx;
            real *y_row = y + rows[i] * ldy;
            FN(gemm_rm)(CblasNoTrans, CblasTrans, 1, ucols, in, 1, x_row, M->ldx, a, ad->lda, 0, s->u, ucols);
            for (ptrdiff_t e = 0; e < M->n_enabled; e++)
                FN(gemm_rm)(CblasNoTrans, CblasTrans, 1, og, r, scaling, s->u + e * r, ucols, b + e * og * ad->ldb,
                            ad->ldb, 1, y_row + M->enabled[e] * og, ldy);
        }
        return;
    }
    const int run = M->contiguous_runs && multi_is_run(rows, m);
    const real *xg = x + rows[0] * M->ldx;
    ptrdiff_t ldxg = M->ldx;
    if (!run) { /* gather: xs (m, in) */
        for (ptrdiff_t i = 0; i < m; i++)
            memcpy(s->xs + i * in, x + rows[i] * M->ldx, sizeof(real) * (size_t)in);
        xg = s->xs;
        ldxg = in > 0 ? in : 1;
    }
    /* shrink: u = x_g A^T  (m, E r) */
    FN(gemm_rm)(CblasNoTrans, CblasTrans, m, ucols, in, 1, xg, ldxg, a, ad->lda, 0, s->u, ucols);
    /* expand: s * u_e B_e^T into block enabled[e] of y's rows (in place) or of ys */
    for (ptrdiff_t e = 0; e < M->n_enabled; e++) {
        const ptrdiff_t col = M->enabled[e] * og;
        const real *be = b + e * og * ad->ldb;
        if (run)
            FN(gemm_rm)(CblasNoTrans, CblasTrans, m, og, r, scaling, s->u + e * r, ucols, be, ad->ldb, 1,
                        y + rows[0] * ldy + col, ldy);
        else
            FN(gemm_rm)(CblasNoTrans, CblasTrans, m, og, r, scaling, s->u + e * r, ucols, be, ad->ldb, 0,
                        s->ys + col, out);
    }
    if (!run)
        FN(multi_scatter_add)(m, rows, og, M->n_enabled, M->enabled, s->ys, out, y, ldy);
}

int FN(lorac_multi_linear_forward)(const LoraMultiLinear *M, real *y, ptrdiff_t ldy)
{
    const ptrdiff_t n = M->n, k = M->n_adapters;
    const ptrdiff_t block = n < LORAC_MULTI_BLOCK_ROWS ? n : LORAC_MULTI_BLOCK_ROWS;
    ptrdiff_t rmax = 0;
    for (ptrdiff_t j = 0; j < k; j++)
        rmax = M->adapters[j].r > rmax ? M->adapters[j].r : rmax;
    FN(MultiScratch) s = {0};
    const int lora = n > 0 && k > 0 && rmax > 0 && M->n_enabled > 0;
    if (lora && FN(multi_scratch_alloc)(&s, n, k, block, M->in, M->n_enabled * rmax, M->out) < 0)
        return -1;

    if (M->with_base) {
        /* y = x W0^T + bias over the whole batch: the Linear kernel without adapter */
        LoraLinear base = {
            .n = n, .in = M->in, .out = M->out, .r = 0, .w_in_out = M->w_in_out, .scaling = 0,
            .keep_scale = 1, .x = M->x, .ldx = M->ldx, .w = M->w, .ldw = M->ldw, .bias = M->bias,
            .a = NULL, .lda = 1, .b = NULL, .ldb = 1, .mask = NULL,
        };
        FN(lorac_linear_forward)(&base, NULL, 1, y, ldy); /* no adapter: allocates nothing, cannot fail */
    } else {
        for (ptrdiff_t i = 0; i < n; i++)
            for (ptrdiff_t j = 0; j < M->out; j++)
                y[i * ldy + j] = 0;
    }
    if (!lora)
        return 0;

    multi_group_rows(n, k, M->ids, s.start, s.order);
    for (ptrdiff_t j = 0; j < k; j++) {
        const LoraAdapterRef *ad = &M->adapters[j];
        if (ad->r == 0)
            continue;
        for (ptrdiff_t i0 = s.start[j]; i0 < s.start[j + 1]; i0 += block) {
            const ptrdiff_t m = s.start[j + 1] - i0 < block ? s.start[j + 1] - i0 : block;
            FN(multi_linear_block)(M, ad, s.order + i0, m, &s, y, ldy);
        }
    }
    FN(multi_scratch_free)(&s);
    return 0;
}

int FN(lorac_multi_embedding_forward)(const LoraMultiEmbedding *M, real *y, ptrdiff_t ldy)
{
    const ptrdiff_t n = M->n, k = M->n_adapters, dim = M->dim;
    const ptrdiff_t block = n < LORAC_MULTI_BLOCK_ROWS ? n : LORAC_MULTI_BLOCK_ROWS;
    const real *w = M->w;
    ptrdiff_t rmax = 0;
    for (ptrdiff_t j = 0; j < k; j++)
        rmax = M->adapters[j].r > rmax ? M->adapters[j].r : rmax;
    FN(MultiScratch) s = {0};
    const int lora = n > 0 && k > 0 && rmax > 0;
    if (lora && FN(multi_scratch_alloc)(&s, n, k, block, 0, rmax, dim) < 0)
        return -1;

    /* y[i] = W0[idx[i]]  (n, dim) */
    for (ptrdiff_t i = 0; i < n && dim > 0; i++)
        memcpy(y + i * ldy, w + M->idx[i] * M->ldw, sizeof(real) * (size_t)dim);
    if (!lora)
        return 0;

    multi_group_rows(n, k, M->ids, s.start, s.order);
    const ptrdiff_t enabled0 = 0;
    for (ptrdiff_t j = 0; j < k; j++) {
        const LoraAdapterRef *ad = &M->adapters[j];
        const real *a = ad->a, *b = ad->b;
        const ptrdiff_t r = ad->r;
        if (r == 0)
            continue;
        for (ptrdiff_t i0 = s.start[j]; i0 < s.start[j + 1]; i0 += block) {
            const ptrdiff_t m = s.start[j + 1] - i0 < block ? s.start[j + 1] - i0 : block;
            const ptrdiff_t *rows = s.order + i0;
            /* u[i, c] = A[c, idx[rows[i]]]  (m, r) */
            for (ptrdiff_t i = 0; i < m; i++)
                for (ptrdiff_t c = 0; c < r; c++)
                    s.u[i * r + c] = a[c * ad->lda + M->idx[rows[i]]];
            /* y[rows] += s * u B^T  (m, dim): in place for consecutive rows, else via ys */
            if (multi_is_run(rows, m)) {
                FN(gemm_rm)(CblasNoTrans, CblasTrans, m, dim, r, (real)ad->scaling, s.u, r, b, ad->ldb, 1,
                            y + rows[0] * ldy, ldy);
            } else {
                FN(gemm_rm)(CblasNoTrans, CblasTrans, m, dim, r, (real)ad->scaling, s.u, r, b, ad->ldb, 0,
                            s.ys, dim > 0 ? dim : 1);
                FN(multi_scatter_add)(m, rows, dim, 1, &enabled0, s.ys, dim > 0 ? dim : 1, y, ldy);
            }
        }
    }
    FN(multi_scratch_free)(&s);
    return 0;
}
