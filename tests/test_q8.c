/* tests/test_q8.c - the products with int8 weights (tq.c's tq_q8_prepare / tq_q8_rows, called
 * through run.c's linear()) against a plain scalar statement of the same arithmetic, bit for bit.
 *
 * The claim under test (tq.h / tq.c, "int8 weight products"): the input is quantized per group of TQ_QGROUP
 * (scale max|x| / 127, codes rounded to nearest-even), each group's dot product of codes is
 * an exact integer, and the groups are summed as a chain of fmaf(sum, w_scale * x_scale, acc)
 * in group order. So the one-token kernels (a row at a time, or 8 / 16 rows in the lanes of
 * one AVX2 / AVX-512 vector), the 4-row x 16-token tile and every leftover row
 * or token give exactly what the scalar loops below give, whatever vector instructions the
 * compiler chose; `make ctest` also builds this file for the baseline x86-64 instruction set
 * (-O1, no -march) and checks that its --hash line equals the optimized build's, so the bits
 * are the same with and without AVX2 / AVX-512 / FMA.
 *
 * The W8A32 products (--qinput 0: the input kept in fp32) have no such guarantee: they are
 * checked against the float64 sum of w * s * x within 1e-5 of the sum of |w * s * x|.
 *
 * Usage: tests/test_q8 [--hash]    exit status 0 when every case matches
 */
#define RUN_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"   /* the rest of run.c is not called here */
#include "../run.c"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double uniform(void) {                   /* xorshift64*, in [0, 1) */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

/* codes and scales of one row of n numbers: the quotient x / s rounded to nearest-even, taken
 * exactly (in double) for the weights as export.py does, in float for an input as run does */
static void quantize_row(const float *x, int n, int8_t *q, float *s, int exact) {
    for (int g = 0; g < n / TQ_QGROUP; g++) {
        float amax = 0.0f;
        for (int k = 0; k < TQ_QGROUP; k++) {
            float a = fabsf(x[g * TQ_QGROUP + k]);
            if (a > amax) amax = a;
        }
        s[g] = amax / 127.0f;
        for (int k = 0; k < TQ_QGROUP; k++) {
            float v = x[g * TQ_QGROUP + k];
            q[g * TQ_QGROUP + k] = (int8_t)(s[g] == 0 ? 0 : exact ? rint((double)v / s[g]) : rintf(v / s[g]));
        }
    }
}

/* out[t][i], straight from the definition: integer group sums in 64 bits, then the fmaf chain */
static float reference(const int8_t *w, const float *ws, const float *x, int n, int i, int t) {
    int8_t xq[4096];
    float xs[64];
    quantize_row(x + (size_t)t * n, n, xq, xs, 0);
    float acc = 0.0f;
    for (int g = 0; g < n / TQ_QGROUP; g++) {
        long long sum = 0;
        for (int k = 0; k < TQ_QGROUP; k++) sum += (long long)w[(size_t)i * n + g * TQ_QGROUP + k] * xq[g * TQ_QGROUP + k];
        acc = fmaf((float)sum, ws[(size_t)i * (n / TQ_QGROUP) + g] * xs[g], acc);
    }
    return acc;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) { h ^= ((const unsigned char *)p)[i]; h *= 0x100000001B3ull; }
    return h;
}

/* out (B, d) = x . W^T through run.c's linear(), W's rows given as `parts` products of uneven
 * sizes (one parallel loop over all their blocks), their outputs put back side by side. */
static void product(RunState *s, float *out, const float *x, int8_t *w, float *ws, int B, int n, int d, int parts) {
    Product p[3];
    QMatrix q = {w, ws};
    int start[4] = {0, d / 3, d / 3 + (d + 1) / 3, d};   /* parts == 3: three runs of rows */
    if (parts == 1) start[1] = d;
    for (int k = 0; k < parts; k++) {
        int dk = start[k + 1] - start[k];
        p[k] = (Product){(float *)xcalloc((size_t)B * dk + 1, sizeof(float), "out"), NULL, &q, (size_t)start[k] * n, dk};
    }
    linear(s, x, B, n, p, parts);
    for (int k = 0; k < parts; k++) {
        for (int t = 0; t < B; t++)
            for (int i = 0; i < p[k].d; i++) out[(size_t)t * d + start[k] + i] = p[k].out[(size_t)t * p[k].d + i];
        free(p[k].out);
    }
}

