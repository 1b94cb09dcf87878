/* tests/test_tq.c - unit tests of the TurboQuant codec (tq.c), run by `make ctest`,
 * plain and under ASan/UBSan. Expected numbers come from the paper (Zandieh et al. 2025,
 * arXiv 2504.19874: Lemma 1's coordinate density, Theorem 1's distortion) or are computed here independently of tq.c
 * (quadrature of the coordinate density, explicit Hadamard matrices, a bit-by-bit
 * reader/writer of the byte layout documented in tq.h). */
#include "../tq.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int n_pass, n_fail;
#define CHECK(cond, ...) do { if (cond) n_pass++; else { n_fail++; \
    printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static const double PI = 3.14159265358979323846;
static const int DIMS[6] = {32, 64, 80, 96, 128, 256};
#define MAXD 256

/* ---- the test's own random numbers (xorshift64*, Box-Muller) ---------------------*/
static uint64_t rs = 0x1234567890ABCDEFULL;
static double urand(void) {
    rs ^= rs >> 12; rs ^= rs << 25; rs ^= rs >> 27;
    return ((double)((rs * 0x2545F4914F6CDD1DULL) >> 11) + 0.5) * 0x1p-53;
}
static double nrand(void) {                          /* Box-Muller, both branches used */
    static double spare;
    static int have;
    if (have) { have = 0; return spare; }
    double r = sqrt(-2 * log(urand())), a = 2 * PI * urand();
    spare = r * sin(a); have = 1;
    return r * cos(a);
}
static void randn(float *x, int d) { for (int i = 0; i < d; i++) x[i] = (float)nrand(); }
static double dotd(const float *a, const float *b, int d) { double s = 0; for (int i = 0; i < d; i++) s += (double)a[i] * b[i]; return s; }
static double norm(const float *x, int d) { return sqrt(dotd(x, x, d)); }
static void unit(float *x, int d) { double n = norm(x, d); for (int i = 0; i < d; i++) x[i] = (float)(x[i] / n); }
static double dist2(const float *a, const float *b, int d) { double s = 0; for (int i = 0; i < d; i++) s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]); return s; }
static int is_tq(tq_fmt f) { return f >= TQ_TQ2; }
static int is_prod(tq_fmt f) { return f >= TQ_TQ2P; }
static int stream_bits(tq_fmt f) { return f >= TQ_TQ2P ? f - TQ_TQ2P + 1 : f - TQ_TQ2 + 2; } /* Lloyd-Max bits */

/* ---- expected distortion --------------------------------------------------------
 * REF_MSE: the Lloyd-Max codebook MSE of the exact coordinate density (paper, Lemma 1) at
 * d = 64 and 128, to the digits shown; Theorem 1's large-d values are 0.36, 0.117, 0.03,
 * 0.009 for b = 1..4. REF_GAUSS: Max's Lloyd-Max quantizer of N(0, 1) (its d -> inf limit). */
static const double REF_MSE[2][5] = {            /* [d=64, d=128][bits], exact density */
    {0, 0.3584, 0.1145, 0.0334, 0.00913}, {0, 0.3609, 0.1160, 0.0340, 0.00932}};
static const double REF_MSE_ULP[5] = {0, 1e-4, 1e-4, 1e-4, 1e-5};   /* last printed digit */
static const double REF_GAUSS[5][8] = {          /* positive half, unit variance */
    {0}, {0.7979}, {0.4528, 1.5104}, {0.2451, 0.7560, 1.3440, 2.1520},
    {0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326}};

/* ---- the byte layout of tq.h, read and written one bit at a time -------------------*/
static unsigned get_bits(const uint8_t *p, size_t bit0, int b) {
    unsigned v = 0;
    for (int k = 0; k < b; k++) v |= (unsigned)((p[(bit0 + k) / 8] >> ((bit0 + k) % 8)) & 1) << k;
    return v;
}
static void put_bits(uint8_t *p, size_t bit0, int b, unsigned v) {
    for (int k = 0; k < b; k++) if ((v >> k) & 1) p[(bit0 + k) / 8] |= (uint8_t)(1u << ((bit0 + k) % 8));
}
static float f16_at(const uint8_t *p) { return tq_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

static size_t layout_bytes(tq_fmt f, int d) {            /* tq.h's table, written out */
    switch (f) {
    case TQ_FP32: return 4 * (size_t)d;
    case TQ_FP16: return 2 * (size_t)d;
    case TQ_Q8: return (size_t)d + 2;
    case TQ_Q4: return (size_t)d / 32 * 18;
    case TQ_TQ2: case TQ_TQ3: case TQ_TQ4: return ((size_t)d * stream_bits(f) + 7) / 8 + 2;
    default: return ((size_t)d * stream_bits(f) + 7) / 8 + (size_t)d / 8 + 4;
    }
}

/* ---- format table ------------------------------------------------------------------*/
static void test_formats(void) {
    int ok = 1;
    for (int f = 0; f < TQ_NFMT; f++) { tq_fmt g; ok &= tq_parse_fmt(tq_fmt_name(f), &g) == 0 && g == (tq_fmt)f; }
    CHECK(ok, "tq_parse_fmt(tq_fmt_name(f)) != f");
    const char *names[] = {"fp32", "fp16", "q8", "q4", "tq2", "tq3", "tq4", "tq2p", "tq3p", "tq4p"};
    ok = 1;
    for (int f = 0; f < TQ_NFMT; f++) ok &= strcmp(tq_fmt_name(f), names[f]) == 0;
    CHECK(ok, "format names differ from the documented ones");
    const char *bad[] = {"", "tq5", "TQ3", "tq3 ", "q4_0", "fp", "tq1p", "tq3pp"};
    ok = 1;
    for (int i = 0; i < 8; i++) { tq_fmt g; ok &= tq_parse_fmt(bad[i], &g) == -1; }
    CHECK(ok, "tq_parse_fmt accepts an unknown name");
    ok = 1;
    for (int s = 0; s < TQ_NSCALE; s++) { tq_scale t; ok &= tq_parse_scale(tq_scale_name(s), &t) == 0 && t == (tq_scale)s; }
    { tq_scale t; ok &= tq_parse_scale("norm", &t) == 0 && t == TQ_SCALE_NORM && tq_parse_scale("NC", &t) == -1; }
    CHECK(ok, "scale names do not round-trip (norm, nc, eden)");
    ok = 1;
    for (int f = 0; f < TQ_NFMT; f++)
        for (int i = 0; i < 6; i++) {
            int d = DIMS[i];
            size_t want = (f == TQ_Q4 && d % 32) ? 0 : layout_bytes(f, d);
            if (tq_bytes(f, d) != want) { ok = 0; printf("  %s d=%d: %zu bytes, want %zu\n", names[f], d, tq_bytes(f, d), want); }
        }
    CHECK(ok, "tq_bytes differs from the layout in tq.h");
    CHECK(fabs(tq_bits_per_elem(TQ_TQ3, 64) - 3.25) < 1e-12 && fabs(16.0 / tq_bits_per_elem(TQ_TQ3, 64) - 4.92) < 0.005,
          "tq3 at d=64 should be 3.25 bits, 4.92x smaller than fp16");
    ok = 1;
    const int bad_d[] = {0, -8, 4, 12, 100};
    for (int f = 0; f < TQ_NFMT; f++)
        for (int i = 0; i < 5; i++) {
            tq_codec c;
            ok &= tq_bytes(f, bad_d[i]) == 0 && tq_init(&c, f, bad_d[i], TQ_SCALE_NORM, 1) == -1;
        }
    { tq_codec c; ok &= tq_init(&c, TQ_Q4, 48, TQ_SCALE_NORM, 1) == -1 && tq_init(&c, TQ_Q4, 80, TQ_SCALE_NORM, 1) == -1; }
    { tq_codec c; ok &= tq_init(&c, TQ_TQ3, 64, TQ_NSCALE, 1) == -1; }
    CHECK(ok, "an unsupported d (or scale) was accepted");
}

/* ---- fp16 ----------------------------------------------------------------------------*/
static void test_fp16(void) {
    int ok = 1;
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) { ok &= isnan(tq_f16_to_f32((uint16_t)h)); continue; }
        ok &= tq_f32_to_f16(tq_f16_to_f32((uint16_t)h)) == h;
    }
    CHECK(ok, "fp16 -> fp32 -> fp16 is not the identity on all 65536 halves");
    CHECK(tq_f16_to_f32(0x3C00) == 1.0f && tq_f16_to_f32(0x7BFF) == 65504.0f && tq_f16_to_f32(0x0001) == 0x1p-24f
          && tq_f16_to_f32(0xC000) == -2.0f && isinf(tq_f16_to_f32(0x7C00)), "fp16 -> fp32 of known halves");
    struct { float f; uint16_t h; } r[] = {
        {1.0f + 0x1p-11f, 0x3C00}, {1.0f + 3 * 0x1p-11f, 0x3C02}, {65504.0f, 0x7BFF}, {65519.0f, 0x7BFF},
        {65520.0f, 0x7C00}, {1e30f, 0x7C00}, {0x1p-24f, 0x0001}, {0x1p-25f, 0x0000}, {1.5f * 0x1p-25f, 0x0001},
        {3 * 0x1p-25f, 0x0002}, {-0.0f, 0x8000}, {0x1p-14f, 0x0400}, {-1.0f / 3, 0xB555}};
    ok = 1;
    for (size_t i = 0; i < sizeof r / sizeof r[0]; i++)
        if (tq_f32_to_f16(r[i].f) != r[i].h) { ok = 0; printf("  %g -> %04x, want %04x\n", r[i].f, tq_f32_to_f16(r[i].f), r[i].h); }
    CHECK(ok, "fp32 -> fp16 rounding (nearest, ties to even)");
    ok = 1;
    for (int i = 0; i < 100000; i++) {          /* nearest: no neighbour of h is closer */
        float f = (float)(nrand() * exp(8 * nrand()));
        if (fabsf(f) >= 65504) continue;
        uint16_t h = tq_f32_to_f16(f);
        double e = fabs(f - tq_f16_to_f32(h));
        ok &= e <= fabs(f - tq_f16_to_f32((uint16_t)(h + 1))) && ((h & 0x7fff) == 0 || e <= fabs(f - tq_f16_to_f32((uint16_t)(h - 1))));
    }
    CHECK(ok, "fp32 -> fp16 is not round-to-nearest on random floats");
}

