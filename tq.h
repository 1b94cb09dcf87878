/* tq.h - TurboQuant KV-cache codec: one attention head's key or value vector.
 *
 * TurboQuant (Zandieh et al., arXiv 2504.19874) in a few lines:
 *   x  (d floats)  ->  s = scale(x), u = x/|x|, y = Pi.u (random rotation)
 *   idx[i] = nearest Lloyd-Max centroid of y[i]      (b bits per coordinate)
 *   decode: x~ = s * Pi^T . c[idx]
 * Attention never undoes the rotation per key: <q, Pi^T c> = <Pi q, c>, so a
 * query is rotated once, every key is scored straight from its codes, values
 * are accumulated in the rotated domain, and the sum is rotated back once.
 *
 * Formats (the names users type after -k):
 *   fp32, fp16     uncompressed references
 *   q8, q4         absmax integer quantization, no rotation (llama.cpp q8_0/q4_0)
 *   tq2, tq3, tq4  TurboQuant_mse, b = 2/3/4 bits per coordinate
 *   tq2p,tq3p,tq4p TurboQuant_prod: (b-1)-bit mse codes + 1-bit QJL residual signs
 *
 * Byte layout of ONE encoded vector (d = head dim, all multi-byte fields
 * little-endian; the CUDA build writes exactly these bytes):
 *   fp32   d x float32
 *   fp16   d x IEEE binary16
 *   q8     d x int8 q, then fp16 scale s;             x~[i] = s * q[i],  s = absmax/127
 *   q4     per block of 32: 16 bytes of 4-bit codes (element j of the block in
 *          byte j/2, low nibble first), then fp16 scale s;  x~ = s * (q - 8),
 *          s = m / -8 with m the element of largest magnitude (q4_0's rule)
 *   tqB    ceil(d*B/8) bytes of packed indices, then fp16 scale s.
 *          Packing: index i occupies bits [B*i, B*i+B) of a little-endian bit
 *          stream (bit k of the stream is bit k%8 of byte k/8), so 3-bit codes
 *          put 8 indices in 3 bytes with no waste.
 *   tqBp   ceil(d*(B-1)/8) bytes of packed (B-1)-bit indices, d/8 bytes of QJL
 *          signs (bit i set <=> sign +1, same bit order), fp16 scale s,
 *          fp16 residual norm gamma.
 *
 * The rotation is fixed by (d, seed) only: a randomized Hadamard transform
 * (several rounds of random +-1 signs then a fast Walsh-Hadamard transform)
 * when d is a power of two, else a dense random orthogonal matrix (QR of a
 * seeded Gaussian matrix). One codec object serves every layer and head.
 */
#ifndef TQ_H
#define TQ_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* run_cuda.cu compiles this codec a second time, as CUDA C++, so that the GPU
 * kernels encode, score and accumulate with these very functions: TQ_HD marks
 * what runs on both, and TQ_STACK(d) sizes a function's scratch vectors (a C99
 * variable-length array on the CPU; a fixed TQ_GPU_MAX_D on the GPU, which has
 * none, so the CUDA build takes tq formats up to that head_dim). */
#define TQ_GPU_MAX_D 256
#ifdef __CUDACC__
#define TQ_HD __host__ __device__
#define TQ_STACK(d) TQ_GPU_MAX_D
#define restrict __restrict__
#else
#define TQ_HD
#define TQ_STACK(d) (d)
#endif

typedef enum {
    TQ_FP32, TQ_FP16, TQ_Q8, TQ_Q4,
    TQ_TQ2, TQ_TQ3, TQ_TQ4,
    TQ_TQ2P, TQ_TQ3P, TQ_TQ4P,
    TQ_NFMT
} tq_fmt;

/* How the stored scale s of a tq vector is chosen (see the paper and
 * section 3.1, Algorithm 1). c = c[idx] is the reconstructed unit vector in the
 * rotated domain, y = Pi.u the rotated unit input. */
