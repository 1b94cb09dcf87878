/* bench/tqbench.c - speed of attention straight from the codes, per format and SIMD path.
 *   make bench        (or: make bench/tqbench && ./bench/tqbench [options])
 * What decode does for one KV head: a group of G query heads attends over `keys` cached
 * positions with the codec's kernels, a chunk of 128 positions at a time: tq_attn_scores,
 * tq_softmax_chunk for each query, tq_attn_values (tq.c's tq_attend_codes without the key
 * projections and exact positions). The cache is one layer's codes copied into an arena of
 * --arena MiB of distinct memory (keys and values), swept layer after layer, so that the rows
 * come from DRAM as they do in decode, where the weights stream through the caches in between
 * (give --arena 0 for a single layer that may stay in the CPU's caches).
 * Prints, per line: ns per cached position per query head, and the GB/s of code bytes
 * (keys and values) read, both per second of this thread's CPU time (so that other jobs on a
 * shared machine do not count; they still share its memory bandwidth). Best of --passes sweeps. */
#include "../tq.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHUNK 128

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);          /* CPU time: other jobs on the machine don't count */
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static uint64_t rs = 42;
static float frand(void) {                           /* uniform(-1, 1), xorshift64* */
    rs ^= rs >> 12; rs ^= rs << 25; rs ^= rs >> 27;
    return (float)((double)((rs * 0x2545F4914F6CDD1DULL) >> 11) * 0x1p-52 - 1.0);
}

static volatile float sink;                          /* keeps the work from being optimized away */

/* One layer: G queries over n positions of keys k and values v, chunk by chunk. */
static void attend(const tq_codec *kc, const tq_codec *vc, tq_simd simd, int G, const float *qp, int n,
                   const uint8_t *k, const uint8_t *v, float *sc, float *st /* (G, 2 + acc) */) {
    size_t qf = tq_query_floats(kc), sf = 2 + tq_acc_floats(vc);
    float scale = 1.0f / sqrtf((float)kc->d);
    for (int r = 0; r < G; r++) { memset(st + r * sf, 0, sf * sizeof(float)); st[r * sf] = -INFINITY; }
    for (int t0 = 0; t0 < n; t0 += CHUNK) {
        int nk = n - t0 < CHUNK ? n - t0 : CHUNK;
        tq_attn_scores(kc, simd, G, qp, qf, k + (size_t)t0 * kc->bytes, nk, sc, CHUNK);
        for (int r = 0; r < G; r++) {
            float rescale, *q = st + r * sf;
            float sum = tq_softmax_chunk(simd, sc + r * CHUNK, nk, scale, &q[0], &rescale);
            for (size_t i = 1; i < sf; i++) q[i] *= rescale;
            q[1] += sum;
        }
        tq_attn_values(vc, simd, G, sc, CHUNK, v + (size_t)t0 * vc->bytes, nk, st + 2, sf);
    }
}

static int in_list(const char *list, const char *name) {
    if (!list) return 1;
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == 0)) return 1;
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: bench/tqbench [--formats f,..] [--paths portable,avx2,avx512] [--dims 64,128] [--groups 3,4]\n"
                    "                     [--keys 8192,32768] [--arena MiB (256)] [--passes n (3)]\n");
    exit(1);
}

