/* lora_merged_linear_decl.h - declarations of the LoRA MergedLinear kernels
 * (template, included once per dtype by lora_merged_linear.h; see it for the
 * operands). */

/* x (n, in), W0, bias, A (E r, in), B (E og, r) -> y (n, out), u (n, E r)
 * y = x W0^T + bias, then u = drop(x) A^T for all groups in one GEMM and, per
 * enabled group e, y[:, block enabled[e]] += scaling * u_e B_e^T written in
 * place through a column offset of y (u_e = u[:, e r : (e + 1) r]).  Never
 * forms the dense block-diagonal delta.  u is unused when M->a is NULL.
 * Returns 0, or -1 when scratch memory (dropout only) cannot be allocated. */
int FN(lorac_merged_linear_forward)(const LoraMergedLinear *M, real *u, ptrdiff_t ldu, real *y,
                                    ptrdiff_t ldy);

/* g (n, out), u (n, E r) from forward -> the gradients requested in G:
 *   dx = g W0 + scaling * drop'(gb A) with gb_e = g[:, block enabled[e]] B_e
 *   dA += scaling * gb^T drop(x);  dB_e += scaling * g[:, block]^T u_e
 *   dW0, dbias as for Linear.
 * Returns 0, or -1 when scratch memory cannot be allocated (then nothing has
 * been written). */
int FN(lorac_merged_linear_backward)(const LoraMergedLinear *M, const real *u, ptrdiff_t ldu,
                                     const real *g, ptrdiff_t ldg, const LoraLinearGrads *G);

/* In place, per enabled group e: W0 rows of block enabled[e] (out, in)
 * += alpha * B_e A_e, or the columns of that block when w_in_out (in, out).
 * alpha = +scaling merges, -scaling unmerges.  A (E r, in), B (E og, r). */
void FN(lorac_merged_linear_merge)(const LoraMergedLinear *M, double alpha, real *w, ptrdiff_t ldw);