typedef enum {
    TQ_SCALE_NORM, /* the paper's Algorithm 1: s = |x|                           */
    TQ_SCALE_NC,   /* "norm correction": s = |x| / |c|  (dequantized length right) */
    TQ_SCALE_EDEN, /* EDEN's unbiased scale: s = |x| / <y, c>                      */
    TQ_NSCALE
} tq_scale;

#define TQ_DEFAULT_SEED 0x5475726230517541ULL

typedef struct {
    tq_fmt fmt;
    int d;            /* vector length (head dim)                              */
    int bits;         /* Lloyd-Max bits per coordinate (B, or B-1 for prod); 0 for fp/q */
    tq_scale scale;   /* scale rule for tq formats                              */
    size_t bytes;     /* bytes of one encoded vector                            */
    float *centroids; /* (1<<bits) sorted centroids of a unit vector's coordinate */
    float *bounds;    /* (1<<bits)-1 decision thresholds, midpoints of centroids */
    int rounds;       /* Hadamard rounds (0 when the dense matrix is used)     */
    float *signs;     /* (rounds, d) random +-1 per Hadamard round, or NULL     */
    float *dense;     /* (d, d) row-major orthogonal Pi when d is not 2^k, or NULL */
    float *qjl;       /* (d, d) row-major Gaussian S for the prod formats, or NULL */
} tq_codec;

/* ---- format table --------------------------------------------------------*/
int tq_parse_fmt(const char *name, tq_fmt *out);  /* 0 on success, -1 unknown  */
const char *tq_fmt_name(tq_fmt f);
const char *tq_fmt_about(tq_fmt f);               /* one line for -h: what the format stores */
size_t tq_bytes(tq_fmt f, int d);                 /* bytes of one encoded vector; 0 if d unsupported */
double tq_bits_per_elem(tq_fmt f, int d);         /* 8*bytes/d, every stored byte counted */
const char *tq_scale_name(tq_scale s);            /* "norm", "nc", "eden" */
int tq_parse_scale(const char *name, tq_scale *out);

/* ---- codec life cycle ------------------------------------------------------*/
/* Returns 0 on success, -1 if the format cannot hold d (d must be a positive
 * multiple of 8, and of 32 for q4). Computes the exact-density Lloyd-Max
 * codebook for d and draws the rotation from seed. */
int tq_init(tq_codec *c, tq_fmt f, int d, tq_scale scale, uint64_t seed);
void tq_free(tq_codec *c);

/* ---- encode / decode -------------------------------------------------------*/
TQ_HD void tq_encode(const tq_codec *c, const float *x /* (d) */, uint8_t *code /* (bytes) */);
TQ_HD void tq_decode(const tq_codec *c, const uint8_t *code /* (bytes) */, float *x /* (d) */);

/* ---- rotation ---------------------------------------------------------------*/
TQ_HD void tq_rotate(const tq_codec *c, const float *x /* (d) */, float *y /* (d) */);   /* y = Pi x   */
TQ_HD void tq_unrotate(const tq_codec *c, const float *y /* (d) */, float *x /* (d) */); /* x = Pi^T y */

/* ---- attention straight from the codes ------------------------------------
 * score:      qp = tq_prepare_query(q) once per query head, then
 *             tq_dot(qp, code_t) = <q, decode(code_t)> for every cached key.
 * accumulate: acc (tq_acc_floats floats) zeroed, tq_axpy(w_t, code_t, acc) for
 *             every cached value, then tq_finish(acc, out) gives
 *             out = sum_t w_t decode(code_t).
 */