/* ---- the rotation ---------------------------------------------------------------------*/

/* y = H D_R ... H D_1 x with the explicit Sylvester matrix H[i][j] = (-1)^popcount(i&j)/sqrt(d). */
static void explicit_hadamard(const tq_codec *c, const float *x, double *y) {
    int d = c->d;
    double v[MAXD];
    for (int i = 0; i < d; i++) y[i] = x[i];
    for (int r = 0; r < c->rounds; r++) {
        for (int i = 0; i < d; i++) v[i] = y[i] * c->signs[r * d + i];
        for (int i = 0; i < d; i++) {
            double s = 0;
            for (int j = 0; j < d; j++) s += (__builtin_popcount(i & j) & 1 ? -v[j] : v[j]);
            y[i] = s / sqrt(d);
        }
    }
}

static void test_rotation(void) {
    for (int t = 0; t < 6; t++) {
        int d = DIMS[t], pow2 = (d & (d - 1)) == 0;
        tq_codec c;
        tq_init(&c, TQ_TQ3, d, TQ_SCALE_NORM, TQ_DEFAULT_SEED);
        CHECK(pow2 ? (c.rounds == 3 && c.signs && !c.dense) : (c.rounds == 0 && c.dense && !c.signs),
              "d=%d: expected %s", d, pow2 ? "3 Hadamard rounds" : "a dense matrix");
        float x[MAXD], y[MAXD], z[MAXD];
        double worst_norm = 0, worst_inv = 0, worst_orth = 0, worst_expl = 0;
        for (int v = 0; v < 200; v++) {
            randn(x, d);
            if (v % 2) for (int i = 0; i < d; i++) x[i] *= (float)exp(3 * nrand());   /* uneven scales */
            tq_rotate(&c, x, y);
            tq_unrotate(&c, y, z);
            worst_norm = fmax(worst_norm, fabs(norm(y, d) / norm(x, d) - 1));
            worst_inv = fmax(worst_inv, sqrt(dist2(x, z, d)) / norm(x, d));
            if (pow2 && v < 4) {
                double e[MAXD], err = 0;
                explicit_hadamard(&c, x, e);
                for (int i = 0; i < d; i++) err = fmax(err, fabs(e[i] - y[i]));
                worst_expl = fmax(worst_expl, err / norm(x, d));
            }
        }
        static float P[MAXD * MAXD];                 /* columns Pi e_j, then Pi Pi^T = I */
        for (int j = 0; j < d; j++) {
            memset(x, 0, sizeof x); x[j] = 1;
            tq_rotate(&c, x, y);
            for (int i = 0; i < d; i++) P[i * d + j] = y[i];
        }
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) worst_orth = fmax(worst_orth, fabs(dotd(P + i * d, P + j * d, d) - (i == j)));
        CHECK(worst_norm < 1e-6, "d=%d: rotation changes the norm by %.2e", d, worst_norm);
        CHECK(worst_inv < 1e-6, "d=%d: unrotate(rotate(x)) is off by %.2e", d, worst_inv);
        CHECK(worst_orth < 1e-6, "d=%d: Pi Pi^T - I = %.2e", d, worst_orth);
        if (pow2) CHECK(worst_expl < 1e-6, "d=%d: rotation != H D3 H D2 H D1 (explicit matrices): %.2e", d, worst_expl);
        tq_free(&c);
    }
    /* the rotation depends on (d, seed) only; another seed gives another rotation */
    tq_codec a, b, e, f;
    tq_init(&a, TQ_TQ2, 64, TQ_SCALE_NORM, 7); tq_init(&b, TQ_TQ4P, 64, TQ_SCALE_EDEN, 7);
    tq_init(&e, TQ_TQ3, 64, TQ_SCALE_NORM, 8); tq_init(&f, TQ_FP16, 64, TQ_SCALE_NORM, 7);
    float x[64], y[64], y2[64], y3[64], y4[64];
    randn(x, 64);
    tq_rotate(&a, x, y); tq_rotate(&b, x, y2); tq_rotate(&e, x, y3); tq_rotate(&f, x, y4);
    CHECK(memcmp(y, y2, sizeof y) == 0 && memcmp(y, y3, sizeof y) != 0 && memcmp(x, y4, sizeof x) == 0,
          "the rotation must depend on (d, seed) only, and be the identity for fp/q formats");
    tq_free(&a); tq_free(&b); tq_free(&e); tq_free(&f);
}

/* ---- the Lloyd-Max codebook ---------------------------------------------------------------*/

