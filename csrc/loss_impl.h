/* loss_impl.h - cross-entropy and MSE, forward and backward (template).
 * Shapes and rules: see loss_decl.h. */

/* row (c) -> its maximum (NaN if any element is NaN; -inf when c == 0). */
static real FN(row_max)(ptrdiff_t c, const real *row)
{
    real mx = -(real)INFINITY;
    for (ptrdiff_t j = 0; j < c; j++)
        if (row[j] > mx || row[j] != row[j])
            mx = row[j];
    return mx;
}

/* row (c) with maximum mx -> log sum_j exp(row_j - mx), in [0, log c]. */
static double FN(log_sum_exp_shifted)(ptrdiff_t c, const real *row, real mx)
{
    double sum = 0;
    for (ptrdiff_t j = 0; j < c; j++)
        sum += (double)FN(r_exp)(row[j] - mx);
    return log(sum);
}

ptrdiff_t FN(lorac_cross_entropy_forward)(ptrdiff_t n, ptrdiff_t c, const real *logits, ptrdiff_t ld,
                                          const int64_t *target, int64_t ignore_index, real *loss,
                                          double *lse, double *total)
{
    ptrdiff_t count = 0;
    double sum = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        const int64_t t = target[i];
        if (t == ignore_index) {
            loss[i] = 0;
            lse[i] = 0;
            continue;
        }
        if (t < 0 || t >= (int64_t)c)
            return -(1 + i);
        const real *row = logits + i * ld;
        const real mx = FN(row_max)(c, row);
        /* NaN stays NaN; a row of -inf gives -inf; +inf gives +inf (then NaN loss) */
        lse[i] = isfinite(mx) ? (double)mx + FN(log_sum_exp_shifted)(c, row, mx) : (double)mx;
        const double li = lse[i] - (double)row[t];
        loss[i] = (real)li;
        sum += li;
        count++;
    }
    *total = sum;
    return count;
}

void FN(lorac_cross_entropy_backward)(ptrdiff_t n, ptrdiff_t c, const real *logits, ptrdiff_t ld,
                                      const int64_t *target, int64_t ignore_index, const double *lse,
                                      double scale, const real *grad, real *dlogits, ptrdiff_t ldd)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        real *out = dlogits + i * ldd;
        const int64_t t = target[i];
        if (t == ignore_index) {
            for (ptrdiff_t j = 0; j < c; j++)
                out[j] = 0;
            continue;
        }
        const real *row = logits + i * ld;
        /* softmax_j = exp((row_j - mx) - (lse - mx)): both differences are small
         * and exact enough in the row's precision, unlike row_j - lse. */
        const real mx = FN(row_max)(c, row);
        const real offset = (real)(lse[i] - (double)mx);
        const real w = (real)(grad ? scale * (double)grad[i] : scale);
        for (ptrdiff_t j = 0; j < c; j++)
            out[j] = w * FN(r_exp)((row[j] - mx) - offset);
        out[t] -= w;
    }
}

double FN(lorac_mse_forward)(ptrdiff_t n, const real *pred, const real *target, real *out)
{
    double sum = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        const real d = pred[i] - target[i], sq = d * d;
        if (out)
            out[i] = sq;
        sum += (double)sq;
    }
    return sum;
}

void FN(lorac_mse_backward)(ptrdiff_t n, const real *pred, const real *target, double scale,
                            const real *grad, real *dpred)
{
    const real two_scale = (real)(2.0 * scale);
    for (ptrdiff_t i = 0; i < n; i++) {
        const real d = pred[i] - target[i];
        dpred[i] = grad ? (real)(2.0 * scale * (double)grad[i]) * d : two_scale * d;
    }
}
