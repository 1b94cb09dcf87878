/* tq.c - TurboQuant KV-cache codec. API and byte layout: tq.h.
 *
 * Paper: Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online Vector Quantization
 * with Near-optimal Distortion Rate", arXiv 2504.19874.
 *
 *   Algorithm 1, TurboQuant_mse, b bits per coordinate:
 *     u = x/|x|,  y = Pi u,  idx_i = argmin_k |y_i - c_k|          (encode)
 *     x~ = s * Pi^T c[idx]                                         (decode)
 *   with c the Lloyd-Max codebook of the density of one coordinate of a random
 *   unit vector and s = |x| (or one of the other two scale rules, tq.h).
 *
 *   Algorithm 2, TurboQuant_prod, b bits: Algorithm 1 at b-1 bits, then the
 *   residual r = x - x~_mse is sketched with 1-bit QJL:
 *     qjl = sign(S r),  gamma = |r|,  x~ = x~_mse + sqrt(pi/2)/d * gamma * S^T qjl
 *   S is a d x d matrix of N(0,1) entries, so E[x~] = x (unbiased inner products).
 *
 * Everything after the rotation happens in the ROTATED domain: Pi is orthogonal,
 * so |r| = |Pi r| and <q, x~> = <Pi q, Pi x~>. We therefore store
 *   sign(S . Pi r)  with  Pi r = |x| y - s c[idx],
 * i.e. S acts on the rotated residual. Since Pi is fixed and S is Gaussian,
 * S.Pi is again a d x d Gaussian matrix, so this is exactly Algorithm 2 with the
 * sketch matrix S' = S Pi; decode adds sqrt(pi/2)/d * gamma * S^T qjl to s*c[idx]
 * before the single Pi^T.
 *
 * Randomness (the CUDA build must reproduce it): splitmix64 (Steele, Lea, Flood,
 * 2014). A stream k of a seed starts from state = seed + k * 0x632BE59BD9B4E019;
 * each draw adds 0x9E3779B97F4A7C15 to the state and mixes it (rng_next).
 *   stream 1: Hadamard signs, rounds x d draws, round-major; sign = +1 if the top
 *             bit of the draw is 0, else -1.
 *   stream 2: dense Pi (d not a power of two): d x d N(0,1) row-major, then
 *             modified Gram-Schmidt on the rows in double.
 *   stream 3: QJL matrix S: d x d N(0,1) row-major.
 * N(0,1) = Box-Muller, cosine branch only: u1, u2 = ((draw >> 11) + 0.5) / 2^53,
 * z = sqrt(-2 ln u1) cos(2 pi u2), rounded to float. cos/log may differ in the last
 * ulp between libms, so a GPU build should copy c->dense and c->qjl from tq_init
 * rather than redraw them; the signs are exact bits.
 */
#include "tq.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PI 3.14159265358979323846
#define F16_MAX 65504.0     /* largest finite fp16: stored scales saturate there */

/* Rounds of random signs + Walsh-Hadamard. One round maps a basis vector to a
 * vector of equal magnitudes 1/sqrt(d): terrible for a scalar quantizer. Two
 * rounds map all d basis vectors to signed permutations of ONE vector whose
 * coordinates sit on a lattice (sums of +-1/d); averaged over seeds its MSE is
 * 1.2x (3 bits) and 1.4x (4 bits) the random-input MSE at d=64. With three rounds
 * every structured input of tests/test_tq.c is within a few percent of random. */
#define HADAMARD_ROUNDS 3

/* ---- fp16 ------------------------------------------------------------------*/

/* IEEE binary16, round to nearest even. Overflow gives +-inf, NaN stays NaN. */
TQ_HD uint16_t tq_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00;              /* NaN */
    if (ax >= 0x477ff000u) return sign | 0x7c00;             /* >= 65520: inf */
    int e = (int)(ax >> 23);                                 /* biased exponent */
    if (e < 113) {                    /* subnormal half: a multiple of 2^-24, scaled exactly */
        memcpy(&f, &ax, 4);
        return (uint16_t)(sign | lrintf(f * 0x1p24f));      /* lrintf rounds to nearest even */
    }
    uint32_t h = ((uint32_t)(e - 112) << 10) | ((ax >> 13) & 0x3ff), rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;    /* carry may bump the exponent: right */
    return (uint16_t)(sign | h);
}

/* tq_half (tq.h) has no branches, so the fp16 loops below vectorize. */
TQ_HD float tq_f16_to_f32(uint16_t h) { return tq_half(h); }

TQ_HD static float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

/* A stored scale: non-negative, saturated at the largest finite fp16 (so any
 * finite input encodes to finite numbers; norms above 65504 are clipped), and
 * rounded double -> float -> fp16. */
TQ_HD static uint16_t scale_f16(double s) {
    return tq_f32_to_f16((float)(s < F16_MAX ? s : F16_MAX));
}

#ifdef __CUDA_ARCH__  /* run_cuda.cu keeps every field aligned (fp32 rows are 4d bytes; it takes tq
                        formats only at head_dim % 16 == 0, where all rows and scales sit at even
                        offsets): one load instead of one per byte */
TQ_HD static float get_f32(const uint8_t *p) { return *(const float *)p; }
TQ_HD static float get_f16(const uint8_t *p) { return tq_half(*(const uint16_t *)p); }
#else
TQ_HD static float get_f32(const uint8_t *p) { float f; memcpy(&f, p, 4); return f; }  /* any alignment */
TQ_HD static float get_f16(const uint8_t *p) { return tq_half((uint16_t)(p[0] | p[1] << 8)); }
#endif
TQ_HD static void put_f16(uint8_t *p, uint16_t h) { p[0] = (uint8_t)h; p[1] = (uint8_t)(h >> 8); }

/* ---- sums ------------------------------------------------------------------------
 * Vector lengths are multiples of 8, so sums run as 8 interleaved partial sums
 * added pairwise at the end: the compiler may use SIMD without reordering any
 * float addition, so SIMD width does not change a result (FMA contraction,
 * which -march=native allows, may still change the last bit). */
