/* activation.c - instantiates the activation kernels for both dtypes. */
#include <math.h>
#include "activation.h"

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "real_math.h"
#include "activation_impl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "real_math.h"
#include "activation_impl.h"
#include "dtype_end.h"
