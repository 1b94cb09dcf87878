/* bench/membw.c - memory read bandwidth, the bound of a decode step.
 *   make bench/membw && ./bench/membw [MiB (512)] [passes (5)]
 * A decode step reads every weight once and the whole KV cache once, so its speed is at most
 * bandwidth / bytes per token (bench/speed divides). This reads a buffer much larger than the
 * CPU's caches, with 1 thread and with all OpenMP threads (each a contiguous share), and prints
 * the best of `passes` sweeps in GB/s (10^9 bytes per second, wall clock). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Sum of n words: integer adds are associative, so the compiler may use its widest vectors. */
static uint64_t sum_words(const uint64_t *x, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) s += x[i];
    return s;
}

static volatile uint64_t sink;

static double sweep(const uint64_t *x, size_t n, int threads, int passes) {
    double best = 1e30;
    for (int p = 0; p < passes; p++) {
        uint64_t total = 0;
        double t0 = now();
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
        for (int k = 0; k < threads; k++) total += sum_words(x + n / threads * k, n / threads);
        double t = now() - t0;
        best = t < best ? t : best;
        sink = total;
    }
    return (double)(n / threads * threads) * sizeof(uint64_t) / best * 1e-9;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 512;
    int passes = argc > 2 ? atoi(argv[2]) : 5, all = 1;
#ifdef _OPENMP
    all = omp_get_max_threads();
#endif
    if (mib < 1 || passes < 1) { fprintf(stderr, "usage: bench/membw [MiB] [passes]\n"); return 1; }
    size_t n = mib * 1048576 / sizeof(uint64_t);
    uint64_t *x = malloc(n * sizeof(uint64_t));
    if (!x) { fprintf(stderr, "membw: error: cannot allocate %zu MiB\n", mib); return 1; }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) x[i] = i;              /* touch every page (first-touch placement) */
    printf("membw: read %zu MiB, best of %d: 1 thread %.2f GB/s", mib, passes, sweep(x, n, 1, passes));
    if (all > 1) printf(", %d threads %.2f GB/s", all, sweep(x, n, all, passes));
    printf("\n");
    free(x);
    return 0;
}