TQ_HD static float sum8(const float *a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

TQ_HD static float dot8(const float *a, const float *b, int n) {
    float acc[8] = {0};
    for (int i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    return sum8(acc);
}

TQ_HD static double norm_f64(const float *x, int n) {              /* |x| in double: no overflow */
    double acc[4] = {0};
    for (int i = 0; i < n; i += 4)
        for (int j = 0; j < 4; j++) acc[j] += (double)x[i + j] * x[i + j];
    return sqrt((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

/* ---- random numbers ----------------------------------------------------------*/

static uint64_t rng_next(uint64_t *s) {                      /* splitmix64 */
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double rng_normal(uint64_t *s) {                      /* Box-Muller, cos branch */
    double u1 = ((double)(rng_next(s) >> 11) + 0.5) * 0x1p-53;
    double u2 = ((double)(rng_next(s) >> 11) + 0.5) * 0x1p-53;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * PI * u2);
}

static uint64_t rng_stream(uint64_t seed, int k) { return seed + (uint64_t)k * 0x632BE59BD9B4E019ULL; }

/* ---- format table ------------------------------------------------------------*/

static const struct { const char *name; int bits; int prod; const char *about; } FMT[TQ_NFMT] = {
    {"fp32", 0, 0, "float32, uncompressed"}, {"fp16", 0, 0, "float16, uncompressed"},
    {"q8", 0, 0, "int8 absmax, one fp16 scale (q8_0-like)"}, {"q4", 0, 0, "int4 absmax, fp16 scale per 32 (q4_0-like)"},
    {"tq2", 2, 0, "TurboQuant mse, 2 bits + fp16 norm"}, {"tq3", 3, 0, "TurboQuant mse, 3 bits + fp16 norm"},
    {"tq4", 4, 0, "TurboQuant mse, 4 bits + fp16 norm"},
    {"tq2p", 1, 1, "TurboQuant prod, 1-bit mse + 1-bit QJL"},   /* bits = Lloyd-Max bits = B-1 */
    {"tq3p", 2, 1, "TurboQuant prod, 2-bit mse + 1-bit QJL"}, {"tq4p", 3, 1, "TurboQuant prod, 3-bit mse + 1-bit QJL"},
};
static const char *SCALE_NAME[TQ_NSCALE] = {"norm", "nc", "eden"};

int tq_parse_fmt(const char *name, tq_fmt *out) {
    for (int f = 0; f < TQ_NFMT; f++)
        if (strcmp(name, FMT[f].name) == 0) { *out = (tq_fmt)f; return 0; }
    return -1;
}
const char *tq_fmt_name(tq_fmt f) { return (unsigned)f < TQ_NFMT ? FMT[f].name : "?"; }
const char *tq_fmt_about(tq_fmt f) { return (unsigned)f < TQ_NFMT ? FMT[f].about : "?"; }

int tq_parse_scale(const char *name, tq_scale *out) {
    for (int s = 0; s < TQ_NSCALE; s++)
        if (strcmp(name, SCALE_NAME[s]) == 0) { *out = (tq_scale)s; return 0; }
    return -1;
}
const char *tq_scale_name(tq_scale s) { return (unsigned)s < TQ_NSCALE ? SCALE_NAME[s] : "?"; }

TQ_HD static int is_tq(tq_fmt f) { return f >= TQ_TQ2; }
TQ_HD static int is_prod(tq_fmt f) { return f >= TQ_TQ2P; }

size_t tq_bytes(tq_fmt f, int d) {
    if ((unsigned)f >= TQ_NFMT || d <= 0 || d % 8 != 0 || (f == TQ_Q4 && d % 32 != 0)) return 0;
    size_t n = (size_t)d;
    switch (f) {
    case TQ_FP32: return 4 * n;
    case TQ_FP16: return 2 * n;
    case TQ_Q8:   return n + 2;
    case TQ_Q4:   return n / 32 * 18;
    default:      return n * (size_t)FMT[f].bits / 8 + 2 + (is_prod(f) ? n / 8 + 2 : 0);
    }
}

double tq_bits_per_elem(tq_fmt f, int d) { return d > 0 ? 8.0 * (double)tq_bytes(f, d) / d : 0.0; }

/* ---- Lloyd-Max codebook -------------------------------------------------------
 * After a random rotation one coordinate t of a unit vector has the density
 * (paper, Lemma 1)
 *     f(t) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - t^2)^((d-3)/2),  t in [-1, 1],
 * close to N(0, 1/d) for large d. The Lloyd-Max codebook of 2^b centroids
 * minimizes E[(t - c(t))^2]; Lloyd's algorithm alternates its two conditions:
 *     bounds:    b_k = (c_{k-1} + c_k) / 2                   (nearest centroid)
 *     centroids: c_k = int_{b_k}^{b_{k+1}} t f / int_{b_k}^{b_{k+1}} f   (cell mean)
 * F(t) = int f and M(t) = int t f are tabulated once on a uniform grid over
 * [-T, T] (Simpson's rule per interval); T = min(1, 12/sqrt(d)) leaves out a mass
 * below 1e-30. Between nodes they are read by cubic Hermite interpolation (their
 * derivatives f and t f are known exactly), so every cell integral is accurate to
 * O(h^4) and an iteration costs O(2^b): thousands of them (Lloyd converges
 * slowly) take well under a millisecond. */
#define GRID 4096

static double density(double t, int d, double logZ) {    /* f(t), logZ = log of its constant */
    return exp(logZ + 0.5 * (d - 3) * log(fmax(1.0 - t * t, 1e-300)));
}

typedef struct { double *F, *dF; } table;            /* (GRID+1) values and derivatives */

static double table_at(table tb, double t, double T) {
    double p = (t + T) / (2.0 * T) * GRID, h = 2.0 * T / GRID;
    if (p <= 0) return tb.F[0];
    if (p >= GRID) return tb.F[GRID];
    int j = (int)p;
    p -= j;                                              /* Hermite basis on [0, 1] */
    double h00 = (1 + 2 * p) * (1 - p) * (1 - p), h10 = p * (1 - p) * (1 - p), h01 = p * p * (3 - 2 * p), h11 = -p * p * (1 - p);
    return h00 * tb.F[j] + h10 * h * tb.dF[j] + h01 * tb.F[j + 1] + h11 * h * tb.dF[j + 1];
}

static void lloyd_max(int d, int b, float *centroids /* (2^b) */, float *bounds /* (2^b - 1) */) {
    const int K = 1 << b;
    const double T = fmin(1.0, 12.0 / sqrt((double)d)), h = 2.0 * T / GRID;
    const double logZ = lgamma(d / 2.0) - 0.5 * log(PI) - lgamma((d - 1) / 2.0);
    double *mem = (double *)malloc(4 * (GRID + 1) * sizeof(double)), c[16], cb[17];
    if (!mem) { memset(centroids, 0, (size_t)K * sizeof(float)); return; }
    table F = {mem, mem + GRID + 1}, M = {mem + 2 * (GRID + 1), mem + 3 * (GRID + 1)};
    for (int j = 0; j <= GRID; j++) {                        /* Simpson on [t - h, t] */
        double t = -T + j * h, tm = t - 0.5 * h, fm = density(tm, d, logZ);
        F.dF[j] = density(t, d, logZ);
        M.dF[j] = t * F.dF[j];
        F.F[j] = j ? F.F[j - 1] + h / 6 * (F.dF[j - 1] + 4 * fm + F.dF[j]) : 0.0;
        M.F[j] = j ? M.F[j - 1] + h / 6 * (M.dF[j - 1] + 4 * tm * fm + M.dF[j]) : 0.0;
    }
    for (int k = 0, j = 0; k < K; k++) {                     /* start at the quantiles */
        while (j < GRID && F.F[j] < F.F[GRID] * (k + 0.5) / K) j++;
        c[k] = -T + j * h;
    }
    cb[0] = -T; cb[K] = T;
    for (int it = 0; it < 20000; it++) {
        double moved = 0;
        for (int k = 1; k < K; k++) cb[k] = 0.5 * (c[k - 1] + c[k]);
        for (int k = 0; k < K; k++) {
            double mass = table_at(F, cb[k + 1], T) - table_at(F, cb[k], T);
            double mean = (table_at(M, cb[k + 1], T) - table_at(M, cb[k], T)) / mass;
            moved = fmax(moved, fabs(mean - c[k]));
            c[k] = mean;
        }
        if (moved * sqrt((double)d) < 1e-12) break;
    }
    for (int k = 0; k < K / 2; k++) {                        /* f is even: make c exactly odd */
        double m = 0.5 * (c[K - 1 - k] - c[k]);
        c[k] = -m; c[K - 1 - k] = m;
    }
    for (int k = 0; k < K; k++) centroids[k] = (float)c[k];
    for (int k = 0; k + 1 < K; k++) bounds[k] = (float)(0.5 * (c[k] + c[k + 1]));
    free(mem);
}

/* ---- the rotation Pi ------------------------------------------------------------
 * Power-of-two d: Pi = H D_R ... H D_2 H D_1, D_r = diag(signs[r]) random +-1,
 * H the Walsh-Hadamard matrix in natural (Sylvester) order, H[i][j] =
 * (-1)^popcount(i & j) / sqrt(d). H is symmetric and orthogonal, so
 * Pi^T = D_1 H D_2 H ... D_R H. Other d: a dense Haar-random orthogonal matrix. */

TQ_HD static void fwht(float *x /* (d) */, int d) {               /* x <- H x, O(d log d) */
    for (int i = 0; i < d; i += 8)               /* butterflies of span 1, 2, 4 within blocks */
        for (int len = 1; len < 8; len *= 2)     /* of 8 (constant loops: unrolled to registers) */
            for (int j = 0; j < 8; j++)
                if (!(j & len)) {
                    float a = x[i + j], b = x[i + j + len];
                    x[i + j] = a + b; x[i + j + len] = a - b;
                }
    for (int len = 8; len < d; len *= 2)         /* span 8, 16, ...: SIMD-friendly */
        for (int i = 0; i < d; i += 2 * len)
            for (int j = i; j < i + len; j++) {
                float a = x[j], b = x[j + len];
                x[j] = a + b; x[j + len] = a - b;
            }
    float norm = 1.0f / sqrtf((float)d);
    for (int i = 0; i < d; i++) x[i] *= norm;
}

/* Rows of a seeded Gaussian matrix, orthonormalized by modified Gram-Schmidt (the
 * QR of the paper); R's diagonal comes out positive, so Pi is Haar distributed. */
static int random_orthogonal(float *pi /* (d, d) */, int d, uint64_t seed) {
    double *a = (double *)malloc((size_t)d * d * sizeof(double));
    if (!a) return -1;
    uint64_t s = rng_stream(seed, 2);
    for (size_t i = 0; i < (size_t)d * d; i++) a[i] = rng_normal(&s);
    for (int i = 0; i < d; i++) {
        double *v = a + (size_t)i * d, nrm = 0;
        for (int j = 0; j < i; j++) {                        /* v -= <v, e_j> e_j */
            const double *e = a + (size_t)j * d;
            double dot = 0;
            for (int k = 0; k < d; k++) dot += v[k] * e[k];
            for (int k = 0; k < d; k++) v[k] -= dot * e[k];
        }
        for (int k = 0; k < d; k++) nrm += v[k] * v[k];
        nrm = sqrt(nrm);
        for (int k = 0; k < d; k++) v[k] /= nrm;
    }
    for (size_t i = 0; i < (size_t)d * d; i++) pi[i] = (float)a[i];
    free(a);
    return 0;
}

TQ_HD void tq_rotate(const tq_codec *c, const float *x, float *y) {   /* y = Pi x (y may be x) */
    int d = c->d;
    if (c->dense) {
        float t[TQ_STACK(d)];
        for (int i = 0; i < d; i++) t[i] = dot8(c->dense + (size_t)i * d, x, d);
        memcpy(y, t, (size_t)d * sizeof(float));
        return;
    }
    if (y != x) memcpy(y, x, (size_t)d * sizeof(float));
    for (int r = 0; r < c->rounds; r++) {
        const float *sg = c->signs + (size_t)r * d;
        for (int i = 0; i < d; i++) y[i] *= sg[i];
        fwht(y, d);
    }
}

TQ_HD void tq_unrotate(const tq_codec *c, const float *y, float *x) { /* x = Pi^T y (x may be y) */
    int d = c->d;
    if (c->dense) {                                          /* x = sum_i y_i Pi[i][:] */
        float t[TQ_STACK(d)];
        memset(t, 0, (size_t)d * sizeof(float));
        for (int i = 0; i < d; i++) {
            const float *row = c->dense + (size_t)i * d;
            for (int j = 0; j < d; j++) t[j] += y[i] * row[j];
        }
        memcpy(x, t, (size_t)d * sizeof(float));
        return;
    }
    if (x != y) memcpy(x, y, (size_t)d * sizeof(float));
    for (int r = c->rounds - 1; r >= 0; r--) {
        const float *sg = c->signs + (size_t)r * d;
        fwht(x, d);
        for (int i = 0; i < d; i++) x[i] *= sg[i];
    }
}

/* ---- life cycle ------------------------------------------------------------------*/

int tq_init(tq_codec *c, tq_fmt f, int d, tq_scale scale, uint64_t seed) {
    memset(c, 0, sizeof *c);
    if (tq_bytes(f, d) == 0 || (unsigned)scale >= TQ_NSCALE) return -1;
    c->fmt = f; c->d = d; c->bits = FMT[f].bits; c->scale = scale; c->bytes = tq_bytes(f, d);
    if (!is_tq(f)) return 0;                                 /* fp/q: identity rotation */
    int K = 1 << c->bits;
    size_t dd = (size_t)d * d;
    c->centroids = (float *)malloc((size_t)K * sizeof(float));
    c->bounds = (float *)malloc((size_t)(K - 1) * sizeof(float));
    if (!c->centroids || !c->bounds) goto fail;
    lloyd_max(d, c->bits, c->centroids, c->bounds);
    if ((d & (d - 1)) == 0) {                                /* power of two: Hadamard */
        uint64_t s = rng_stream(seed, 1);
        c->rounds = HADAMARD_ROUNDS;
        c->signs = (float *)malloc((size_t)c->rounds * d * sizeof(float));
        if (!c->signs) goto fail;
        for (size_t i = 0; i < (size_t)c->rounds * d; i++) c->signs[i] = (rng_next(&s) >> 63) ? -1.0f : 1.0f;
    } else {
        c->dense = (float *)malloc(dd * sizeof(float));
        if (!c->dense || random_orthogonal(c->dense, d, seed)) goto fail;
    }
    if (is_prod(f)) {                                        /* QJL: S with N(0,1) entries */
        uint64_t s = rng_stream(seed, 3);
        c->qjl = (float *)malloc(dd * sizeof(float));
        if (!c->qjl) goto fail;
        for (size_t i = 0; i < dd; i++) c->qjl[i] = (float)rng_normal(&s);
    }
    return 0;
fail:
    tq_free(c);
    return -1;
}

void tq_free(tq_codec *c) {
    free(c->centroids); free(c->bounds); free(c->signs); free(c->dense); free(c->qjl);
    c->centroids = c->bounds = c->signs = c->dense = c->qjl = NULL;
}

/* ---- bit packing ------------------------------------------------------------------
 * b-bit indices form a little-endian bit stream, so 8 consecutive indices fill
 * exactly b bytes (d is a multiple of 8): index j of a group sits at bits
 * [b*j, b*j + b) of the group's b bytes read as a little-endian integer.
 * The QJL signs are the same stream with b = 1. */

TQ_HD static uint32_t load_group(const uint8_t *p, int b) {       /* b bytes, little-endian */
    uint32_t w = 0;
    for (int k = 0; k < b; k++) w |= (uint32_t)p[k] << (8 * k);
    return w;
}

TQ_HD static void pack(const uint8_t *idx /* (d) */, int d, int b, uint8_t *out /* (d*b/8) */) {
    for (int g = 0; g < d / 8; g++) {
        uint32_t w = 0;
        for (int j = 0; j < 8; j++) w |= (uint32_t)idx[8 * g + j] << (b * j);
        for (int k = 0; k < b; k++) out[b * g + k] = (uint8_t)(w >> (8 * k));
    }
}

TQ_HD static void unpack(const uint8_t *in, int d, int b, uint8_t *idx /* (d) */) {
    for (int g = 0; g < d / 8; g++) {
        uint32_t w = load_group(in + b * g, b);
        for (int j = 0; j < 8; j++) idx[8 * g + j] = (uint8_t)((w >> (b * j)) & ((1u << b) - 1));
    }
}

/* ---- encode / decode: fp and absmax formats ----------------------------------------*/

TQ_HD static void encode_plain(const tq_codec *c, const float *x, uint8_t *code) {
    int d = c->d;
    if (c->fmt == TQ_FP32) { memcpy(code, x, (size_t)d * 4); return; }   /* little-endian host */
    if (c->fmt == TQ_FP16) {                                 /* saturate instead of inf */
        for (int i = 0; i < d; i++)
            put_f16(code + 2 * i, tq_f32_to_f16(clampf(x[i], -(float)F16_MAX, (float)F16_MAX)));
        return;
    }
    if (c->fmt == TQ_Q8) {                                   /* s = absmax/127, q = round(x/s) */
        float amax = 0;
        for (int i = 0; i < d; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        uint16_t h = scale_f16(amax / 127.0);
        float s = tq_f16_to_f32(h);                          /* quantize with the stored scale */
        for (int i = 0; i < d; i++) {
            float q = s > 0 ? roundf(x[i] / s) : 0.0f;
            code[i] = (uint8_t)(int8_t)clampf(q, -127.0f, 127.0f);
        }
        put_f16(code + d, h);
        return;
    }
    for (int blk = 0; blk < d / 32; blk++) {                 /* q4: q4_0's rule per block */
        const float *xb = x + 32 * blk;
        uint8_t *cb = code + 18 * blk;
        float m = 0;                                         /* signed element of largest |x| */
        for (int j = 0; j < 32; j++) if (fabsf(xb[j]) > fabsf(m)) m = xb[j];
        uint16_t h = scale_f16(fabs(m / 8.0));
        if (m > 0) h |= 0x8000;                              /* s = m / -8 */
        float s = tq_f16_to_f32(h);
        for (int j = 0; j < 32; j++) {                       /* q = min(15, floor(x/s + 8.5)) */
            float q = s != 0 ? floorf(xb[j] / s + 8.5f) : 8.0f;
            int qi = (int)clampf(q, 0.0f, 15.0f);
            if (j % 2 == 0) cb[j / 2] = (uint8_t)qi; else cb[j / 2] |= (uint8_t)(qi << 4);
        }
        put_f16(cb + 16, h);
    }
}

TQ_HD static float q4_value(const uint8_t *blk, int j) { return (float)(((blk[j / 2] >> (4 * (j % 2))) & 15) - 8); }  /* q - 8 */

TQ_HD static void decode_plain(const tq_codec *c, const uint8_t *code, float *x) {
    int d = c->d;
    switch (c->fmt) {
    case TQ_FP32: memcpy(x, code, (size_t)d * 4); break;
    case TQ_FP16: for (int i = 0; i < d; i++) x[i] = get_f16(code + 2 * i); break;
    case TQ_Q8: {
        float s = get_f16(code + d);
        for (int i = 0; i < d; i++) x[i] = s * (float)(int8_t)code[i];
        break;
    }
    default:
        for (int i = 0; i < d; i++) {
            const uint8_t *blk = code + 18 * (i / 32);
            x[i] = get_f16(blk + 16) * q4_value(blk, i % 32);
        }
    }
}

/* ---- encode / decode: TurboQuant -------------------------------------------------------*/

/* Algorithm 1's idx_i = argmin_k |y_i - c_k|: the number of decision bounds
 * (sorted midpoints) below y_i; a tie y_i == bound goes to the lower cell. */
TQ_HD static void quantize(const tq_codec *c, const float *y /* (d) */, uint8_t *idx /* (d) */) {
    for (int i = 0; i < c->d; i++) idx[i] = y[i] > c->bounds[0];
    for (int k = 1; k + 1 < (1 << c->bits); k++)
        for (int i = 0; i < c->d; i++) idx[i] += y[i] > c->bounds[k];
}

/* The stored scale s of x~ = s Pi^T c (tq.h), c = c[idx]: the paper's |x|, norm
 * correction |x|/|c|, or EDEN's |x|/<y,c>, which makes <x, x~> = |x|^2 exactly. */
TQ_HD static double scale_rule(const tq_codec *c, double norm, const float *y, const float *cy) {
    if (c->scale == TQ_SCALE_NC) return norm / sqrt(dot8(cy, cy, c->d));   /* no centroid is 0 */
    double yc = dot8(y, cy, c->d);
    if (c->scale == TQ_SCALE_EDEN && yc > 0) return norm / yc;
    return norm;
}

/* Algorithm 2's sketch, in the rotated domain and divided by |x| (so that huge
 * inputs cannot overflow): r = y - (s/|x|) c, bit k = [<S_k, r> > 0] with the
 * sums of dot8, gamma = |x| |r|. Writes the d/8 sign bytes, returns gamma. */
TQ_HD static double qjl_signs(const tq_codec *c, double norm, float s, const float *y, const float *cy, uint8_t *out) {
    int d = c->d;
    float r[TQ_STACK(d)], ratio = (float)(s / norm);
    uint8_t sg[TQ_STACK(d)];
    for (int i = 0; i < d; i++) r[i] = y[i] - ratio * cy[i];
    for (int k = 0; k < d; k++) sg[k] = dot8(c->qjl + (size_t)k * d, r, d) > 0;
    pack(sg, d, 1, out);
    return norm * sqrt(dot8(r, r, d));
}

TQ_HD static void encode_tq(const tq_codec *c, const float *x, uint8_t *code) {
    int d = c->d, b = c->bits;
    float u[TQ_STACK(d)], y[TQ_STACK(d)], cy[TQ_STACK(d)];
    uint8_t idx[TQ_STACK(d)], *p = code + (size_t)d * b / 8;
    double norm = norm_f64(x, d), inv = norm > 0 ? 1.0 / norm : 0.0;
    memset(u, 0, (size_t)d * sizeof(float));                 /* (only for gcc's -Wmaybe-uninitialized) */
    for (int i = 0; i < d; i++) u[i] = (float)(x[i] * inv);   /* u = x / |x| */
    tq_rotate(c, u, y);                                      /* y = Pi u */
    quantize(c, y, idx);
    pack(idx, d, b, code);
    for (int i = 0; i < d; i++) cy[i] = c->centroids[idx[i]];
    uint16_t h = scale_f16(norm > 0 ? scale_rule(c, norm, y, cy) : 0.0);
    if (!is_prod(c->fmt)) { put_f16(p, h); return; }
    double gamma = norm > 0 ? qjl_signs(c, norm, tq_f16_to_f32(h), y, cy, p) : 0.0;
    if (norm == 0) memset(p, 0, (size_t)d / 8);
    put_f16(p + d / 8, h);
    put_f16(p + d / 8 + 2, scale_f16(gamma));
}

/* yt += S^T a, i.e. yt[i] += sum_k a_k S[k][i]: the QJL dequantization. */
TQ_HD static void add_qjl_transpose(const tq_codec *c, const float *a /* (d) */, float *restrict yt /* (d) */) {
    for (int k = 0; k < c->d; k++) {
        const float *row = c->qjl + (size_t)k * c->d;
        for (int i = 0; i < c->d; i += 8)
            for (int j = 0; j < 8; j++) yt[i + j] += a[k] * row[i + j];
    }
}

/* Rotated-domain reconstruction Pi x~ = s c[idx] (+ sqrt(pi/2)/d gamma S^T qjl). */
TQ_HD static void decode_rotated(const tq_codec *c, const uint8_t *code, float *yt /* (d) */) {
    int d = c->d, b = c->bits;
    uint8_t idx[TQ_STACK(d)];
    const uint8_t *p = code + (size_t)d * b / 8;
    unpack(code, d, b, idx);
    float s = get_f16(p + (is_prod(c->fmt) ? d / 8 : 0));
    for (int i = 0; i < d; i++) yt[i] = s * c->centroids[idx[i]];
    if (!is_prod(c->fmt)) return;
    uint8_t sg[TQ_STACK(d)];
    float a[TQ_STACK(d)], amp = sqrtf((float)(PI / 2)) / d * get_f16(p + d / 8 + 2);
    unpack(p, d, 1, sg);
    for (int k = 0; k < d; k++) a[k] = sg[k] ? amp : -amp;
    add_qjl_transpose(c, a, yt);
}

TQ_HD void tq_encode(const tq_codec *c, const float *x, uint8_t *code) {
    if (is_tq(c->fmt)) encode_tq(c, x, code); else encode_plain(c, x, code);
}

TQ_HD void tq_decode(const tq_codec *c, const uint8_t *code, float *x) {
    if (!is_tq(c->fmt)) { decode_plain(c, code, x); return; }
    float yt[TQ_STACK(c->d)];
    decode_rotated(c, code, yt);
    tq_unrotate(c, yt, x);                                   /* x~ = Pi^T (Pi x~) */
}

/* ---- attention straight from the codes ----------------------------------------------------
 * Prepared query, tq formats (K = 2^bits):
 *   qp = [ Pi q (d) | lut (d, K): lut[i][k] = (Pi q)_i c_k | S Pi q (d), prod only ]
 * so <q, x~> = s sum_i lut[i][idx_i] + sqrt(pi/2)/d gamma sum_k (S Pi q)_k qjl_k.
 * Accumulator, tq formats: [ sum_t w_t s_t c[idx_t] (d) | prod: sum_t w_t
 * sqrt(pi/2)/d gamma_t qjl_t (d) ]; tq_finish applies S^T to the second half once,
 * adds, and unrotates once. fp/q formats: qp = q and acc = the plain sum. */

TQ_HD size_t tq_query_floats(const tq_codec *c) {
    size_t d = (size_t)c->d;
    if (!is_tq(c->fmt)) return d;
    return d + d * ((size_t)1 << c->bits) + (is_prod(c->fmt) ? d : 0);
}

TQ_HD size_t tq_acc_floats(const tq_codec *c) { return is_prod(c->fmt) ? 2 * (size_t)c->d : (size_t)c->d; }

TQ_HD void tq_prepare_query(const tq_codec *c, const float *q, float *qp) {
    if (!is_tq(c->fmt)) { memcpy(qp, q, (size_t)c->d * sizeof(float)); return; }
    tq_rotate(c, q, qp);
    tq_prepare_rotated(c, qp, qp);
}

/* qp from y = Pi q (y may be qp: only qp's first d floats alias it); with lut 0 the table is
 * left out (the SIMD kernels read only Pi q, and S Pi q after the table's place) */
TQ_HD static void prepare_rotated(const tq_codec *c, const float *y, float *qp, int lut_too) {
    int d = c->d, K = 1 << c->bits;
    if (y != qp) memcpy(qp, y, (size_t)d * sizeof(float));
    if (!is_tq(c->fmt)) return;
    float *lut = qp + d;
    if (lut_too)
        for (int i = 0; i < d; i++)
            for (int k = 0; k < K; k++) lut[(size_t)i * K + k] = qp[i] * c->centroids[k];
    if (!is_prod(c->fmt)) return;
    float *sq = lut + (size_t)d * K;
    for (int k = 0; k < d; k++) sq[k] = dot8(c->qjl + (size_t)k * d, qp, d);   /* S (Pi q) */
}

TQ_HD void tq_prepare_rotated(const tq_codec *c, const float *y, float *qp) { prepare_rotated(c, y, qp, 1); }

/* Table lookups: GCC's vectorizer turns 8 independent lookups into gather
 * instructions, which are 2x slower than plain loads on the x86 CPUs we measured
 * (bench/tqbench.c). The lookup loops below are therefore written with two
 * accumulators fed by pairs (nothing for the vectorizer to take), and tq_axpy
 * asks GCC for scalar code. */
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define SCALAR_CODE __attribute__((optimize("no-tree-vectorize", "no-tree-slp-vectorize")))
#else
#define SCALAR_CODE
#endif

/* sum_i lut[i][idx_i], reading 8 b-bit indices from b bytes at a time. */
TQ_HD static inline float lut_sum(const float *lut /* (d, 2^b) */, const uint8_t *p, int d, int b) {
    const int K = 1 << b;
    const uint32_t m = (uint32_t)K - 1;
    float a0 = 0, a1 = 0;
    for (int g = 0; g < d / 8; g++, p += b, lut += 8 * K) {
        uint32_t w = load_group(p, b);
        for (int j = 0; j < 8; j += 4) {
            a0 += lut[j * K + ((w >> (b * j)) & m)] + lut[(j + 1) * K + ((w >> (b * j + b)) & m)];
            a1 += lut[(j + 2) * K + ((w >> (b * j + 2 * b)) & m)] + lut[(j + 3) * K + ((w >> (b * j + 3 * b)) & m)];
        }
    }
    return a0 + a1;
}

/* sum_k v_k qjl_k with qjl_k = +1 if bit k is set, else -1. */
TQ_HD static float sign_sum(const float *v /* (d) */, const uint8_t *bits, int d) {
    float acc[8] = {0};
    for (int g = 0; g < d / 8; g++)
        for (int j = 0; j < 8; j++) acc[j] += v[8 * g + j] * (float)(2 * ((bits[g] >> j) & 1) - 1);
    return sum8(acc);
}

TQ_HD static float dot_plain(const tq_codec *c, const float *q, const uint8_t *code) {
    int d = c->d;
    float acc[8] = {0};
    if (c->fmt == TQ_FP32) {
        for (int i = 0; i < d; i += 8) for (int j = 0; j < 8; j++) acc[j] += q[i + j] * get_f32(code + 4 * (i + j));
        return sum8(acc);
    }
    if (c->fmt == TQ_FP16) {
        for (int i = 0; i < d; i += 8) for (int j = 0; j < 8; j++) acc[j] += q[i + j] * get_f16(code + 2 * (i + j));
        return sum8(acc);
    }
    if (c->fmt == TQ_Q8) {
        for (int i = 0; i < d; i += 8) for (int j = 0; j < 8; j++) acc[j] += q[i + j] * (float)(int8_t)code[i + j];
        return get_f16(code + d) * sum8(acc);
    }
    float sum = 0;                                           /* q4: byte j holds elements 2j, 2j+1 */
    for (int blk = 0; blk < d / 32; blk++, code += 18, q += 32) {
        for (int j = 0; j < 8; j++) acc[j] = 0;
        for (int i = 0; i < 16; i += 4)
            for (int j = 0; j < 4; j++) {
                acc[2 * j] += q[2 * (i + j)] * (float)((code[i + j] & 15) - 8);
                acc[2 * j + 1] += q[2 * (i + j) + 1] * (float)((code[i + j] >> 4) - 8);
            }
        sum += get_f16(code + 16) * sum8(acc);
    }
    return sum;
}

TQ_HD float tq_dot(const tq_codec *c, const float *qp, const uint8_t *code) {
    int d = c->d, b = c->bits;
    if (!is_tq(c->fmt)) return dot_plain(c, qp, code);
    const float *lut = qp + d;
    const uint8_t *p = code + (size_t)d * b / 8;
    float mse;
    switch (b) {                    /* a constant b lets the compiler unroll each width */
    case 1: mse = lut_sum(lut, code, d, 1); break;
    case 2: mse = lut_sum(lut, code, d, 2); break;
    case 3: mse = lut_sum(lut, code, d, 3); break;
    default: mse = lut_sum(lut, code, d, 4); break;
    }
    if (!is_prod(c->fmt)) return get_f16(p) * mse;
    const float *sq = lut + ((size_t)d << b);
    float amp = sqrtf((float)(PI / 2)) / d * get_f16(p + d / 8 + 2);
    return get_f16(p + d / 8) * mse + amp * sign_sum(sq, p, d);
}

/* acc[i] += table[idx_i], 8 b-bit indices at a time. */
TQ_HD static inline void lut_axpy(const float *table /* (2^b) */, const uint8_t *p, int d, int b, float *restrict acc) {
    const uint32_t mask = (1u << b) - 1;
    for (int g = 0; g < d / 8; g++, p += b, acc += 8) {
        uint32_t w = load_group(p, b);
        for (int j = 0; j < 8; j++) acc[j] += table[(w >> (b * j)) & mask];
    }
}

TQ_HD static void axpy_plain(const tq_codec *c, float w, const uint8_t *restrict code, float *restrict acc) {
    int d = c->d;
    if (c->fmt == TQ_FP32) {
        for (int i = 0; i < d; i++) acc[i] += w * get_f32(code + 4 * i);
    } else if (c->fmt == TQ_FP16) {
        for (int i = 0; i < d; i++) acc[i] += w * get_f16(code + 2 * i);
    } else if (c->fmt == TQ_Q8) {
        float ws = w * get_f16(code + d);
        for (int i = 0; i < d; i++) acc[i] += ws * (float)(int8_t)code[i];
    } else {
        for (int blk = 0; blk < d / 32; blk++, code += 18, acc += 32) {
            float ws = w * get_f16(code + 16);
            for (int j = 0; j < 16; j++) {
                acc[2 * j] += ws * (float)((code[j] & 15) - 8);
                acc[2 * j + 1] += ws * (float)((code[j] >> 4) - 8);
            }
        }
    }
}

SCALAR_CODE TQ_HD static void axpy_tq(const tq_codec *c, float w, const uint8_t *code, float *acc) {
    int d = c->d, b = c->bits;
    const uint8_t *p = code + (size_t)d * b / 8;
    float ws = w * get_f16(p + (is_prod(c->fmt) ? d / 8 : 0)), table[16];
    for (int k = 0; k < (1 << b); k++) table[k] = ws * c->centroids[k];   /* w s c_k */
    switch (b) {
    case 1: lut_axpy(table, code, d, 1, acc); break;
    case 2: lut_axpy(table, code, d, 2, acc); break;
    case 3: lut_axpy(table, code, d, 3, acc); break;
    default: lut_axpy(table, code, d, 4, acc); break;
    }
    if (!is_prod(c->fmt)) return;
    float amp = w * sqrtf((float)(PI / 2)) / d * get_f16(p + d / 8 + 2);
    float pm[2] = {-amp, amp};                               /* w sqrt(pi/2)/d gamma qjl_k */
    lut_axpy(pm, p, d, 1, acc + d);
}

TQ_HD void tq_axpy(const tq_codec *c, float w, const uint8_t *code, float *acc) {
    if (is_tq(c->fmt)) axpy_tq(c, w, code, acc); else axpy_plain(c, w, code, acc);
}

TQ_HD void tq_finish(const tq_codec *c, const float *acc, float *out) {
    int d = c->d;
    if (!is_tq(c->fmt)) { memcpy(out, acc, (size_t)d * sizeof(float)); return; }
    float yt[TQ_STACK(d)];
    memcpy(yt, acc, (size_t)d * sizeof(float));
    if (is_prod(c->fmt)) add_qjl_transpose(c, acc + d, yt);
    tq_unrotate(c, yt, out);
}

/* ==== attention over a range of rows (tq.h): dispatch and the portable path ====================== */

static const char *SIMD_NAME[TQ_NSIMD] = {"portable", "avx2", "avx512"};

const char *tq_simd_name(tq_simd s) { return (unsigned)s < TQ_NSIMD ? SIMD_NAME[s] : "?"; }

int tq_simd_parse(const char *name, tq_simd *out) {
    for (int s = 0; s < TQ_NSIMD; s++)
        if (strcmp(name, SIMD_NAME[s]) == 0) { *out = (tq_simd)s; return 0; }
    return -1;
}

/* x86-64 with GCC or Clang: the SIMD paths below are compiled for their own
 * instruction sets (target attributes), whatever -march says, and only called
 * where the CPU reports them (CPUID, and the OS saving the wider registers:
 * __builtin_cpu_supports checks both). nvcc never sees them. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define TQ_X86 1
#include <immintrin.h>
#endif

int tq_simd_supported(tq_simd s) {
#ifdef TQ_X86
    __builtin_cpu_init();
#ifdef __clang__
    int f16c = 1;             /* clang has no "f16c" feature name; every AVX2 CPU has F16C */
#else
    int f16c = __builtin_cpu_supports("f16c");
#endif
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
    if (s == TQ_SIMD_AVX2) return avx2;
    if (s == TQ_SIMD_AVX512) return avx2 && __builtin_cpu_supports("avx512f");
#endif
    return s == TQ_SIMD_PORTABLE;
}

tq_simd tq_simd_best(void) {
    for (int s = TQ_NSIMD - 1; s > 0; s--)
        if (tq_simd_supported((tq_simd)s)) return (tq_simd)s;
    return TQ_SIMD_PORTABLE;
}

const char *tq_simd_from_env(tq_simd *out) {
    const char *e = getenv("TQ_SIMD");
    *out = tq_simd_best();
    if (!e || !*e) return NULL;
    if (tq_simd_parse(e, out) != 0) return "TQ_SIMD must be portable, avx2 or avx512";
    if (!tq_simd_supported(*out)) return *out == TQ_SIMD_AVX2 ? "TQ_SIMD=avx2: this CPU (or build) lacks AVX2, FMA or F16C"
                                                              : "TQ_SIMD=avx512: this CPU (or build) lacks AVX-512F";
    return NULL;
}

/* Portable: tq_dot / tq_axpy row by row, each row read once for all nq queries. */
static void scores_portable(const tq_codec *c, int nq, const float *qp, size_t ldq, const uint8_t *rows, int n,
                            float *s, size_t lds) {
    for (int t = 0; t < n; t++)
        for (int r = 0; r < nq; r++) s[r * lds + t] = tq_dot(c, qp + r * ldq, rows + (size_t)t * c->bytes);
}

static void values_portable(const tq_codec *c, int nq, const float *w, size_t ldw, const uint8_t *rows, int n,
                            float *acc, size_t lda) {
    for (int t = 0; t < n; t++)
        for (int r = 0; r < nq; r++) tq_axpy(c, w[r * ldw + t], rows + (size_t)t * c->bytes, acc + r * lda);
}

static float softmax_chunk_portable(float *s, int n, float scale, float *m, float *rescale) {
    float mx = *m, sum = 0.0f;
    for (int t = 0; t < n; t++) { s[t] *= scale; mx = s[t] > mx ? s[t] : mx; }
    if (mx == -INFINITY) {                               /* all masked, nothing seen before */
        for (int t = 0; t < n; t++) s[t] = 0.0f;
        *rescale = 1.0f;
        return 0.0f;
    }
    *rescale = expf(*m - mx);                            /* 0 when *m is -inf */
    *m = mx;
    for (int t = 0; t < n; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }
    return sum;
}

/* exp(x) for the SIMD paths: x = n ln2 + f with n = round(x / ln2), |f| <= ln2/2, ln2 split
 * in a high part with 15 significant bits (n * LN2_HI is exact for |n| < 256) and the rest;
 * e^f by its Taylor polynomial to degree 6 (remainder below f^7/7! < 1.2e-7 there); 2^n put
 * into the exponent bits. Below -87 (where e^x leaves the normal floats) the result is 0,
 * which is also what masked (-inf) logits give. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693145751953125f
#define EXP_LN2_LO 1.42860682030941723e-6f
#define EXP_MIN (-87.0f)
#define EXP_C2 (1.0f / 2)
#define EXP_C3 (1.0f / 6)
#define EXP_C4 (1.0f / 24)
#define EXP_C5 (1.0f / 120)
#define EXP_C6 (1.0f / 720)

#ifdef TQ_X86
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX512_FN __attribute__((target("avx512f,avx2,fma,f16c")))
#define INLINE inline __attribute__((always_inline))
#define FEW_ROWS 256   /* rows per call up to which the few-query value path scales its weights ahead */
#define PF_TILES 4      /* tiles ahead that prefetch_tile asks for */

/* Asks for the rows of the tile PF_TILES tiles ahead (tile: L rows of B bytes at p): with this
 * much computing per byte the hardware prefetcher alone falls behind the DRAM stream (bench/
 * tqbench: fp16 ~30 %, q8 ~20 %, tq 10-15 % faster per key with it, fp32 unchanged). A prefetch
 * never faults, so the last tiles may ask past the rows. */
static INLINE void prefetch_tile(const uint8_t *p, size_t tile_bytes) {
    const char *q = (const char *)p + PF_TILES * tile_bytes;
    for (size_t off = 0; off < tile_bytes; off += 64) _mm_prefetch(q + off, _MM_HINT_T0);
}

/* The two SIMD paths have the same shape. A tile of L consecutive rows (L = 8 for AVX2, 16 for
 * AVX-512) is turned into floats in a small buffer that stays in L1, in one of two layouts:
 *   columns  T[i*L + k] = coordinate i of row k: for tq codes, which give 8 indices per b bytes,
 *            so one gather brings coordinate group g of all L rows; an index becomes its
 *            centroid with one register permute (vpermps: the index's low bits pick a lane).
 *            A score is then L lanes of sum_i T[i] * q_i: no horizontal sums.
 *   rows     R[k*ldr + i] = coordinate i of row k: for the plain formats (fp32 rows are used in
 *            place) and for every format's values, which are added row by row to accumulators.
 * Row scales (tq, q8) stay out of the buffer: they multiply a tile's L scores, or the weights.
 * Then one small dense kernel per layout multiplies the buffer with up to 8 queries (or 4 weight
 * rows) held in registers, so each buffer load serves every query of a group. Rows past the
 * last full tile, prod formats and head dims that are not a multiple of L use the portable code. */

/* ---- AVX2 + FMA + F16C: 8 lanes ---------------------------------------------------------------- */

AVX2_FN static INLINE __m256 exp_avx2(__m256 x) {
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), f);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(EXP_C6), f, _mm256_set1_ps(EXP_C5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP_C4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP_C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP_C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

AVX2_FN static float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2_FN static float hmax_avx2(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

AVX2_FN static float softmax_chunk_avx2(float *s, int n, float scale, float *m, float *rescale) {
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(*m);
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + t), sc);
        _mm256_storeu_ps(s + t, x);
        mx = _mm256_max_ps(mx, x);
    }
    float top = hmax_avx2(mx);
    for (; t < n; t++) { s[t] *= scale; top = s[t] > top ? s[t] : top; }
    if (top == -INFINITY) {
        for (t = 0; t < n; t++) s[t] = 0.0f;
        *rescale = 1.0f;
        return 0.0f;
    }
    __m256 sum = _mm256_setzero_ps(), base = _mm256_set1_ps(top);
    for (t = 0; t + 8 <= n; t += 8) {
        __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + t), base));
        _mm256_storeu_ps(s + t, p);
        sum = _mm256_add_ps(sum, p);
    }
    if (t < n) {                                         /* the tail: masked lanes give 0 */
        float in[8];
        for (int k = 0; k < 8; k++) in[k] = t + k < n ? s[t + k] - top : -INFINITY;
        __m256 p = exp_avx2(_mm256_loadu_ps(in));
        _mm256_storeu_ps(in, p);
        memcpy(s + t, in, (size_t)(n - t) * sizeof(float));
        sum = _mm256_add_ps(sum, p);
    }
    *rescale = _mm256_cvtss_f32(exp_avx2(_mm256_set1_ps(*m - top)));
    *m = top;
    return hsum_avx2(sum);
}

