/* blas_info.h - query and control the OpenBLAS runtime (no Python here). */
#ifndef LORAC_BLAS_INFO_H
#define LORAC_BLAS_INFO_H

const char *lorac_blas_name(void);     /* how this build found its BLAS */
const char *lorac_blas_config(void);   /* OpenBLAS build configuration string */
const char *lorac_blas_corename(void); /* CPU kernel set chosen at run time */
int lorac_blas_get_num_threads(void);
void lorac_blas_set_num_threads(int n);
int lorac_blas_get_num_procs(void);

#endif
