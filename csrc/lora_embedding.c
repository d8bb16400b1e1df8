/* lora_embedding.c - instantiates the LoRA Embedding kernels for both dtypes. */
#include <stdlib.h>
#include <string.h>
#include "lora_embedding.h"

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "lora_embedding_impl.h"
#include "dtype_end.h"

#define LORAC_DTYPE 64
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "lora_embedding_impl.h"
#include "dtype_end.h"