/* The codebook as permute tables: lo = lanes 0..7, hi = lanes 8..15 of the codebook repeated to
 * 16 entries (2^b divides 16, so an index's low b bits pick its centroid whatever lies above). */
static void table16(const tq_codec *c, float *t /* (16) */) {
    int K = 1 << c->bits;
    for (int k = 0; k < 16; k++) t[k] = c->centroids[k % K];
}

/* Centroids of 8 indices (the low b bits of each lane). vpermps reads 3 index bits; a 4-bit
 * index takes two permutes and its bit 3 (moved to the sign bit) chooses between them. */
AVX2_FN static INLINE __m256 centroid_avx2(__m256i idx, __m256 lo, __m256 hi, const int b) {
    __m256 v = _mm256_permutevar8x32_ps(lo, idx);
    if (b < 4) return v;
    return _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* The fp16 scales that end each of the 8 rows at p + offs (the last 2 of a row's B bytes;
 * gathered as the 4 bytes that end there, so no read leaves the row). */
AVX2_FN static INLINE __m256 row_scales_avx2(const uint8_t *p, __m256i offs, size_t B) {
    __m256i h = _mm256_srli_epi32(_mm256_i32gather_epi32((const int *)(p + B - 4), offs, 1), 16);
    return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

/* Columns tile of 8 tq rows: coordinate group g (8 indices in b bytes) of all rows in one gather
 * (4 bytes from byte g*b: inside the row, which ends with the 2-byte scale), then index j of the
 * group is the lane's bits [b*j, b*j + b). */
AVX2_FN static INLINE void cols_tq_avx2(const uint8_t *p, __m256i offs, int d, const int b, __m256 lo, __m256 hi,
                                        float *T /* (d, 8) */) {
    for (int g = 0; g < d / 8; g++) {
        __m256i w = _mm256_i32gather_epi32((const int *)(p + (size_t)g * b), offs, 1);
        for (int j = 0; j < 8; j++)
            _mm256_store_ps(T + (size_t)(8 * g + j) * 8, centroid_avx2(_mm256_srli_epi32(w, b * j), lo, hi, b));
    }
}

/* Rows tile of 8 tq rows: group g of row k broadcast to 8 lanes, lane j shifted by b*j. */
AVX2_FN static INLINE void rows_tq_avx2(const uint8_t *p, size_t B, int d, const int b, __m256 lo, __m256 hi,
                                        float *R /* (8, d) */) {
    const __m256i sh = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    for (int k = 0; k < 8; k++)
        for (int g = 0; g < d / 8; g++) {
            uint32_t w;
            memcpy(&w, p + k * B + (size_t)g * b, 4);
            _mm256_store_ps(R + (size_t)k * d + 8 * g, centroid_avx2(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), lo, hi, b));
        }
}

/* Coordinates i..i+7 of a plain row as floats, read in place (f a constant): as plain16_512
 * below; a q4 block's 32 elements come from its bytes 8h..8h+7 (h = 0, 1), pair 0 or 1 of them. */
AVX2_FN static INLINE __m256 plain8_avx2(const uint8_t *row, int i, const int f) {
    if (f == TQ_FP32) return _mm256_loadu_ps((const float *)row + i);
    if (f == TQ_FP16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * (size_t)i)));
    if (f == TQ_Q8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + i))));
    const __m256i pair0 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), pair1 = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
    const __m256i nib = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    const uint8_t *q = row + 18 * (size_t)(i / 32);
    __m256 s = _mm256_set1_ps(get_f16(q + 16)), s8 = _mm256_mul_ps(s, _mm256_set1_ps(8.0f));
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * (i % 32 / 16))));
    __m256i e = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(x, i % 16 ? pair1 : pair0), nib), _mm256_set1_epi32(15));
    return _mm256_fmsub_ps(_mm256_cvtepi32_ps(e), s, s8);
}

/* Rows tile of 8 plain rows as floats (for the transposed path of many queries); returns the
 * row scales left out (q8), else 1. */
AVX2_FN static __m256 rows_plain_avx2(const tq_codec *c, const uint8_t *p, __m256i offs, float *R /* (8, d) */) {
    const int d = c->d;
    const size_t B = c->bytes;
    for (int k = 0; k < 8; k++)
        for (int i = 0; i < d; i += 8) {
            const uint8_t *row = p + k * B;
            __m256 v = c->fmt == TQ_FP16 ? plain8_avx2(row, i, TQ_FP16) : c->fmt == TQ_Q8 ? plain8_avx2(row, i, TQ_Q8)
                                                                        : plain8_avx2(row, i, TQ_Q4);
            _mm256_store_ps(R + (size_t)k * d + i, v);
        }
    return c->fmt == TQ_Q8 ? row_scales_avx2(p, offs, B) : _mm256_set1_ps(1.0f);
}

/* The 8 sums of eight vectors a[0..7] as one vector (lane k = sum of a[k]), in two stages so that
 * only a quad of rows is live: sum4_avx2 folds a[4j..4j+3] (halves, then pairs), sum8_avx2 folds
 * the two quads (the last pair) and permutes back the order the shuffles leave ([0 2 4 6 | 1 3 5 7]). */
AVX2_FN static INLINE __m256 sum4_avx2(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 b0 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
    __m256 b1 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
    return _mm256_add_ps(_mm256_shuffle_ps(b0, b1, 0x44), _mm256_shuffle_ps(b0, b1, 0xEE));
}

