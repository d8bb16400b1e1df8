/* optim_impl.h - fused SGD and Adam/AdamW updates (template).
 * Shapes and rules: see optim_decl.h. */

/* torch's lerp: start + weight * (end - start), evaluated from the nearer end. */
static inline real FN(lerp)(real start, real end, real weight)
{
    return weight < (real)0.5 ? start + weight * (end - start)
                              : end - (end - start) * ((real)1 - weight);
}

void FN(lorac_sgd_step)(ptrdiff_t n, real *param, const real *grad, real *buf, const SgdHyper *h)
{
    const real lr = (real)h->lr, wd = (real)h->weight_decay, mom = (real)h->momentum;
    const real keep = (real)(1.0 - h->dampening);
    const int decay = h->weight_decay != 0, init = h->init_buffer, nesterov = h->nesterov;
    const real sign = h->maximize ? (real)-1 : (real)1;
    for (ptrdiff_t i = 0; i < n; i++) {
        real d = sign * grad[i];
        if (decay)
            d += wd * param[i];
        if (buf) {
            const real bi = init ? d : mom * buf[i] + keep * d;
            buf[i] = bi;
            d = nesterov ? d + mom * bi : bi;
        }
        param[i] -= lr * d;
    }
}

/* The Adam loop for one combination of the weight-decay mode and amsgrad.
 * Called with constant flags, so each caller below gets its own branch-free
 * (vectorisable) copy of the loop.  mode: 0 none, 1 coupled (Adam), 2
 * decoupled (AdamW); vmax is used only when amsgrad. */
static inline void FN(adam_loop)(ptrdiff_t n, real *restrict param, const real *restrict grad,
                                 real *restrict exp_avg, real *restrict exp_avg_sq,
                                 real *restrict vmax, const int mode, const int amsgrad,
                                 real sign, real wd, real decay_factor, real one_minus_beta1, real beta2,
                                 real one_minus_beta2, real bc2_sqrt, real eps, real step_size)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        real p = param[i], g = sign * grad[i];
        if (mode == 2)
            p *= decay_factor;
        else if (mode == 1)
            g += wd * p;
        const real m = FN(lerp)(exp_avg[i], g, one_minus_beta1);
        real v = exp_avg_sq[i] * beta2 + one_minus_beta2 * (g * g);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        if (amsgrad) { /* vmax = max(vmax, v), NaN-propagating like torch.maximum */
            const real old = vmax[i];
            v = v != v ? v : (old > v || old != old ? old : v);
            vmax[i] = v;
        }
        const real denom = FN(r_sqrt)(v) / bc2_sqrt + eps;
        param[i] = p - step_size * (m / denom);
    }
}

void FN(lorac_adam_step)(ptrdiff_t n, real *param, const real *grad, real *exp_avg, real *exp_avg_sq,
                         real *max_exp_avg_sq, const AdamHyper *h)
{
    /* Step-dependent scalars in double, as torch computes them in Python. */
    const double bias_correction1 = 1.0 - pow(h->beta1, (double)h->step);
    const double bias_correction2 = 1.0 - pow(h->beta2, (double)h->step);
    const real step_size = (real)(h->lr / bias_correction1);
    const real bc2_sqrt = (real)sqrt(bias_correction2);
    const real eps = (real)h->eps, wd = (real)h->weight_decay;
    const real one_minus_beta1 = (real)(1.0 - h->beta1), beta2 = (real)h->beta2;
    const real one_minus_beta2 = (real)(1.0 - h->beta2);
    const real decay_factor = (real)(1.0 - h->lr * h->weight_decay);
    const real sign = h->maximize ? (real)-1 : (real)1;
    const int mode = h->weight_decay == 0 ? 0 : (h->decoupled ? 2 : 1);
#define LORAC_ADAM_LOOP(MODE, AMSGRAD)                                                               \
    FN(adam_loop)(n, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, MODE, AMSGRAD, sign, wd,     \
                  decay_factor, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size)
    if (h->amsgrad) {
        if (mode == 0) LORAC_ADAM_LOOP(0, 1);
        else if (mode == 1) LORAC_ADAM_LOOP(1, 1);
        else LORAC_ADAM_LOOP(2, 1);
    } else {
        if (mode == 0) LORAC_ADAM_LOOP(0, 0);
        else if (mode == 1) LORAC_ADAM_LOOP(1, 0);
        else LORAC_ADAM_LOOP(2, 0);
    }
#undef LORAC_ADAM_LOOP
}
