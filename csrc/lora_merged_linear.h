/* lora_merged_linear.h - LoRA MergedLinear kernels, float32 and float64.
 *
 * loralib's MergedLinear: one linear layer whose output splits into `groups`
 * equal blocks of og = out / groups features (e.g. the fused q, k, v
 * projection), with a rank-r adapter on the enabled blocks only.  Enabled
 * block e (0 <= e < n_enabled) is output block enabled[e]; its adapter is the
 * row block e of A and of B:
 *   A_e = a[e r : (e + 1) r, :]      (r, in)
 *   B_e = b[e og : (e + 1) og, :]    (og, r)
 * Pointers are untyped (float for _f32, double for _f64); matrices are
 * row-major with unit column stride, ld* the row stride in elements.
 *   x     (n, in)                input
 *   w     (out, in)              base weight W0, or (in, out) when w_in_out
 *   bias  (out)                  or NULL
 *   a     (n_enabled r, in)      lora_A, or NULL when the adapter is off
 *   b     (n_enabled og, r)      lora_B
 *   mask  (n, in) uint8          dropout keep-mask of the LoRA branch (shared
 *                                by all groups, as in loralib), contiguous, or
 *                                NULL; drop(x) = x * mask * keep_scale
 * Gradients use LoraLinearGrads (lora_linear.h) with da (n_enabled r, in)
 * and db (n_enabled og, r).
 */
#ifndef LORAC_LORA_MERGED_LINEAR_H
#define LORAC_LORA_MERGED_LINEAR_H

#include <stddef.h>
#include <stdint.h>

#include "lora_linear.h"

typedef struct {
    ptrdiff_t n, in, out, r;   /* r: rank of each enabled group */
    ptrdiff_t groups;          /* len(enable_lora) >= 1, divides out */
    ptrdiff_t n_enabled;       /* number of enabled groups */
    const ptrdiff_t *enabled;  /* (n_enabled) output block of each adapter, ascending */
    int w_in_out;              /* fan_in_fan_out: W0 is stored transposed, (in, out) */
    double scaling;            /* lora_alpha / r (or / sqrt(r) for rsLoRA) */
    double keep_scale;         /* 1 / (1 - p) */
    const void *x;    ptrdiff_t ldx;
    const void *w;    ptrdiff_t ldw;
    const void *bias;
    const void *a;    ptrdiff_t lda;
    const void *b;    ptrdiff_t ldb;
    const uint8_t *mask;
} LoraMergedLinear;

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "lora_merged_linear_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "lora_merged_linear_decl.h"
#include "dtype_end.h"

#endif
