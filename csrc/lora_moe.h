/* lora_moe.h - Mixture-of-LoRA-experts Linear (MoLoRA) kernels, float32 (_f32)
 * and float64 (_f64).
 *
 * One rank-r adapter split into `experts` blocks of rb = r / experts ranks;
 * a router gives every row its gates over the blocks:
 *   z = x R^T                      (n, E) router logits
 *   p = softmax(z)                 (n, E) probabilities (kept for the aux loss)
 *   g = softmax of z over the top_k largest logits of the row, 0 elsewhere
 *       (top_k = E: g = p)         (n, E) gates
 *   u = drop(x) A^T                (n, r)
 *   h = u * expand(g)              (n, r)  h[:, j] = u[:, j] * g[:, j / rb]
 *   y = x W0^T + bias + scaling * h B^T
 * Pointers are untyped (float for _f32, double for _f64); matrices are
 * row-major with unit column stride, ld* the row stride in elements.
 *   x      (n, in)     input
 *   w      (out, in)   base weight W0
 *   bias   (out)       or NULL
 *   a      (r, in)     lora_A
 *   b      (out, r)    lora_B
 *   router (E, in)     lora_router
 *   mask   (n, in) uint8 dropout keep-mask of the adapter input (not of the
 *          router's), contiguous, or NULL; drop(x) = x * mask * keep_scale
 */
#ifndef LORAC_LORA_MOE_H
#define LORAC_LORA_MOE_H

#include <stddef.h>
#include <stdint.h>

#include "lora_linear.h" /* LoraLinearGrads */

typedef struct {
    ptrdiff_t n, in, out, r;
    ptrdiff_t experts;  /* E >= 1, divides r */
    ptrdiff_t top_k;    /* in [1, E] */
    double scaling;     /* lora_alpha / r (or / sqrt(r) for rsLoRA) */
    double keep_scale;  /* 1 / (1 - p) */
    const void *x;      ptrdiff_t ldx;
    const void *w;      ptrdiff_t ldw;
    const void *bias;
    const void *a;      ptrdiff_t lda;
    const void *b;      ptrdiff_t ldb;
    const void *router; ptrdiff_t ldrouter;
    const uint8_t *mask;
} LoraMoe;

/* Gradient accumulators; NULL: frozen / not wanted, nothing computed for it.
 * lin holds the Linear layer's (lora_linear.h), here meaning:
 *   dx (n, in)         written (not accumulated)
 *   dw (out, in)       += g^T x
 *   dbias (out)        += column sums of g
 *   da (r, in)         += (dh * expand(gates))^T drop(x),  dh = scaling * g B
 *   db (out, r)        += scaling * g^T h
 * and the router's:
 *   drouter (E, in)    += dz^T x                                          */
typedef struct {
    LoraLinearGrads lin;
    void *drouter; ptrdiff_t lddrouter;
} LoraMoeGrads;

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "lora_moe_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "lora_moe_decl.h"
#include "dtype_end.h"

#endif