AVX2_FN static INLINE __m256 sum8_avx2(__m256 c0, __m256 c1) {
    __m256 e = _mm256_add_ps(_mm256_shuffle_ps(c0, c1, 0x88), _mm256_shuffle_ps(c0, c1, 0xDD));
    return _mm256_permutevar8x32_ps(e, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* T[i*8 + k] = R[k*ldr + i] for i, k < 8: an 8 x 8 transpose in registers (24 shuffles). */
AVX2_FN static INLINE void transpose8_avx2(const float *R, size_t ldr, float *T) {
    __m256 r[8], t[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(R + k * ldr);
    for (int k = 0; k < 4; k++) {
        t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; k++) {                       /* r[4k+j], half L: column 4L+j of rows 4k..4k+3 */
        r[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        r[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        r[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        r[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        _mm256_store_ps(T + (size_t)j * 8, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
        _mm256_store_ps(T + (size_t)(4 + j) * 8, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
    }
}

/* NR queries against a columns tile: lane k of query r = sc_k sum_i T[i][k] q_r[i]. An FMA
 * waits for the one before it on the same accumulator (4-5 cycles), so each query keeps C partial
 * sums over interleaved coordinates, enough chains in flight to fill both FMA units. */
AVX2_FN static INLINE void mk_cols_avx2(const float *T, int d, const float *q, size_t ldq, __m256 sc, float *s,
                                        size_t lds, const int NR) {
    const int C = NR == 1 ? 8 : NR == 2 ? 4 : NR == 3 ? 4 : 2;
    __m256 a[16];
    for (int x = 0; x < NR * C; x++) a[x] = _mm256_setzero_ps();
    for (int i = 0; i < d; i += C)
        for (int j = 0; j < C; j++) {
            __m256 v = _mm256_load_ps(T + (size_t)(i + j) * 8);
            for (int r = 0; r < NR; r++) a[r * C + j] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(q + r * ldq + i + j), a[r * C + j]);
        }
    for (int r = 0; r < NR; r++) {
        for (int w = C / 2; w > 0; w /= 2)
            for (int j = 0; j < w; j++) a[r * C + j] = _mm256_add_ps(a[r * C + j], a[r * C + j + w]);
        _mm256_storeu_ps(s + r * lds, _mm256_mul_ps(a[r * C], sc));
    }
}

AVX2_FN static void scores_cols_avx2(const float *T, int d, int nq, const float *qp, size_t ldq, __m256 sc, float *s, size_t lds) {
    for (int r = 0; r < nq; r += 6) {
        const float *q = qp + r * ldq;
        float *o = s + r * lds;
        switch (nq - r) {
        case 1: mk_cols_avx2(T, d, q, ldq, sc, o, lds, 1); break;
        case 2: mk_cols_avx2(T, d, q, ldq, sc, o, lds, 2); break;
        case 3: mk_cols_avx2(T, d, q, ldq, sc, o, lds, 3); break;
        case 4: mk_cols_avx2(T, d, q, ldq, sc, o, lds, 4); break;
        case 5: mk_cols_avx2(T, d, q, ldq, sc, o, lds, 5); break;
        default: mk_cols_avx2(T, d, q, ldq, sc, o, lds, 6); break;
        }
    }
}

/* NR queries against 8 plain rows read in place: as few_plain_512 below. */
AVX2_FN static INLINE void few_plain_avx2(const uint8_t *p, size_t B, int d, const int f, const float *q, size_t ldq,
                                          __m256 sc, float *s, size_t lds, const int NR) {
    __m256 c[4][2];                                      /* [query][quad]: rows 4j..4j+3 folded */
    for (int j = 0; j < 2; j++) {
        __m256 a[4][4];                                  /* [query][row of the quad] */
        for (int k = 0; k < 4; k++) {
            const uint8_t *row = p + (size_t)(4 * j + k) * B;
            for (int r = 0; r < NR; r++) a[r][k] = _mm256_setzero_ps();
            for (int i = 0; i < d; i += 8) {
                __m256 x = plain8_avx2(row, i, f);
                for (int r = 0; r < NR; r++) a[r][k] = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + r * ldq + i), a[r][k]);
            }
        }
        for (int r = 0; r < NR; r++) c[r][j] = sum4_avx2(a[r][0], a[r][1], a[r][2], a[r][3]);
    }
    for (int r = 0; r < NR; r++) _mm256_storeu_ps(s + r * lds, _mm256_mul_ps(sum8_avx2(c[r][0], c[r][1]), sc));
}

AVX2_FN static INLINE void few_plain_scores_avx2(const uint8_t *p, size_t B, int d, const int f, int nq, const float *q,
                                                 size_t ldq, __m256 sc, float *s, size_t lds) {
    switch (nq) {
    case 1: few_plain_avx2(p, B, d, f, q, ldq, sc, s, lds, 1); break;
    case 2: few_plain_avx2(p, B, d, f, q, ldq, sc, s, lds, 2); break;
    case 3: few_plain_avx2(p, B, d, f, q, ldq, sc, s, lds, 3); break;
    default: few_plain_avx2(p, B, d, f, q, ldq, sc, s, lds, 4); break;
    }
}

/* NR accumulators += 8 rows (B bytes apart at p, format f, read in place) weighted by ws (NR x 8,
 * the row scales folded in), for the CH 8-coordinate chunks at i0: NR x CH independent sums, so
 * that the FMAs need not wait. */
AVX2_FN static INLINE void mk_values_avx2(const uint8_t *p, size_t B, const int f, const float *ws, float *acc, size_t lda,
                                          int i0, const int NR, const int CH) {
    __m256 a[8];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) a[r * CH + c] = _mm256_loadu_ps(acc + r * lda + i0 + 8 * c);
    for (int k = 0; k < 8; k++) {
        __m256 wk[4];
        for (int r = 0; r < NR; r++) wk[r] = _mm256_broadcast_ss(ws + 8 * r + k);
        for (int c = 0; c < CH; c++) {
            __m256 v = plain8_avx2(p + k * B, i0 + 8 * c, f);    /* one conversion for the NR rows */
            for (int r = 0; r < NR; r++) a[r * CH + c] = _mm256_fmadd_ps(v, wk[r], a[r * CH + c]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) _mm256_storeu_ps(acc + r * lda + i0 + 8 * c, a[r * CH + c]);
}

AVX2_FN static INLINE void values_group_avx2(const uint8_t *p, size_t B, int d, const int f, const float *ws, float *acc,
                                             size_t lda, const int NR) {
    int i0 = 0;
    for (; i0 + 16 <= d; i0 += 16) mk_values_avx2(p, B, f, ws, acc, lda, i0, NR, 2);
    if (i0 < d) mk_values_avx2(p, B, f, ws, acc, lda, i0, NR, 1);
}

/* nq weight rows (w, ldw) times 8 rows (B bytes apart at p, format f) into nq accumulators. */
AVX2_FN static INLINE void values_rows_avx2(const uint8_t *p, size_t B, int d, const int f, int nq, const float *w, size_t ldw,
                                            __m256 sc, float *acc, size_t lda) {
    float ws[4 * 8];
    for (int r = 0; r < nq; r += 4) {
        int nr = nq - r < 4 ? nq - r : 4;
        for (int j = 0; j < nr; j++) _mm256_storeu_ps(ws + 8 * j, _mm256_mul_ps(_mm256_loadu_ps(w + (r + j) * ldw), sc));
        float *a = acc + r * lda;
        switch (nr) {
        case 1: values_group_avx2(p, B, d, f, ws, a, lda, 1); break;
        case 2: values_group_avx2(p, B, d, f, ws, a, lda, 2); break;
        case 3: values_group_avx2(p, B, d, f, ws, a, lda, 3); break;
        default: values_group_avx2(p, B, d, f, ws, a, lda, 4); break;
        }
    }
}

/* Few queries (decode: one GQA group) need no tile: each group of centroids goes straight into the
 * NR queries' sums (C chains each), and each row's centroids straight into the accumulators. */
AVX2_FN static INLINE void few_cols_avx2(const uint8_t *p, __m256i offs, int d, const int b, __m256 lo, __m256 hi,
                                         const float *q, size_t ldq, __m256 sc, float *s, size_t lds, const int NR) {
    const int C = NR == 1 ? 4 : 2;
    __m256 a[8];
    for (int x = 0; x < NR * C; x++) a[x] = _mm256_setzero_ps();
    for (int g = 0; g < d / 8; g++) {
        __m256i w = _mm256_i32gather_epi32((const int *)(p + (size_t)g * b), offs, 1);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            __m256 v = centroid_avx2(_mm256_srli_epi32(w, b * j), lo, hi, b);
            for (int r = 0; r < NR; r++)
                a[r * C + j % C] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(q + r * ldq + 8 * g + j), a[r * C + j % C]);
        }
    }
    for (int r = 0; r < NR; r++) {
        for (int w = C / 2; w > 0; w /= 2)
            for (int j = 0; j < w; j++) a[r * C + j] = _mm256_add_ps(a[r * C + j], a[r * C + j + w]);
        _mm256_storeu_ps(s + r * lds, _mm256_mul_ps(a[r * C], sc));
    }
}

AVX2_FN static INLINE void few_scores_avx2(const uint8_t *p, __m256i offs, int d, const int b, __m256 lo, __m256 hi, int nq,
                                           const float *q, size_t ldq, __m256 sc, float *s, size_t lds) {
    switch (nq) {
    case 1: few_cols_avx2(p, offs, d, b, lo, hi, q, ldq, sc, s, lds, 1); break;
    case 2: few_cols_avx2(p, offs, d, b, lo, hi, q, ldq, sc, s, lds, 2); break;
    case 3: few_cols_avx2(p, offs, d, b, lo, hi, q, ldq, sc, s, lds, 3); break;
    default: few_cols_avx2(p, offs, d, b, lo, hi, q, ldq, sc, s, lds, 4); break;
    }
}

AVX2_FN static INLINE void few_rows_avx2(const uint8_t *p, size_t B, const int b, __m256 lo, __m256 hi, const float *ws,
                                         size_t lws, float *acc, size_t lda, int i0, const int NR, const int CH) {
    const __m256i sh = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    __m256 a[8];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) a[r * CH + c] = _mm256_loadu_ps(acc + r * lda + i0 + 8 * c);
    for (int k = 0; k < 8; k++) {
        const uint8_t *row = p + k * B + (size_t)(i0 / 8) * b;
        __m256 wk[4];
        for (int r = 0; r < NR; r++) wk[r] = _mm256_broadcast_ss(ws + r * lws + k);
        for (int c = 0; c < CH; c++) {
            uint32_t w;
            memcpy(&w, row + (size_t)c * b, 4);
            __m256 v = centroid_avx2(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), lo, hi, b);
            for (int r = 0; r < NR; r++) a[r * CH + c] = _mm256_fmadd_ps(v, wk[r], a[r * CH + c]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) _mm256_storeu_ps(acc + r * lda + i0 + 8 * c, a[r * CH + c]);
}

AVX2_FN static INLINE void few_rows_group_avx2(const uint8_t *p, size_t B, int d, const int b, __m256 lo, __m256 hi,
                                               const float *ws, size_t lws, float *acc, size_t lda, const int NR) {
    int i0 = 0;
    for (; i0 + 16 <= d; i0 += 16) few_rows_avx2(p, B, b, lo, hi, ws, lws, acc, lda, i0, NR, 2);
    if (i0 < d) few_rows_avx2(p, B, b, lo, hi, ws, lws, acc, lda, i0, NR, 1);
}

/* ws (nq, lws): the weights of the 8 rows, their scales folded in. */
AVX2_FN static INLINE void few_values_avx2(const uint8_t *p, size_t B, int d, const int b, __m256 lo, __m256 hi, int nq,
                                           const float *ws, size_t lws, float *acc, size_t lda) {
    switch (nq) {
    case 1: few_rows_group_avx2(p, B, d, b, lo, hi, ws, lws, acc, lda, 1); break;
    case 2: few_rows_group_avx2(p, B, d, b, lo, hi, ws, lws, acc, lda, 2); break;
    case 3: few_rows_group_avx2(p, B, d, b, lo, hi, ws, lws, acc, lda, 3); break;
    default: few_rows_group_avx2(p, B, d, b, lo, hi, ws, lws, acc, lda, 4); break;
    }
}

AVX2_FN static void scores_avx2(const tq_codec *c, int nq, const float *qp, size_t ldq, const uint8_t *rows, int n,
                                float *s, size_t lds) {
    const int d = c->d, b = c->bits;
    const size_t B = c->bytes;
    const __m256i offs = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)B));
    float buf[16 * d + 8], *tile = (float *)(((uintptr_t)buf + 31) & ~(uintptr_t)31), *cols = tile + 8 * d, tab[16] = {0};
    if (b) table16(c, tab);
    __m256 lo = _mm256_loadu_ps(tab), hi = _mm256_loadu_ps(tab + 8), one = _mm256_set1_ps(1.0f);
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const uint8_t *p = rows + (size_t)t * B;
        prefetch_tile(p, 8 * B);
        if (b && nq <= 4) {
            __m256 sc = row_scales_avx2(p, offs, B);
            if (b == 2) few_scores_avx2(p, offs, d, 2, lo, hi, nq, qp, ldq, sc, s + t, lds);
            else if (b == 3) few_scores_avx2(p, offs, d, 3, lo, hi, nq, qp, ldq, sc, s + t, lds);
            else few_scores_avx2(p, offs, d, 4, lo, hi, nq, qp, ldq, sc, s + t, lds);
        } else if (b) {
            if (b == 2) cols_tq_avx2(p, offs, d, 2, lo, hi, tile);
            else if (b == 3) cols_tq_avx2(p, offs, d, 3, lo, hi, tile);
            else cols_tq_avx2(p, offs, d, 4, lo, hi, tile);
            scores_cols_avx2(tile, d, nq, qp, ldq, row_scales_avx2(p, offs, B), s + t, lds);
        } else if (nq <= 4) {                            /* plain rows, few queries: read in place */
            __m256 sc = c->fmt == TQ_Q8 ? row_scales_avx2(p, offs, B) : one;
            switch (c->fmt) {
            case TQ_FP32: few_plain_scores_avx2(p, B, d, TQ_FP32, nq, qp, ldq, sc, s + t, lds); break;
            case TQ_FP16: few_plain_scores_avx2(p, B, d, TQ_FP16, nq, qp, ldq, sc, s + t, lds); break;
            case TQ_Q8: few_plain_scores_avx2(p, B, d, TQ_Q8, nq, qp, ldq, sc, s + t, lds); break;
            default: few_plain_scores_avx2(p, B, d, TQ_Q4, nq, qp, ldq, sc, s + t, lds); break;
            }
        } else {                                         /* many queries: transposed, fp32 from place */
            const float *R = (const float *)p;
            __m256 sc = one;
            if (c->fmt != TQ_FP32) { sc = rows_plain_avx2(c, p, offs, tile); R = tile; }
            for (int i = 0; i < d; i += 8) transpose8_avx2(R + i, (size_t)d, cols + (size_t)i * 8);
            scores_cols_avx2(cols, d, nq, qp, ldq, sc, s + t, lds);
        }
    }
    if (t < n) scores_portable(c, nq, qp, ldq, rows + (size_t)t * B, n - t, s + t, lds);
}

AVX2_FN static void values_avx2(const tq_codec *c, int nq, const float *w, size_t ldw, const uint8_t *rows, int n,
                                float *acc, size_t lda) {
    const int d = c->d, b = c->bits;
    const size_t B = c->bytes;
    const __m256i offs = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)B));
    float buf[8 * d + 8], *tile = (float *)(((uintptr_t)buf + 31) & ~(uintptr_t)31), tab[16] = {0};
    if (b) table16(c, tab);
    __m256 lo = _mm256_loadu_ps(tab), hi = _mm256_loadu_ps(tab + 8);
    int t = 0, few = b && nq <= 4 && n <= FEW_ROWS;
    float ws[4 * FEW_ROWS];
    for (; few && t + 8 <= n; t += 8) {                  /* weights times row scales, ahead of their use */
        __m256 sc = row_scales_avx2(rows + (size_t)t * B, offs, B);
        for (int r = 0; r < nq; r++) _mm256_storeu_ps(ws + r * FEW_ROWS + t, _mm256_mul_ps(_mm256_loadu_ps(w + r * ldw + t), sc));
    }
    for (t = 0; few && t + 8 <= n; t += 8) {
        const uint8_t *p = rows + (size_t)t * B;
        prefetch_tile(p, 8 * B);
        if (b == 2) few_values_avx2(p, B, d, 2, lo, hi, nq, ws + t, FEW_ROWS, acc, lda);
        else if (b == 3) few_values_avx2(p, B, d, 3, lo, hi, nq, ws + t, FEW_ROWS, acc, lda);
        else few_values_avx2(p, B, d, 4, lo, hi, nq, ws + t, FEW_ROWS, acc, lda);
    }
    for (; !few && t + 8 <= n; t += 8) {
        const uint8_t *p = rows + (size_t)t * B;
        prefetch_tile(p, 8 * B);
        const uint8_t *T = (const uint8_t *)tile;        /* the tile: fp32 rows of 4d bytes */
        if (b) {
            if (b == 2) rows_tq_avx2(p, B, d, 2, lo, hi, tile);
            else if (b == 3) rows_tq_avx2(p, B, d, 3, lo, hi, tile);
            else rows_tq_avx2(p, B, d, 4, lo, hi, tile);
            values_rows_avx2(T, 4 * (size_t)d, d, TQ_FP32, nq, w + t, ldw, row_scales_avx2(p, offs, B), acc, lda);
        } else if (c->fmt == TQ_FP32) {
            values_rows_avx2(p, B, d, TQ_FP32, nq, w + t, ldw, _mm256_set1_ps(1.0f), acc, lda);
        } else if (nq > 4) {                             /* many queries: each row converted once, to the tile */
            __m256 sc = rows_plain_avx2(c, p, offs, tile);
            values_rows_avx2(T, 4 * (size_t)d, d, TQ_FP32, nq, w + t, ldw, sc, acc, lda);
        } else {                                         /* few queries: converted as they are read */
            __m256 sc = c->fmt == TQ_Q8 ? row_scales_avx2(p, offs, B) : _mm256_set1_ps(1.0f);
            if (c->fmt == TQ_FP16) values_rows_avx2(p, B, d, TQ_FP16, nq, w + t, ldw, sc, acc, lda);
            else if (c->fmt == TQ_Q8) values_rows_avx2(p, B, d, TQ_Q8, nq, w + t, ldw, sc, acc, lda);
            else values_rows_avx2(p, B, d, TQ_Q4, nq, w + t, ldw, sc, acc, lda);
        }
    }
    if (t < n) values_portable(c, nq, w + t, ldw, rows + (size_t)t * B, n - t, acc, lda);
}

/* ---- AVX-512F: 16 lanes (the same steps; one vpermps holds a whole 4-bit codebook) ------------- */

AVX512_FN static INLINE __m512 exp_512(__m512 x) {
    __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_MIN), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), f);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP_C6), f, _mm512_set1_ps(EXP_C5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

AVX512_FN static float softmax_chunk_512(float *s, int n, float scale, float *m, float *rescale) {
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(*m);
    for (int t = 0; t < n; t += 16) {                   /* the tail through a lane mask */
        __mmask16 k = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + t), sc);
        _mm512_mask_storeu_ps(s + t, k, x);
        mx = _mm512_mask_max_ps(mx, k, mx, x);
    }
    float top = _mm512_reduce_max_ps(mx);
    if (top == -INFINITY) {
        for (int t = 0; t < n; t++) s[t] = 0.0f;
        *rescale = 1.0f;
        return 0.0f;
    }
    __m512 sum = _mm512_setzero_ps(), base = _mm512_set1_ps(top);
    for (int t = 0; t < n; t += 16) {
        __mmask16 k = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        __m512 p = _mm512_maskz_mov_ps(k, exp_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), base)));
        _mm512_mask_storeu_ps(s + t, k, p);
        sum = _mm512_add_ps(sum, p);
    }
    *rescale = _mm512_cvtss_f32(exp_512(_mm512_set1_ps(*m - top)));
    *m = top;
    return _mm512_reduce_add_ps(sum);
}

AVX512_FN static INLINE __m512 row_scales_512(const uint8_t *p, __m512i offs, size_t B) {
    __m512i h = _mm512_srli_epi32(_mm512_i32gather_epi32(offs, p + B - 4, 1), 16);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
}

AVX512_FN static INLINE void cols_tq_512(const uint8_t *p, __m512i offs, int d, const int b, __m512 tab, float *T /* (d, 16) */) {
    for (int g = 0; g < d / 8; g++) {
        __m512i w = _mm512_i32gather_epi32(offs, p + (size_t)g * b, 1);
        for (int j = 0; j < 8; j++)
            _mm512_store_ps(T + (size_t)(8 * g + j) * 16, _mm512_permutexvar_ps(_mm512_srli_epi32(w, b * j), tab));
    }
}

/* Rows tile of 16 tq rows: 16 coordinates = groups 2h and 2h+1, broadcast to 8 lanes each. */
AVX512_FN static INLINE void rows_tq_512(const uint8_t *p, size_t B, int d, const int b, __m512 tab, float *R /* (16, d) */) {
    const __m512i sh = _mm512_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b, 0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    for (int k = 0; k < 16; k++)
        for (int h = 0; h < d / 16; h++) {
            uint32_t w0, w1;
            memcpy(&w0, p + k * B + (size_t)(2 * h) * b, 4);
            memcpy(&w1, p + k * B + (size_t)(2 * h + 1) * b, 4);
            __m512i w = _mm512_mask_set1_epi32(_mm512_set1_epi32((int)w0), 0xFF00, (int)w1);
            _mm512_store_ps(R + (size_t)k * d + 16 * h, _mm512_permutexvar_ps(_mm512_srlv_epi32(w, sh), tab));
        }
}

/* Coordinates i..i+15 of a plain row as floats, read in place (f a constant, so each use compiles
 * to one format): fp32 as stored, fp16 through F16C, q8's integers (the row scale stays out),
 * q4's block of 32 decoded: byte j holds elements 2j (low nibble) and 2j+1, so each byte goes to
 * two lanes, shifted by 0 and 4; x~ = s (q - 8) = q s - 8 s, the block scale folded in. */
