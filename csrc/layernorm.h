/* layernorm.h - LayerNorm over the last dimension with an optional
 * elementwise affine, forward and backward, float32 (_f32) and float64 (_f64).
 *
 * Matrices are row-major with unit column stride, ld* the row stride in
 * elements; vectors are contiguous.  Row statistics (mean, biased variance)
 * and the weight/bias gradient sums are accumulated in double.
 */
#ifndef LORAC_LAYERNORM_H
#define LORAC_LAYERNORM_H

#include <stddef.h>

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "layernorm_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "layernorm_decl.h"
#include "dtype_end.h"

#endif
