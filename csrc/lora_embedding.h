/* lora_embedding.h - LoRA Embedding kernels, float32 (_f32) and float64 (_f64).
 *
 * Operands of one LoRA embedding layer looked up for a batch of n indices.
 * Pointers are untyped so one struct serves both dtypes (float for _f32,
 * double for _f64).  Matrices are row-major with unit column stride; ld* is
 * the row stride in elements.
 *   idx  (n)            indices, every one in [0, num) (the caller checks)
 *   w    (num, dim)     base weight W0 (one row per embedding)
 *   a    (r, num)       lora_A (loralib's layout: one column per embedding),
 *                       or NULL when the adapter is off
 *   b    (dim, r)       lora_B
 * Merging (W0 += s (B A)^T) is lorac_linear_merge with w_in_out = 1, in = num
 * and out = dim: the same GEMM, so there is no separate kernel for it.
 */
#ifndef LORAC_LORA_EMBEDDING_H
#define LORAC_LORA_EMBEDDING_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    ptrdiff_t n, num, dim, r;
    double scaling;        /* lora_alpha / r (or / sqrt(r) for rsLoRA) */
    ptrdiff_t padding_idx; /* row that gets no gradient, or -1 for none */
    const ptrdiff_t *idx;
    const void *w;    ptrdiff_t ldw;
    const void *a;    ptrdiff_t lda;
    const void *b;    ptrdiff_t ldb;
} LoraEmbedding;

/* Gradient accumulators; a NULL pointer means frozen / not wanted.
 *   dw (num, dim)  += g[i] into row idx[i]          (rows padding_idx skipped)
 *   da (r, num)    += scaling * (g B)[i] into column idx[i]   (same skip)
 *   db (dim, r)    += scaling * g^T u               (every position)      */
typedef struct {
    void *dw;    ptrdiff_t lddw;
    void *da;    ptrdiff_t ldda;
    void *db;    ptrdiff_t lddb;
} LoraEmbeddingGrads;

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "lora_embedding_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "lora_embedding_decl.h"
#include "dtype_end.h"

#endif
