/* loss_decl.h - declarations of the loss kernels (template, included once per
 * dtype by loss.h; see it for the conventions). */

/* logits (n, c), target (n) -> loss (n), lse (n) double, *total
 *   lse_i  = log sum_j exp(logits_ij)          (max-shifted: stable; kept in double
 *                                               so lse_i - logits_ij loses nothing)
 *   loss_i = lse_i - logits_i,target_i         (= -log_softmax at the target)
 * Rows whose target equals ignore_index get loss_i = 0 and lse_i = 0 and do
 * not count.  *total is the sum of the loss_i, in double.
 * Returns the number of rows counted, or -(1 + i) for the first row i whose
 * target is neither ignore_index nor in [0, c) (outputs then unspecified). */
ptrdiff_t FN(lorac_cross_entropy_forward)(ptrdiff_t n, ptrdiff_t c, const real *logits, ptrdiff_t ld,
                                          const int64_t *target, int64_t ignore_index, real *loss,
                                          double *lse, double *total);

/* logits (n, c), target (n), lse (n) double from forward, grad (n) or NULL
 * -> dlogits (n, c) = w_i * (softmax(logits_i) - onehot(target_i)),
 *    w_i = scale * (grad ? grad_i : 1); rows with target == ignore_index are 0.
 * Targets must have passed forward's range check. */
void FN(lorac_cross_entropy_backward)(ptrdiff_t n, ptrdiff_t c, const real *logits, ptrdiff_t ld,
                                      const int64_t *target, int64_t ignore_index, const double *lse,
                                      double scale, const real *grad, real *dlogits, ptrdiff_t ldd);

/* pred (n), target (n) -> out (n) = (pred - target)^2 when out != NULL;
 * returns the sum of the squares in double. */
double FN(lorac_mse_forward)(ptrdiff_t n, const real *pred, const real *target, real *out);

/* pred (n), target (n), grad (n) or NULL
 * -> dpred (n) = scale * 2 (pred - target) * (grad ? grad_i : 1). */
void FN(lorac_mse_backward)(ptrdiff_t n, const real *pred, const real *target, double scale,
                            const real *grad, real *dpred);