/* d * E[(t - Q(t))^2] under the exact density f(t) = Gamma(d/2)/(sqrt(pi) Gamma((d-1)/2))
 * (1-t^2)^((d-3)/2), by Simpson's rule on each nearest-centroid cell (independent of
 * tq.c); *cond_err = how far (times sqrt(d)) a centroid is from its cell's mean. */
static double codebook_mse(const float *cent, int K, int d, double *cond_err) {
    const int n = 4000;                               /* even number of intervals per cell */
    double logZ = lgamma(d / 2.0) - 0.5 * log(PI) - lgamma((d - 1) / 2.0), mse = 0;
    *cond_err = 0;
    for (int k = 0; k < K; k++) {
        double lo = k ? 0.5 * (cent[k - 1] + cent[k]) : -1, hi = k + 1 < K ? 0.5 * (cent[k] + cent[k + 1]) : 1;
        double h = (hi - lo) / n, m0 = 0, m1 = 0, m2 = 0;
        for (int j = 0; j <= n; j++) {
            double t = lo + j * h, w = (j == 0 || j == n) ? 1 : (j % 2 ? 4 : 2);
            double f = 1 - t * t > 0 ? exp(logZ + 0.5 * (d - 3) * log(1 - t * t)) : 0;
            w *= f * h / 3;
            m0 += w; m1 += w * t; m2 += w * (t - cent[k]) * (t - cent[k]);
        }
        mse += m2;
        *cond_err = fmax(*cond_err, fabs(m1 / m0 - cent[k]) * sqrt(d));
    }
    return d * mse;
}

static void test_codebook(void) {
    for (int b = 1; b <= 4; b++) {                   /* Gaussian limit, scaled by sqrt(d) */
        tq_codec c;                                  /* (1 bit only in tq2p, whose d x d S must stay small) */
        int K = 1 << b, d = b == 1 ? 1024 : 65536;
        tq_init(&c, b == 1 ? TQ_TQ2P : TQ_TQ2 + b - 2, d, TQ_SCALE_NORM, 1);
        double err = 0;
        for (int k = 0; k < K / 2; k++) err = fmax(err, fabs(c.centroids[K / 2 + k] * sqrt(d) - REF_GAUSS[b][k]));
        CHECK(err < 1e-3, "b=%d: centroids at d=%d are %.2e from the Gaussian Lloyd-Max ones", b, d, err);
        tq_free(&c);
    }
    for (int di = 0; di < 2; di++)
        for (int b = 1; b <= 4; b++) {
            tq_codec c;
            int d = 64 << di, K = 1 << b, ok = 1;
            tq_init(&c, b == 1 ? TQ_TQ2P : TQ_TQ2 + b - 2, d, TQ_SCALE_NORM, 1);
            double cond, mse = codebook_mse(c.centroids, K, d, &cond);
            CHECK(fabs(mse - REF_MSE[di][b]) < 0.6 * REF_MSE_ULP[b], "d=%d b=%d: codebook MSE %.6f, expected %.5g", d, b, mse, REF_MSE[di][b]);
            CHECK(cond < 1e-5, "d=%d b=%d: centroids are off their cell means by %.2e (not Lloyd-Max)", d, b, cond);
            for (int k = 0; k < K; k++) {
                ok &= c.centroids[k] == -c.centroids[K - 1 - k] && (k == 0 || c.centroids[k] > c.centroids[k - 1]);
                if (k + 1 < K) ok &= fabs(c.bounds[k] - 0.5 * (c.centroids[k] + c.centroids[k + 1])) < 1e-7;
            }
            CHECK(ok, "d=%d b=%d: codebook not sorted/symmetric or bounds not midpoints", d, b);
            if (d == 64 && b == 4) CHECK(fabs(c.centroids[15] * 8 - 2.643) < 0.005, "d=64: largest 4-bit centroid %.4f/sqrt(d), expected ~2.643", c.centroids[15] * 8);
            tq_free(&c);
        }
    struct timespec t0, t1;
    tq_codec c;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 10; i++) { tq_init(&c, TQ_TQ4P, 128, TQ_SCALE_NORM, i); tq_free(&c); }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = ((t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) * 1e-6) / 10;
    CHECK(ms < 50, "tq_init takes %.1f ms, want < 50", ms);
}

/* ---- pack / unpack: the bytes are exactly tq.h's layout -----------------------------------------*/

/* Check one tq code against x, bit by bit. Returns 1 when everything agrees. */
static int check_tq_code(const tq_codec *c, const float *x, const uint8_t *code) {
    int d = c->d, b = c->bits, K = 1 << b, ok = 1;
    size_t nb = c->bytes, sbyte = (size_t)d * b / 8 + (is_prod(c->fmt) ? d / 8 : 0);
    unsigned idx[MAXD], sg[MAXD];
    float u[MAXD], y[MAXD], yt[MAXD], xt[MAXD], dec[MAXD];
    uint8_t re[4096] = {0};
    double nx = norm(x, d);
    for (int i = 0; i < d; i++) { idx[i] = get_bits(code, (size_t)b * i, b); put_bits(re, (size_t)b * i, b, idx[i]); }
    for (int i = 0; i < d; i++) u[i] = (float)(x[i] / nx);
    tq_rotate(c, u, y);
    for (int i = 0; i < d; i++)                               /* Algorithm 1: nearest centroid */
        for (int k = 0; k < K; k++) ok &= fabsf(y[i] - c->centroids[idx[i]]) <= fabsf(y[i] - c->centroids[k]) + 1e-6f;
    double cc = 0, yc = 0;                                        /* the scale rules of tq.h, in fp16 */
    for (int i = 0; i < d; i++) { cc += c->centroids[idx[i]] * c->centroids[idx[i]]; yc += y[i] * c->centroids[idx[i]]; }
    double want = c->scale == TQ_SCALE_NORM ? nx : c->scale == TQ_SCALE_NC ? nx / sqrt(cc) : nx / yc;
    float s = f16_at(code + sbyte);
    ok &= fabs(s - want) <= 0x1p-11 * want * 1.01 + 1e-7;
    for (int i = 0; i < d; i++) yt[i] = s * c->centroids[idx[i]];
    if (is_prod(c->fmt)) {                                        /* Algorithm 2 on Pi r = |x| y - s c */
        double r[MAXD], gamma = 0;
        for (int i = 0; i < d; i++) { r[i] = nx * y[i] - (double)s * c->centroids[idx[i]]; gamma += r[i] * r[i]; }
        gamma = sqrt(gamma);
        float g16 = f16_at(code + sbyte + 2);
        ok &= fabs(g16 - gamma) <= 0x1p-11 * gamma + 1e-7;
        for (int k = 0; k < d; k++) {
            double z = 0;
            for (int i = 0; i < d; i++) z += c->qjl[k * d + i] * r[i];
            sg[k] = get_bits(code + (size_t)d * b / 8, k, 1);
            ok &= sg[k] == (z > 0) || fabs(z) < 1e-4 * gamma;
            put_bits(re + (size_t)d * b / 8, k, 1, sg[k]);
        }
        for (int k = 0; k < d; k++)
            for (int i = 0; i < d; i++) yt[i] += (float)(sqrt(PI / 2) / d * g16 * (sg[k] ? 1 : -1) * c->qjl[k * d + i]);
        memcpy(re + sbyte + 2, code + sbyte + 2, 2);
    }
    memcpy(re + sbyte, code + sbyte, 2);
    ok &= memcmp(re, code, nb) == 0;                              /* re-packed bit by bit: same bytes */
    tq_unrotate(c, yt, xt);
    tq_decode(c, code, dec);
    ok &= sqrt(dist2(xt, dec, d)) <= 1e-5 * (norm(xt, d) + 1e-30);
    return ok;
}