TQ_HD size_t tq_query_floats(const tq_codec *c);  /* floats in a prepared query    */
TQ_HD size_t tq_acc_floats(const tq_codec *c);    /* floats in an accumulator      */
TQ_HD void tq_prepare_query(const tq_codec *c, const float *q /* (d) */, float *qp /* (query_floats) */);
TQ_HD void tq_prepare_rotated(const tq_codec *c, const float *y /* (d) = Pi q */, float *qp /* (query_floats) */);
TQ_HD float tq_dot(const tq_codec *c, const float *qp /* (query_floats) */, const uint8_t *code);
TQ_HD void tq_axpy(const tq_codec *c, float w, const uint8_t *code, float *acc /* (acc_floats) */);
TQ_HD void tq_finish(const tq_codec *c, const float *acc /* (acc_floats) */, float *out /* (d) */);

/* ---- attention over a range of rows: one pass for a group of queries -------
 * A KV head's rows are scored and accumulated for all the query heads that
 * share it (GQA) from one load of each row's codes:
 *   tq_attn_scores  s[r*lds + t] = tq_dot(qp + r*ldq, row t)        r < nq, t < n
 *   tq_attn_values  acc + r*lda += sum_t w[r*ldw + t] * (row t, as tq_axpy adds it)
 * rows: n consecutive encoded vectors (c->bytes each); qp + r*ldq: query r as
 * tq_prepare_query leaves it; acc + r*lda: an accumulator of tq_acc_floats
 * floats (finished by tq_finish). The callers handle everything that is not a
 * row of codes (exact positions, per-key projections, masks), so that these
 * loops are TurboQuant itself: score = s <Pi q, c[idx]>, value sum in the
 * rotated domain.
 *   tq_softmax_chunk  one step of the online softmax (Milakov & Gimelshein
 *                  2018, as in FlashAttention): with m the running maximum of
 *                  the logits seen so far (-INFINITY at first), logits
 *                  x_t = scale * s[t] (-INFINITY: masked) raise it to m' =
 *                  max(m, max_t x_t); s[t] <- exp(x_t - m'), the chunk's sum is
 *                  returned and *rescale = exp(m - m') is the factor by which
 *                  earlier sums and accumulators shrink (1 if all are masked).
 *
 * Each has a portable C path and, on x86-64 GCC/Clang builds, AVX2+FMA+F16C
 * and AVX-512F paths in the same binary (target attributes), chosen at run time
 * by the tq_simd argument. The SIMD paths turn 8 or 16 codes at a time into
 * centroids with one register permute; the prod formats (tq*p) and head dims
 * that are not a multiple of the vector width take the portable path in every
 * mode. The paths agree within float rounding (tests/test_tq.c checks 1e-5
 * relative); bit-identical results are not promised. */
typedef enum { TQ_SIMD_PORTABLE, TQ_SIMD_AVX2, TQ_SIMD_AVX512, TQ_NSIMD } tq_simd;
const char *tq_simd_name(tq_simd s);               /* "portable", "avx2", "avx512" */
int tq_simd_parse(const char *name, tq_simd *out); /* 0 on success, -1 unknown   */
int tq_simd_supported(tq_simd s);                  /* 1 if this CPU and build run path s */
tq_simd tq_simd_best(void);                        /* the fastest supported path  */
/* The path the environment variable TQ_SIMD names, else tq_simd_best(). Returns
 * NULL, or a one-line reason (unknown name, a path this CPU cannot run). */
const char *tq_simd_from_env(tq_simd *out);

void tq_attn_scores(const tq_codec *c, tq_simd simd, int nq, const float *qp /* (nq, ldq) */, size_t ldq,
                    const uint8_t *rows /* (n, bytes) */, int n, float *s /* (nq, lds) */, size_t lds);
void tq_attn_values(const tq_codec *c, tq_simd simd, int nq, const float *w /* (nq, ldw) */, size_t ldw,
                    const uint8_t *rows /* (n, bytes) */, int n, float *acc /* (nq, lda) */, size_t lda);
float tq_softmax_chunk(tq_simd simd, float *s /* (n) */, int n, float scale, float *m, float *rescale);

