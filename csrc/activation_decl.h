/* activation_decl.h - declarations of the activation kernels (template,
 * included once per dtype by activation.h; see it for the conventions). */

/* x (n) -> y (n) = f(x).  y may alias x (in place). */
void FN(lorac_activation_forward)(LoracActivation kind, ptrdiff_t n, const real *x, real *y);

/* saved (n), g (n) -> dx (n) = g * f'(.), where saved is the forward's output
 * y for ReLU and Tanh (lorac_activation_backward_uses_output) and its input x
 * for the GELU forms.  dx may alias g. */
void FN(lorac_activation_backward)(LoracActivation kind, ptrdiff_t n, const real *saved, const real *g,
                                   real *dx);
