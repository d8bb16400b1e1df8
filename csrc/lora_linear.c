/* lora_linear.c - instantiates the LoRA Linear kernels for both dtypes. */
#include <stdlib.h>
#include <string.h>
#include "lora_linear.h"

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "lora_branch_impl.h"
#include "lora_linear_impl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "lora_branch_impl.h"
#include "lora_linear_impl.h"
#include "dtype_end.h"
