/* lora_embedding_decl.h - declarations of the LoRA Embedding kernels
 * (template, included once per dtype by lora_embedding.h; see it for the
 * operands). */

/* idx (n), W0 (num, dim), A (r, num), B (dim, r) -> y (n, dim), u (n, r)
 * y[i] = W0[idx[i]] + scaling * u[i] B^T with u[i] = A[:, idx[i]]^T: a gather
 * of rows of W0 and of columns of A, then one GEMM (n, dim, r).  No one-hot
 * matrix, no B A.  u is unused when E->a is NULL (then y is the gather only). */
void FN(lorac_embedding_forward)(const LoraEmbedding *E, real *u, ptrdiff_t ldu, real *y,
                                 ptrdiff_t ldy);

/* g (n, dim), u (n, r) from forward -> the gradients requested in G.
 * Repeated indices accumulate; positions whose index is padding_idx add
 * nothing to dW0 or dA (they still reach dB, as in torch, since u[i] is
 * A[:, padding_idx] there).  Indices get no gradient.
 * Returns 0, or -1 when scratch memory cannot be allocated (then nothing has
 * been written). */
int FN(lorac_embedding_backward)(const LoraEmbedding *E, const real *u, ptrdiff_t ldu,
                                 const real *g, ptrdiff_t ldg, const LoraEmbeddingGrads *G);
