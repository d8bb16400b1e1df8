/* loss.h - loss kernels (cross-entropy on logits, mean squared error) with
 * their backward, float32 (_f32) and float64 (_f64).
 *
 * Matrices are row-major with unit column stride, ld* the row stride in
 * elements; vectors are contiguous.  Reductions (sums of per-row losses) are
 * accumulated in double.  Targets of the cross-entropy are class indices
 * (int64, like torch's), one per row.
 */
#ifndef LORAC_LOSS_H
#define LORAC_LOSS_H

#include <stddef.h>
#include <stdint.h>

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "loss_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "loss_decl.h"
#include "dtype_end.h"

#endif
