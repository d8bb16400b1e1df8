/* layernorm.c - instantiates the LayerNorm kernels for both dtypes. */
#include <math.h>
#include <stdlib.h>
#include "layernorm.h"

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "layernorm_impl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "layernorm_impl.h"
#include "dtype_end.h"