/* ---- one KV head's cache, and attention over it ----------------------------------
 * run.c keeps, per KV head, the codes of every position plus two fixes on top of
 * the paper's codec (both off with --paper):
 *
 * Key projection. The queries of a head share a large common direction: the mean
 * query's direction u holds a large part of a head's query energy. The score error
 * of a quantized key is q.e = (q.u)(u.e) + q_perp.e, and the first term, large
 * because q.u is, moves every score of the key the same way for all queries. So
 * each key also keeps beta = u.k exactly (one fp16 number per key: +0.25 bits/elem
 * at head_dim 64) and only the rest, k - beta u, is encoded. Scoring uses
 *     q.k ~= (q.u) beta + q_perp.k~,   q_perp = q - (q.u) u,
 * so the codes' error along u (not zero: the codec spreads its error over all
 * directions, paper section 3.1) never reaches the score. u is the normalized mean
 * query of the sequence's first batch (the sink token left out: statistics of the
 * sequence itself, nothing fitted offline), rounded to fp16 and normalized again.
 * A second direction u_2, orthogonal to u, is the keys' own main direction (their
 * top principal direction in the first batch, less the part along u), so the codes
 * no longer carry the largest remaining part of a key. With R directions,
 * k - sum_j beta_j u_j is encoded and
 *     q.k ~= sum_j (q.u_j) beta_j + q_perp.k~,   q_perp = q - sum_j (q.u_j) u_j.
 * Both directions drift as a sequence goes on (the text changes, and RoPE turns the
 * keys with position), so they can be measured per block of `kblock` positions
 * instead of once: a block's directions come from its own queries and keys in the
 * batch that starts it (a prompt is run in batches), or, when that batch holds too
 * few of them (decoding one token at a time), are the previous block's. The cost is
 * R fp16 directions per block and head (2 x 64 x 2 bytes per 256 positions), paid back
 * by storing the betas as int8 codes with one step per block and direction: 2 max|beta|
 * / 127 over the tokens the block was measured on, so that keys up to twice as far out
 * as any of those still fit (beyond: clamped to +-127 steps).
 *
 * Exact positions. Most of what a small model's attention looks at is the attention
 * sink (position 0) and the last few tokens; their quantization error goes straight
 * into the output. Those positions are also kept in fp16 (the vectors that were
 * encoded): the first `sink`, and the last `window` in a ring of rows, so the cost
 * does not grow with the context. The positions of the batch being processed are
 * read from the batch itself (rounded to fp16 the same way) and enter the ring after
 * attention. bench/README.md measures what each fix gains.
 *
 * Attention of a query at position T-1 reads the coded positions [sink, T - window)
 * from the codes and the exact ones from their fp16 copies, both gathered into an
 * online-softmax state per query (Milakov & Gimelshein 2018; FlashAttention):
 *   st = [ m | l | acc (tq_acc_floats) | ex (d) ],  m the largest logit x_t seen,
 *   l = sum_t e^(x_t - m),  acc = sum_t e^(x_t - m) v~_t over coded positions in the
 *   codec's accumulator form (rotated domain), ex the same over exact positions;
 * the output is (Pi^T acc + ex) / l, and states over disjoint positions merge by
 * rescaling to the larger m. The coded part runs a chunk of rows at a time for a
 * group of queries at once (GQA: one pass over each row's codes serves the query
 * heads of a KV head, and in prefill several tokens too); scores come straight from
 * the codes (paper, section 3: <q, x~> without decoding x~). */
#define TQ_KPROJ_MAX 2   /* key directions at most: the mean query's, the keys' main one */

