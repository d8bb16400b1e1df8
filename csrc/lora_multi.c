/* lora_multi.c - instantiates the mixed-batch kernels for both dtypes. */
#include <stdlib.h>
#include <string.h>
#include "lora_linear.h"
#include "lora_multi.h"

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "lora_multi_impl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "lora_multi_impl.h"
#include "dtype_end.h"