/* fp32/fp16/q8/q4: the documented formulas, byte for byte. */
static int check_plain_code(const tq_codec *c, const float *x, const uint8_t *code) {
    int d = c->d, ok = 1;
    uint8_t want[4096] = {0};
    float dec[MAXD];
    tq_decode(c, code, dec);
    if (c->fmt == TQ_FP32) return memcmp(code, x, 4 * (size_t)d) == 0 && memcmp(dec, x, 4 * (size_t)d) == 0;
    if (c->fmt == TQ_FP16) {
        for (int i = 0; i < d; i++) { uint16_t h = tq_f32_to_f16(x[i]); want[2 * i] = (uint8_t)h; want[2 * i + 1] = (uint8_t)(h >> 8);
                                      ok &= dec[i] == tq_f16_to_f32(h); }
    } else if (c->fmt == TQ_Q8) {                                /* s = absmax/127, x~ = s q */
        double amax = 0;
        for (int i = 0; i < d; i++) amax = fmax(amax, fabs(x[i]));
        uint16_t h = tq_f32_to_f16((float)(amax / 127));
        float s = tq_f16_to_f32(h);
        for (int i = 0; i < d; i++) { int q = (int)lround(x[i] / s); q = q > 127 ? 127 : q < -127 ? -127 : q;
                                      want[i] = (uint8_t)(int8_t)q; ok &= dec[i] == s * q; }
        want[d] = (uint8_t)h; want[d + 1] = (uint8_t)(h >> 8);
    } else {                                                      /* q4: s = m / -8, x~ = s (q - 8) */
        for (int blk = 0; blk < d / 32; blk++) {
            float m = 0;
            for (int j = 0; j < 32; j++) if (fabsf(x[32 * blk + j]) > fabsf(m)) m = x[32 * blk + j];
            uint16_t h = tq_f32_to_f16(-m / 8);
            float s = tq_f16_to_f32(h);
            for (int j = 0; j < 32; j++) {
                int q = (int)floor(x[32 * blk + j] / s + 8.5); q = q > 15 ? 15 : q < 0 ? 0 : q;
                put_bits(want + 18 * blk, 4 * (size_t)j, 4, (unsigned)q);
                ok &= dec[32 * blk + j] == s * (q - 8);
            }
            want[18 * blk + 16] = (uint8_t)h; want[18 * blk + 17] = (uint8_t)(h >> 8);
        }
    }
    return ok && memcmp(want, code, c->bytes) == 0;
}

static void test_roundtrip(void) {
    for (int f = 0; f < TQ_NFMT; f++)
        for (int t = 0; t < 6; t++) {
            int d = DIMS[t], ok = 1;
            tq_codec c;
            if (tq_init(&c, f, d, (tq_scale)(t % TQ_NSCALE), TQ_DEFAULT_SEED) != 0) {
                CHECK(f == TQ_Q4 && d % 32, "%s d=%d: tq_init failed", tq_fmt_name(f), d);
                continue;
            }
            uint8_t code[4096];
            float x[MAXD];
            for (int v = 0; v < 12; v++) {
                randn(x, d);
                double sc = exp(2 * nrand());                    /* vectors of any length */
                for (int i = 0; i < d; i++) x[i] = (float)(x[i] * sc);
                tq_encode(&c, x, code);
                ok &= is_tq(f) ? check_tq_code(&c, x, code) : check_plain_code(&c, x, code);
            }
            CHECK(ok, "%s d=%d: encoded bytes differ from tq.h's layout or decode disagrees", tq_fmt_name(f), d);
            tq_free(&c);
        }
}

/* ---- zeros, huge and tiny inputs --------------------------------------------------------------*/
static void test_extremes(void) {
    for (int f = 0; f < TQ_NFMT; f++)
        for (int d = 64; d <= 96; d += 32) {                    /* Hadamard and dense */
            tq_codec c;
            if (tq_init(&c, f, d, TQ_SCALE_EDEN, 3) != 0) continue;
            uint8_t code[4096];
            float x[MAXD], y[MAXD], qp[MAXD * 20], acc[2 * MAXD];
            int ok = 1;
            memset(x, 0, sizeof x);
            tq_encode(&c, x, code);
            tq_decode(&c, code, y);
            for (int i = 0; i < d; i++) ok &= y[i] == 0;
            randn(x, d);
            tq_prepare_query(&c, x, qp);
            memset(acc, 0, sizeof acc);
            tq_axpy(&c, 1.0f, code, acc);
            tq_finish(&c, acc, y);
            ok &= tq_dot(&c, qp, code) == 0;
            for (int i = 0; i < d; i++) ok &= y[i] == 0;
            CHECK(ok, "%s d=%d: the zero vector does not decode to zero", tq_fmt_name(f), d);
            ok = 1;
            const float big[] = {1e30f, 3.4e38f, 1e-30f, 1e-45f, 7e4f, 1e5f};
            for (int k = 0; k < 8; k++) {
                for (int i = 0; i < d; i++)
                    x[i] = k < 6 ? big[k] * (i % 3 ? 1 : -1) : k == 6 ? (i == 5 ? 3.4e38f : 1.0f) : (i % 2 ? 1e20f : 1e-20f);
                tq_encode(&c, x, code);
                tq_decode(&c, code, y);
                for (int i = 0; i < d; i++) ok &= isfinite(y[i]);
                if (f != TQ_FP32) ok &= isfinite(tq_dot(&c, qp, code));  /* fp32 dots may overflow */
            }
            CHECK(ok, "%s d=%d: a finite input gave NaN or Inf", tq_fmt_name(f), d);
            tq_free(&c);
        }
    tq_codec c;                                                  /* fp16 scale saturates at 65504 */
    tq_init(&c, TQ_TQ3, 64, TQ_SCALE_NORM, 1);
    float x[64], y[64];
    uint8_t code[64];
    randn(x, 64); unit(x, 64);
    for (int i = 0; i < 64; i++) x[i] *= 1e6f;
    tq_encode(&c, x, code);
    CHECK(f16_at(code + 24) == 65504.0f, "tq3: a norm above 65504 must saturate to 65504, got %g", f16_at(code + 24));
    for (int i = 0; i < 64; i++) x[i] *= 1e-6f * 1000;           /* norm 1000: plain fp16 */
    tq_encode(&c, x, code);
    tq_decode(&c, code, y);
    CHECK(fabs(f16_at(code + 24) - 1000) < 0.5 && sqrt(dist2(x, y, 64)) / 1000 < 0.3, "tq3: norm 1000 encodes badly");
    tq_free(&c);
}

/* ---- distortion: Algorithm 1 against the table, Algorithm 2 unbiased --------------------------------*/

/* Mean |x - x~|^2 over n random unit vectors. */
static double mean_mse(const tq_codec *c, int n) {
    int d = c->d;
    float x[MAXD], y[MAXD];
    uint8_t code[4096];
    double sum = 0;
    for (int v = 0; v < n; v++) {
        randn(x, d); unit(x, d);
        tq_encode(c, x, code); tq_decode(c, code, y);
        sum += dist2(x, y, d);
    }
    return sum / n;
}

static void test_distortion(void) {
    for (int di = 0; di < 2; di++)
        for (int f = TQ_TQ2; f <= TQ_TQ4; f++) {
            tq_codec c;
            int d = 64 << di;
            tq_init(&c, f, d, TQ_SCALE_NORM, TQ_DEFAULT_SEED);
            double mse = mean_mse(&c, 10000), ref = REF_MSE[di][c.bits];
            CHECK(fabs(mse / ref - 1) < 0.03, "%s d=%d: MSE %.5f, expected %.5g (3%% allowed)", tq_fmt_name(f), d, mse, ref);
            tq_free(&c);
        }
}

