/* lora_moe.c - instantiates the MoLoRA kernels for both dtypes. */
#include <stdlib.h>
#include <string.h>
#include "lora_linear.h"
#include "lora_moe.h"

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "real_math.h"
#include "lora_branch_impl.h"
#include "lora_moe_impl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "real_math.h"
#include "lora_branch_impl.h"
#include "lora_moe_impl.h"
#include "dtype_end.h"
