/* lora_linear.h - LoRA Linear kernels, float32 (_f32) and float64 (_f64).
 *
 * Operands of one LoRA linear layer applied to a batch.  Pointers are untyped
 * so one struct serves both dtypes; they point to float for the _f32 kernels
 * and to double for the _f64 ones.  All matrices are row-major with unit
 * column stride; ld* is the row stride in elements.
 *   x     (n, in)            input
 *   w     (out, in)          base weight W0, or (in, out) when w_in_out
 *   bias  (out)              or NULL
 *   a     (r, in)            lora_A, or NULL when the adapter is off
 *   b     (out, r)           lora_B
 *   mask  (n, in) uint8      dropout keep-mask of the LoRA branch, contiguous,
 *                            or NULL;  drop(x) = x * mask * keep_scale
 */
#ifndef LORAC_LORA_LINEAR_H
#define LORAC_LORA_LINEAR_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    ptrdiff_t n, in, out, r;
    int w_in_out;      /* fan_in_fan_out: W0 is stored transposed, (in, out) */
    double scaling;    /* lora_alpha / r (or / sqrt(r) for rsLoRA) */
    double keep_scale; /* 1 / (1 - p) */
    const void *x;    ptrdiff_t ldx;
    const void *w;    ptrdiff_t ldw;
    const void *bias;
    const void *a;    ptrdiff_t lda;
    const void *b;    ptrdiff_t ldb;
    const uint8_t *mask;
} LoraLinear;

/* Gradient accumulators; a NULL pointer means frozen / not wanted: nothing is
 * computed or read for it.
 *   dx (n, in)   written (not accumulated): the input's gradient
 *   dw like w    += g^T x (or x^T g when w_in_out)
 *   dbias (out)  += column sums of g
 *   da (r, in)   += scaling * (g B)^T drop(x)
 *   db (out, r)  += scaling * g^T u                                      */
typedef struct {
    void *dx;    ptrdiff_t lddx;
    void *dw;    ptrdiff_t lddw;
    void *dbias;
    void *da;    ptrdiff_t ldda;
    void *db;    ptrdiff_t lddb;
} LoraLinearGrads;

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "lora_linear_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "lora_linear_decl.h"
#include "dtype_end.h"

#endif
