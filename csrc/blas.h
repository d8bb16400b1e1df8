/* blas.h - the one place that knows how CBLAS is named in this build.
 *
 * The scipy-openblas32 wheel prefixes every symbol with "scipy_"
 * (scipy_cblas_sgemm, scipy_openblas_set_num_threads, ...); a system OpenBLAS
 * does not.  Kernels write CBLAS(sgemm) and OPENBLAS(get_num_threads) and never
 * spell a prefix themselves.
 */
#ifndef LORAC_BLAS_H
#define LORAC_BLAS_H

#include <cblas.h>

#ifdef LORAC_BLAS_SCIPY_PREFIX
#define CBLAS(name) scipy_cblas_##name
#define OPENBLAS(name) scipy_openblas_##name
#else
#define CBLAS(name) cblas_##name
#define OPENBLAS(name) openblas_##name
#endif

/* Largest size or leading dimension the BLAS integer can hold (blasint is a
 * 32-bit int for both supported builds).  The binding refuses anything larger
 * before calling a kernel, so kernels may cast sizes to blasint freely. */
#define LORAC_BLAS_INT_MAX 2147483647

#endif
