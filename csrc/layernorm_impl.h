/* layernorm_impl.h - LayerNorm forward and backward (template).
 * Shapes and rules: see layernorm_decl.h. */

void FN(lorac_layernorm_forward)(ptrdiff_t n, ptrdiff_t d, double eps, const real *x, ptrdiff_t ldx,
                                 const real *weight, const real *bias, real *y, ptrdiff_t ldy,
                                 real *mean, real *rstd)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        const real *xi = x + i * ldx;
        real *yi = y + i * ldy;
        double sum = 0, sq = 0;
        for (ptrdiff_t j = 0; j < d; j++)
            sum += (double)xi[j];
        const double mu = d > 0 ? sum / (double)d : 0.0;
        for (ptrdiff_t j = 0; j < d; j++) { /* two passes: no cancellation */
            const double c = (double)xi[j] - mu;
            sq += c * c;
        }
        const double var = d > 0 ? sq / (double)d : 0.0;
        const real m = (real)mu, rs = (real)(1.0 / sqrt(var + eps));
        mean[i] = m;
        rstd[i] = rs;
        for (ptrdiff_t j = 0; j < d; j++) {
            real v = (xi[j] - m) * rs;
            if (weight)
                v *= weight[j];
            if (bias)
                v += bias[j];
            yi[j] = v;
        }
    }
}

int FN(lorac_layernorm_backward)(ptrdiff_t n, ptrdiff_t d, const real *g, ptrdiff_t ldg, const real *x,
                                 ptrdiff_t ldx, const real *weight, const real *mean, const real *rstd,
                                 real *dx, ptrdiff_t lddx, real *dweight, real *dbias)
{
    double *acc_w = NULL, *acc_b = NULL;
    if (d > 0 && (dweight || dbias)) { /* column sums over the rows, in double */
        acc_w = calloc((size_t)d * 2, sizeof(double));
        if (!acc_w)
            return -1;
        acc_b = acc_w + d;
    }
    for (ptrdiff_t i = 0; i < n; i++) {
        const real *gi = g + i * ldg, *xi = x + i * ldx;
        const real m = mean[i], rs = rstd[i];
        double sum_gw = 0, sum_gw_xhat = 0;
        for (ptrdiff_t j = 0; j < d; j++) {
            const real xhat = (xi[j] - m) * rs;
            const real gw = weight ? gi[j] * weight[j] : gi[j];
            sum_gw += (double)gw;
            sum_gw_xhat += (double)(gw * xhat);
            if (acc_w) {
                acc_w[j] += (double)(gi[j] * xhat);
                acc_b[j] += (double)gi[j];
            }
        }
        if (!dx)
            continue;
        const real mean_gw = (real)(sum_gw / (double)d), mean_gw_xhat = (real)(sum_gw_xhat / (double)d);
        real *dxi = dx + i * lddx;
        for (ptrdiff_t j = 0; j < d; j++) {
            const real xhat = (xi[j] - m) * rs;
            const real gw = weight ? gi[j] * weight[j] : gi[j];
            dxi[j] = rs * (gw - mean_gw - xhat * mean_gw_xhat);
        }
    }
    for (ptrdiff_t j = 0; acc_w && j < d; j++) {
        if (dweight)
            dweight[j] += (real)acc_w[j];
        if (dbias)
            dbias[j] += (real)acc_b[j];
    }
    free(acc_w);
    return 0;
}