/* Errors of <q, x~> = tq_dot for unit x and a unit q at 60 degrees from x, so that
 * a multiplicative bias (1 + beta) of <q, x~> shows up as a mean error beta/2.
 * Pairs are drawn as q random, x = q/2 + sqrt(3)/2 w with w a random unit vector
 * orthogonal to q (the same joint law as x first, q second), 100 x per q. */
static void ip_errors(const tq_codec *c, int n, double *mean, double *var) {
    int d = c->d;
    float x[MAXD], w[MAXD], q[MAXD];
    static float qp[MAXD * 20];
    uint8_t code[4096];
    double s1 = 0, s2 = 0;
    for (int v = 0; v < n; v++) {
        if (v % 100 == 0) { randn(q, d); unit(q, d); tq_prepare_query(c, q, qp); }
        randn(w, d);
        double qw = dotd(q, w, d);
        for (int i = 0; i < d; i++) w[i] -= (float)(qw * q[i]);
        unit(w, d);
        for (int i = 0; i < d; i++) x[i] = (float)(0.5 * q[i] + sqrt(0.75) * w[i]);
        tq_encode(c, x, code);
        double e = tq_dot(c, qp, code) - dotd(q, x, d);
        s1 += e; s2 += e * e;
    }
    *mean = s1 / n;
    *var = s2 / n - *mean * *mean;
}

static void test_prod(void) {
    const int n = 10000;
    for (int di = 0; di < 2; di++)
        for (int f = TQ_TQ2P; f <= TQ_TQ4P; f++) {
            tq_codec c;
            int d = 64 << di;
            tq_init(&c, f, d, TQ_SCALE_NORM, TQ_DEFAULT_SEED);
            int B = c.bits + 1;
            double mean, var;
            ip_errors(&c, n, &mean, &var);
            double se = sqrt(var / n), bound = sqrt(3) * PI * PI / pow(4, B);
            double predicted = PI / 2 * REF_MSE[di][B - 1];      /* Var ~ (pi/2) |r|^2 / d, |r|^2 = D_mse(B-1) */
            CHECK(fabs(mean) < 3 * se, "%s d=%d: inner products biased: mean error %.2e, standard error %.2e", tq_fmt_name(f), d, mean, se);
            CHECK(var * d <= bound, "%s d=%d: d*Var = %.4f above the paper's bound sqrt(3) pi^2 / 4^b = %.4f", tq_fmt_name(f), d, var * d, bound);
            CHECK(fabs(var * d / predicted - 1) < 0.1, "%s d=%d: d*Var = %.4f, (pi/2) D_mse(b-1) = %.4f", tq_fmt_name(f), d, var * d, predicted);
            tq_free(&c);
        }
    tq_codec c;                              /* control: Algorithm 1 alone IS biased (shrinks by ~D_mse) */
    tq_init(&c, TQ_TQ3, 64, TQ_SCALE_NORM, TQ_DEFAULT_SEED);
    double mean, var;
    ip_errors(&c, n, &mean, &var);
    CHECK(mean < -3 * sqrt(var / n) && fabs(mean / (-0.5 * REF_MSE[0][3]) - 1) < 0.2,
          "tq3 d=64: expected the MSE quantizer's bias -D_mse/2 = %.4f, got %.4f", -0.5 * REF_MSE[0][3], mean);
    tq_free(&c);
}

/* ---- structured inputs ----------------------------------------------------------------------------
 * Theorem 1's MSE holds in expectation over the random rotation for EVERY input.
 * A too-weak rotation fails that on structured inputs even on average, so each
 * input's MSE is averaged over NSEEDS rotations and compared with random inputs. */
#define NSEEDS 32
enum { BASIS, ONES, SPIKE, OFFSET, NSTRUCT };
static const char *STRUCT_NAME[NSTRUCT] = {"basis vectors", "all-ones", "a huge spike", "keys with a common offset"};

static void structured_mse(tq_fmt f, int d, int rounds, double out[NSTRUCT] /* mse / random mse */) {
    float x[MAXD], y[MAXD];
    uint8_t code[4096];
    double sum[NSTRUCT] = {0}, rnd = 0;
    int cnt[NSTRUCT] = {0};
    for (int s = 0; s < NSEEDS; s++) {
        tq_codec c;
        tq_init(&c, f, d, TQ_SCALE_NORM, 1000 + s);
        if (rounds) c.rounds = rounds;                            /* fewer rounds: for the controls */
        for (int kind = 0; kind < NSTRUCT; kind++) {
            int nv = kind == ONES ? 1 : 8;
            for (int v = 0; v < nv; v++) {
                int j = v * d / 8 + s % (d / 8);                  /* basis vector / spike position */
                for (int i = 0; i < d; i++)
                    x[i] = kind == BASIS ? (i == j) : kind == ONES ? 1.0f : kind == SPIKE ? (float)nrand() : (float)(20 + nrand());
                if (kind == SPIKE) x[j] = 1000;
                tq_encode(&c, x, code); tq_decode(&c, code, y);
                sum[kind] += dist2(x, y, d) / dotd(x, x, d); cnt[kind]++;
            }
        }
        rnd += mean_mse(&c, 64) / NSEEDS;                         /* random inputs, same rotations */
        tq_free(&c);
    }
    for (int k = 0; k < NSTRUCT; k++) out[k] = sum[k] / cnt[k] / rnd;
}

static void test_structured(void) {
    const tq_fmt fmts[4] = {TQ_TQ2, TQ_TQ3, TQ_TQ4, TQ_TQ3P};   /* prod: its mse stage is tq2's */
    for (int di = 0; di < 2; di++)
        for (int fi = 0; fi < 4; fi++) {
            int d = 64 << di;
            tq_fmt f = fmts[fi];
            double r[NSTRUCT];
            structured_mse(f, d, 0, r);
            for (int k = 0; k < NSTRUCT; k++)
                CHECK(r[k] < 1.25, "%s d=%d: %s have %.2fx the random-input MSE (1.25x allowed)", tq_fmt_name(f), d, STRUCT_NAME[k], r[k]);
        }
    /* Controls, which show the test can fail and why tq.c uses 3 rounds: one round
     * maps basis vectors to flat vectors; two rounds map all d of them to signed
     * permutations of one vector with a lattice of values (~1.4x for 4 bits). */
    double r[NSTRUCT];
    structured_mse(TQ_TQ3, 64, 1, r);
    CHECK(r[BASIS] > 1.25, "control: with 1 Hadamard round tq3 basis vectors should fail (%.2fx)", r[BASIS]);
    structured_mse(TQ_TQ4, 64, 2, r);
    CHECK(r[BASIS] > 1.25, "control: with 2 Hadamard rounds tq4 basis vectors should fail (%.2fx)", r[BASIS]);
}