typedef struct {
    const tq_codec *kc, *vc; /* key and value formats (d = kc->d = vc->d)            */
    int ctx;                 /* positions allocated                                   */
    uint8_t *key;            /* (ctx, kc->bytes) codes of k - sum_j beta_j u_j        */
    uint8_t *value;          /* (ctx, vc->bytes) codes of the values                  */
    int R;                   /* key directions, 0..TQ_KPROJ_MAX                       */
    int kblock;              /* positions per block of directions: block j is [j kblock, (j+1) kblock) */
    float *kdir;             /* (blocks, R, d) each block's orthonormal u_j (NULL when R = 0) */
    float *kdir_rot;         /* (blocks, R, d) the same rotated, Pi u_j: what queries meet */
    uint16_t *kbeta;         /* (ctx, R) fp16 beta_tj = u_j.k_t, or NULL (R = 0, or int8 betas) */
    int8_t *kbeta8;          /* (ctx, R) beta_tj as int8 codes times kscale, or NULL  */
    float *kscale;           /* (blocks, R) each block's int8 step per direction (fp16-rounded) */
    int sink, window;        /* exact positions: the first `sink` and the last `window` */
    int slots;               /* rows of the exact store: the sinks, then a ring       */
    uint16_t *exact_k;       /* (slots, d) fp16 keys as encoded                       */
    uint16_t *exact_v;       /* (slots, d) fp16 values as encoded                     */
} tq_head;

/* The batch being processed: its keys and values as stored (fp16-rounded), read for
 * exact positions >= pos. */
typedef struct {
    int pos;                 /* position of the batch's first token                  */
    const float *k, *v;      /* (n, ld) this head's key and value of every token      */
    size_t ld;
} tq_batch;

/* Row of position pos in the exact store: the sinks first, then the ring. */
TQ_HD static inline int tq_exact_slot(int pos, int sink, int slots) {
    return pos < sink ? pos : sink + (pos - sink) % (slots - sink);
}
/* the end of the coded positions of a query at T-1: they are [sink, tq_coded_end) */
static inline int tq_coded_end(int T, int sink, int window) { return T - window > sink ? T - window : sink; }

/* The key directions of the block that starts at position pos (R of them into its rows of
 * h->kdir, rotated into h->kdir_rot, and the int8 betas' steps into h->kscale if it has
 * them) from the n tokens at pos..: q + b*ldq holds token b's
 * `group` query heads (group*d floats), k + b*ldk its key, both after RoPE; position 0 (the
 * sink) is left out when n > 1. u_1 is the mean query, u_2 the top principal direction of the
 * keys less their part along u_1 (power iteration on the d x d second moments, from the
 * longest of those keys); each rounded to fp16 as stored and made orthonormal again.
 * Returns 0, or -1 out of memory. */
int tq_key_dirs(const tq_head *h, int pos, int group, const float *q, size_t ldq, const float *k, size_t ldk, int n);
/* The block that starts at pos (> 0) takes the previous block's directions (and steps): for a block whose
 * first batch holds too few of its tokens to measure them on. */
void tq_key_dirs_inherit(const tq_head *h, int pos);
/* Stores position pos's key k and value v (d each): beta_j = u_j.k in fp16 or int8 (u_j: pos's block's) and
 * kperp = k - sum_j beta_j u_j encoded; then k and v are rounded to fp16 in place, as
 * the exact store keeps them. kperp: d floats of scratch. */
void tq_store(const tq_head *h, int pos, float *k, float *v, float *kperp);
/* After attention, token b of a batch of n at pos enters the exact store if it is a sink
 * or among the batch's last `window` (k, v as tq_store left them). */
void tq_store_exact(const tq_head *h, int pos, int b, int n, const float *k, const float *v);

size_t tq_state_floats(const tq_codec *vc);   /* floats of one query's state: 2 + acc + d */
size_t tq_attend_scratch(const tq_codec *kc, int nq); /* scratch floats of tq_attend_codes for nq queries */
/* The coded positions [k0, k1) for nq queries, `group` per token (query r belongs to token
 * r / group, at position pos0 + r / group), each query's logits past its own coded range
 * masked (they are exact for it, or in its future): rq (nq, d) the queries rotated, Pi q
 * (tq_rotate). Each block of positions meets the queries readied for its own directions:
 * along_j = q.u_j = <Pi q, Pi u_j>, and Pi q_perp = Pi q - sum_j along_j Pi u_j (the
 * rotation is linear, so no query is rotated again per block). Sets st (nq,
 * tq_state_floats) to the states of those positions. scratch: tq_attend_scratch(kc, nq)
 * floats. k0 is lowered and k1 widened to whole tiles of 16 rows where the cache has them (the
 * rows outside [k0, k1): masked), so the codec's kernels need no row-by-row tail. */
