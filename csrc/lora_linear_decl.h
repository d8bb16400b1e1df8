/* lora_linear_decl.h - declarations of the LoRA Linear kernels (template,
 * included once per dtype by lora_linear.h; see it for the operands). */

/* x (n, in), W0, bias, A (r, in), B (out, r) -> y (n, out), u (n, r)
 * y = x W0^T + bias + scaling * (drop(x) A^T) B^T; u = drop(x) A^T is kept for
 * backward.  The rank-r product is formed first and accumulated into y with
 * beta = 1: no (n, out) temporary and no B A.  u is unused when L->a is NULL.
 * Returns 0, or -1 when scratch memory (dropout only) cannot be allocated. */
int FN(lorac_linear_forward)(const LoraLinear *L, real *u, ptrdiff_t ldu, real *y, ptrdiff_t ldy);

/* g (n, out), u (n, r) from forward -> the gradients requested in G, with
 *   dx = g W0 + scaling * drop'((g B) A).
 * Returns 0, or -1 when scratch memory cannot be allocated (then nothing has
 * been written). */
int FN(lorac_linear_backward)(const LoraLinear *L, const real *u, ptrdiff_t ldu, const real *g,
                              ptrdiff_t ldg, const LoraLinearGrads *G);

/* In place: W0 (out, in) += alpha * B A, or W0 (in, out) += alpha * (B A)^T
 * when w_in_out.  One GEMM; alpha = +scaling merges, -scaling unmerges.
 * A (r, in), B (out, r). */
void FN(lorac_linear_merge)(ptrdiff_t out, ptrdiff_t in, ptrdiff_t r, int w_in_out, double alpha,
                            const real *a, ptrdiff_t lda, const real *b, ptrdiff_t ldb, real *w,
                            ptrdiff_t ldw);
