/* optim_decl.h - declarations of the optimizer kernels (template, included
 * once per dtype by optim.h; see it for the conventions). */

/* param (n), grad (n), buf (n) or NULL -> param (n), buf (n) updated in place.
 *   d = grad (+ weight_decay * param);  with momentum (buf != NULL):
 *   buf = d on the first step, else momentum * buf + (1 - dampening) * d;
 *   d = d + momentum * buf (nesterov) or buf;   param -= lr * d.
 * buf must be NULL exactly when momentum == 0. */
void FN(lorac_sgd_step)(ptrdiff_t n, real *param, const real *grad, real *buf, const SgdHyper *h);

/* param (n), grad (n), exp_avg (n), exp_avg_sq (n), max_exp_avg_sq (n) or NULL
 * -> all but grad updated in place (torch.optim.Adam / AdamW):
 *   AdamW: param *= 1 - lr * wd;      Adam: g = grad + wd * param
 *   m = lerp(m, g, 1 - beta1);        v = beta2 * v + (1 - beta2) g^2
 *   vmax = max(vmax, v) (amsgrad);    denom = sqrt(v or vmax) / sqrt(1 - beta2^t) + eps
 *   param -= lr / (1 - beta1^t) * m / denom.
 * max_exp_avg_sq is read only when h->amsgrad. */
void FN(lorac_adam_step)(ptrdiff_t n, real *param, const real *grad, real *exp_avg, real *exp_avg_sq,
                         real *max_exp_avg_sq, const AdamHyper *h);
