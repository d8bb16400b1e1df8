/* gemm_routes.c - times csrc/gemm_impl.h's gemm_rm on the products a batch of
 * m rows makes with a square weight, so its route constants can be checked
 * on a new machine or OpenBLAS.  Built and driven by bench_gemm_routes.py,
 * once per route: the LORAC_GEMV_MAX_ROWS / LORAC_PANEL_MAX_ROWS given with
 * -D force one route (GEMV per row, panels of C^T, or plain GEMM).
 *
 *   usage: gemm_routes SIZE REPEATS M...
 *   prints one line per M: "M nt_seconds nn_seconds", medians of REPEATS
 *     nt: C (M, SIZE) = A (M, SIZE) W^T, W (SIZE, SIZE)   (the forward's x W0^T)
 *     nn: C (M, SIZE) = A (M, SIZE) W                     (the backward's g W0)
 *
 *   usage: gemm_routes k1 SIZE REPEATS R...
 *   prints one line per R: "R seconds", medians of REPEATS of
 *     C (SIZE, R) += g^T u, g (1, SIZE), u (1, R)    (dB for a one-row batch)
 *   (its route is switched off with -DLORAC_K1_TRANSPOSED_ROW=0)
 *
 *   usage: gemm_routes alias SIZE REPEATS OFFSET...
 *   prints one line per OFFSET: "OFFSET raw_seconds lorac_seconds", medians
 *   of REPEATS of c (1, SIZE) = g (1, SIZE) W (the backward's g W0 for one
 *   row) with c placed OFFSET bytes after W's rows modulo 4 KiB: a bare
 *   sgemv, and gemm_rm (which moves a c in the 4K-aliasing window)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LORAC_DTYPE 32
#include "dtype_begin.h"
#include "gemm_impl.h"
#include "dtype_end.h"

static double seconds_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int by_value(const void *p, const void *q)
{
    const double a = *(const double *)p, b = *(const double *)q;
    return (a > b) - (a < b);
}

/* The median of samples[0..repeats), sorting them in place. */
static double median_of(double *samples, int repeats)
{
    qsort(samples, (size_t)repeats, sizeof(double), by_value);
    return samples[repeats / 2];
}

/* Median over `repeats` of the mean time of `inner` calls, after one warm-up. */
static double median_seconds(enum CBLAS_TRANSPOSE tb, ptrdiff_t m, ptrdiff_t size, const float *a,
                             const float *w, float *c, int repeats, int inner, double *samples)
{
    gemm_rm_f32(CblasNoTrans, tb, m, size, size, 1, a, size, w, size, 0, c, size);
    for (int rep = 0; rep < repeats; rep++) {
        const double start = seconds_now();
        for (int i = 0; i < inner; i++)
            gemm_rm_f32(CblasNoTrans, tb, m, size, size, 1, a, size, w, size, 0, c, size);
        samples[rep] = (seconds_now() - start) / inner;
    }
    return median_of(samples, repeats);
}

/* Median over `repeats` of the mean time of 1000 calls of C (size, r) += g^T u. */
static double k1_median_seconds(ptrdiff_t size, ptrdiff_t r, const float *g, const float *u, float *c,
                                int repeats, double *samples)
{
    enum { inner = 1000 };
    for (int rep = 0; rep < repeats; rep++) {
        const double start = seconds_now();
        for (int i = 0; i < inner; i++)
            gemm_rm_f32(CblasTrans, CblasNoTrans, size, r, 1, 1e-3f, g, size, u, r, 1, c, r);
        samples[rep] = (seconds_now() - start) / inner;
    }
    return median_of(samples, repeats);
}

/* Median over `repeats` of the mean time of 100 products c (1, size) = g W,
 * by gemm_rm (lorac) or by a bare sgemv. */
static double alias_median_seconds(int lorac, ptrdiff_t size, const float *g, const float *w, float *c,
                                   int repeats, double *samples)
{
    enum { inner = 100 };
    for (int rep = 0; rep < repeats; rep++) {
        const double start = seconds_now();
        for (int i = 0; i < inner; i++) {
            if (lorac)
                gemm_rm_f32(CblasNoTrans, CblasNoTrans, 1, size, size, 1, g, size, w, size, 0, c, size);
            else
                CBLAS(sgemv)(CblasRowMajor, CblasTrans, (blasint)size, (blasint)size, 1, w, (blasint)size, g, 1, 0,
                             c, 1);
        }
        samples[rep] = (seconds_now() - start) / inner;
    }
    return median_of(samples, repeats);
}

/* argv[first], argv[first + 1]: SIZE and REPEATS, then the counts (M or R).
 * Returns 0 with the largest count in *max_count, or 2 after printing why not. */