AVX512_FN static INLINE __m512 plain16_512(const uint8_t *row, int i, const int f) {
    if (f == TQ_FP32) return _mm512_loadu_ps((const float *)row + i);
    if (f == TQ_FP16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * (size_t)i)));
    if (f == TQ_Q8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + i))));
    const __m512i pair0 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i pair1 = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    const __m512i nib = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const uint8_t *q = row + 18 * (size_t)(i / 32);
    __m512 s = _mm512_set1_ps(get_f16(q + 16)), s8 = _mm512_mul_ps(s, _mm512_set1_ps(8.0f));
    __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512i e = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(i % 32 ? pair1 : pair0, x), nib), _mm512_set1_epi32(15));
    return _mm512_fmsub_ps(_mm512_cvtepi32_ps(e), s, s8);
}

/* Rows tile of 16 plain rows as floats (for the transposed path of many queries); returns the
 * row scales left out (q8), else 1. */
AVX512_FN static __m512 rows_plain_512(const tq_codec *c, const uint8_t *p, __m512i offs, float *R /* (16, d) */) {
    const int d = c->d;
    const size_t B = c->bytes;
    for (int k = 0; k < 16; k++)
        for (int i = 0; i < d; i += 16) {
            const uint8_t *row = p + k * B;
            __m512 v = c->fmt == TQ_FP16 ? plain16_512(row, i, TQ_FP16) : c->fmt == TQ_Q8 ? plain16_512(row, i, TQ_Q8)
                                                                         : plain16_512(row, i, TQ_Q4);
            _mm512_store_ps(R + (size_t)k * d + i, v);
        }
    return c->fmt == TQ_Q8 ? row_scales_512(p, offs, B) : _mm512_set1_ps(1.0f);
}

/* The 16 sums of sixteen vectors a[0..15] as one vector (lane k = sum of a[k]), in two stages so
 * that only a quad of rows is live: sum4_512 folds a[4j..4j+3] (256-bit halves, then 128-bit
 * quarters), sum16_512 folds the four quads (pairs, the last pair) and permutes back the order the
 * shuffles leave (lane 4j+m holds row 4m+j). */
AVX512_FN static INLINE __m512 sum4_512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 b0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    __m512 b1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(b0, b1, 0x88), _mm512_shuffle_f32x4(b0, b1, 0xDD));
}

AVX512_FN static INLINE __m512 sum16_512(__m512 c0, __m512 c1, __m512 c2, __m512 c3) {
    __m512 e0 = _mm512_add_ps(_mm512_shuffle_ps(c0, c1, 0x44), _mm512_shuffle_ps(c0, c1, 0xEE));
    __m512 e1 = _mm512_add_ps(_mm512_shuffle_ps(c2, c3, 0x44), _mm512_shuffle_ps(c2, c3, 0xEE));
    __m512 g = _mm512_add_ps(_mm512_shuffle_ps(e0, e1, 0x88), _mm512_shuffle_ps(e0, e1, 0xDD));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), g);
}

/* T[i*16 + k] = R[k*ldr + i] for i, k < 16: a 16 x 16 transpose in registers (pairs, quads,
 * then 128-bit lanes: 64 shuffles), so that many queries (prefill) can use the columns kernel on
 * plain rows too instead of summing across each row's lanes. */
AVX512_FN static INLINE void transpose16_512(const float *R, size_t ldr, float *T) {
    __m512 r[16], t[16];
    for (int k = 0; k < 16; k++) r[k] = _mm512_loadu_ps(R + k * ldr);
    for (int k = 0; k < 8; k++) {                       /* per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3] */
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; k++) {                       /* r[4k+j], lane L: column 4L+j of rows 4k..4k+3 */
        r[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {                       /* lane L of the four row groups, in order */
        __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), e = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
        _mm512_store_ps(T + (size_t)j * 16, _mm512_shuffle_f32x4(a, c, 0x88));
        _mm512_store_ps(T + (size_t)(4 + j) * 16, _mm512_shuffle_f32x4(b, e, 0x88));
        _mm512_store_ps(T + (size_t)(8 + j) * 16, _mm512_shuffle_f32x4(a, c, 0xDD));
        _mm512_store_ps(T + (size_t)(12 + j) * 16, _mm512_shuffle_f32x4(b, e, 0xDD));
    }
}

AVX512_FN static INLINE void mk_cols_512(const float *T, int d, const float *q, size_t ldq, __m512 sc, float *s,
                                         size_t lds, const int NR) {
    const int C = NR == 1 ? 8 : NR == 2 ? 4 : NR == 3 ? 4 : 2;
    __m512 a[16];
    for (int x = 0; x < NR * C; x++) a[x] = _mm512_setzero_ps();
    for (int i = 0; i < d; i += C)
        for (int j = 0; j < C; j++) {
            __m512 v = _mm512_load_ps(T + (size_t)(i + j) * 16);
            for (int r = 0; r < NR; r++) a[r * C + j] = _mm512_fmadd_ps(v, _mm512_set1_ps(q[r * ldq + i + j]), a[r * C + j]);
        }
    for (int r = 0; r < NR; r++) {
        for (int w = C / 2; w > 0; w /= 2)
            for (int j = 0; j < w; j++) a[r * C + j] = _mm512_add_ps(a[r * C + j], a[r * C + j + w]);
        _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(a[r * C], sc));
    }
}

AVX512_FN static void scores_cols_512(const float *T, int d, int nq, const float *qp, size_t ldq, __m512 sc, float *s, size_t lds) {
    for (int r = 0; r < nq; r += 8) {
        const float *q = qp + r * ldq;
        float *o = s + r * lds;
        switch (nq - r) {
        case 1: mk_cols_512(T, d, q, ldq, sc, o, lds, 1); break;
        case 2: mk_cols_512(T, d, q, ldq, sc, o, lds, 2); break;
        case 3: mk_cols_512(T, d, q, ldq, sc, o, lds, 3); break;
        case 4: mk_cols_512(T, d, q, ldq, sc, o, lds, 4); break;
        case 5: mk_cols_512(T, d, q, ldq, sc, o, lds, 5); break;
        case 6: mk_cols_512(T, d, q, ldq, sc, o, lds, 6); break;
        case 7: mk_cols_512(T, d, q, ldq, sc, o, lds, 7); break;
        default: mk_cols_512(T, d, q, ldq, sc, o, lds, 8); break;
        }
    }
}

/* NR queries against 16 plain rows read in place (rows of B bytes at p, format f): each row's
 * coordinates are converted once and serve every query. Lane k of query r's score is the dot
 * product of row k with q_r: d/16 FMAs into one vector per (query, row), then summed across its
 * lanes by sum4_512 per quad of rows and sum16_512 at the end. */
AVX512_FN static INLINE void few_plain_512(const uint8_t *p, size_t B, int d, const int f, const float *q, size_t ldq,
                                           __m512 sc, float *s, size_t lds, const int NR) {
    __m512 c[4][4];                                      /* [query][quad]: rows 4j..4j+3 folded */
    for (int j = 0; j < 4; j++) {
        __m512 a[4][4];                                  /* [query][row of the quad] */
        for (int k = 0; k < 4; k++) {
            const uint8_t *row = p + (size_t)(4 * j + k) * B;
            for (int r = 0; r < NR; r++) a[r][k] = _mm512_setzero_ps();
            for (int i = 0; i < d; i += 16) {
                __m512 x = plain16_512(row, i, f);
                for (int r = 0; r < NR; r++) a[r][k] = _mm512_fmadd_ps(x, _mm512_loadu_ps(q + r * ldq + i), a[r][k]);
            }
        }
        for (int r = 0; r < NR; r++) c[r][j] = sum4_512(a[r][0], a[r][1], a[r][2], a[r][3]);
    }
    for (int r = 0; r < NR; r++) _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(sum16_512(c[r][0], c[r][1], c[r][2], c[r][3]), sc));
}

AVX512_FN static INLINE void few_plain_scores_512(const uint8_t *p, size_t B, int d, const int f, int nq, const float *q,
                                                  size_t ldq, __m512 sc, float *s, size_t lds) {
    switch (nq) {
    case 1: few_plain_512(p, B, d, f, q, ldq, sc, s, lds, 1); break;
    case 2: few_plain_512(p, B, d, f, q, ldq, sc, s, lds, 2); break;
    case 3: few_plain_512(p, B, d, f, q, ldq, sc, s, lds, 3); break;
    default: few_plain_512(p, B, d, f, q, ldq, sc, s, lds, 4); break;
    }
}

/* NR accumulators += 16 rows (B bytes apart at p, format f, read in place) weighted by ws (NR x 16,
 * the row scales folded in), for the CH 16-coordinate chunks at i0. */
AVX512_FN static INLINE void mk_values_512(const uint8_t *p, size_t B, const int f, const float *ws, float *acc, size_t lda,
                                           int i0, const int NR, const int CH) {
    __m512 a[16];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) a[r * CH + c] = _mm512_loadu_ps(acc + r * lda + i0 + 16 * c);
    for (int k = 0; k < 16; k++) {
        __m512 wk[4];
        for (int r = 0; r < NR; r++) wk[r] = _mm512_set1_ps(ws[16 * r + k]);
        for (int c = 0; c < CH; c++) {
            __m512 v = plain16_512(p + k * B, i0 + 16 * c, f);   /* one conversion for the NR rows */
            for (int r = 0; r < NR; r++) a[r * CH + c] = _mm512_fmadd_ps(v, wk[r], a[r * CH + c]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) _mm512_storeu_ps(acc + r * lda + i0 + 16 * c, a[r * CH + c]);
}

AVX512_FN static INLINE void values_group_512(const uint8_t *p, size_t B, int d, const int f, const float *ws, float *acc,
                                              size_t lda, const int NR) {
    int i0 = 0;
    for (; i0 + 64 <= d; i0 += 64) mk_values_512(p, B, f, ws, acc, lda, i0, NR, 4);
    switch ((d - i0) / 16) {
    case 3: mk_values_512(p, B, f, ws, acc, lda, i0, NR, 3); break;
    case 2: mk_values_512(p, B, f, ws, acc, lda, i0, NR, 2); break;
    case 1: mk_values_512(p, B, f, ws, acc, lda, i0, NR, 1); break;
    default: break;
    }
}

/* nq weight rows (w, ldw) times 16 rows (B bytes apart at p, format f) into nq accumulators. */
AVX512_FN static INLINE void values_rows_512(const uint8_t *p, size_t B, int d, const int f, int nq, const float *w, size_t ldw,
                                             __m512 sc, float *acc, size_t lda) {
    float ws[4 * 16];
    for (int r = 0; r < nq; r += 4) {
        int nr = nq - r < 4 ? nq - r : 4;
        for (int j = 0; j < nr; j++) _mm512_storeu_ps(ws + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(w + (r + j) * ldw), sc));
        float *a = acc + r * lda;
        switch (nr) {
        case 1: values_group_512(p, B, d, f, ws, a, lda, 1); break;
        case 2: values_group_512(p, B, d, f, ws, a, lda, 2); break;
        case 3: values_group_512(p, B, d, f, ws, a, lda, 3); break;
        default: values_group_512(p, B, d, f, ws, a, lda, 4); break;
        }
    }
}

/* Few queries (decode: one GQA group) need no tile: each permuted centroid vector goes straight
 * into the NR queries' sums, C chains each (the FMA latency again). */
AVX512_FN static INLINE void few_cols_512(const uint8_t *p, __m512i offs, int d, const int b, __m512 tab, const float *q,
                                          size_t ldq, __m512 sc, float *s, size_t lds, const int NR) {
    const int C = NR == 1 ? 4 : 2;
    __m512 a[8];
    for (int x = 0; x < NR * C; x++) a[x] = _mm512_setzero_ps();
    for (int g = 0; g < d / 8; g++) {
        __m512i w = _mm512_i32gather_epi32(offs, p + (size_t)g * b, 1);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            __m512 v = _mm512_permutexvar_ps(_mm512_srli_epi32(w, b * j), tab);
            for (int r = 0; r < NR; r++) a[r * C + j % C] = _mm512_fmadd_ps(v, _mm512_set1_ps(q[r * ldq + 8 * g + j]), a[r * C + j % C]);
        }
    }
    for (int r = 0; r < NR; r++) {
        for (int w = C / 2; w > 0; w /= 2)
            for (int j = 0; j < w; j++) a[r * C + j] = _mm512_add_ps(a[r * C + j], a[r * C + j + w]);
        _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(a[r * C], sc));
    }
}

AVX512_FN static INLINE void few_scores_512(const uint8_t *p, __m512i offs, int d, const int b, __m512 tab, int nq,
                                            const float *q, size_t ldq, __m512 sc, float *s, size_t lds) {
    switch (nq) {
    case 1: few_cols_512(p, offs, d, b, tab, q, ldq, sc, s, lds, 1); break;
    case 2: few_cols_512(p, offs, d, b, tab, q, ldq, sc, s, lds, 2); break;
    case 3: few_cols_512(p, offs, d, b, tab, q, ldq, sc, s, lds, 3); break;
    default: few_cols_512(p, offs, d, b, tab, q, ldq, sc, s, lds, 4); break;
    }
}

/* Few weight rows: the 16 rows' centroids go straight into the NR x CH accumulators at i0. */
AVX512_FN static INLINE void few_rows_512(const uint8_t *p, size_t B, const int b, __m512 tab, const float *ws, size_t lws,
                                          float *acc, size_t lda, int i0, const int NR, const int CH) {
    const __m512i sh = _mm512_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b, 0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    __m512 a[16];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) a[r * CH + c] = _mm512_loadu_ps(acc + r * lda + i0 + 16 * c);
    for (int k = 0; k < 16; k++) {
        const uint8_t *row = p + k * B + (size_t)(i0 / 8) * b;
        __m512 wk[4];
        for (int r = 0; r < NR; r++) wk[r] = _mm512_set1_ps(ws[r * lws + k]);
        for (int c = 0; c < CH; c++) {
            uint32_t w0, w1;
            memcpy(&w0, row + (size_t)(2 * c) * b, 4);
            memcpy(&w1, row + (size_t)(2 * c + 1) * b, 4);
            __m512i w = _mm512_mask_set1_epi32(_mm512_set1_epi32((int)w0), 0xFF00, (int)w1);
            __m512 v = _mm512_permutexvar_ps(_mm512_srlv_epi32(w, sh), tab);
            for (int r = 0; r < NR; r++) a[r * CH + c] = _mm512_fmadd_ps(v, wk[r], a[r * CH + c]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) _mm512_storeu_ps(acc + r * lda + i0 + 16 * c, a[r * CH + c]);
}

AVX512_FN static INLINE void few_rows_group_512(const uint8_t *p, size_t B, int d, const int b, __m512 tab, const float *ws,
                                                size_t lws, float *acc, size_t lda, const int NR) {
    int i0 = 0;
    for (; i0 + 64 <= d; i0 += 64) few_rows_512(p, B, b, tab, ws, lws, acc, lda, i0, NR, 4);
    switch ((d - i0) / 16) {
    case 3: few_rows_512(p, B, b, tab, ws, lws, acc, lda, i0, NR, 3); break;
    case 2: few_rows_512(p, B, b, tab, ws, lws, acc, lda, i0, NR, 2); break;
    case 1: few_rows_512(p, B, b, tab, ws, lws, acc, lda, i0, NR, 1); break;
    default: break;
    }
}

/* ws (nq, lws): the weights of the 16 rows, their scales folded in. */
AVX512_FN static INLINE void few_values_512(const uint8_t *p, size_t B, int d, const int b, __m512 tab, int nq,
                                            const float *ws, size_t lws, float *acc, size_t lda) {
    switch (nq) {
    case 1: few_rows_group_512(p, B, d, b, tab, ws, lws, acc, lda, 1); break;
    case 2: few_rows_group_512(p, B, d, b, tab, ws, lws, acc, lda, 2); break;
    case 3: few_rows_group_512(p, B, d, b, tab, ws, lws, acc, lda, 3); break;
    default: few_rows_group_512(p, B, d, b, tab, ws, lws, acc, lda, 4); break;
    }
}

AVX512_FN static void scores_512(const tq_codec *c, int nq, const float *qp, size_t ldq, const uint8_t *rows, int n,
                                 float *s, size_t lds) {
    const int d = c->d, b = c->bits;
    const size_t B = c->bytes;
    const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)B));
    float buf[32 * d + 16], *tile = (float *)(((uintptr_t)buf + 63) & ~(uintptr_t)63), *cols = tile + 16 * d, tab[16] = {0};
    if (b) table16(c, tab);
    __m512 tb = _mm512_loadu_ps(tab), one = _mm512_set1_ps(1.0f);
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        const uint8_t *p = rows + (size_t)t * B;
        prefetch_tile(p, 16 * B);
        if (b && nq <= 4) {
            __m512 sc = row_scales_512(p, offs, B);
            if (b == 2) few_scores_512(p, offs, d, 2, tb, nq, qp, ldq, sc, s + t, lds);
            else if (b == 3) few_scores_512(p, offs, d, 3, tb, nq, qp, ldq, sc, s + t, lds);
            else few_scores_512(p, offs, d, 4, tb, nq, qp, ldq, sc, s + t, lds);
        } else if (b) {
            if (b == 2) cols_tq_512(p, offs, d, 2, tb, tile);
            else if (b == 3) cols_tq_512(p, offs, d, 3, tb, tile);
            else cols_tq_512(p, offs, d, 4, tb, tile);
            scores_cols_512(tile, d, nq, qp, ldq, row_scales_512(p, offs, B), s + t, lds);
        } else if (nq <= 4) {                            /* plain rows, few queries: read in place */
            __m512 sc = c->fmt == TQ_Q8 ? row_scales_512(p, offs, B) : one;
            switch (c->fmt) {
            case TQ_FP32: few_plain_scores_512(p, B, d, TQ_FP32, nq, qp, ldq, sc, s + t, lds); break;
            case TQ_FP16: few_plain_scores_512(p, B, d, TQ_FP16, nq, qp, ldq, sc, s + t, lds); break;
            case TQ_Q8: few_plain_scores_512(p, B, d, TQ_Q8, nq, qp, ldq, sc, s + t, lds); break;
            default: few_plain_scores_512(p, B, d, TQ_Q4, nq, qp, ldq, sc, s + t, lds); break;
            }
        } else {                                         /* many queries: transposed, fp32 from place */
            const float *R = (const float *)p;
            __m512 sc = one;
            if (c->fmt != TQ_FP32) { sc = rows_plain_512(c, p, offs, tile); R = tile; }
            for (int i = 0; i < d; i += 16) transpose16_512(R + i, (size_t)d, cols + (size_t)i * 16);
            scores_cols_512(cols, d, nq, qp, ldq, sc, s + t, lds);
        }
    }
    if (t < n) scores_portable(c, nq, qp, ldq, rows + (size_t)t * B, n - t, s + t, lds);
}

