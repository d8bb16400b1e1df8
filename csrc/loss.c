/* loss.c - instantiates the loss kernels for both dtypes. */
#include <math.h>
#include "loss.h"

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "real_math.h"
#include "loss_impl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "real_math.h"
#include "loss_impl.h"
#include "dtype_end.h"
