/* lora_moe_impl.h - MoLoRA forward and backward (template).  Shapes and math:
 * see lora_moe.h and lora_moe_decl.h.  The base layer is the Linear kernel
 * without adapter; the adapter input side (with dropout) comes from
 * lora_branch_impl.h; the router, gating and their gradients live here. */

/* One row: p (E) holds the logits z on entry and softmax(z) on return;
 * gate (E) = softmax over the top k logits (ties to the lower index; chosen
 * by p, which orders like z), 0 elsewhere.  NaN logits give NaN. */
static void FN(moe_row_gates)(ptrdiff_t experts, ptrdiff_t top_k, real *p, real *gate)
{
    real mx = -(real)INFINITY;
    for (ptrdiff_t e = 0; e < experts; e++)
        if (p[e] > mx || p[e] != p[e])
            mx = p[e];
    double sum = 0;
    for (ptrdiff_t e = 0; e < experts; e++)
        sum += (double)(p[e] = FN(r_exp)(p[e] - mx));
    for (ptrdiff_t e = 0; e < experts; e++)
        p[e] = (real)((double)p[e] / sum);
    if (top_k >= experts) {
        for (ptrdiff_t e = 0; e < experts; e++)
            gate[e] = p[e];
        return;
    }
    /* gate[] first flags the chosen experts (1), then holds their gates */
    for (ptrdiff_t e = 0; e < experts; e++)
        gate[e] = 0;
    double chosen = 0;
    for (ptrdiff_t t = 0; t < top_k; t++) {
        ptrdiff_t best = -1;
        for (ptrdiff_t e = 0; e < experts; e++)
            if (gate[e] == 0 && (best < 0 || p[e] > p[best]))
                best = e;
        gate[best] = 1;
        chosen += (double)p[best];
    }
    for (ptrdiff_t e = 0; e < experts; e++)
        gate[e] = gate[e] != 0 ? (real)((double)p[e] / chosen) : (real)0;
}

/* u (n, r), gates (n, E) -> h (n, r) = u * expand(gates), rb = r / E per block. */
static void FN(moe_gate_rows)(ptrdiff_t n, ptrdiff_t r, ptrdiff_t experts, const real *u, const real *gates,
                              real *h)
{
    const ptrdiff_t rb = r / experts;
    for (ptrdiff_t i = 0; i < n; i++)
        for (ptrdiff_t j = 0; j < r; j++)
            h[i * r + j] = u[i * r + j] * gates[i * experts + j / rb];
}

/* The Linear view of the base layer: same x, W0 and bias, no adapter. */
static LoraLinear FN(moe_base)(const LoraMoe *L)
{
    LoraLinear base = {
        .n = L->n, .in = L->in, .out = L->out, .r = 0, .w_in_out = 0, .scaling = 0, .keep_scale = 1,
        .x = L->x, .ldx = L->ldx, .w = L->w, .ldw = L->ldw, .bias = L->bias,
        .a = NULL, .lda = 1, .b = NULL, .ldb = 1, .mask = NULL,
    };
    return base;
}

int FN(lorac_moe_forward)(const LoraMoe *L, real *u, real *probs, real *gates, real *y, ptrdiff_t ldy)
{
    const ptrdiff_t n = L->n, in = L->in, r = L->r, experts = L->experts;
    const real *x = L->x;
    real *h = NULL, *scratch = NULL;
    if (n > 0 && r > 0 && !(h = malloc(sizeof(real) * (size_t)n * (size_t)r)))
        return -1;
    if (L->mask && n > 0 && in > 0 &&
        !(scratch = malloc(sizeof(real) * (size_t)LORAC_BRANCH_BLOCK_ROWS * (size_t)in))) {
        free(h);
        return -1;
    }

    /* y = x W0^T + bias  (n, out) */
    const LoraLinear base = FN(moe_base)(L);
    FN(lorac_linear_forward)(&base, NULL, 1, y, ldy);
    /* u = drop(x) A^T  (n, r) */
    FN(branch_down)(n, in, r, x, L->ldx, L->mask, (real)L->keep_scale, L->a, L->lda, u, r > 0 ? r : 1,
                    scratch);
    free(scratch);
    /* logits z = x R^T  (n, E), written into probs, then probs and gates row by row */
    FN(gemm_rm)(CblasNoTrans, CblasTrans, n, experts, in, 1, x, L->ldx, L->router, L->ldrouter, 0, probs,
                experts);
    for (ptrdiff_t i = 0; i < n; i++)
        FN(moe_row_gates)(experts, L->top_k, probs + i * experts, gates + i * experts);
    if (h) {
        /* h = u * expand(gates);  y += scaling * h B^T */
        FN(moe_gate_rows)(n, r, experts, u, gates, h);
        FN(gemm_rm)(CblasNoTrans, CblasTrans, n, L->out, r, (real)L->scaling, h, r, L->b, L->ldb, 1, y, ldy);
        free(h);
    }
    return 0;
}

