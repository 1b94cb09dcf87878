/* tq.c - TurboQuant KV-cache codec. API and byte layout: tq.h.
 *
 * Paper: Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online Vector Quantization
 * with Near-optimal Distortion Rate", arXiv 2504.19874 (REFERENCE.md section 1).
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

/* Put the 15 exponent+fraction bits where a float keeps them and multiply by
 * 2^(127-15): exact for normal and subnormal halves alike. An all-ones half
 * exponent (inf, NaN) becomes an all-ones float exponent. No branches, so the
 * fp16 loops below vectorize. */
TQ_HD static inline float half_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)(h & 0x7fff) << 13;
    float f;
    memcpy(&f, &bits, 4);
    f *= 0x1p112f;
    memcpy(&bits, &f, 4);
    bits |= ((h & 0x7c00) == 0x7c00) * 0x7f800000u | (uint32_t)(h & 0x8000) << 16;
    memcpy(&f, &bits, 4);
    return f;
}
TQ_HD float tq_f16_to_f32(uint16_t h) { return half_to_float(h); }

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
TQ_HD static float get_f16(const uint8_t *p) { return half_to_float(*(const uint16_t *)p); }
#else
TQ_HD static float get_f32(const uint8_t *p) { float f; memcpy(&f, p, 4); return f; }  /* any alignment */
TQ_HD static float get_f16(const uint8_t *p) { return half_to_float((uint16_t)(p[0] | p[1] << 8)); }
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

static const struct { const char *name; int bits; int prod; } FMT[TQ_NFMT] = {
    {"fp32", 0, 0}, {"fp16", 0, 0}, {"q8", 0, 0}, {"q4", 0, 0},
    {"tq2", 2, 0}, {"tq3", 3, 0}, {"tq4", 4, 0},
    {"tq2p", 1, 1}, {"tq3p", 2, 1}, {"tq4p", 3, 1},   /* bits = Lloyd-Max bits = B-1 */
};
static const char *SCALE_NAME[TQ_NSCALE] = {"norm", "nc", "eden"};

int tq_parse_fmt(const char *name, tq_fmt *out) {
    for (int f = 0; f < TQ_NFMT; f++)
        if (strcmp(name, FMT[f].name) == 0) { *out = (tq_fmt)f; return 0; }
    return -1;
}
const char *tq_fmt_name(tq_fmt f) { return (unsigned)f < TQ_NFMT ? FMT[f].name : "?"; }

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
 * (paper, Lemma 1; REFERENCE.md step 3)
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
    int d = c->d, K = 1 << c->bits;
    if (!is_tq(c->fmt)) { memcpy(qp, q, (size_t)d * sizeof(float)); return; }
    float *lut = qp + d;
    tq_rotate(c, q, qp);
    for (int i = 0; i < d; i++)
        for (int k = 0; k < K; k++) lut[(size_t)i * K + k] = qp[i] * c->centroids[k];
    if (!is_prod(c->fmt)) return;
    float *sq = lut + (size_t)d * K;
    for (int k = 0; k < d; k++) sq[k] = dot8(c->qjl + (size_t)k * d, qp, d);   /* S (Pi q) */
}

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
