/* blas_info.c - OpenBLAS runtime information and thread control. */
#include "blas_info.h"
#include "blas.h"

#ifndef LORAC_BLAS_NAME
#define LORAC_BLAS_NAME "OpenBLAS"
#endif

const char *lorac_blas_name(void) { return LORAC_BLAS_NAME; }
const char *lorac_blas_config(void) { return OPENBLAS(get_config)(); }
const char *lorac_blas_corename(void) { return OPENBLAS(get_corename)(); }
int lorac_blas_get_num_threads(void) { return OPENBLAS(get_num_threads)(); }
void lorac_blas_set_num_threads(int n) { OPENBLAS(set_num_threads)(n); }
int lorac_blas_get_num_procs(void) { return OPENBLAS(get_num_procs)(); }
