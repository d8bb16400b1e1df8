/* lora_multi_decl.h - declarations of the mixed-batch kernels (template,
 * included once per dtype by lora_multi.h; see it for the operands). */

/* x (n, in), W0, bias, ids (n), adapters k: A_k (E r_k, in), B_k (E og, r_k)
 *   -> y (n, out) with, for row i of adapter k = ids[i] (none when -1),
 *   y[i] = x[i] W0^T + bias + s_k * sum over enabled groups e of
 *          (x[i] A_ke^T) B_ke^T  written into output block enabled[e].
 * The base GEMM runs once over all n rows; then rows are counting-sorted by
 * adapter and processed LORAC_MULTI_BLOCK_ROWS at a time: gather x rows
 * (or use them in place when consecutive), u = x_g A_k^T (m, E r_k),
 * expand s_k u_e B_ke^T into a (m, out) scratch and add it into y's rows.
 * With M->with_base = 0 only the adapters' part: y = sum of the s_k terms.
 * Returns 0, or -1 when scratch memory cannot be allocated (y unspecified). */
int FN(lorac_multi_linear_forward)(const LoraMultiLinear *M, real *y, ptrdiff_t ldy);

/* idx (n), W0 (num, dim), ids (n), adapters k: A_k (r_k, num), B_k (dim, r_k)
 *   -> y (n, dim), y[i] = W0[idx[i]] + s_k * A_k[:, idx[i]]^T B_k^T.
 * Rows grouped by adapter as above; u is a gather of A_k's columns.
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int FN(lorac_multi_embedding_forward)(const LoraMultiEmbedding *M, real *y, ptrdiff_t ldy);
