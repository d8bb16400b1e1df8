/* activation.h - elementwise activations with their backward, float32 (_f32)
 * and float64 (_f64): ReLU, GELU (exact erf form and torch's tanh
 * approximation) and Tanh.  Every array is a contiguous vector of n elements
 * (the binding flattens (..., features) inputs).
 */
#ifndef LORAC_ACTIVATION_H
#define LORAC_ACTIVATION_H

#include <stddef.h>

typedef enum {
    LORAC_ACT_RELU = 0,      /* max(x, 0), NaN kept */
    LORAC_ACT_GELU = 1,      /* x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) */
    LORAC_ACT_GELU_TANH = 2, /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
    LORAC_ACT_TANH = 3,
} LoracActivation;

/* What backward reads besides the gradient: the input x (GELU forms) or the
 * output y (ReLU, Tanh: cheaper, and all they need). */
static inline int lorac_activation_backward_uses_output(LoracActivation kind)
{
    return kind == LORAC_ACT_RELU || kind == LORAC_ACT_TANH;
}

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "activation_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "activation_decl.h"
#include "dtype_end.h"

#endif