AVX512_FN static void values_512(const tq_codec *c, int nq, const float *w, size_t ldw, const uint8_t *rows, int n,
                                 float *acc, size_t lda) {
    const int d = c->d, b = c->bits;
    const size_t B = c->bytes;
    const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)B));
    float buf[16 * d + 16], *tile = (float *)(((uintptr_t)buf + 63) & ~(uintptr_t)63), tab[16] = {0};
    if (b) table16(c, tab);
    __m512 tb = _mm512_loadu_ps(tab);
    int t = 0, few = b && nq <= 4 && n <= FEW_ROWS;
    float ws[4 * FEW_ROWS];
    for (; few && t + 16 <= n; t += 16) {                /* weights times row scales, ahead of their use */
        __m512 sc = row_scales_512(rows + (size_t)t * B, offs, B);
        for (int r = 0; r < nq; r++) _mm512_storeu_ps(ws + r * FEW_ROWS + t, _mm512_mul_ps(_mm512_loadu_ps(w + r * ldw + t), sc));
    }
    for (t = 0; few && t + 16 <= n; t += 16) {
        const uint8_t *p = rows + (size_t)t * B;
        prefetch_tile(p, 16 * B);
        if (b == 2) few_values_512(p, B, d, 2, tb, nq, ws + t, FEW_ROWS, acc, lda);
        else if (b == 3) few_values_512(p, B, d, 3, tb, nq, ws + t, FEW_ROWS, acc, lda);
        else few_values_512(p, B, d, 4, tb, nq, ws + t, FEW_ROWS, acc, lda);
    }
    for (; !few && t + 16 <= n; t += 16) {
        const uint8_t *p = rows + (size_t)t * B;
        prefetch_tile(p, 16 * B);
        const uint8_t *T = (const uint8_t *)tile;        /* the tile: fp32 rows of 4d bytes */
        if (b) {
            if (b == 2) rows_tq_512(p, B, d, 2, tb, tile);
            else if (b == 3) rows_tq_512(p, B, d, 3, tb, tile);
            else rows_tq_512(p, B, d, 4, tb, tile);
            values_rows_512(T, 4 * (size_t)d, d, TQ_FP32, nq, w + t, ldw, row_scales_512(p, offs, B), acc, lda);
        } else if (c->fmt == TQ_FP32) {
            values_rows_512(p, B, d, TQ_FP32, nq, w + t, ldw, _mm512_set1_ps(1.0f), acc, lda);
        } else if (nq > 4) {                             /* many queries: each row converted once, to the tile */
            __m512 sc = rows_plain_512(c, p, offs, tile);
            values_rows_512(T, 4 * (size_t)d, d, TQ_FP32, nq, w + t, ldw, sc, acc, lda);
        } else {                                         /* few queries: converted as they are read */
            __m512 sc = c->fmt == TQ_Q8 ? row_scales_512(p, offs, B) : _mm512_set1_ps(1.0f);
            if (c->fmt == TQ_FP16) values_rows_512(p, B, d, TQ_FP16, nq, w + t, ldw, sc, acc, lda);
            else if (c->fmt == TQ_Q8) values_rows_512(p, B, d, TQ_Q8, nq, w + t, ldw, sc, acc, lda);
            else values_rows_512(p, B, d, TQ_Q4, nq, w + t, ldw, sc, acc, lda);
        }
    }
    if (t < n) values_portable(c, nq, w + t, ldw, rows + (size_t)t * B, n - t, acc, lda);
}
#endif /* TQ_X86 */

/* ---- the entry points: one choice per call, outside the loops ---------------------------------- */

/* The lanes a SIMD path needs d to be a multiple of (0: that path does not take this format;
 * nor head dims above 1024, whose tiles would not fit a thread's stack comfortably). */
static int simd_lanes(const tq_codec *c, tq_simd simd) {
    if (is_prod(c->fmt) || simd == TQ_SIMD_PORTABLE || c->d > 1024) return 0;
    return simd == TQ_SIMD_AVX512 ? 16 : 8;
}

void tq_attn_scores(const tq_codec *c, tq_simd simd, int nq, const float *qp, size_t ldq, const uint8_t *rows, int n,
                    float *s, size_t lds) {
    int lanes = simd_lanes(c, simd);
#ifdef TQ_X86
    if (lanes && c->d % lanes == 0) {
        if (simd == TQ_SIMD_AVX512) scores_512(c, nq, qp, ldq, rows, n, s, lds);
        else scores_avx2(c, nq, qp, ldq, rows, n, s, lds);
        return;
    }
#else
    (void)lanes;
#endif
    scores_portable(c, nq, qp, ldq, rows, n, s, lds);
}

void tq_attn_values(const tq_codec *c, tq_simd simd, int nq, const float *w, size_t ldw, const uint8_t *rows, int n,
                    float *acc, size_t lda) {
    int lanes = simd_lanes(c, simd);
#ifdef TQ_X86
    if (lanes && c->d % lanes == 0) {
        if (simd == TQ_SIMD_AVX512) values_512(c, nq, w, ldw, rows, n, acc, lda);
        else values_avx2(c, nq, w, ldw, rows, n, acc, lda);
        return;
    }
#else
    (void)lanes;
#endif
    values_portable(c, nq, w, ldw, rows, n, acc, lda);
}

float tq_softmax_chunk(tq_simd simd, float *s, int n, float scale, float *m, float *rescale) {
#ifdef TQ_X86
    if (simd == TQ_SIMD_AVX512) return softmax_chunk_512(s, n, scale, m, rescale);
    if (simd == TQ_SIMD_AVX2) return softmax_chunk_avx2(s, n, scale, m, rescale);
#else
    (void)simd;
#endif
    return softmax_chunk_portable(s, n, scale, m, rescale);
}

/* ---- one KV head's cache: key directions, stores, attention (tq.h) ------------------------------ */

#define ATT_CHUNK 128   /* rows per call into the kernels above: a chunk's scores stay in L1 */
#if TQ_KPROJ_MAX > 2
#error "tq_attend_codes adds at most two key projections"
#endif

float tq_dot_f32(const float *a, const float *b, int n) {
    float s = 0.0f;
#ifdef _OPENMP
#pragma omp simd reduction(+ : s)
#endif
    for (int j = 0; j < n; j++) s += a[j] * b[j];
    return s;
}

static float dot_f16(const float *a, const uint16_t *b, int n) {
    float s = 0.0f;
    for (int j = 0; j < n; j++) s += a[j] * tq_half(b[j]);
    return s;
}

/* fp16-rounds u (n) as it is stored, then makes it a unit vector orthogonal to the
 * unit vector prev (if given) again, in float, the way every reader recomputes it. */
static void store_direction(float *u, const float *prev, int n) {
    for (int i = 0; i < n; i++) u[i] = tq_f16_to_f32(tq_f32_to_f16(u[i]));
    if (prev) {
        float p = tq_dot_f32(u, prev, n);
        for (int i = 0; i < n; i++) u[i] -= p * prev[i];
    }
    double norm = 0;
    for (int i = 0; i < n; i++) norm += (double)u[i] * u[i];
    for (int i = 0; i < n; i++) u[i] = norm > 0 ? (float)(u[i] / sqrt(norm)) : 0.0f;
}

/* the rotated copies of the directions of the block at pos (tq_attend_codes reads those) */
static void rotate_dirs(const tq_head *h, int pos) {
    size_t at = (size_t)(pos / h->kblock) * h->R * h->kc->d;
    for (int j = 0; j < h->R; j++) tq_rotate(h->kc, h->kdir + at + (size_t)j * h->kc->d, h->kdir_rot + at + (size_t)j * h->kc->d);
}

void tq_key_dirs_inherit(const tq_head *h, int pos) {
    size_t n = (size_t)h->R * h->kc->d, at = (size_t)(pos / h->kblock) * n, R = (size_t)h->R;
    memcpy(h->kdir + at, h->kdir + at - n, n * sizeof(float));
    memcpy(h->kdir_rot + at, h->kdir_rot + at - n, n * sizeof(float));
    if (h->kbeta8) memcpy(h->kscale + (size_t)(pos / h->kblock) * R, h->kscale + (size_t)(pos / h->kblock - 1) * R, R * sizeof(float));
}

/* An int8 beta: the code of beta in steps of `step`, clamped (keys up to twice as far out as the
 * measured ones fit); the step of a block and direction from the largest |beta| measured there,
 * 2 max|beta| / 127, fp16-rounded as stored. Both builds store with these. */
