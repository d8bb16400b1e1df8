/* dtype_begin.h - open a type-generic section.
 *
 * Define LORAC_DTYPE to 32 or 64, include this file, then a *_impl.h or
 * *_decl.h template, then dtype_end.h.  Inside, templates write:
 *   real          the element type (float or double)
 *   FN(name)      name_f32 / name_f64
 *   GEMM, GEMV, GER, AXPY   cblas_sgemm / cblas_dgemm, ...
 * so each kernel is written once for both dtypes.
 */
#include <stddef.h>
#include <stdint.h>
#include "blas.h"

#define LORAC_PASTE_(a, b) a##b
#define LORAC_PASTE(a, b) LORAC_PASTE_(a, b)

#if LORAC_DTYPE == 32
#define real float
#define FN(name) LORAC_PASTE(name, _f32)
#define GEMM CBLAS(sgemm)
#define GEMV CBLAS(sgemv)
#define GER CBLAS(sger)
#define AXPY CBLAS(saxpy)
#elif LORAC_DTYPE == 64
#define real double
#define FN(name) LORAC_PASTE(name, _f64)
#define GEMM CBLAS(dgemm)
#define GEMV CBLAS(dgemv)
#define GER CBLAS(dger)
#define AXPY CBLAS(daxpy)
#else
#error "LORAC_DTYPE must be 32 or 64"
#endif