int FN(lorac_moe_backward)(const LoraMoe *L, const real *u, const real *probs, const real *gates,
                           const double *aux, const real *g, ptrdiff_t ldg, const LoraMoeGrads *G)
{
    const ptrdiff_t n = L->n, in = L->in, out = L->out, r = L->r, experts = L->experts;
    const ptrdiff_t rb = r > 0 ? r / experts : 1;
    const real scaling = (real)L->scaling;
    const real *x = L->x;
    real *dx = G->lin.dx, *da = G->lin.da, *db = G->lin.db, *drouter = G->drouter;
    const int need_gh = n > 0 && r > 0 && (dx || da || drouter);
    const int need_dz = n > 0 && (dx || drouter);
    const int need_drop = need_gh && L->mask && in > 0 && (dx || da);
    real *tmp = NULL, *dz = NULL, *scratch = NULL;

    /* Allocate every scratch first: on failure nothing has been written. */
    if ((need_gh || (db && n > 0 && r > 0)) && !(tmp = malloc(sizeof(real) * (size_t)n * (size_t)r)))
        goto nomem;
    if (need_dz && !(dz = malloc(sizeof(real) * (size_t)n * (size_t)experts)))
        goto nomem;
    if (need_drop && !(scratch = malloc(sizeof(real) * (size_t)LORAC_BRANCH_BLOCK_ROWS * (size_t)in)))
        goto nomem;
    /* dx = g W0, dW0, dbias: the Linear kernel without adapter (allocates before it writes) */
    const LoraLinear base = FN(moe_base)(L);
    LoraLinearGrads base_grads = G->lin; /* the adapter's gradients are this kernel's own */
    base_grads.da = NULL, base_grads.ldda = 1, base_grads.db = NULL, base_grads.lddb = 1;
    if (FN(lorac_linear_backward)(&base, NULL, 1, g, ldg, &base_grads) != 0)
        goto nomem;

    if (db && tmp) { /* db += scaling * g^T h,  h = u * expand(gates)  (out, r) */
        FN(moe_gate_rows)(n, r, experts, u, gates, tmp);
        FN(gemm_rm)(CblasTrans, CblasNoTrans, out, r, n, scaling, g, ldg, tmp, r, 1, db, G->lin.lddb);
    }
    if (need_gh) /* gh = g B  (n, r) */
        FN(gemm_rm)(CblasNoTrans, CblasNoTrans, n, r, out, 1, g, ldg, L->b, L->ldb, 0, tmp, r);
    if (need_dz) {
        for (ptrdiff_t i = 0; i < n; i++) {
            const real *gate = gates + i * experts, *p = probs + i * experts;
            real *dzi = dz + i * experts;
            /* dgate[e] = scaling * sum_{j in block e} gh[i, j] u[i, j] */
            for (ptrdiff_t e = 0; e < experts; e++) {
                double acc = 0;
                for (ptrdiff_t j = e * rb; j < (e + 1) * rb && j < r; j++)
                    acc += (double)tmp[i * r + j] * (double)u[i * r + j];
                dzi[e] = (real)((double)scaling * acc);
            }
            /* softmax (over the chosen experts) backward */
            double dot = 0;
            for (ptrdiff_t e = 0; e < experts; e++)
                dot += (double)gate[e] * (double)dzi[e];
            for (ptrdiff_t e = 0; e < experts; e++)
                dzi[e] = (real)((double)gate[e] * ((double)dzi[e] - dot));
            if (aux) { /* + the auxiliary loss through the full softmax */
                double paux = 0;
                for (ptrdiff_t e = 0; e < experts; e++)
                    paux += (double)p[e] * aux[e];
                for (ptrdiff_t e = 0; e < experts; e++)
                    dzi[e] += (real)((double)p[e] * (aux[e] - paux));
            }
        }
        if (drouter) /* drouter += dz^T x  (E, in) */
            FN(gemm_rm)(CblasTrans, CblasNoTrans, experts, in, n, 1, dz, experts, x, L->ldx, 1, drouter,
                        G->lddrouter);
        if (dx) /* dx += dz R  (n, in) */
            FN(gemm_rm)(CblasNoTrans, CblasNoTrans, n, in, experts, 1, dz, experts, L->router, L->ldrouter, 1,
                        dx, G->lin.lddx);
    }
    if (need_gh && (dx || da)) {
        /* du = scaling * gh * expand(gates), in place */
        for (ptrdiff_t i = 0; i < n; i++)
            for (ptrdiff_t j = 0; j < r; j++)
                tmp[i * r + j] *= scaling * gates[i * experts + j / rb];
        /* dx += drop'(du A);  da += du^T drop(x) */
        FN(branch_down_backward)(n, in, r, 1, tmp, r, x, L->ldx, L->mask, (real)L->keep_scale, L->a, L->lda,
                                 dx, G->lin.lddx, da, G->lin.ldda, scratch);
    }
    free(tmp);
    free(dz);
    free(scratch);
    return 0;
nomem:
    free(tmp);
    free(dz);
    free(scratch);
    return -1;
}