/* ---- scoring and accumulation straight from the codes --------------------------------------------------*/
static void test_attention(void) {
    const int dims[3] = {64, 80, 128}, T = 32;
    for (int f = 0; f < TQ_NFMT; f++)
        for (int t = 0; t < 3; t++) {
            int d = dims[t];
            tq_codec c;
            if (tq_init(&c, f, d, (tq_scale)(t % TQ_NSCALE), 11) != 0) continue;
            static uint8_t codes[32][4096];
            static float dec[32][MAXD], qp[MAXD * 20];
            float q[MAXD], acc[2 * MAXD], out[MAXD], w[32];
            double want[MAXD] = {0}, dot_err = 0, mag = 0, axpy_err = 0;
            randn(q, d);
            tq_prepare_query(&c, q, qp);
            for (int k = 0; k < T; k++) {
                float x[MAXD];
                randn(x, d);
                for (int i = 0; i < d; i++) x[i] = (float)(x[i] * exp(nrand()) + (i == 3 ? 10 : 0));
                tq_encode(&c, x, codes[k]); tq_decode(&c, codes[k], dec[k]);
                double ref = dotd(q, dec[k], d);
                dot_err = fmax(dot_err, fabs(tq_dot(&c, qp, codes[k]) - ref) / (norm(q, d) * norm(dec[k], d)));
                w[k] = (float)(k % 5 ? urand() : -urand());
                for (int i = 0; i < d; i++) want[i] += (double)w[k] * dec[k][i];
                mag += fabs(w[k]) * norm(dec[k], d);
            }
            memset(acc, 0, sizeof acc);
            for (int k = 0; k < T; k++) tq_axpy(&c, w[k], codes[k], acc);
            tq_finish(&c, acc, out);
            for (int i = 0; i < d; i++) axpy_err += (out[i] - want[i]) * (out[i] - want[i]);
            CHECK(dot_err < 1e-5, "%s d=%d: tq_dot differs from <q, decode> by %.2e (relative)", tq_fmt_name(f), d, dot_err);
            CHECK(sqrt(axpy_err) / mag < 1e-5, "%s d=%d: tq_axpy+tq_finish differ from sum w decode by %.2e", tq_fmt_name(f), d, sqrt(axpy_err) / mag);
            CHECK(tq_query_floats(&c) <= MAXD * 20 && tq_acc_floats(&c) <= 2 * (size_t)d, "%s: query/acc sizes", tq_fmt_name(f));
            tq_free(&c);
        }
}

/* ---- tq_attn_*: every SIMD path this CPU runs, against float64 over tq_decode and against the
 * portable path --------------------------------------------------------------------------------*/
#define AQ 13          /* queries at most */
#define AN 300         /* rows at most: more than the SIMD paths' few-query limit (256) */
static int simd_tested[TQ_NSIMD];

static void attn_case(const tq_codec *c, const uint8_t *rows /* the last n rows of a buffer */, const float *dec,
                      const float *q, const float *qp, const float *w, int nq, int n, const char *what) {
    size_t qf = tq_query_floats(c), af = tq_acc_floats(c), lds = AN + 3;
    static float s[TQ_NSIMD][AQ * (AN + 3)], acc[AQ * 2 * MAXD], out[TQ_NSIMD][AQ * MAXD];
    int d = c->d;
    for (int p = 0; p < TQ_NSIMD; p++) {
        if (!tq_simd_supported((tq_simd)p)) continue;
        simd_tested[p] = 1;
        tq_attn_scores(c, (tq_simd)p, nq, qp, qf, rows, n, s[p], lds);
        memset(acc, 0, sizeof acc);
        tq_attn_values(c, (tq_simd)p, nq, w, AN, rows, n, acc, af);
        for (int r = 0; r < nq; r++) tq_finish(c, acc + r * af, out[p] + r * d);
        double score_err = 0, path_err = 0, value_err = 0, value_path_err = 0;
        for (int r = 0; r < nq; r++) {
            double want[MAXD] = {0}, mag = 1e-30;
            for (int t = 0; t < n; t++) {
                double ref = dotd(q + r * d, dec + t * d, d), scale = norm(q + r * d, d) * norm(dec + t * d, d) + 1e-30;
                score_err = fmax(score_err, fabs(s[p][r * lds + t] - ref) / scale);
                path_err = fmax(path_err, fabs(s[p][r * lds + t] - s[0][r * lds + t]) / scale);
                for (int i = 0; i < d; i++) want[i] += (double)w[r * AN + t] * dec[t * d + i];
                mag += fabs(w[r * AN + t]) * norm(dec + t * d, d);
            }
            for (int i = 0; i < d; i++) {
                value_err = fmax(value_err, fabs(out[p][r * d + i] - want[i]) / mag);
                value_path_err = fmax(value_path_err, fabs(out[p][r * d + i] - out[0][r * d + i]) / mag);
            }
        }
        const char *path = tq_simd_name((tq_simd)p);
        CHECK(score_err < 1e-5, "%s %s nq=%d n=%d: tq_attn_scores off <q, decode> by %.2e", path, what, nq, n, score_err);
        CHECK(path_err < 1e-5, "%s %s nq=%d n=%d: scores differ from the portable path by %.2e", path, what, nq, n, path_err);
        CHECK(value_err < 1e-5, "%s %s nq=%d n=%d: tq_attn_values off sum w decode by %.2e", path, what, nq, n, value_err);
        CHECK(value_path_err < 1e-5, "%s %s nq=%d n=%d: values differ from the portable path by %.2e", path, what, nq, n, value_path_err);
    }
}

static void test_attn_paths(void) {
    const int dims[4] = {64, 80, 128, 256}, nqs[4] = {1, 3, 4, 13}, ns[6] = {1, 7, 16, 17, 131, AN};
    for (int f = 0; f < TQ_NFMT; f++)
        for (int di = 0; di < 4; di++) {
            int d = dims[di];
            tq_codec c;
            if (tq_init(&c, f, d, (tq_scale)(di % TQ_NSCALE), 7) != 0) continue;
            size_t qf = tq_query_floats(&c);
            uint8_t *codes = malloc(AN * c.bytes);           /* exactly: ASan sees a read past the end */
            float *dec = malloc(sizeof(float) * AN * d), *q = malloc(sizeof(float) * AQ * d);
            float *qp = malloc(sizeof(float) * AQ * qf), *w = malloc(sizeof(float) * AQ * AN);
            for (int t = 0; t < AN; t++) {
                float x[MAXD];
                randn(x, d);
                for (int i = 0; i < d; i++) x[i] = (float)(x[i] * exp(nrand()) + (i == 5 ? 4 : 0));
                tq_encode(&c, x, codes + t * c.bytes);
            }
            for (int r = 0; r < AQ; r++) { randn(q + r * d, d); tq_prepare_query(&c, q + r * d, qp + r * qf); }
            for (int i = 0; i < AQ * AN; i++) w[i] = (float)(i % 7 == 0 ? 0.0 : i % 3 ? urand() : -urand());
            for (int a = 0; a < 6; a++)
                for (int b = 0; b < 4; b++) {
                    int n = ns[a], skip = AN - n;
                    for (int t = 0; t < n; t++) tq_decode(&c, codes + (skip + t) * c.bytes, dec + t * d);
                    char what[64];
                    snprintf(what, sizeof what, "%s d=%d", tq_fmt_name(f), d);
                    attn_case(&c, codes + skip * c.bytes, dec, q, qp, w, nqs[b], n, what);
                }
            free(codes); free(dec); free(q); free(qp); free(w);
            tq_free(&c);
        }
}

/* ---- one KV head (tq_head): tq_store, tq_store_exact, tq_attend_codes and tq_attend_finish on
 * every SIMD path, against attention written out in float64 over tq_decode: a query at T-1 reads
 * position t from its fp16 copy when t < sink or t >= T - window, else scores
 * sum_j (q.u_j) beta_tj + <q - sum_j (q.u_j) u_j, decode(key t)> and adds decode(value t), with
 * u_j the directions of t's block of kblock positions. A batch of HB tokens at HP (their rows read
 * from the batch), G queries a token, the coded positions in one work item and, for the batch's
 * last token, split in three and merged. ----------------------------------------------------*/
