/* real_math.h - <math.h> functions for the `real` of a type-generic section
 * (template: include after dtype_begin.h, like gemm_impl.h).
 *
 * FN(r_exp)(x) is expf for float32 and exp for float64, and so on, so a
 * kernel written once calls the single-precision libm routine in its float32
 * instance instead of silently computing in double.
 */
#include <math.h>

#if LORAC_DTYPE == 32
static inline float FN(r_exp)(float x) { return expf(x); }
static inline float FN(r_log)(float x) { return logf(x); }
static inline float FN(r_sqrt)(float x) { return sqrtf(x); }
static inline float FN(r_tanh)(float x) { return tanhf(x); }
static inline float FN(r_erf)(float x) { return erff(x); }
#else
static inline double FN(r_exp)(double x) { return exp(x); }
static inline double FN(r_log)(double x) { return log(x); }
static inline double FN(r_sqrt)(double x) { return sqrt(x); }
static inline double FN(r_tanh)(double x) { return tanh(x); }
static inline double FN(r_erf)(double x) { return erf(x); }
#endif