TQ_HD static inline int8_t beta_code(float beta, float step) {
    float q = rintf(beta / step);
    return (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
}
TQ_HD static inline float beta_step(float max_abs) { return max_abs > 0 ? tq_f16_to_f32(tq_f32_to_f16(2 * max_abs / 127)) : 1.0f; }

/* the int8 betas' steps of the block at pos from its n measured keys k + b*ldk (b >= first) */
static void beta_steps(const tq_head *h, int pos, const float *k, size_t ldk, int first, int n) {
    int hd = h->kc->d, blk = pos / h->kblock;
    for (int j = 0; j < h->R; j++) {
        const float *u = h->kdir + ((size_t)blk * h->R + j) * hd;
        float mx = 0;
        for (int b = first; b < n; b++) mx = fmaxf(mx, fabsf(tq_dot_f32(u, k + b * ldk, hd)));
        h->kscale[(size_t)blk * h->R + j] = beta_step(mx);
    }
}

int tq_key_dirs(const tq_head *h, int pos, int group, const float *q, size_t ldq, const float *k, size_t ldk, int n) {
    int hd = h->kc->d, first = pos == 0 && n > 1 ? 1 : 0;
    if (h->R == 0) return 0;
    float *u1 = h->kdir + (size_t)(pos / h->kblock) * h->R * hd, *u2 = u1 + hd;
    double norm = 0;
    for (int i = 0; i < hd; i++) {
        double sum = 0;
        for (int b = first; b < n; b++)
            for (int j = 0; j < group; j++) sum += q[b * ldq + (size_t)j * hd + i];
        u1[i] = (float)sum;
        norm += (double)u1[i] * u1[i];
    }
    for (int i = 0; i < hd; i++) u1[i] = norm > 0 ? (float)(u1[i] / sqrt(norm)) : 0.0f;
    store_direction(u1, NULL, hd);
    if (h->R < 2) {
        rotate_dirs(h, pos);
        if (h->kbeta8) beta_steps(h, pos, k, ldk, first, n);
        return 0;
    }
    double *m = (double *)calloc((size_t)hd * hd + 3 * (size_t)hd, sizeof(double));
    if (!m) return -1;
    double *r = m + (size_t)hd * hd, *v = r + hd, *mv = v + hd, longest = -1;
    for (int b = first; b < n; b++) {           /* m = sum_b r_b r_b^T, r_b = k_b - (u_1.k_b) u_1 */
        double p = 0, len = 0;
        for (int i = 0; i < hd; i++) {
            r[i] = k[b * ldk + i];
            p += r[i] * u1[i];
        }
        for (int i = 0; i < hd; i++) { r[i] -= p * u1[i]; len += r[i] * r[i]; }
        for (int i = 0; i < hd; i++)                    /* the upper triangle; mirrored below */
            for (int j = i; j < hd; j++) m[(size_t)i * hd + j] += r[i] * r[j];
        if (len > longest) { longest = len; memcpy(v, r, hd * sizeof(double)); }
    }
    for (int i = 0; i < hd; i++)
        for (int j = 0; j < i; j++) m[(size_t)i * hd + j] = m[(size_t)j * hd + i];
    for (int it = 0; it < 200; it++) {          /* v <- m v / |m v|, until it stops moving */
        double len = 0, moved = 0;
        for (int i = 0; i < hd; i++) {
            mv[i] = 0;
            for (int j = 0; j < hd; j++) mv[i] += m[(size_t)i * hd + j] * v[j];
            len += mv[i] * mv[i];
        }
        for (int i = 0; i < hd; i++) {
            double x = len > 0 ? mv[i] / sqrt(len) : 0.0;
            moved = fmax(moved, fabs(x - v[i]));
            v[i] = x;
        }
        if (moved < 1e-12) break;               /* far below the fp16 step it is rounded to */
    }
    for (int i = 0; i < hd; i++) u2[i] = (float)v[i];
    store_direction(u2, u1, hd);
    free(m);
    rotate_dirs(h, pos);
    if (h->kbeta8) beta_steps(h, pos, k, ldk, first, n);
    return 0;
}

void tq_store(const tq_head *h, int pos, float *k, float *v, float *kperp) {
    int hd = h->kc->d, R = h->R;
    if (R) {
        const float *u = h->kdir + (size_t)(pos / h->kblock) * R * hd;
        const float *step = h->kbeta8 ? h->kscale + (size_t)(pos / h->kblock) * R : NULL;
        memcpy(kperp, k, hd * sizeof(float));
        for (int r = 0; r < R; r++) {
            float beta = tq_dot_f32(u + (size_t)r * hd, k, hd);
            if (h->kbeta8) {                            /* int8 codes of the block's step */
                h->kbeta8[(size_t)pos * R + r] = beta_code(beta, step[r]);
                beta = h->kbeta8[(size_t)pos * R + r] * step[r];
            } else {
                h->kbeta[(size_t)pos * R + r] = tq_f32_to_f16(beta);
                beta = tq_f16_to_f32(h->kbeta[(size_t)pos * R + r]);
            }
            for (int j = 0; j < hd; j++) kperp[j] -= beta * u[(size_t)r * hd + j];
        }
    }
    tq_encode(h->kc, R ? kperp : k, h->key + (size_t)pos * h->kc->bytes);
    tq_encode(h->vc, v, h->value + (size_t)pos * h->vc->bytes);
    for (int j = 0; j < hd; j++) { k[j] = tq_f16_to_f32(tq_f32_to_f16(k[j])); v[j] = tq_f16_to_f32(tq_f32_to_f16(v[j])); }
}

void tq_store_exact(const tq_head *h, int pos, int b, int n, const float *k, const float *v) {
    if (!(pos + b < h->sink || (h->window > 0 && b >= n - h->window))) return;
    size_t hd = (size_t)h->kc->d, r = (size_t)tq_exact_slot(pos + b, h->sink, h->slots) * hd;
    for (size_t j = 0; j < hd; j++) { h->exact_k[r + j] = tq_f32_to_f16(k[j]); h->exact_v[r + j] = tq_f32_to_f16(v[j]); }
}

size_t tq_state_floats(const tq_codec *vc) { return 2 + tq_acc_floats(vc) + (size_t)vc->d; }
size_t tq_attend_scratch(const tq_codec *kc, int nq) {
    return ((size_t)nq + TQ_KPROJ_MAX) * ATT_CHUNK + (size_t)nq * (tq_query_floats(kc) + TQ_KPROJ_MAX) + (size_t)kc->d;
}

/* The nq rotated queries rq (nq, d) readied for the directions of the block at pos (tq.h, "Key
 * projection"): along (nq, TQ_KPROJ_MAX) = <Pi q, Pi u_j> = q.u_j, and prepared (nq,
 * tq_query_floats) from Pi q_perp = Pi q - sum_j along_j Pi u_j. y: d floats of scratch. */
static void prepare_block(const tq_head *h, int nq, const float *rq, int pos, int lut, float *prepared, float *along,
                          float *y) {
    int d = h->kc->d, R = h->R;
    const float *ur = R ? h->kdir_rot + (size_t)(pos / h->kblock) * R * d : NULL;
    size_t qf = tq_query_floats(h->kc);
    for (int r = 0; r < nq; r++) {
        const float *x = rq + (size_t)r * d;
        memcpy(y, x, d * sizeof(float));
        for (int j = 0; j < R; j++) {
            float a = tq_dot_f32(x, ur + (size_t)j * d, d);
            along[r * TQ_KPROJ_MAX + j] = a;
            for (int i = 0; i < d; i++) y[i] -= a * ur[(size_t)j * d + i];
        }
        prepare_rotated(h->kc, y, prepared + r * qf, lut);
    }
}

/* Runs one chunk at a time (chunks end at the blocks' edges): scores from the key codes, plus
 * the keys' exact parts along.beta, masked logits, an online-softmax step per query, then the
 * value codes weighted into each query's accumulator. */
void tq_attend_codes(const tq_head *h, tq_simd simd, int nq, int group, int pos0, const float *rq,
                     int k0, int k1, float *st, float *scratch) {
    int R = h->R, first = k0, last = k1;            /* [first, last): the rows not masked */
    k0 = k0 / 16 * 16;                              /* whole tiles of 16 rows, the rows outside masked */
    int k = k0 + (k1 - k0 + 15) / 16 * 16;
    size_t qf = tq_query_floats(h->kc), sf = tq_state_floats(h->vc), acc_end = 2 + tq_acc_floats(h->vc);
    float *scores = scratch, *beta = scores + (size_t)nq * ATT_CHUNK, *prepared = beta + (size_t)TQ_KPROJ_MAX * ATT_CHUNK;
    float *along = prepared + (size_t)nq * qf, *y = along + (size_t)nq * TQ_KPROJ_MAX, scale = 1.0f / sqrtf((float)h->kc->d);
    k1 = k < h->ctx ? k : h->ctx;
    int lanes = simd_lanes(h->kc, simd);             /* the lookup table: for the portable path and row-by-row tails */
    int lut = lanes == 0 || h->kc->d % lanes || (k1 - k0) % 16 || (R && h->kblock % 16);
    for (int r = 0; r < nq; r++) {
        memset(st + r * sf, 0, sf * sizeof(float));
        st[r * sf] = -INFINITY;
    }
    for (int t0 = k0, nk; t0 < k1; t0 += nk) {
        int edge = (t0 / h->kblock + 1) * h->kblock;  /* the next block's first position */
        nk = k1 - t0 < ATT_CHUNK ? k1 - t0 : ATT_CHUNK;
        if (R && edge < last && t0 + nk > edge) nk = edge - t0;
        if (t0 == k0 || (R && t0 % h->kblock == 0 && t0 < last)) prepare_block(h, nq, rq, t0, lut, prepared, along, y);
        tq_attn_scores(h->kc, simd, nq, prepared, qf, h->key + (size_t)t0 * h->kc->bytes, nk, scores, ATT_CHUNK);
        if (R) {                                        /* + sum_j along_j beta_tj */
            /* beta (R, nk): the stored betas, int8 codes (their block's steps go into along) or fp16 */
            const float *step = h->kbeta8 ? h->kscale + (size_t)(t0 / h->kblock) * R : NULL;
            const int8_t *b8 = step ? h->kbeta8 + (size_t)t0 * R : NULL;
            const uint16_t *b16 = step ? NULL : h->kbeta + (size_t)t0 * R;
            if (R == 2 && step)                         /* (a constant stride: vectorized) */
                for (int t = 0; t < nk; t++) { beta[t] = (float)b8[2 * t]; beta[ATT_CHUNK + t] = (float)b8[2 * t + 1]; }
            else if (R == 2)
                for (int t = 0; t < nk; t++) { beta[t] = tq_half(b16[2 * t]); beta[ATT_CHUNK + t] = tq_half(b16[2 * t + 1]); }
            else
                for (int t = 0; t < nk; t++) beta[t] = step ? (float)b8[t] : tq_half(b16[t]);
            for (int r = 0; r < nq; r++) {
                const float *u = along + r * TQ_KPROJ_MAX;
                float *x = scores + (size_t)r * ATT_CHUNK, a0 = step ? u[0] * step[0] : u[0];
                if (R == 2) {                           /* R <= TQ_KPROJ_MAX = 2 */
                    float a1 = step ? u[1] * step[1] : u[1];
                    for (int t = 0; t < nk; t++) x[t] = x[t] + a0 * beta[t] + a1 * beta[ATT_CHUNK + t];
                } else
                    for (int t = 0; t < nk; t++) x[t] += a0 * beta[t];
            }
        }
        for (int r = 0; r < nq; r++) {
            float *x = scores + (size_t)r * ATT_CHUNK, *q = st + r * sf, rescale;
            int end = tq_coded_end(pos0 + r / group + 1, h->sink, h->window);   /* the query's, and the call's */
            end = (end < last ? end : last) - t0;
            for (int t = 0; t < nk; t++) if (t < first - t0 || t >= end) x[t] = -INFINITY;
            float sum = tq_softmax_chunk(simd, x, nk, scale, &q[0], &rescale);
            for (size_t i = 1; i < acc_end; i++) q[i] *= rescale;   /* (the exact part is 0 here) */
            q[1] += sum;
        }
        tq_attn_values(h->vc, simd, nq, scores, ATT_CHUNK, h->value + (size_t)t0 * h->vc->bytes, nk, st + 2, sf);
    }
}

/* dst <- the state of dst's and src's positions together (the same query, disjoint positions). */
static void state_merge(float *dst, const float *src, size_t sf) {
    float m = fmaxf(dst[0], src[0]);
    if (m == -INFINITY) return;                         /* both empty */
    float fd = expf(dst[0] - m), fs = expf(src[0] - m);
    for (size_t i = 1; i < sf; i++) dst[i] = dst[i] * fd + src[i] * fs;
    dst[0] = m;
}

/* 1 if position t is read from the exact store by a query at position T-1 */
static int is_exact(const tq_head *h, int t, int T) { return t < h->sink || t >= T - h->window; }

/* The first position >= t that a query at T-1 reads from the exact store (T: none). */
static int next_exact(const tq_head *h, int t, int T) { return is_exact(h, t, T) ? t : T - h->window; }

/* q.k_t for exact position t: its fp16 copy, or the batch's own key */
static float exact_score(const tq_head *h, const float *q, const tq_batch *batch, int t) {
    int hd = h->kc->d;
    if (t >= batch->pos) return tq_dot_f32(q, batch->k + (size_t)(t - batch->pos) * batch->ld, hd);
    return dot_f16(q, h->exact_k + (size_t)tq_exact_slot(t, h->sink, h->slots) * hd, hd);
}

/* out (d) += w times the value of exact position t: its fp16 copy, or the batch's own. */
static void add_exact_value(const tq_head *h, const tq_batch *batch, int t, float w, float *out) {
    int hd = h->kc->d;
    if (t >= batch->pos) {
        const float *v = batch->v + (size_t)(t - batch->pos) * batch->ld;
        for (int i = 0; i < hd; i++) out[i] += w * v[i];
    } else {
        const uint16_t *v = h->exact_v + (size_t)tq_exact_slot(t, h->sink, h->slots) * hd;
        for (int i = 0; i < hd; i++) out[i] += w * tq_half(v[i]);
    }
}

#define EXACT_KEPT 64   /* exact positions whose scores the second pass reuses (beyond: recomputed) */
void tq_attend_finish(const tq_head *h, const float *q, const tq_batch *batch, int T, float *st, int parts,
                      size_t stride, float *out) {
    size_t sf = tq_state_floats(h->vc);
    for (int p = 1; p < parts; p++) state_merge(st, st + (size_t)p * stride, sf);
    /* the exact positions: their scores, one rescale, their weighted values */
    float scale = 1.0f / sqrtf((float)h->kc->d), m = st[0], kept[EXACT_KEPT];
    float *ex = st + 2 + tq_acc_floats(h->vc);
    int i = 0;
    for (int t = next_exact(h, 0, T); t < T; t = next_exact(h, t + 1, T), i++) {
        float x = scale * exact_score(h, q, batch, t);
        if (i < EXACT_KEPT) kept[i] = x;
        m = fmaxf(m, x);
    }
    float f = expf(st[0] - m);                          /* 0 when nothing was coded */
    for (size_t j = 1; j < sf; j++) st[j] *= f;
    st[0] = m;
    i = 0;
    for (int t = next_exact(h, 0, T); t < T; t = next_exact(h, t + 1, T), i++) {
        float p = expf((i < EXACT_KEPT ? kept[i] : scale * exact_score(h, q, batch, t)) - m);
        st[1] += p;
        add_exact_value(h, batch, t, p, ex);
    }
    tq_finish(h->vc, st + 2, out);                      /* Pi^T acc, once per query */
    float inv = 1.0f / st[1];
    for (int i = 0; i < h->kc->d; i++) out[i] = (out[i] + ex[i]) * inv;
}

/* ---- the whole cache: layout, sizes, and a layer's attention over it (tq.h) --------------------- */

#ifdef _OPENMP
#include <omp.h>
static int n_threads(void) { return omp_get_max_threads(); }   /* threads of the parallel loops */
static int thread_id(void) { return omp_get_thread_num(); }    /* and the one running this      */
#else
static int n_threads(void) { return 1; }
static int thread_id(void) { return 0; }
#endif

/* n zeroed items of `size` bytes, counted into *bytes; allocated only with alloc set (*oom when
 * that fails) */
static void *cache_array(size_t n, size_t size, int alloc, double *bytes, int *oom) {
    *bytes += (double)n * (double)size;
    if (!alloc) return NULL;
    void *p = calloc(n ? n : 1, size ? size : 1);
    *oom |= p == NULL;
    return p;
}

/* the formats that lose precision: what the cache's fixes apply to */
static int is_lossy(tq_fmt f) { return f != TQ_FP32 && f != TQ_FP16; }

const char *tq_cache_check(const tq_cache_opts *o, int head_dim, char *err, size_t len) {
    tq_fmt fmts[2] = {o->key_fmt, o->value_fmt};
    for (int i = 0; i < 2; i++) {
        if (tq_bytes(fmts[i], head_dim) == 0)
            snprintf(err, len, "format %s cannot hold head_dim %d (every format needs a multiple of 8, q4 of 32)",
                     tq_fmt_name(fmts[i]), head_dim);
        else if (is_tq(fmts[i]) && head_dim > 1024)   /* a head_dim^2 rotation or QJL matrix */
            snprintf(err, len, "format %s handles head_dim up to 1024, the model's is %d (use fp32, fp16, q8 or q4)",
                     tq_fmt_name(fmts[i]), head_dim);
        else
            continue;
        return err;
    }
    return NULL;
}

double tq_cache_build(tq_cache *kv, const tq_cache_opts *o, int layers, int kv_heads, int head_dim, int ctx, int alloc) {
    memset(kv, 0, sizeof *kv);
    if (tq_init(&kv->kc, o->key_fmt, head_dim, o->kscale, TQ_DEFAULT_SEED) != 0 ||
        tq_init(&kv->vc, o->value_fmt, head_dim, o->vscale, TQ_DEFAULT_SEED) != 0) {
        tq_cache_free(kv);
        return -1;
    }
    int lossy = is_lossy(o->key_fmt) || is_lossy(o->value_fmt), oom = 0;
    kv->layers = layers;
    kv->kv_heads = kv_heads;
    kv->ctx = ctx;
    kv->kproj = is_lossy(o->key_fmt) ? o->kproj : 0;
    kv->kblock = o->kblock > 0 && o->kblock < ctx ? o->kblock : ctx;
    kv->blocks = (ctx + kv->kblock - 1) / kv->kblock;
    kv->sink = lossy ? (o->sink < ctx ? o->sink : ctx) : 0;
    kv->window = lossy ? o->window : 0;
    kv->slots = kv->sink + (kv->window < ctx - kv->sink ? kv->window : ctx - kv->sink);
    size_t heads = (size_t)layers * kv_heads, hd = (size_t)head_dim, R = (size_t)kv->kproj;
    size_t dirs = heads * kv->blocks * R * hd, R8 = o->kblock > 0 ? R : 0, R16 = R - R8;   /* int8 betas with blocks */
    double bytes = 0;
    kv->key = (uint8_t *)cache_array(heads * ctx, kv->kc.bytes, alloc, &bytes, &oom);
    kv->value = (uint8_t *)cache_array(heads * ctx, kv->vc.bytes, alloc, &bytes, &oom);
    kv->kdir = R ? (float *)cache_array(dirs, sizeof(float), alloc, &bytes, &oom) : NULL;
    kv->kdir_rot = R ? (float *)cache_array(dirs, sizeof(float), alloc, &bytes, &oom) : NULL;
    kv->kbeta = R16 ? (uint16_t *)cache_array(heads * ctx * R, sizeof(uint16_t), alloc, &bytes, &oom) : NULL;
    kv->kbeta8 = R8 ? (int8_t *)cache_array(heads * ctx * R, 1, alloc, &bytes, &oom) : NULL;
    kv->kscale = R8 ? (float *)cache_array(heads * kv->blocks * R, sizeof(float), alloc, &bytes, &oom) : NULL;
    kv->exact_k = (uint16_t *)cache_array(heads * kv->slots * hd, sizeof(uint16_t), alloc, &bytes, &oom);
    kv->exact_v = (uint16_t *)cache_array(heads * kv->slots * hd, sizeof(uint16_t), alloc, &bytes, &oom);
    if (oom) {
        tq_cache_free(kv);
        return -1;
    }
    return bytes;
}

void tq_cache_free(tq_cache *kv) {
    void *arrays[] = {kv->key, kv->value, kv->kdir, kv->kdir_rot, kv->kbeta, kv->kbeta8, kv->kscale, kv->exact_k, kv->exact_v};
    for (size_t i = 0; i < sizeof arrays / sizeof *arrays; i++) free(arrays[i]);
    tq_free(&kv->kc);
    tq_free(&kv->vc);
}

tq_head tq_cache_head(const tq_cache *kv, int l, int g) {
    size_t head = (size_t)l * kv->kv_heads + g, row = tq_cache_row(kv, l, g, 0), hd = (size_t)kv->kc.d, R = (size_t)kv->kproj;
    size_t dirs = kv->blocks * R * hd;
    tq_head h = {&kv->kc, &kv->vc, kv->ctx, kv->key + row * kv->kc.bytes, kv->value + row * kv->vc.bytes, kv->kproj, kv->kblock,
                 R ? kv->kdir + head * dirs : NULL, R ? kv->kdir_rot + head * dirs : NULL,
                 kv->kbeta ? kv->kbeta + row * R : NULL, kv->kbeta8 ? kv->kbeta8 + row * R : NULL,
                 kv->kscale ? kv->kscale + head * kv->blocks * R : NULL, kv->sink, kv->window, kv->slots,
                 kv->exact_k + head * kv->slots * hd, kv->exact_v + head * kv->slots * hd};
    return h;
}

tq_cache_bytes tq_cache_size(const tq_cache *kv, int n) {
    size_t heads = (size_t)kv->layers * kv->kv_heads, hd = (size_t)kv->kc.d, R = (size_t)kv->kproj;
    size_t sink = (size_t)(n < kv->sink ? n : kv->sink), rest = (size_t)n - sink;
    size_t exact = sink + (rest < (size_t)kv->window ? rest : (size_t)kv->window);   /* fp16 rows in use */
    size_t blocks = n > 0 ? ((size_t)n + kv->kblock - 1) / kv->kblock : 1;
    size_t beta = kv->kbeta8 ? 1 : 2, steps = kv->kbeta8 ? blocks * R * 2 : 0;
    tq_cache_bytes b = {heads * n * (kv->kc.bytes + kv->vc.bytes), heads * n * R * beta,
                        heads * (exact * hd * 2 * 2 + blocks * R * hd * 2 + steps), 0};
    b.all = b.codes + b.projections + b.fixed;
    return b;
}

double tq_cache_bits(const tq_cache *kv, int n) {
    return 8.0 * tq_cache_size(kv, n).all / ((double)n * kv->layers * kv->kv_heads * kv->kc.d * 2);
}

int tq_cache_key_dirs(const tq_cache *kv, const tq_cache_batch *b) {
    int hd = kv->kc.d, group = b->group, B = kv->kblock, pos = b->pos, n = b->n;
    size_t qd = (size_t)kv->kv_heads * group * hd, kvd = (size_t)kv->kv_heads * hd;
    for (int p = (pos + B - 1) / B * B; p < pos + n && kv->kproj; p += B) {
        int m = pos + n - p < B ? pos + n - p : B, g, oom = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : oom)
        for (g = 0; g < kv->kv_heads; g++) {
            tq_head h = tq_cache_head(kv, b->layer, g);
            if (p > 0 && m < TQ_KBLOCK_MIN) tq_key_dirs_inherit(&h, p);
            else oom |= tq_key_dirs(&h, p, group, b->q + (size_t)(p - pos) * qd + (size_t)g * group * hd, qd,
                                    b->k + (size_t)(p - pos) * kvd + (size_t)g * hd, kvd, m) != 0;
        }
        if (oom) return -1;
    }
    return 0;
}

/* The CPU's attention runs in work items: a KV head's queries of up to ATT_TILE batch tokens
 * against its coded positions, or, when the batch has a single tile (decode), against
 * ATT_SPLIT of them at a time so that every thread has work with only a few KV heads. */
#define ATT_TILE 16     /* batch tokens whose queries share one pass over the codes */
#define ATT_SPLIT 256   /* coded positions per work item when the batch has one tile, at least */
#define ATT_MAX_SPLITS 32 /* and at most this many items per KV head (longer splits beyond) */

/* States that a batch of n tokens can use at most (q_heads query heads): a tile's queries per work item. */
static size_t att_states(int q_heads, int n) {
    size_t tiles = ((size_t)n + ATT_TILE - 1) / ATT_TILE;
    return (size_t)q_heads * ATT_TILE * (tiles > ATT_MAX_SPLITS ? tiles : ATT_MAX_SPLITS);
}

/* scratch floats of one thread: tq_attend_codes' for a tile's queries */
static size_t att_scratch(const tq_cache *kv, int group) { return tq_attend_scratch(&kv->kc, ATT_TILE * group); }

/* The work of a batch of n tokens, as offsets in floats: at[0] every thread's scratch, at[1]
 * the rotated queries (kv_heads, n, group, d), at[2] the work items' states, at[3] the keys less
 * their parts along the key directions (n, kv_heads, d), as tq_store encodes them; at[4] the end. */
static void att_layout(const tq_cache *kv, int group, int n, size_t at[5]) {
    size_t kvd = (size_t)kv->kv_heads * kv->kc.d;
    at[0] = 0;
    at[1] = (size_t)n_threads() * att_scratch(kv, group);
    at[2] = at[1] + (size_t)n * group * kvd;
    at[3] = at[2] + att_states(kv->kv_heads * group, n) * tq_state_floats(&kv->vc);
    at[4] = at[3] + (size_t)n * kvd;
}

size_t tq_cache_work_floats(const tq_cache *kv, int group, int batch) {
    size_t at[5];
    att_layout(kv, group, batch, at);
    return at[4];
}

int tq_cache_attention(const tq_cache *kv, tq_simd simd, const tq_cache_batch *b) {
    int n = b->n, pos = b->pos, l = b->layer, group = b->group, hd = kv->kc.d, nkv = kv->kv_heads, q_heads = nkv * group;
    size_t qd = (size_t)q_heads * hd, sf = tq_state_floats(&kv->vc), at[5];
    att_layout(kv, group, n, at);
    float *rq = b->work + at[1], *part = b->work + at[2], *kperp = b->work + at[3];
    if (tq_cache_key_dirs(kv, b)) return -1;      /* the blocks of directions this batch starts */
    int i;
#pragma omp parallel for schedule(static)
    for (i = 0; i < n * nkv; i++) {               /* encode k, v into the cache; i = token * nkv + g */
        tq_head head = tq_cache_head(kv, l, i % nkv);
        size_t x = (size_t)i * hd;
        tq_store(&head, pos + i / nkv, b->k + x, b->v + x, kperp + x);
    }
    /* the work items (KV head, tile of ATT_TILE tokens, split of the coded positions): a batch of
     * one tile (decode) splits its coded positions so that every thread has work, longer batches
     * do not; then each query merges its splits, adds its exact positions and finishes */
    int tiles = (n + ATT_TILE - 1) / ATT_TILE, end = tq_coded_end(pos + n, kv->sink, kv->window);
    int split = end > ATT_SPLIT * ATT_MAX_SPLITS ? ((end + ATT_MAX_SPLITS - 1) / ATT_MAX_SPLITS + 15) / 16 * 16 : ATT_SPLIT;
    int splits = tiles == 1 && end > split ? (end + split - 1) / split : 1, items = nkv * tiles * splits;
    int per_item = (n < ATT_TILE ? n : ATT_TILE) * group;   /* states of an item's queries */
#pragma omp parallel
    {
#pragma omp for schedule(static)
    for (i = 0; i < n * q_heads; i++) {           /* rq: a KV head's queries together */
        int t = i / q_heads, h = i % q_heads, g = h / group;
        size_t qi = ((size_t)g * n + t) * group + h % group;
        tq_rotate(&kv->kc, b->q + (size_t)t * qd + (size_t)h * hd, rq + qi * hd);
    }
#pragma omp for schedule(dynamic)
    for (i = 0; i < items; i++) {                 /* KV head g's queries of tokens [t0, t1) over [k0, k1) */
        int g = i / (tiles * splits), tile = i / splits % tiles, sp = i % splits;
        int t0 = tile * ATT_TILE, t1 = t0 + ATT_TILE < n ? t0 + ATT_TILE : n;
        int k0 = sp == 0 ? kv->sink : sp * split;   /* splits start at multiples of split (of 16 rows) */
        int k1 = splits == 1 ? tq_coded_end(pos + t1, kv->sink, kv->window) : sp + 1 < splits ? (sp + 1) * split : end;
        tq_head head = tq_cache_head(kv, l, g);
        size_t first = ((size_t)g * n + t0) * group;
        tq_attend_codes(&head, simd, (t1 - t0) * group, group, pos + t0, rq + first * hd, k0, k1 > k0 ? k1 : k0,
                        part + (size_t)i * per_item * sf, b->work + (size_t)thread_id() * att_scratch(kv, group));
    }
#pragma omp for schedule(static)
    for (i = 0; i < n * q_heads; i++) {
        int t = i / q_heads, h = i % q_heads, g = h / group, tile = t / ATT_TILE;
        tq_head head = tq_cache_head(kv, l, g);
        tq_batch batch = {pos, b->k + (size_t)g * hd, b->v + (size_t)g * hd, (size_t)nkv * hd};
        float *st = part + (((size_t)g * tiles + tile) * splits * per_item + (size_t)(t % ATT_TILE) * group + h % group) * sf;
        tq_attend_finish(&head, b->q + (size_t)t * qd + (size_t)h * hd, &batch, pos + t + 1, st, splits,
                         (size_t)per_item * sf, b->out + (size_t)t * qd + (size_t)h * hd);
    }
    }
    for (i = 0; i < n * nkv; i++) {               /* the exact store, once every query has read the batch */
        tq_head head = tq_cache_head(kv, l, i % nkv);
        tq_store_exact(&head, pos, i / nkv, n, b->k + (size_t)i * hd, b->v + (size_t)i * hd);
    }
    return 0;
}

size_t tq_cache_stats(const tq_cache *kv, int l, int n, float *out) {
    size_t hd = (size_t)kv->kc.d, R = (size_t)kv->kproj, used = ((size_t)n + kv->kblock - 1) / kv->kblock;
    size_t count = kv->kv_heads * used * R * hd + (size_t)kv->kv_heads * n * R;
    for (int g = 0; out && g < kv->kv_heads && R; g++, out += used * R * hd)
        memcpy(out, kv->kdir + (((size_t)l * kv->kv_heads + g) * kv->blocks) * R * hd, used * R * hd * sizeof(float));
    for (int g = 0; out && g < kv->kv_heads; g++)
        for (size_t j = 0, head = (size_t)l * kv->kv_heads + g; j < (size_t)n * R; j++)
            *out++ = kv->kbeta8 ? kv->kbeta8[head * kv->ctx * R + j] * kv->kscale[(head * kv->blocks + j / R / kv->kblock) * R + j % R]
                                : tq_f16_to_f32(kv->kbeta[head * kv->ctx * R + j]);
    return count;
}