#define HC 300   /* positions allocated */
#define HP 280   /* the batch's first position */
#define HB 10    /* batch tokens */
#define HG 3     /* queries per token (GQA group) */

static void head_case(tq_fmt f, int d, int R, int sink, int window, int kblock) {
    tq_codec kc, vc;
    if (tq_init(&kc, f, d, TQ_SCALE_EDEN, 5) != 0 || tq_init(&vc, f == TQ_TQ3 ? TQ_TQ4 : f, d, TQ_SCALE_NC, 6) != 0) return;
    int slots = sink + window, nq = HB * HG, n = HP + HB, blocks = (HC + kblock - 1) / kblock;
    size_t sf = tq_state_floats(&vc);
    uint8_t *key = calloc(HC, kc.bytes), *value = calloc(HC, vc.bytes);
    float *kdir = calloc((size_t)blocks * R * d + 1, 4), *krot = calloc((size_t)blocks * R * d + 1, 4), *kr = malloc(sizeof(float) * n * d), *vr = malloc(sizeof(float) * n * d);
    int8_t *kbeta8 = calloc((size_t)HC * R + 1, 1);    /* int8 betas with blocks (run.c's choice) */
    float *kscale = calloc((size_t)blocks * R + 1, 4);
    uint16_t *kbeta = calloc((size_t)HC * R + 1, 2), *ek = calloc((size_t)slots * d + 1, 2), *ev = calloc((size_t)slots * d + 1, 2);
    float *q = malloc(sizeof(float) * nq * d), *rq = malloc(sizeof(float) * nq * d);
    float *st = malloc(sizeof(float) * 3 * nq * sf), *scratch = malloc(sizeof(float) * tq_attend_scratch(&kc, nq));
    float kperp[MAXD], out[MAXD];
    float *dk = malloc(sizeof(float) * n * d), *dv = malloc(sizeof(float) * n * d);   /* what the codes decode to */
    int i8 = R && kblock < HC;
    tq_head h = {&kc, &vc, HC, key, value, R, kblock, R ? kdir : NULL, R ? krot : NULL, R && !i8 ? kbeta : NULL,
                 i8 ? kbeta8 : NULL, i8 ? kscale : NULL, sink, window, slots, ek, ev};
    for (int j = 0; j < blocks * R; j++) kscale[j] = j % R ? 0.02f : 0.1f;   /* steps: |beta_1| ~ 6 + noise, beta_2 ~ noise */
    for (int j = 0; j < blocks * R; j++) {              /* orthonormal directions per block, by Gram-Schmidt */
        float *u = kdir + j * d;
        randn(u, d);
        if (j >= R) for (int k = 0; k < d; k++) u[k] += 2.0f * u[k - R * d];   /* near the previous block's: drift */
        for (int i = j - j % R; i < j; i++) { double p = dotd(u, kdir + i * d, d); for (int k = 0; k < d; k++) u[k] -= (float)(p * kdir[i * d + k]); }
        unit(u, d);
        tq_rotate(&kc, u, krot + j * d);
    }
    for (int t = 0; t < n; t++) {                       /* keys with a large part along u_1, as real ones have */
        float *k = kr + t * d, *v = vr + t * d, *u1 = kdir + (size_t)(t / kblock) * R * d;
        randn(k, d); randn(v, d);
        for (int i = 0; i < d && R; i++) k[i] += 6 * u1[i];
        tq_store(&h, t, k, v, kperp);                   /* rounds k and v to fp16 in place */
        if (t < HP) tq_store_exact(&h, t, 0, 1, k, v);  /* earlier tokens, one at a time */
        tq_decode(&kc, key + t * kc.bytes, dk + t * d);
        tq_decode(&vc, value + t * vc.bytes, dv + t * d);
    }
    for (int r = 0; r < nq; r++) {
        randn(q + r * d, d);
        for (int i = 0; i < d && R; i++) q[r * d + i] += 2 * kdir[i];
        tq_rotate(&kc, q + r * d, rq + r * d);
    }
    double *want = malloc(sizeof(double) * nq * d), mag[HB * HG];   /* the float64 outputs, their largest |.| */
    for (int r = 0; r < nq; r++) {
        int T = HP + r / HG + 1;
        double sc[HC], m = -INFINITY, l = 0, a[TQ_KPROJ_MAX], qp[MAXD], *o = want + r * d;
        for (int t = 0; t < T; t++) {
            double s = 0;
            if (t % kblock == 0) {                      /* block t / kblock's directions */
                const float *u = kdir + (size_t)(t / kblock) * R * d;
                for (int j = 0; j < R; j++) a[j] = dotd(q + r * d, u + j * d, d);
                for (int i = 0; i < d; i++) { qp[i] = q[r * d + i]; for (int j = 0; j < R; j++) qp[i] -= a[j] * u[j * d + i]; }
            }
            if (t < sink || t >= T - window) s = dotd(q + r * d, kr + t * d, d);
            else {
                for (int i = 0; i < d; i++) s += qp[i] * dk[t * d + i];
                for (int j = 0; j < R; j++)
                    s += a[j] * (i8 ? kbeta8[t * R + j] * kscale[t / kblock * R + j] : tq_f16_to_f32(kbeta[t * R + j]));
            }
            sc[t] = s / sqrt(d);
            m = fmax(m, sc[t]);
        }
        memset(o, 0, sizeof(double) * d);
        for (int t = 0; t < T; t++) {
            double w = exp(sc[t] - m);
            const float *val = t < sink || t >= T - window ? vr + t * d : dv + t * d;
            for (int i = 0; i < d; i++) o[i] += w * val[i];
            l += w;
        }
        mag[r] = 0;
        for (int i = 0; i < d; i++) { o[i] /= l; mag[r] = fmax(mag[r], fabs(o[i])); }
    }
    tq_batch batch = {HP, kr + (size_t)HP * d, vr + (size_t)HP * d, (size_t)d};
    for (int p = 0; p < TQ_NSIMD; p++) {
        if (!tq_simd_supported((tq_simd)p)) continue;
        double err = 0, split_err = 0;
        tq_attend_codes(&h, (tq_simd)p, nq, HG, HP, rq, sink, tq_coded_end(n, sink, window), st, scratch);
        for (int r = 0; r < nq; r++) {
            int T = HP + r / HG + 1;
            tq_attend_finish(&h, q + r * d, &batch, T, st + r * sf, 1, 0, out);
            for (int i = 0; i < d; i++) err = fmax(err, fabs(out[i] - want[r * d + i]) / mag[r]);
            if (r / HG < HB - 1) continue;
            /* the last token's queries again, their coded positions in three parts (the first not a whole number of 16-row tiles) */
            float *part = st + nq * sf, ref[MAXD];
            int end = tq_coded_end(T, sink, window), cut[4] = {sink, sink + 100, sink + 192, end};
            memcpy(ref, out, sizeof ref);
            for (int k = 0; k < 3; k++)
                tq_attend_codes(&h, (tq_simd)p, HG, HG, T - 1, rq + (r - r % HG) * d, cut[k], cut[k + 1], part + k * HG * sf,
                                scratch);
            tq_attend_finish(&h, q + r * d, &batch, T, part + (r % HG) * sf, 3, HG * sf, out);
            for (int i = 0; i < d; i++) split_err = fmax(split_err, fabs(out[i] - ref[i]) / mag[r]);
        }
        CHECK(err < 1e-4, "%s %s d=%d R=%d kblock=%d sink=%d window=%d: tq_attend_* off float64 attention by %.2e",
              tq_simd_name((tq_simd)p), tq_fmt_name(f), d, R, kblock, sink, window, err);
        CHECK(split_err < 1e-5, "%s %s d=%d R=%d kblock=%d: three merged parts differ from one by %.2e",
              tq_simd_name((tq_simd)p), tq_fmt_name(f), d, R, kblock, split_err);
    }
    free(want);
    free(key); free(value); free(kdir); free(krot); free(kr); free(vr); free(kbeta); free(kbeta8); free(kscale); free(ek); free(ev);
    free(q); free(rq); free(st); free(scratch); free(dk); free(dv);
    tq_free(&kc); tq_free(&vc);
}

