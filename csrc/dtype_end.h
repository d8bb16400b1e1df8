/* dtype_end.h - close a type-generic section opened by dtype_begin.h. */
#undef real
#undef FN
#undef GEMM
#undef GEMV
#undef GER
#undef AXPY
#undef LORAC_DTYPE