int main(int argc, char **argv) {
    const char *formats = NULL, *paths = NULL, *dims = "64,128", *groups = "3,4", *keys = "8192,32768";
    double arena_mib = 256;
    int passes = 3;
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc) usage();
        if (!strcmp(argv[i], "--formats")) formats = argv[i + 1];
        else if (!strcmp(argv[i], "--paths")) paths = argv[i + 1];
        else if (!strcmp(argv[i], "--dims")) dims = argv[i + 1];
        else if (!strcmp(argv[i], "--groups")) groups = argv[i + 1];
        else if (!strcmp(argv[i], "--keys")) keys = argv[i + 1];
        else if (!strcmp(argv[i], "--arena")) arena_mib = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--passes")) passes = atoi(argv[i + 1]) > 0 ? atoi(argv[i + 1]) : 1;
        else usage();
    }
    printf("tqbench: attention of a GQA group over a KV head's cache; arena %.0f MiB, best of %d sweeps; "
           "this CPU runs:", arena_mib, passes);
    for (int p = 0; p < TQ_NSIMD; p++) if (tq_simd_supported((tq_simd)p)) printf(" %s", tq_simd_name((tq_simd)p));
    printf("\n%-8s %-5s %4s %2s %6s %6s %13s %9s\n", "path", "fmt", "d", "G", "keys", "layers", "ns/key/head", "codes_GB/s");
    char buf[32];
    for (const char *dp = dims; *dp; dp += strcspn(dp, ",") + (dp[strcspn(dp, ",")] == ',')) {
        int d = atoi(dp);
        for (int f = 0; f < TQ_NFMT; f++) {
            if (!in_list(formats, tq_fmt_name((tq_fmt)f))) continue;
            tq_codec c;
            if (tq_init(&c, (tq_fmt)f, d, TQ_SCALE_NORM, TQ_DEFAULT_SEED) != 0) continue;
            for (const char *np = keys; *np; np += strcspn(np, ",") + (np[strcspn(np, ",")] == ',')) {
                int n = atoi(np);
                size_t layer = (size_t)n * c.bytes;      /* one layer's keys (values alike) */
                int layers = (int)ceil(arena_mib * 1048576.0 / (2.0 * layer));
                if (layers < 1) layers = 1;
                uint8_t *k = malloc(layer * layers), *v = malloc(layer * layers);
                float *x = malloc(sizeof(float) * d);
                if (!k || !v || !x) { fprintf(stderr, "tqbench: out of memory\n"); return 1; }
                for (int t = 0; t < n; t++) {
                    for (int i = 0; i < d; i++) x[i] = frand();
                    tq_encode(&c, x, k + (size_t)t * c.bytes);
                    for (int i = 0; i < d; i++) x[i] = frand();
                    tq_encode(&c, x, v + (size_t)t * c.bytes);
                }
                for (int L = 1; L < layers; L++) { memcpy(k + L * layer, k, layer); memcpy(v + L * layer, v, layer); }
                for (const char *gp = groups; *gp; gp += strcspn(gp, ",") + (gp[strcspn(gp, ",")] == ',')) {
                    int G = atoi(gp);
                    size_t qf = tq_query_floats(&c);
                    float *qp = malloc(sizeof(float) * G * qf), *sc = malloc(sizeof(float) * G * CHUNK);
                    float *st = malloc(sizeof(float) * G * (2 + tq_acc_floats(&c)));
                    for (int r = 0; r < G; r++) {
                        for (int i = 0; i < d; i++) x[i] = 4 * frand();
                        tq_prepare_query(&c, x, qp + r * qf);
                    }
                    for (int p = 0; p < TQ_NSIMD; p++) {
                        if (!tq_simd_supported((tq_simd)p) || !in_list(paths, tq_simd_name((tq_simd)p))) continue;
                        double best = 1e30;
                        for (int pass = 0; pass < passes; pass++) {
                            double t0 = now();
                            for (int L = 0; L < layers; L++)
                                attend(&c, &c, (tq_simd)p, G, qp, n, k + L * layer, v + L * layer, sc, st);
                            best = fmin(best, now() - t0);
                            sink = st[2];
                        }
                        double per_key = best / ((double)layers * n);
                        snprintf(buf, sizeof buf, "%d", layers);
                        printf("%-8s %-5s %4d %2d %6d %6s %13.2f %9.2f\n", tq_simd_name((tq_simd)p), tq_fmt_name((tq_fmt)f), d, G,
                               n, buf, per_key / G * 1e9, 2.0 * c.bytes / per_key * 1e-9);
                        fflush(stdout);
                    }
                    free(qp); free(sc); free(st);
                }
                free(k); free(v); free(x);
            }
            tq_free(&c);
        }
    }
    return 0;
}
