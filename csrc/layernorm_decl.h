/* layernorm_decl.h - declarations of the LayerNorm kernels (template, included
 * once per dtype by layernorm.h; see it for the conventions). */

/* x (n, d), weight (d) or NULL, bias (d) or NULL -> y (n, d), mean (n), rstd (n)
 *   mean_i = sum_j x_ij / d,   rstd_i = 1 / sqrt(sum_j (x_ij - mean_i)^2 / d + eps)
 *   y_ij = (x_ij - mean_i) rstd_i weight_j + bias_j
 * mean and rstd are kept for backward. */
void FN(lorac_layernorm_forward)(ptrdiff_t n, ptrdiff_t d, double eps, const real *x, ptrdiff_t ldx,
                                 const real *weight, const real *bias, real *y, ptrdiff_t ldy,
                                 real *mean, real *rstd);

/* g (n, d), x (n, d), weight (d) or NULL, mean (n), rstd (n) from forward ->
 *   dx (n, d) = rstd (gw - mean_j(gw) - xhat mean_j(gw xhat))  written, or NULL
 *   dweight (d) += sum_i g xhat,   dbias (d) += sum_i g        or NULL (frozen)
 * with xhat = (x - mean) rstd and gw = g weight (g without weight).
 * Returns 0, or -1 when scratch memory cannot be allocated (nothing written). */
int FN(lorac_layernorm_backward)(ptrdiff_t n, ptrdiff_t d, const real *g, ptrdiff_t ldg, const real *x,
                                 ptrdiff_t ldx, const real *weight, const real *mean, const real *rstd,
                                 real *dx, ptrdiff_t lddx, real *dweight, real *dbias);