void tq_attend_codes(const tq_head *h, tq_simd simd, int nq, int group, int pos0, const float *rq,
                     int k0, int k1, float *st, float *scratch);
/* Query q (d, after RoPE) at position T-1: merges the `parts` states st, st + stride, ...
 * (its coded positions, split) into st, adds its exact positions (their fp16 copies, or
 * the batch's own rows), and writes the attention output to out (d). */
void tq_attend_finish(const tq_head *h, const float *q, const tq_batch *batch, int T, float *st, int parts,
                      size_t stride, float *out);

/* ---- the whole cache: every layer's KV heads ---------------------------------------------
 * How it is held (-k and the fixes' flags) and the arrays themselves, head-major so that
 * attention streams one head's codes from contiguous memory: head h = l * kv_heads + g (layer l,
 * KV head g) owns rows [h * ctx, (h + 1) * ctx) of key and value, position pos's key at
 * key + (h * ctx + pos) * kc.bytes; the same for every other per-position array, and per
 * block (kdir, kdir_rot, kscale) or per exact slot likewise. tq_cache_build is the one place
 * that lays it out and counts its bytes; tq_cache_head hands out one head's rows as a tq_head. */
typedef struct {
    tq_fmt key_fmt, value_fmt; /* -k KEYS:VALUES                                           */
    tq_scale kscale, vscale;   /* --scale: the tq formats' scale rules                      */
    int kproj;                 /* key directions kept exactly, 0..TQ_KPROJ_MAX ("Key projection") */
    int kblock;                /* positions per block of key directions (0: one set per sequence) */
    int sink, window;          /* the first `sink` and the last `window` positions also kept in fp16 */
} tq_cache_opts;

typedef struct {
    tq_codec kc, vc;   /* key and value formats (d = head_dim)                              */
    int layers, kv_heads; /* heads = layers * kv_heads                                      */
    int ctx;           /* positions allocated                                               */
    uint8_t *key;      /* (heads, ctx, kc.bytes)                                            */
    uint8_t *value;    /* (heads, ctx, vc.bytes)                                            */
    int kproj;         /* R: keys' components along R directions kept exactly (0: lossless keys) */
    int kblock, blocks; /* positions per block of directions (ctx: one block), blocks per head */
    float *kdir;       /* (heads, blocks, R, d) orthonormal directions u_j, or NULL          */
    float *kdir_rot;   /* (heads, blocks, R, d) the same rotated, Pi u_j, or NULL            */
    uint16_t *kbeta;   /* (heads, ctx, R) fp16 beta_tj = u_j.k_t of every key (--kblock 0), or NULL */
    int8_t *kbeta8;    /* (heads, ctx, R) the same as int8 codes (--kblock N), or NULL       */
    float *kscale;     /* (heads, blocks, R) their steps, fp16-rounded, or NULL              */
    int sink, window;  /* exact positions: the first `sink` and the last `window` (0 for a lossless cache) */
    int slots;         /* rows per head of the exact store: sink + a ring of window          */
    uint16_t *exact_k; /* (heads, slots, d) fp16 keys as encoded                            */
    uint16_t *exact_v; /* (heads, slots, d) fp16 values as encoded                          */
} tq_cache;

/* Sets up the codecs and the layout of a cache of ctx positions; allocates it (alloc 1) or only
 * counts it (alloc 0: the arrays stay NULL). Returns its bytes, or -1 out of memory (then
 * everything is freed). The fixes apply to lossy formats only (q8, q4, tq*): the key
 * projection to lossy keys, the exact positions to a cache with a lossy side. The formats
 * must hold head_dim (tq_cache_check). */
