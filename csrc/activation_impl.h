/* activation_impl.h - ReLU, GELU (erf and tanh forms), Tanh (template).
 * Shapes and rules: see activation_decl.h.  The values are torch's (erf GELU,
 * tanh-approximated GELU); the tanh form is evaluated as x sigmoid(2u), which
 * equals 0.5 x (1 + tanh u) and is more accurate for negative x. */

#define LORAC_SQRT1_2 0.70710678118654752440      /* 1 / sqrt(2) */
#define LORAC_INV_SQRT_2PI 0.39894228040143267794 /* 1 / sqrt(2 pi) */
#define LORAC_SQRT_2_PI 0.79788456080286535588    /* sqrt(2 / pi) */
#define LORAC_GELU_KAPPA 0.044715

/* s = sigmoid(2u) = (1 + tanh u) / 2 with u = beta (x + kappa x^3), and 1 - s
 * (when one_minus_s != NULL), both without cancellation.  For very negative x,
 * e^(-2u) overflows: s = 0 and 1 - s = 1 exactly (so x = -inf gives NaN, as
 * in torch, and finite x gives 0). */
static inline real FN(gelu_tanh_sigmoid)(real x, real beta, real kappa, real *one_minus_s)
{
    const real e = FN(r_exp)((real)-2 * beta * (x + kappa * x * x * x));
    const real s = (real)1 / ((real)1 + e);
    if (one_minus_s)
        *one_minus_s = e == (real)INFINITY ? (real)1 : e * s;
    return s;
}

void FN(lorac_activation_forward)(LoracActivation kind, ptrdiff_t n, const real *x, real *y)
{
    const real half = (real)0.5, one = (real)1, beta = (real)LORAC_SQRT_2_PI;
    const real kappa = (real)LORAC_GELU_KAPPA, inv_sqrt2 = (real)LORAC_SQRT1_2;
    switch (kind) {
    case LORAC_ACT_RELU:
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = x[i] < 0 ? (real)0 : x[i];
        break;
    case LORAC_ACT_GELU:
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = half * x[i] * (one + FN(r_erf)(x[i] * inv_sqrt2));
        break;
    case LORAC_ACT_GELU_TANH: /* 0.5 x (1 + tanh u) = x sigmoid(2u): no cancellation for x << 0 */
        for (ptrdiff_t i = 0; i < n; i++) {
            const real v = x[i];
            y[i] = v * FN(gelu_tanh_sigmoid)(v, beta, kappa, NULL);
        }
        break;
    case LORAC_ACT_TANH:
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = FN(r_tanh)(x[i]);
        break;
    }
}

void FN(lorac_activation_backward)(LoracActivation kind, ptrdiff_t n, const real *saved, const real *g,
                                   real *dx)
{
    const real half = (real)0.5, one = (real)1, beta = (real)LORAC_SQRT_2_PI;
    const real kappa = (real)LORAC_GELU_KAPPA, inv_sqrt2 = (real)LORAC_SQRT1_2;
    const real inv_sqrt_2pi = (real)LORAC_INV_SQRT_2PI;
    switch (kind) {
    case LORAC_ACT_RELU: /* saved = y: the gradient passes where y > 0 */
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i] = saved[i] <= 0 ? (real)0 : g[i]; /* torch: result <= 0 -> 0 */
        break;
    case LORAC_ACT_GELU: /* Phi(x) + x phi(x) */
        for (ptrdiff_t i = 0; i < n; i++) {
            const real v = saved[i];
            const real cdf = half * (one + FN(r_erf)(v * inv_sqrt2));
            const real pdf = inv_sqrt_2pi * FN(r_exp)(-half * v * v);
            dx[i] = g[i] * (cdf + v * pdf);
        }
        break;
    case LORAC_ACT_GELU_TANH: /* s + 2 x s (1 - s) beta (1 + 3 kappa x^2), s = sigmoid(2u) */
        for (ptrdiff_t i = 0; i < n; i++) {
            const real v = saved[i];
            real one_minus_s;
            const real s = FN(gelu_tanh_sigmoid)(v, beta, kappa, &one_minus_s);
            dx[i] = g[i] * (s + 2 * v * s * one_minus_s * beta * (one + 3 * kappa * v * v));
        }
        break;
    case LORAC_ACT_TANH: /* saved = y: 1 - y^2 */
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i] = g[i] * (one - saved[i] * saved[i]);
        break;
    }
}
