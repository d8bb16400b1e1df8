/* lora_multi.h - mixed-batch LoRA inference: one batch, a different adapter
 * per row, float32 (_f32) and float64 (_f64).
 *
 * Serving many adapters on one base (punica / S-LoRA style): the base product
 * runs once over the whole batch, then the rows are grouped by adapter and
 * each group gets its adapter's rank-r shrink (x A_k^T) and expand (u B_k^T),
 * accumulated into its rows of y.  No (n, out) temporary, no B A.
 *
 * Pointers are untyped (float for _f32, double for _f64); matrices are
 * row-major with unit column stride, ld* the row stride in elements.
 *
 * One adapter k (LoraAdapterRef), for a layer of `groups` output blocks of
 * og = out / groups features of which n_enabled carry an adapter (Linear:
 * groups = n_enabled = 1, enabled = {0}; loralib's MergedLinear otherwise):
 *   a  (n_enabled r, in)    lora_A (Embedding: (r, num))
 *   b  (n_enabled og, r)    lora_B (Embedding: (dim, r))
 *   scaling                 lora_alpha / r (or / sqrt(r))
 * Enabled group e uses rows [e r, (e + 1) r) of a and [e og, (e + 1) og) of b.
 */
#ifndef LORAC_LORA_MULTI_H
#define LORAC_LORA_MULTI_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const void *a;    ptrdiff_t lda;
    const void *b;    ptrdiff_t ldb;
    ptrdiff_t r;
    double scaling;
} LoraAdapterRef;

/* Rows of x gathered per adapter block (bounds the scratch memory). */
#ifndef LORAC_MULTI_BLOCK_ROWS
#define LORAC_MULTI_BLOCK_ROWS 128
#endif
/* Blocks of at most this many rows use per-row GEMVs instead of GEMMs. */
#ifndef LORAC_MULTI_ROW_GEMV_MAX
#define LORAC_MULTI_ROW_GEMV_MAX 4
#endif

/* A Linear or MergedLinear layer applied to a mixed batch.
 *   x     (n, in)          input
 *   w     (out, in)        base weight W0, or (in, out) when w_in_out
 *   bias  (out)            or NULL
 *   ids   (n)              adapter of each row, in [-1, n_adapters); -1: base only
 *   adapters (n_adapters)  see above; every one has the same groups / enabled
 * contiguous_runs: a block of rows that are consecutive in x is used in place
 * (the "segment" approach: no gather, the expand accumulates straight into
 * y); 0 forces the gather / scatter path for every block (for measuring).
 * with_base: 1 computes the whole layer; 0 only the adapters' part (y starts
 * at zero: no x W0^T, no bias), to add to a base output computed elsewhere. */
typedef struct {
    ptrdiff_t n, in, out;
    ptrdiff_t groups, n_enabled;
    const ptrdiff_t *enabled;  /* (n_enabled) output block of each enabled group, ascending */
    int w_in_out;
    int contiguous_runs;
    int with_base;
    const void *x;    ptrdiff_t ldx;
    const void *w;    ptrdiff_t ldw;
    const void *bias;
    ptrdiff_t n_adapters;
    const LoraAdapterRef *adapters;
    const ptrdiff_t *ids;
} LoraMultiLinear;

/* An Embedding layer looked up for a mixed batch of n indices.
 *   idx   (n)          indices in [0, num)
 *   w     (num, dim)   base weight W0
 *   ids   (n)          adapter of each index, in [-1, n_adapters)
 *   adapters           a (r, num), b (dim, r) each (groups = 1)           */
typedef struct {
    ptrdiff_t n, num, dim;
    const ptrdiff_t *idx;
    const void *w;    ptrdiff_t ldw;
    ptrdiff_t n_adapters;
    const LoraAdapterRef *adapters;
    const ptrdiff_t *ids;
} LoraMultiEmbedding;

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "lora_multi_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "lora_multi_decl.h"
#include "dtype_end.h"

#endif