double tq_cache_build(tq_cache *kv, const tq_cache_opts *o, int layers, int kv_heads, int head_dim, int ctx, int alloc);
/* NULL when both formats can hold head_dim, else err holding one line that says why not */
const char *tq_cache_check(const tq_cache_opts *o, int head_dim, char *err, size_t len);
void tq_cache_free(tq_cache *kv);
/* the first row of head (l, g) in a per-position array, and the row of position pos in the exact store */
TQ_HD static inline size_t tq_cache_row(const tq_cache *kv, int l, int g, int pos) {
    return ((size_t)l * kv->kv_heads + g) * kv->ctx + pos;
}
TQ_HD static inline size_t tq_exact_row(const tq_cache *kv, int l, int g, int pos) {
    return (((size_t)l * kv->kv_heads + g) * kv->slots + tq_exact_slot(pos, kv->sink, kv->slots)) * kv->kc.d;
}
tq_head tq_cache_head(const tq_cache *kv, int l, int g);   /* KV head g of layer l as tq.c reads it */

/* What the cache holds for n positions: the codes; every key's R projections beta (fp16, or
 * int8 codes); a fixed cost: the fp16 exact rows in use and, per head and block in use, the R
 * directions and int8 steps (kept as fp16 numbers: tq_key_dirs; the directions' rotated
 * copies are derived, not stored information). */
typedef struct { size_t codes, projections, fixed, all; } tq_cache_bytes;   /* all: the sum */
tq_cache_bytes tq_cache_size(const tq_cache *kv, int n);
double tq_cache_bits(const tq_cache *kv, int n);   /* all of it per cached number (keys and values) */

/* One layer's batch of n tokens at positions pos.., as the forward pass hands it to the cache. */
typedef struct {
    int layer, n, pos;
    int group;         /* query heads per KV head                                           */
    const float *q;    /* (n, kv_heads, group, d) queries after RoPE                        */
    float *k, *v;      /* (n, kv_heads, d) keys after RoPE and values; left rounded to fp16 as stored */
    float *out;        /* (n, kv_heads, group, d) the attention output                      */
    float *work;       /* (tq_cache_work_floats) scratch                                    */
} tq_cache_batch;

#define TQ_KBLOCK_MIN 16   /* a block's own tokens needed in its first batch to measure its directions on */
/* The key directions of the blocks that start in the batch (tq_key_dirs), measured on the
 * block's own tokens of the batch (the first block on whatever the first batch holds), or, with
 * fewer than TQ_KBLOCK_MIN of them, the previous block's. Returns 0, or -1 out of memory. */
int tq_cache_key_dirs(const tq_cache *kv, const tq_cache_batch *b);
/* The batch's layer of the forward pass, on the cache's side: its key directions, its keys and
 * values encoded (tq_store), every token b's attention to positions 0..pos+b (tq_attend_codes
 * over the coded positions, split into work items over KV heads, tiles of queries and ranges of
 * positions; tq_attend_finish), then the exact store updated. Parallel (OpenMP); the split
 * depends on n and pos only, never on the thread count, so the output does not either.
 * Returns 0, or -1 out of memory. */
int tq_cache_attention(const tq_cache *kv, tq_simd simd, const tq_cache_batch *b);
size_t tq_cache_work_floats(const tq_cache *kv, int group, int batch);   /* scratch of batches up to `batch` */
/* --stats: layer l's statistics for n positions as floats: the directions of the blocks in use
 * (kv_heads, blocks, R, d), then every position's projections beta (kv_heads, n, R). Writes them
 * to out unless it is NULL; returns their count. */
size_t tq_cache_stats(const tq_cache *kv, int l, int n, float *out);

float tq_dot_f32(const float *a, const float *b, int n);   /* sum_j a[j] b[j], float */

/* fp16 helpers (round to nearest even), shared with run.c */
TQ_HD uint16_t tq_f32_to_f16(float f);
TQ_HD float tq_f16_to_f32(uint16_t h);