int main(int argc, char **argv) {
    int hash_only = argc > 1 && !strcmp(argv[1], "--hash");
    /* (B tokens, n inputs, d outputs): one token; tiles with and without leftover tokens;
     * row counts that are not a multiple of 4 (the tile's rows); leftover tokens over whole blocks of 8
     * and 16 rows (the AVX2 and AVX-512 one-token kernels) and the rows after them */
    const int cases[][3] = {{1, 64, 8}, {1, 192, 7}, {3, 128, 5}, {16, 64, 4}, {17, 128, 9},
                            {33, 192, 12}, {48, 64, 3}, {40, 320, 11}, {1, 128, 16}, {2, 64, 35},
                            {19, 192, 48}, {1, 576, 64}};
    int failed = 0;
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int B = cases[c][0], n = cases[c][1], d = cases[c][2];
        float *x = (float *)xcalloc((size_t)B * n, sizeof(float), "x");
        float *wf = (float *)xcalloc((size_t)d * n, sizeof(float), "w");
        int8_t *w = (int8_t *)xcalloc((size_t)d * n, 1, "w");
        float *ws = (float *)xcalloc((size_t)d * (n / TQ_QGROUP), sizeof(float), "ws");
        float *out = (float *)xcalloc((size_t)B * d, sizeof(float), "out");
        for (size_t j = 0; j < (size_t)B * n; j++) x[j] = (float)(4 * uniform() - 2) * (j % 7 == 0 ? 10 : 1);
        for (int k = 0; k < TQ_QGROUP; k++) x[k] = 0.0f;              /* an all-zero input group */
        for (size_t j = 0; j < (size_t)d * n; j++) wf[j] = (float)(uniform() - 0.5) * 0.2f;
        for (int i = 0; i < d; i++) quantize_row(wf + (size_t)i * n, n, w + (size_t)i * n, ws + (size_t)i * (n / TQ_QGROUP), 1);
        RunState s;
        memset(&s, 0, sizeof s);
        if (tq_q8_input_build(&s.q8, B, n, 1) < 0) die("out of memory");
        s.q8.qinput = 1;
        for (int parts = 1; parts <= 3; parts += 2) {   /* one product, then the rows as three */
            if (parts == 3 && d < 3) break;
            product(&s, out, x, w, ws, B, n, d, parts);
            int bad = 0;
            for (int t = 0; t < B; t++)
                for (int i = 0; i < d; i++) {
                    float want = reference(w, ws, x, n, i, t), got = out[(size_t)t * d + i];
                    if (memcmp(&want, &got, sizeof got) != 0) {
                        if (bad++ < 3)
                            fprintf(stderr, "test_q8: B %d n %d d %d in %d parts: token %d row %d: %.9g, the definition gives %.9g\n",
                                    B, n, d, parts, t, i, got, want);
                    }
                }
            if (bad) failed++;
            if (!hash_only) printf("test_q8: B %2d n %3d d %2d, %d part%s: %s\n", B, n, d, parts, parts > 1 ? "s" : "",
                                   bad ? "MISMATCH" : "bit-identical");
        }
        h = fnv(h, out, (size_t)B * d * sizeof(float));

        s.q8.qinput = 0;                                   /* W8A32: within rounding of the float64 sum */
        product(&s, out, x, w, ws, B, n, d, 1);
        double worst = 0;
        for (int t = 0; t < B; t++)
            for (int i = 0; i < d; i++) {
                double sum = 0, mag = 0;
                for (int j = 0; j < n; j++) {
                    double term = (double)w[(size_t)i * n + j] * ws[((size_t)i * n + j) / TQ_QGROUP] * x[(size_t)t * n + j];
                    sum += term;
                    mag += fabs(term);
                }
                double err = fabs(out[(size_t)t * d + i] - sum) / (mag + 1e-30);
                if (err > worst) worst = err;
            }
        if (worst > 1e-5) failed++;
        if (!hash_only) printf("test_q8: B %2d n %3d d %2d W8A32: worst error %.2g of the sum of |terms|%s\n", B, n, d,
                               worst, worst > 1e-5 ? " MISMATCH" : "");
        free(x); free(wf); free(w); free(ws); free(out); tq_q8_input_free(&s.q8);
    }
    if (hash_only) printf("%016llx\n", (unsigned long long)h);
    else printf("test_q8: %s\n", failed ? "FAILED" : "W8A8 bit-identical to its definition, W8A32 within 1e-5");
    return failed != 0;
}
