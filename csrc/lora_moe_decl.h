/* lora_moe_decl.h - declarations of the MoLoRA kernels (template, included
 * once per dtype by lora_moe.h; see it for the operands and the math). */

/* x (n, in), W0 (out, in), bias, A (r, in), B (out, r), R (E, in)
 *   -> y (n, out), u (n, r) = drop(x) A^T, probs (n, E) = softmax(x R^T),
 *      gates (n, E) (top-k renormalised, 0 outside the top k).
 * u, probs and gates are what backward needs.  Top-k ties go to the lower
 * expert index.  Returns 0, or -1 when scratch memory cannot be allocated. */
int FN(lorac_moe_forward)(const LoraMoe *L, real *u, real *probs, real *gates, real *y, ptrdiff_t ldy);

/* g (n, out) and forward's u (n, r), probs, gates (n, E) -> the gradients
 * requested in G.  With gh = g B (n, r):
 *   db += s g^T h;  du = s gh * expand(gates);  dgate[:, e] = s sum_{j in e} gh u
 *   dz = gates * (dgate - rowsum(gates * dgate))       (softmax / top-k backward)
 *      + probs * (aux - rowsum(probs * aux))           (aux (E) or NULL: the
 *        gradient of an auxiliary loss sum_{i,e} aux[e] probs[i, e])
 *   dx = g W0 + drop'(du A) + dz R;  da += du^T drop(x);  drouter += dz^T x.
 * Returns 0, or -1 when scratch memory cannot be allocated (then nothing
 * has been written). */
int FN(lorac_moe_backward)(const LoraMoe *L, const real *u, const real *probs, const real *gates,
                           const double *aux, const real *g, ptrdiff_t ldg, const LoraMoeGrads *G);