/* tq_f16_to_f32 inline, for loops over many halves (the compiler can vectorize it): the 15
 * exponent+fraction bits go where a float keeps them, times 2^(127-15), which is exact for
 * normal and subnormal halves alike; an all-ones half exponent (inf, NaN) becomes an all-ones
 * float exponent. No branches. */
TQ_HD static inline float tq_half(uint16_t h) {
    uint32_t bits = (uint32_t)(h & 0x7fff) << 13;
    float f;
    memcpy(&f, &bits, 4);
    f *= 0x1p112f;
    memcpy(&bits, &f, 4);
    bits |= ((h & 0x7c00) == 0x7c00) * 0x7f800000u | (uint32_t)(h & 0x8000) << 16;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- weight products (tq.c's last section): run.c's out (B, d) = x (B, n) . W^T ------------------
 * W (d, n), x and out row-major (a token a row). The kernels are compiled for -march's instruction
 * set, not chosen at run time; calls for different blocks of rows are independent (run.c's linear
 * runs them in parallel).
 * fp32 W: tq_f32_rows computes rows [i, i + TQ_F32_BLOCK) of out (fewer at W's end). */
#define TQ_F32_BLOCK 2
void tq_f32_rows(float *out, const float *x, const float *w, int B, int n, int d, int i);

/* int8 (run.c's weight type 1):
 * W (d, n), n a multiple of TQ_QGROUP: number j of row i is w[i*n + j] * ws[(i*n + j) / TQ_QGROUP]
 * (llama2.c's runq.c: per group of TQ_QGROUP numbers one scale max|w| / 127 and codes in
 * [-127, 127]). out (B, d) = x (B, n) . W^T, out[t][i] = sum_j W[i][j] x[t][j], in one of two ways:
 * W8A8 (qinput 1): x quantized per group the same way (codes rounded to nearest-even); the
 *   group sums are exact integers, summed as a chain of fmaf(sum, w_scale * x_scale, acc) in
 *   group order, so every kernel and every CPU gives the same bits (tests/test_q8.c).
 * W8A32 (qinput 0): x kept in fp32, summed in float like an fp32 product. */
#define TQ_QGROUP 64     /* numbers per scale */
#define TQ_Q8_BLOCK 16   /* rows of W per tq_q8_rows call: a multiple of its kernels' 4-row tiles and 8/16-row lanes */

typedef struct {   /* a product's input x (batch, n), prepared by tq_q8_prepare */
    int qinput;    /* 1: W8A8, quantize x to int8; 0: W8A32, keep it fp32 */
    int16_t *xq;   /* (batch, n) W8A8 codes, token by token (int16: the one-token kernel widens only the weights) */
    float *xqs;    /* (batch, n / TQ_QGROUP) their scales */
    float *xqt;    /* (batch / 16, n, 16) whole tiles of 16 tokens side by side: the codes as floats (W8A32: x) */
    float *xqts;   /* (batch / 16, n / TQ_QGROUP, 16) their scales, the same way (W8A32: 1) */
} tq_q8_input;

/* Allocates, zeroed (alloc 1), or only counts (alloc 0: the pointers NULL) the buffers for inputs of up
 * to batch tokens of n numbers, qinput 0 (set it after); returns their bytes, -1 out of memory (then
 * nothing is held). */
double tq_q8_input_build(tq_q8_input *in, int batch, int n, int alloc);
void tq_q8_input_free(tq_q8_input *in);
void tq_q8_prepare(tq_q8_input *in, const float *x, int B, int n);   /* x (B, n): once, before its tq_q8_rows */
/* rows [i, i + TQ_Q8_BLOCK) of out (B, d) (fewer at the end of W), x (B, n) prepared in `in` */
void tq_q8_rows(const tq_q8_input *in, float *out, const float *x, const int8_t *w, const float *ws, int B, int n, int d,
                int i);

#endif
