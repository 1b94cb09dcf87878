/* tests/tqstat.c - distortion of every KV format, one line per (format, d):
 *   make tqstat
 *   tqstat fmt=tq3 d=64 bits=3.25 ratio_fp16=4.92 mse=0.0334 ip_bias=... ip_var_d=... mse_nc=... mse_eden=...
 * bits        bits per element, every stored byte counted (norms, signs)
 * ratio_fp16  fp16 bytes / format bytes
 * mse         mean |x - x~|^2 over 10,000 seeded random unit vectors, with the
 *             paper's scale rule s = |x| (Theorem 1 bounds it)
 * ip_bias     mean of <q, x~> - <q, x> (paper's rule), q a random unit vector at
 *             60 degrees from x: q = x/2 + sqrt(3)/2 w, w a random unit vector
 *             orthogonal to x. A multiplicative bias (1 + beta) of inner products
 *             shows as beta/2; for an independent q every format would read ~0.
 * ip_var_d    d * variance of that error (the paper's D_prod is Var for unit q, x)
 * mse_nc, mse_eden  mse with the other two scale rules (fp/q formats have no
 *             such rule: they repeat mse). */
#include "../tq.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N 10000
#define MAXD 128

static uint64_t rs;
static double urand(void) {                           /* xorshift64*, uniform (0, 1) */
    rs ^= rs >> 12; rs ^= rs << 25; rs ^= rs >> 27;
    return ((double)((rs * 0x2545F4914F6CDD1DULL) >> 11) + 0.5) * 0x1p-53;
}
static void random_unit(float *x, int d) {            /* Box-Muller, then normalize */
    double n = 0;
    for (int i = 0; i < d; i++) {
        x[i] = (float)(sqrt(-2 * log(urand())) * cos(6.283185307179586 * urand()));
        n += (double)x[i] * x[i];
    }
    for (int i = 0; i < d; i++) x[i] = (float)(x[i] / sqrt(n));
}
static double dotd(const float *a, const float *b, int d) { double s = 0; for (int i = 0; i < d; i++) s += (double)a[i] * b[i]; return s; }

typedef struct { double mse, ip_bias, ip_var_d; } stats;

/* N random unit vectors x (N, d) and unit q (N, d) at 60 degrees from each x. */
static void make_vectors(int d, float *X, float *Q) {
    float w[MAXD];
    rs = 0x7153746174ULL;
    for (int v = 0; v < N; v++) {
        float *x = X + (size_t)v * d, *q = Q + (size_t)v * d;
        random_unit(x, d);
        random_unit(w, d);
        double xw = dotd(x, w, d), wn = 0;
        for (int i = 0; i < d; i++) { w[i] -= (float)(xw * x[i]); wn += (double)w[i] * w[i]; }
        for (int i = 0; i < d; i++) q[i] = (float)(0.5 * x[i] + sqrt(0.75 / wn) * w[i]);
    }
}

static stats measure(tq_fmt f, int d, tq_scale scale, const float *X, const float *Q) {
    tq_codec c;
    stats st = {0, 0, 0};
    if (tq_init(&c, f, d, scale, TQ_DEFAULT_SEED) != 0) return st;
    uint8_t code[1024];
    float y[MAXD];
    double s1 = 0, s2 = 0;
    for (int v = 0; v < N; v++) {
        const float *x = X + (size_t)v * d, *q = Q + (size_t)v * d;
        tq_encode(&c, x, code);
        tq_decode(&c, code, y);
        for (int i = 0; i < d; i++) st.mse += ((double)x[i] - y[i]) * ((double)x[i] - y[i]);
        double e = dotd(q, y, d) - dotd(q, x, d);
        s1 += e; s2 += e * e;
    }
    st.mse /= N;
    st.ip_bias = s1 / N;
    st.ip_var_d = (s2 / N - st.ip_bias * st.ip_bias) * d;
    tq_free(&c);
    return st;
}

int main(void) {
    float *X = malloc(sizeof(float) * N * MAXD), *Q = malloc(sizeof(float) * N * MAXD);
    if (!X || !Q) return 1;
    for (int d = 64; d <= 128; d *= 2) {
        make_vectors(d, X, Q);                        /* the same vectors for every format */
        for (int f = 0; f < TQ_NFMT; f++) {
            stats p = measure(f, d, TQ_SCALE_NORM, X, Q);
            int has_rule = f >= TQ_TQ2;
            double nc = has_rule ? measure(f, d, TQ_SCALE_NC, X, Q).mse : p.mse;
            double eden = has_rule ? measure(f, d, TQ_SCALE_EDEN, X, Q).mse : p.mse;
            double bits = tq_bits_per_elem(f, d);
            printf("tqstat fmt=%s d=%d bits=%.2f ratio_fp16=%.2f mse=%.3g ip_bias=%.3g ip_var_d=%.3g mse_nc=%.3g mse_eden=%.3g\n",
                   tq_fmt_name(f), d, bits, 16.0 / bits, p.mse, p.ip_bias, p.ip_var_d, nc, eden);
        }
    }
    free(X); free(Q);
    return 0;
}
