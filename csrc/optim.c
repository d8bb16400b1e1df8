/* optim.c - instantiates the optimizer kernels for both dtypes. */
#include <math.h>
#include "optim.h"

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "real_math.h"
#include "optim_impl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "real_math.h"
#include "optim_impl.h"
#include "dtype_end.h"