static int parse_arguments(int argc, char **argv, int first, const char *usage, ptrdiff_t *size,
                           int *repeats, ptrdiff_t *max_count)
{
    if (argc < first + 3) {
        fprintf(stderr, "usage: %s %s\n", argv[0], usage);
        return 2;
    }
    *size = atol(argv[first]);
    *repeats = atoi(argv[first + 1]);
    *max_count = 0;
    for (int i = first + 2; i < argc; i++)
        if (atol(argv[i]) > *max_count)
            *max_count = atol(argv[i]);
    if (*size <= 0 || *repeats <= 0 || *max_count <= 0) {
        fprintf(stderr, "SIZE, REPEATS and every count must be positive\n");
        return 2;
    }
    return 0;
}

static int k1_main(int argc, char **argv)
{
    ptrdiff_t size, max_r;
    int repeats;
    if (parse_arguments(argc, argv, 2, "k1 SIZE REPEATS R...", &size, &repeats, &max_r) != 0)
        return 2;
    float *g = malloc(sizeof(float) * (size_t)size);
    float *u = malloc(sizeof(float) * (size_t)max_r);
    float *c = calloc((size_t)(size * max_r), sizeof(float));
    double *samples = malloc(sizeof(double) * (size_t)repeats);
    if (!g || !u || !c || !samples) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (ptrdiff_t i = 0; i < size; i++)
        g[i] = (float)(i % 7) - 3.0f;
    for (ptrdiff_t j = 0; j < max_r; j++)
        u[j] = (float)(j % 5) - 2.0f;
    for (int i = 4; i < argc; i++) {
        const ptrdiff_t r = atol(argv[i]);
        printf("%td %.9g\n", r, k1_median_seconds(size, r, g, u, c, repeats, samples));
    }
    free(g);
    free(u);
    free(c);
    free(samples);
    return 0;
}

static int alias_main(int argc, char **argv)
{
    ptrdiff_t size, max_offset;
    int repeats;
    if (parse_arguments(argc, argv, 2, "alias SIZE REPEATS OFFSET...", &size, &repeats, &max_offset) != 0)
        return 2;
    float *w = malloc(sizeof(float) * (size_t)(size * size));
    float *g = malloc(sizeof(float) * (size_t)size);
    float *room = malloc(sizeof(float) * (size_t)size + 8192);
    double *samples = malloc(sizeof(double) * (size_t)repeats);
    if (!w || !g || !room || !samples) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (ptrdiff_t i = 0; i < size * size; i++)
        w[i] = (float)(i % 13) - 6.0f;
    for (ptrdiff_t i = 0; i < size; i++)
        g[i] = (float)(i % 7) - 3.0f;
    for (int i = 4; i < argc; i++) {
        const size_t offset = (size_t)atol(argv[i]) % 4096 / sizeof(float) * sizeof(float);
        /* c: the first address in room that lies `offset` bytes after w modulo 4 KiB */
        const size_t shift = ((uintptr_t)w + offset - (uintptr_t)room) % 4096 / sizeof(float) * sizeof(float);
        float *c = (float *)((char *)room + shift);
        printf("%zu %.9g %.9g\n", offset, alias_median_seconds(0, size, g, w, c, repeats, samples),
               alias_median_seconds(1, size, g, w, c, repeats, samples));
    }
    free(w);
    free(g);
    free(room);
    free(samples);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "k1") == 0)
        return k1_main(argc, argv);
    if (argc > 1 && strcmp(argv[1], "alias") == 0)
        return alias_main(argc, argv);
    ptrdiff_t size, max_m;
    int repeats;
    if (parse_arguments(argc, argv, 1, "SIZE REPEATS M...", &size, &repeats, &max_m) != 0)
        return 2;
    float *w = malloc(sizeof(float) * (size_t)(size * size));
    float *a = malloc(sizeof(float) * (size_t)(max_m * size));
    float *c = malloc(sizeof(float) * (size_t)(max_m * size));
    double *samples = malloc(sizeof(double) * (size_t)repeats);
    if (!w || !a || !c || !samples) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    srand(1);
    for (ptrdiff_t i = 0; i < size * size; i++)
        w[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    for (ptrdiff_t i = 0; i < max_m * size; i++)
        a[i] = (float)rand() / (float)RAND_MAX - 0.5f;

    for (int i = 3; i < argc; i++) {
        const ptrdiff_t m = atol(argv[i]);
        /* about 20 ms of calls per sample: 2 m size^2 flops at a few GFLOP/s */
        const double flops = 2.0 * (double)m * (double)size * (double)size;
        const int inner = flops > 4e7 ? 1 : (int)(4e7 / flops) + 1;
        const double nt = median_seconds(CblasTrans, m, size, a, w, c, repeats, inner, samples);
        const double nn = median_seconds(CblasNoTrans, m, size, a, w, c, repeats, inner, samples);
        printf("%td %.9g %.9g\n", m, nt, nn);
    }
    free(w);
    free(a);
    free(c);
    free(samples);
    return 0;
}
