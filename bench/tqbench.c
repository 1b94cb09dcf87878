/* bench/tqbench.c - speed of the attention inner loop of every KV format.
 *   make bench        (or: make bench/tqbench && ./bench/tqbench)
 * For each format and head dim d in {64, 128}: a cache of NKEYS encoded random
 * vectors; ns per key of tq_dot (score one key) and of tq_axpy (accumulate one
 * value), and the GB/s of code bytes those loops read. Also ns per tq_encode.
 * Each figure is the best of 200 passes over the cache (the machine may be shared). */
#include "../tq.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NKEYS 4096
#define PASSES 200          /* short passes; the best one is the least disturbed */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static uint64_t rs = 42;
static float frand(void) {                           /* uniform(-1, 1), xorshift64* */
    rs ^= rs >> 12; rs ^= rs << 25; rs ^= rs >> 27;
    return (float)((double)((rs * 0x2545F4914F6CDD1DULL) >> 11) * 0x1p-52 - 1.0);
}

static volatile float sink;                          /* keeps the loops from being optimized away */

/* Best ns per key of one pass over the cache. */
static double time_dot(const tq_codec *c, const float *qp, const uint8_t *cache) {
    double best = 1e30;
    for (int p = 0; p < PASSES; p++) {
        float s = 0;
        double t0 = now();
        for (int t = 0; t < NKEYS; t++) s += tq_dot(c, qp, cache + (size_t)t * c->bytes);
        best = fmin(best, (now() - t0) / NKEYS);
        sink = s;
    }
    return best * 1e9;
}

static double time_axpy(const tq_codec *c, const float *w, const uint8_t *cache, float *acc) {
    double best = 1e30;
    for (int p = 0; p < PASSES; p++) {
        memset(acc, 0, tq_acc_floats(c) * sizeof(float));
        double t0 = now();
        for (int t = 0; t < NKEYS; t++) tq_axpy(c, w[t], cache + (size_t)t * c->bytes, acc);
        best = fmin(best, (now() - t0) / NKEYS);
        sink = acc[0];
    }
    return best * 1e9;
}

int main(void) {
    printf("tqbench: %d keys per cache, best of %d passes\n", NKEYS, PASSES);
    printf("%-5s %4s %7s %9s %9s %9s %9s %10s\n", "fmt", "d", "bytes", "dot_ns", "dot_GB/s", "axpy_ns", "axpy_GB/s", "encode_ns");
    for (int d = 64; d <= 128; d *= 2)
        for (int f = 0; f < TQ_NFMT; f++) {
            tq_codec c;
            if (tq_init(&c, f, d, TQ_SCALE_NORM, TQ_DEFAULT_SEED) != 0) continue;
            uint8_t *cache = malloc(c.bytes * NKEYS);
            float *qp = malloc(tq_query_floats(&c) * sizeof(float));
            float *acc = malloc(tq_acc_floats(&c) * sizeof(float));
            float *x = malloc((size_t)NKEYS * d * sizeof(float)), q[128], w[NKEYS];
            for (size_t i = 0; i < (size_t)NKEYS * d; i++) x[i] = frand();
            for (int i = 0; i < d; i++) q[i] = frand();
            for (int t = 0; t < NKEYS; t++) w[t] = 0.5f + 0.5f * frand();
            double enc_ns = 1e30;
            for (int p = 0; p < 5; p++) {
                double t0 = now();
                for (int t = 0; t < NKEYS; t++) tq_encode(&c, x + (size_t)t * d, cache + (size_t)t * c.bytes);
                enc_ns = fmin(enc_ns, (now() - t0) / NKEYS * 1e9);
            }
            tq_prepare_query(&c, q, qp);
            double dot = time_dot(&c, qp, cache), axpy = time_axpy(&c, w, cache, acc);
            printf("%-5s %4d %7zu %9.1f %9.2f %9.1f %9.2f %10.0f\n", tq_fmt_name(f), d, c.bytes,
                   dot, c.bytes / dot, axpy, c.bytes / axpy, enc_ns);
            free(cache); free(qp); free(acc); free(x);
            tq_free(&c);
        }
    return 0;
}