static void test_head_attention(void) {
    const tq_fmt fmts[4] = {TQ_TQ3, TQ_Q8, TQ_TQ3P, TQ_FP16};
    for (int f = 0; f < 4; f++)
        for (int R = 0; R <= TQ_KPROJ_MAX; R++) {
            head_case(fmts[f], 64, R, 1, 8, HC);
            head_case(fmts[f], 64, R, 1, 8, 48);        /* blocks cut the chunks and the splits */
            head_case(fmts[f], 80, R, f == 0 ? 0 : 2, f == 0 ? 0 : 3, f == 0 ? 32 : HC);
        }
}

/* tq_softmax_chunk on every path against float64: chunks with masked (-inf) logits, a running
 * maximum below, above or absent (-inf), and a chunk with everything masked. */
static void test_softmax_chunk(void) {
    const int ns[7] = {1, 7, 8, 9, 16, 17, 100};
    const float scale = 0.125f;
    for (int p = 0; p < TQ_NSIMD; p++) {
        if (!tq_simd_supported((tq_simd)p)) continue;
        double worst = 0;
        int ok = 1;
        for (int a = 0; a < 7; a++)
            for (int mcase = 0; mcase < 3; mcase++) {
                int n = ns[a];
                float s[100], x[100];
                for (int t = 0; t < n; t++) x[t] = s[t] = t % 5 == 3 ? -INFINITY : (float)(40 * nrand());
                float m = mcase == 0 ? -INFINITY : mcase == 1 ? -30.0f : 30.0f, m0 = m, rescale;
                float sum = tq_softmax_chunk((tq_simd)p, s, n, scale, &m, &rescale);
                double top = m0, want = 0;
                for (int t = 0; t < n; t++) top = fmax(top, (double)scale * x[t]);
                for (int t = 0; t < n; t++) {
                    double e = exp((double)scale * x[t] - top);
                    want += e;
                    worst = fmax(worst, fabs(s[t] - e) / (e + 1e-30));
                    ok &= fabs(s[t] - e) <= 1e-5 * e + 1e-30;
                }
                worst = fmax(worst, fabs(sum - want) / want);
                ok &= fabs(sum - want) <= 1e-5 * want && fabs(m - top) <= 1e-6 * fabs(top);
                double wr = exp(m0 - top);
                ok &= fabs(rescale - wr) <= 1e-5 * wr + 1e-30;
            }
        float s[9], m = -INFINITY, rescale = 0;
        for (int t = 0; t < 9; t++) s[t] = -INFINITY;
        float sum = tq_softmax_chunk((tq_simd)p, s, 9, scale, &m, &rescale);
        for (int t = 0; t < 9; t++) ok &= s[t] == 0.0f;
        ok &= sum == 0.0f && rescale == 1.0f && m == -INFINITY;
        CHECK(ok, "%s: tq_softmax_chunk off float64 exp by %.2e (relative), or mishandles masked logits",
              tq_simd_name((tq_simd)p), worst);
    }
}

static void test_simd_env(void) {
    tq_simd s;
    int ok = tq_simd_supported(TQ_SIMD_PORTABLE) && tq_simd_supported(tq_simd_best());
    for (int p = 0; p < TQ_NSIMD; p++) ok &= tq_simd_parse(tq_simd_name((tq_simd)p), &s) == 0 && s == (tq_simd)p;
    ok &= tq_simd_parse("sse", &s) != 0;
    setenv("TQ_SIMD", "portable", 1);
    ok &= tq_simd_from_env(&s) == NULL && s == TQ_SIMD_PORTABLE;
    setenv("TQ_SIMD", "avx", 1);
    ok &= tq_simd_from_env(&s) != NULL;
    for (int p = 0; p < TQ_NSIMD; p++) {
        setenv("TQ_SIMD", tq_simd_name((tq_simd)p), 1);
        const char *err = tq_simd_from_env(&s);
        ok &= tq_simd_supported((tq_simd)p) ? err == NULL && s == (tq_simd)p : err != NULL;
    }
    unsetenv("TQ_SIMD");
    ok &= tq_simd_from_env(&s) == NULL && s == tq_simd_best();
    CHECK(ok, "tq_simd_parse / tq_simd_from_env");
}

/* ---- determinism ------------------------------------------------------------------------------------------*/
static void test_determinism(void) {
    int same = 1, differ = 0;
    for (int f = TQ_TQ2; f < TQ_NFMT; f++) {
        tq_codec a, b, e;
        tq_init(&a, f, 96, TQ_SCALE_NC, 5); tq_init(&b, f, 96, TQ_SCALE_NC, 5); tq_init(&e, f, 96, TQ_SCALE_NC, 6);
        float x[96];
        uint8_t ca[256], cb[256], ce[256];
        randn(x, 96);
        tq_encode(&a, x, ca); tq_encode(&b, x, cb); tq_encode(&e, x, ce);
        same &= memcmp(ca, cb, a.bytes) == 0;
        differ += memcmp(ca, ce, a.bytes) != 0;
        tq_free(&a); tq_free(&b); tq_free(&e);
    }
    CHECK(same && differ == 6, "codes must depend on the seed and only on it");
}

/* test_tq [NAME...]: every test, or only the named ones (make test runs the SIMD ones on an
 * emulated CPU without AVX-512, where the whole set would take too long) */
int main(int argc, char **argv) {
    static const struct { const char *name; void (*fn)(void); } tests[] = {
        {"formats", test_formats}, {"fp16", test_fp16}, {"rotation", test_rotation},
        {"codebook", test_codebook}, {"roundtrip", test_roundtrip}, {"extremes", test_extremes},
        {"distortion", test_distortion}, {"prod", test_prod}, {"structured", test_structured},
        {"attention", test_attention}, {"attn_paths", test_attn_paths}, {"head_attention", test_head_attention},
        {"softmax_chunk", test_softmax_chunk}, {"simd_env", test_simd_env},
        {"determinism", test_determinism}};
    int n = (int)(sizeof tests / sizeof tests[0]);
    for (int a = 1; a < argc; a++) {
        int known = 0;
        for (int i = 0; i < n; i++) known |= !strcmp(argv[a], tests[i].name);
        if (!known) { fprintf(stderr, "test_tq: no test named \"%s\"\n", argv[a]); return 2; }
    }
    for (int i = 0; i < n; i++) {
        int run = argc == 1;
        for (int a = 1; a < argc; a++) run |= !strcmp(argv[a], tests[i].name);
        if (run) tests[i].fn();
    }
    printf("test_tq: SIMD paths tested:");
    for (int p = 0; p < TQ_NSIMD; p++) if (simd_tested[p]) printf(" %s", tq_simd_name((tq_simd)p));
    printf(" (best here: %s)\n", tq_simd_name(tq_simd_best()));
    printf("test_tq: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