/* ---- weight products (tq.h): run.c's out (B, d) = x (B, n) . W^T, fp32 then int8 W ----------------
 * Kernels for the compiler's own target (-march), not chosen at run time as the attention
 * kernels are; run_cuda.cu multiplies with cuBLAS and compiles only the int8 buffers' functions. */

#ifndef __CUDACC__
/* fp32 W. A 2-row x 6-token tile of the product, 8 floats at a time: 12 accumulators
 * and 2 weight vectors fit the 16 AVX registers, so every weight load serves
 * 6 tokens and every activation load 2 rows, where one dot at a time would load both
 * for one product each (bench/README.md, Research options, has the figure). v8f is
 * GCC/Clang's portable vector extension. */
typedef float v8f __attribute__((vector_size(32)));
#define TILE_ROWS TQ_F32_BLOCK
#define TILE_TOKS 6

static void matmul_tile(float *out, const float *x, const float *w, int b, int i, int n, int d) {
    v8f acc[TILE_ROWS][TILE_TOKS] = {{{0}}};
    for (int j = 0; j < n; j += 8) {
        v8f wv[TILE_ROWS], xv;
        for (int r = 0; r < TILE_ROWS; r++) memcpy(&wv[r], w + (size_t)(i + r) * n + j, sizeof(v8f));
        for (int t = 0; t < TILE_TOKS; t++) {
            memcpy(&xv, x + (size_t)(b + t) * n + j, sizeof(v8f));
            for (int r = 0; r < TILE_ROWS; r++) acc[r][t] += wv[r] * xv;
        }
    }
    for (int r = 0; r < TILE_ROWS; r++)
        for (int t = 0; t < TILE_TOKS; t++) {
            float s = 0.0f;
            for (int k = 0; k < 8; k++) s += acc[r][t][k];
            out[(size_t)(b + t) * d + i + r] = s;
        }
}

/* One token x (n, a multiple of 16) against the TILE_ROWS rows w (TILE_ROWS, n) into out
 * (TILE_ROWS): two chains of 8 lanes a row (the FMA latency), and the rows PF_ROWS ahead asked
 * for, as one token reads every weight once and the hardware prefetcher alone falls behind. */
#define PF_ROWS 8
static void dot_rows(float *out, const float *w, const float *x, int n) {
    v8f acc[TILE_ROWS][2] = {{{0}}};
    for (int j = 0; j < n; j += 16) {
        v8f x0, x1, w0, w1;
        memcpy(&x0, x + j, sizeof x0);
        memcpy(&x1, x + j + 8, sizeof x1);
        for (int r = 0; r < TILE_ROWS; r++) {
            const float *wr = w + (size_t)r * n + j;
            __builtin_prefetch(wr + (size_t)PF_ROWS * n);
            memcpy(&w0, wr, sizeof w0);
            memcpy(&w1, wr + 8, sizeof w1);
            acc[r][0] += w0 * x0;
            acc[r][1] += w1 * x1;
        }
    }
    for (int r = 0; r < TILE_ROWS; r++) {
        v8f a = acc[r][0] + acc[r][1];
        float s = 0.0f;
        for (int k = 0; k < 8; k++) s += a[k];
        out[r] = s;
    }
}

/* Tiles of 6 tokens where they fit, then the other tokens (a single decoded token is all
 * other: it is bound by reading the weights) a pair of rows at a time, else one dot at a time. */
void tq_f32_rows(float *out, const float *x, const float *w, int B, int n, int d, int i) {
    int b = 0, whole = n % 16 == 0 && i + TILE_ROWS <= d;
    if (n % 8 == 0 && i + TILE_ROWS <= d)
        for (; b + TILE_TOKS <= B; b += TILE_TOKS) matmul_tile(out, x, w, b, i, n, d);
    if (whole) {
        float o[TILE_ROWS];
        for (int t = b; t < B; t++) {
            dot_rows(o, w + (size_t)i * n, x + (size_t)t * n, n);
            for (int r = 0; r < TILE_ROWS; r++) out[(size_t)t * d + i + r] = o[r];
        }
        return;
    }
    for (int r = i; r < i + TILE_ROWS && r < d; r++)
        for (int t = b; t < B; t++) out[(size_t)t * d + r] = tq_dot_f32(w + (size_t)r * n, x + (size_t)t * n, n);
}
#endif

/* ---- int8 weights: run.c's weight type 1 ----
 * W8A8, llama2.c runq.c's products (qinput 1): the input x is quantized the way the weights
 * are, per group of TQ_QGROUP numbers: xs = max|x| / 127, xq = x / xs rounded to the nearest
 * integer (ties to even: rintf in the default rounding mode). Then for row i of W and token t
 *     out[t][i] = sum_g (sum_k wq[i][g,k] * xq[t][g,k]) * (ws[i][g] * xs[t][g]),
 * the inner sum an exact integer (|.| <= 64 * 127 * 127 < 2^24) and the outer one a chain of
 * fmaf in group order. Exact integers and one correctly rounded fma per group make the
 * result the same bits on every CPU and for every SIMD path GCC picks, and the same in the
 * one-token and the tiled kernel below (tests/test_q8.c checks it).
 * W8A32 (qinput 0): x stays fp32 and out[t][i] = sum_j wq[i][j] * ws[i][j / TQ_QGROUP] * x[t][j],
 * summed in float as the fp32 product is (the rounding depends on the order of the sums).
 * It reads the same bytes of weights and skips the rounding of x, which costs more than
 * the weights' own: README, "int8 weights". */
#define QGROUP TQ_QGROUP
#define QROWS 4    /* the tiled kernel: QROWS rows of the matrix ...           */
#define QTOKS 16   /* ... times QTOKS tokens, one token per lane of a 16-float vector */

double tq_q8_input_build(tq_q8_input *in, int batch, int n, int alloc) {
    size_t B = (size_t)batch, tiled = B / QTOKS * QTOKS, G = (size_t)n / QGROUP;
    size_t sizes[4] = {B * n * sizeof(int16_t), B * G * sizeof(float), tiled * n * sizeof(float), tiled * G * sizeof(float)};
    void **bufs[4] = {(void **)&in->xq, (void **)&in->xqs, (void **)&in->xqt, (void **)&in->xqts};
    double bytes = 0;
    memset(in, 0, sizeof *in);
    for (int k = 0; k < 4; k++) {
        bytes += (double)sizes[k];
        if (alloc && !(*bufs[k] = calloc(sizes[k] ? sizes[k] : 1, 1))) { tq_q8_input_free(in); return -1; }
    }
    return bytes;
}

void tq_q8_input_free(tq_q8_input *in) {
    free(in->xq); free(in->xqs); free(in->xqt); free(in->xqts);
    in->xq = NULL; in->xqs = in->xqt = in->xqts = NULL;
}

#ifndef __CUDACC__
typedef float v16f __attribute__((vector_size(64)));   /* GCC/Clang's vector extension */

void tq_q8_prepare(tq_q8_input *in, const float *x, int B, int n) {
    int G = n / QGROUP, tiles = B / QTOKS, b;
    if (in->qinput) {
#pragma omp parallel for schedule(static) if (B > 1)
        for (b = 0; b < B; b++)
            for (int g = 0; g < G; g++) {
                const float *xg = x + (size_t)b * n + (size_t)g * QGROUP;
                int16_t *q = in->xq + (size_t)b * n + (size_t)g * QGROUP;
                float amax = 0.0f;
                for (int k = 0; k < QGROUP; k++) amax = fabsf(xg[k]) > amax ? fabsf(xg[k]) : amax;   /* not fmaxf: libm */
                float scale = amax / 127.0f, div = scale > 0 ? scale : 1.0f;   /* all zeros: codes 0 */
                for (int k = 0; k < QGROUP; k++) q[k] = (int16_t)rintf(xg[k] / div);
                in->xqs[(size_t)b * G + g] = scale;
            }
    }
#pragma omp parallel for schedule(static) if (tiles > 1)
    for (b = 0; b < tiles; b++) {   /* transpose: xqt[b][j][t] = xq[b*QTOKS + t][j] (W8A32: x) */
        float *xt = in->xqt + (size_t)b * n * QTOKS, *st = in->xqts + (size_t)b * G * QTOKS;
        for (int t = 0; t < QTOKS; t++) {
            size_t row = (size_t)b * QTOKS + t;
            for (int j = 0; j < n; j++) xt[(size_t)j * QTOKS + t] = in->qinput ? in->xq[row * n + j] : x[row * n + j];
            for (int g = 0; g < G; g++) st[(size_t)g * QTOKS + t] = in->qinput ? in->xqs[row * G + g] : 1.0f;
        }
    }
}

/* W8A8: one row w (n codes, scales ws) against one quantized token x (n codes, scales xs). */
static float dot_q8(const int8_t *w, const float *ws, const int16_t *x, const float *xs, int n) {
    float acc = 0.0f;
    for (int g = 0; g < n / QGROUP; g++) {
        int32_t isum = 0;
        for (int k = 0; k < QGROUP; k++) isum += (int32_t)w[g * QGROUP + k] * x[g * QGROUP + k];
        acc = fmaf((float)isum, ws[g] * xs[g], acc);
    }
    return acc;
}

/* W8A8, one token against QLANES rows of W at once (rows w (QLANES, n), their scales ws
 * (QLANES, n/QGROUP)): lane r of the accumulator holds row r and runs dot_q8's chain of
 * fmaf over the groups, so out (QLANES) gets dot_q8's bits on any path. Per group each row's
 * 64 products are summed in int16 pairs to int32 lanes (vpmaddwd), and sum_lanes gathers
 * the QLANES rows' sums into one vector by a tree of integer additions, exact in any order. */
#if defined(__AVX512BW__) && defined(__AVX512F__)
#define QLANES 16
static __m512i sum_lanes(__m512i v[16]) {   /* lane r of the result = the sum of v[r]'s lanes */
    for (int r = 0; r < 8; r++)   /* each 128-bit lane: rows 2r, 2r+1, 2r, 2r+1 */
        v[r] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * r], v[2 * r + 1]), _mm512_unpackhi_epi32(v[2 * r], v[2 * r + 1]));
    for (int r = 0; r < 4; r++)   /* each 128-bit lane: rows 4r .. 4r+3 */
        v[r] = _mm512_add_epi32(_mm512_unpacklo_epi64(v[2 * r], v[2 * r + 1]), _mm512_unpackhi_epi64(v[2 * r], v[2 * r + 1]));
    for (int r = 0; r < 2; r++)   /* 128-bit lanes added in pairs, then the last pairs */
        v[r] = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2 * r], v[2 * r + 1], 0x88), _mm512_shuffle_i32x4(v[2 * r], v[2 * r + 1], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(v[0], v[1], 0x88), _mm512_shuffle_i32x4(v[0], v[1], 0xdd));
}

static void dot_q8_rows(float *out, const int8_t *w, const float *ws, const int16_t *x, const float *xs, int n) {
    int G = n / QGROUP;
    __m512i row = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                     _mm512_set1_epi32(G));   /* offset of row r's scales in ws */
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512i x0 = _mm512_loadu_si512(x + g * QGROUP), x1 = _mm512_loadu_si512(x + g * QGROUP + 32), v[QLANES];
        for (int r = 0; r < QLANES; r++) {
            const int8_t *wr = w + (size_t)r * n + (size_t)g * QGROUP;
            _mm_prefetch((const char *)(wr + (size_t)QLANES * n), _MM_HINT_T0);   /* the next block: the hardware prefetcher misses 16 rows read side by side */
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)wr));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr + 32)));
            v[r] = _mm512_add_epi32(_mm512_madd_epi16(w0, x0), _mm512_madd_epi16(w1, x1));
        }
        __m512 scale = _mm512_mul_ps(_mm512_i32gather_ps(row, ws + g, 4), _mm512_set1_ps(xs[g]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_lanes(v)), scale, acc);
    }
    _mm512_storeu_ps(out, acc);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define QLANES 8
static __m256i sum_lanes(__m256i v[8]) {    /* lane r of the result = the sum of v[r]'s lanes */
    for (int r = 0; r < 4; r++)   /* each 128-bit lane: rows 2r, 2r+1, 2r, 2r+1 */
        v[r] = _mm256_add_epi32(_mm256_unpacklo_epi32(v[2 * r], v[2 * r + 1]), _mm256_unpackhi_epi32(v[2 * r], v[2 * r + 1]));
    for (int r = 0; r < 2; r++)   /* each 128-bit lane: rows 4r .. 4r+3 */
        v[r] = _mm256_add_epi32(_mm256_unpacklo_epi64(v[2 * r], v[2 * r + 1]), _mm256_unpackhi_epi64(v[2 * r], v[2 * r + 1]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(v[0], v[1], 0x20), _mm256_permute2x128_si256(v[0], v[1], 0x31));
}

static void dot_q8_rows(float *out, const int8_t *w, const float *ws, const int16_t *x, const float *xs, int n) {
    int G = n / QGROUP;
    __m256i row = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(G));
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256i xv[4], v[QLANES];
        for (int k = 0; k < 4; k++) xv[k] = _mm256_loadu_si256((const __m256i *)(x + g * QGROUP + 16 * k));
        for (int r = 0; r < QLANES; r++) {
            const int8_t *wr = w + (size_t)r * n + (size_t)g * QGROUP;
            _mm_prefetch((const char *)(wr + (size_t)QLANES * n), _MM_HINT_T0);
            __m256i s = _mm256_setzero_si256();
            for (int k = 0; k < 4; k++)
                s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr + 16 * k))), xv[k]));
            v[r] = s;
        }
        __m256 scale = _mm256_mul_ps(_mm256_i32gather_ps(ws + g, row, 4), _mm256_set1_ps(xs[g]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_lanes(v)), scale, acc);
    }
    _mm256_storeu_ps(out, acc);
}
#else
#define QLANES 1   /* portable: dot_q8 row by row */
static void dot_q8_rows(float *out, const int8_t *w, const float *ws, const int16_t *x, const float *xs, int n) {
    *out = dot_q8(w, ws, x, xs, n);
}
#endif

/* W8A32: one row w (n codes, scales ws) against one fp32 token x (n): 4 x 16 lanes (one
 * vector per quarter of a group, so that 4 multiply-adds are in flight) accumulate
 * w * x * s over the whole row and are summed once at the end (a sum per group would cost a
 * horizontal reduction per 64 numbers). A group's codes become floats in a plain loop,
 * which GCC vectorizes (its __builtin_convertvector from int8 does not). */
static float dot_w8(const int8_t *w, const float *ws, const float *x, int n) {
    v16f acc[QGROUP / 16] = {{0}}, wv, xv;
    for (int g = 0; g < n / QGROUP; g++) {
        float wf[QGROUP];
        for (int k = 0; k < QGROUP; k++) wf[k] = w[g * QGROUP + k];
        for (int k = 0; k < QGROUP / 16; k++) {
            memcpy(&wv, wf + 16 * k, sizeof wv);
            memcpy(&xv, x + g * QGROUP + 16 * k, sizeof xv);
            acc[k] += wv * xv * ws[g];
        }
    }
    v16f all = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float sum = 0.0f;
    for (int t = 0; t < 16; t++) sum += all[t];
    return sum;
}

/* Rows i..i+QROWS-1 of W (d, n) against the QTOKS tokens b.. of tile xt (n, QTOKS) with
 * scales xts (n/QGROUP, QTOKS): a token per vector lane, so each weight, loaded once as a
 * float, is multiplied into 16 tokens, and a group's sums need no horizontal reduction.
 * W8A8: the integer sums are taken in float, where every product and partial sum is an
 * integer below 2^24, which float holds exactly in any order, fused or not. */
static void matmul_q8_tile(float *out, const float *xt, const float *xts, const int8_t *w, const float *ws,
                           int b, int i, int n, int d) {
    int G = n / QGROUP;
    v16f o[QROWS] = {{0}};
    for (int g = 0; g < G; g++) {
        float wf[QROWS][QGROUP];
        for (int r = 0; r < QROWS; r++)
            for (int k = 0; k < QGROUP; k++) wf[r][k] = w[(size_t)(i + r) * n + (size_t)g * QGROUP + k];
        v16f acc[QROWS] = {{0}}, xv, xs;
        for (int k = 0; k < QGROUP; k++) {
            memcpy(&xv, xt + ((size_t)g * QGROUP + k) * QTOKS, sizeof xv);
            for (int r = 0; r < QROWS; r++) acc[r] += xv * wf[r][k];
        }
        memcpy(&xs, xts + (size_t)g * QTOKS, sizeof xs);
        for (int r = 0; r < QROWS; r++) {
            float sw = ws[(size_t)(i + r) * G + g];
            for (int t = 0; t < QTOKS; t++) o[r][t] = fmaf(acc[r][t], sw * xs[t], o[r][t]);
        }
    }
    for (int r = 0; r < QROWS; r++)
        for (int t = 0; t < QTOKS; t++) out[(size_t)(b + t) * d + i + r] = o[r][t];
}

/* Row r of W (codes w, scales ws) against token t of the product's input: W8A8 or W8A32. */
static float dot_int8_row(const tq_q8_input *in, const int8_t *w, const float *ws, const float *x, int t, int r, int n) {
    int G = n / QGROUP;
    if (in->qinput) return dot_q8(w + (size_t)r * n, ws + (size_t)r * G, in->xq + (size_t)t * n, in->xqs + (size_t)t * G, n);
    return dot_w8(w + (size_t)r * n, ws + (size_t)r * G, x + (size_t)t * n, n);
}

/* Tiles of QROWS rows x QTOKS tokens where they fit; the other tokens (a decoded token is all
 * other: it is bound by reading the weights) QLANES rows at a time with W8A8, else one dot at
 * a time. TQ_Q8_BLOCK is a multiple of QROWS and QLANES, so which rows go through which
 * kernel depends on d alone, not on the blocks. */
void tq_q8_rows(const tq_q8_input *in, float *out, const float *x, const int8_t *w, const float *ws, int B, int n, int d,
                int i) {
    int G = n / QGROUP, tiled = B / QTOKS * QTOKS, end = i + TQ_Q8_BLOCK < d ? i + TQ_Q8_BLOCK : d, r = i;
    for (; r + QROWS <= end; r += QROWS)
        for (int b = 0; b < tiled; b += QTOKS)
            matmul_q8_tile(out, in->xqt + (size_t)b * n, in->xqts + (size_t)b * G, w, ws, b, r, n, d);
    for (; r < end; r++)
        for (int t = 0; t < tiled; t++) out[(size_t)t * d + r] = dot_int8_row(in, w, ws, x, t, r, n);
    for (int t = tiled; t < B; t++) {
        r = i;
        if (in->qinput)
            for (; r + QLANES <= end; r += QLANES)
                dot_q8_rows(out + (size_t)t * d + r, w + (size_t)r * n, ws + (size_t)r * G, in->xq + (size_t)t * n,
                            in->xqs + (size_t)t * G, n);
        for (; r < end; r++) out[(size_t)t * d + r] = dot_int8_row(in, w, ws, x, t, r, n);
    }
}
#endif
