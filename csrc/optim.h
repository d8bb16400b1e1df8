/* optim.h - fused optimizer updates (SGD, Adam, AdamW), float32 (_f32) and
 * float64 (_f64).
 *
 * One kernel call updates one parameter in a single pass over its elements:
 * every array is a contiguous vector of the parameter's n elements (the
 * binding passes flattened C-contiguous views).  The update rules are
 * torch.optim's (single-tensor code path), bias correction included; the
 * scalar hyper-parameters are applied in the parameter's precision, as torch
 * does.
 */
#ifndef LORAC_OPTIM_H
#define LORAC_OPTIM_H

#include <stddef.h>
#include <stdint.h>

/* torch.optim.SGD's hyper-parameters for one step. */
typedef struct {
    double lr, momentum, dampening, weight_decay;
    int nesterov;
    int maximize;
    int init_buffer; /* first step with momentum: the buffer is set to the gradient */
} SgdHyper;

/* torch.optim.Adam / AdamW's hyper-parameters for one step. */
typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    int64_t step;   /* the step being taken, >= 1 (bias correction 1 - beta^step) */
    int decoupled;  /* AdamW: param *= 1 - lr * weight_decay; Adam: grad += weight_decay * param */
    int amsgrad;
    int maximize;
} AdamHyper;

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "optim_decl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "optim_decl.h"
#include "dtype_end.h"

#endif
