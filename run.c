/* run.c - inference of a Llama-architecture model whose whole KV cache lives in TurboQuant form
 * (or another format chosen with -k), in one C file. Build: make run    Usage: ./run model.bin -h
 *
 * Structure follows karpathy/llama2.c, in sections: config and weights, the cache, the forward
 * pass, the tokenizer, the sampler, the modes (generate, chat, logits, score, eval), main. What is
 * new is the KV cache (tq.h, tq_cache): keys and values are encoded by tq.c as they are produced,
 * and attention scores keys and accumulates values straight from their codes (tq_cache_attention,
 * tq_attend_codes). tq.c also holds the SIMD kernels of the weight products (tq_f32_rows, tq_q8_rows).
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tq.h"

#ifndef PROG
#define PROG "run"   /* run_cuda.cu includes this file with its own name */
#endif

/* Every bad input ends here: one line that names the problem, exit status 1. */
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xcalloc(size_t n, size_t size, const char *what) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory: %s needs %.1f MiB", what, (double)n * size / 1048576.0);
    return p;
}

/* ---------------------------------------------------------------------------
 * Config and weights: the header and the weights, mmap'd from model.bin (format in README.md) */

#define MODEL_MAGIC "TQLM"
#define MODEL_VERSION 1
#define HEADER_BYTES 256

/* Weight types (header offset 112). int8 follows llama2.c's runq.c: every matrix row is cut into
 * groups of TQ_QGROUP numbers, each with one fp32 scale s = max|w| / 127 and codes q = round(w / s)
 * in [-127, 127]; the RMSNorm weights stay fp32. tq.c multiplies them (tq_q8_rows). */
#define WEIGHTS_FP32 0
#define WEIGHTS_INT8 1

typedef struct {
    int dim;               /* transformer width                               */
    int hidden_dim;        /* FFN width                                       */
    int n_layers;
    int n_heads;           /* query heads                                     */
    int n_kv_heads;        /* key/value heads (< n_heads: grouped-query attention) */
    int head_dim;
    int vocab_size;
    int seq_len;           /* the model's trained context                     */
    int shared_classifier; /* 1: logits = token_embedding . x                 */
    int tokenizer_kind;    /* 1 SentencePiece, 2 GPT-2 byte-level BPE         */
    int bos_id, eos_id;    /* -1: none                                        */
    int chat_start_id, chat_end_id; /* <|im_start|>, <|im_end|>; -1: none      */
    float rope_theta, norm_eps;
    size_t tokenizer_offset, tokenizer_bytes, weights_offset, weights_bytes;   /* the file's two sections */
    int add_bos;           /* 1: prompts start with bos                       */
    int pretok;            /* pre-tokenizer: 0 none, 1 smollm, 2 gpt2         */
    int weight_type;       /* WEIGHTS_FP32 or WEIGHTS_INT8                    */
    int group_size;        /* numbers per scale: TQ_QGROUP for int8, 0 for fp32  */
} Config;

/* A matrix (rows, cols) of int8 weights, cols a multiple of TQ_QGROUP: number j of row i is
 * q[i*cols + j] * s[(i*cols + j) / TQ_QGROUP], so an offset into q maps to offset / TQ_QGROUP in s. */
typedef struct {
    int8_t *q;              /* (rows, cols) codes                                 */
    float *s;               /* (rows, cols / TQ_QGROUP) scales                       */
} QMatrix;

/* The matrices of an fp32 file are the float pointers; those of an int8 file are the
 * QMatrix fields, of the same shapes, and the float matrix pointers are NULL. */
typedef struct {
    float *token_embedding; /* (vocab_size, dim)                              */
    float *rms_att;         /* (n_layers, dim)                                */
    float *wq;              /* (n_layers, n_heads*head_dim, dim)              */
    float *wk;              /* (n_layers, n_kv_heads*head_dim, dim)           */
    float *wv;              /* (n_layers, n_kv_heads*head_dim, dim)           */
    float *wo;              /* (n_layers, dim, n_heads*head_dim)              */
    float *rms_ffn;         /* (n_layers, dim)                                */
    float *w1;              /* (n_layers, hidden_dim, dim)   gate             */
    float *w2;              /* (n_layers, dim, hidden_dim)   down             */
    float *w3;              /* (n_layers, hidden_dim, dim)   up               */
    float *rms_final;       /* (dim)                                          */
    float *wcls;            /* (vocab_size, dim); = token_embedding when shared */
    QMatrix q_embedding, q_wq, q_wk, q_wv, q_wo, q_w1, q_w2, q_w3, q_wcls; /* int8 files */
} TransformerWeights;

#define KPROJ_MAX TQ_KPROJ_MAX  /* --kproj: the mean query direction, then the keys' main one */
#define KBLOCK_DEFAULT 256      /* --kblock: key directions per 256 positions (bench/README.md) */

/* Activations for up to `batch` tokens processed together (prompts are run in
 * batches so that every weight row read from memory serves many tokens; the
 * first batch of a sequence is also where the cache's statistics come from). */
typedef struct {
    int batch;
    float *x;      /* (batch, dim) residual stream                            */
    float *xb;     /* (batch, max(dim, q_dim)) normed input / attention output */
    float *xb2;    /* (batch, dim)                                            */
    float *hb;     /* (batch, hidden_dim)                                     */
    float *hb2;    /* (batch, hidden_dim)                                     */
    float *q;      /* (batch, q_dim)   q_dim = n_heads*head_dim               */
    float *k;      /* (batch, kv_dim)  kv_dim = n_kv_heads*head_dim           */
    float *v;      /* (batch, kv_dim)                                         */
    float *work;   /* (tq_cache_work_floats) the cache's scratch for attention   */
    float *logits; /* (batch, vocab_size) in eval / logits mode, else (1, vocab_size) */
    tq_simd simd;  /* the codec's attention kernels: TQ_SIMD, else the best this CPU runs */
    tq_q8_input q8; /* int8 weights: a product's input (batch, n <= max(dim, q_dim, hidden_dim)), quantized or tiled */
} RunState;

typedef struct {
    Config config;
    TransformerWeights weights;
    tq_cache cache;
    RunState state;
    uint8_t *data;     /* the mmap'd file                                      */
    size_t file_size;
    struct Gpu *gpu;   /* run_cuda.cu: weights, cache and activations in GPU memory */
} Transformer;

#ifdef RUN_CUDA  /* run_cuda.cu includes this file and defines these, and its own forward() */
static void gpu_build(Transformer *t, const tq_cache_opts *o, int all_logits);
static void gpu_free(Transformer *t);
#endif

static int32_t rd_i32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
static float rd_f32(const uint8_t *p) { float v; memcpy(&v, p, 4); return v; }
static uint64_t rd_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* a*b and a+b that stick at SIZE_MAX instead of wrapping: no file is that large */
static size_t mul_sz(size_t a, size_t b) { size_t r; return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r; }
static size_t add_sz(size_t a, size_t b) { size_t r; return __builtin_add_overflow(a, b, &r) ? SIZE_MAX : r; }

/* n fp32 numbers at base + *at (base NULL: only counted); *at moves past them, sticking at
 * SIZE_MAX where a header's sizes overflow */
static float *take_f32(uint8_t *base, size_t *at, size_t n) {
    float *f = base ? (float *)(base + *at) : NULL;
    *at = add_sz(*at, mul_sz(n, sizeof(float)));
    return f;
}

/* A group of matrices, n numbers: fp32 (*f), or in an int8 file (*q) its n codes, then one
 * fp32 scale per TQ_QGROUP of them. */
static void take_matrix(uint8_t *base, size_t *at, size_t n, int int8, float **f, QMatrix *q) {
    if (!int8) { *f = take_f32(base, at, n); return; }
    q->q = base ? (int8_t *)(base + *at) : NULL;
    *at = add_sz(*at, n);
    q->s = take_f32(base, at, n / TQ_QGROUP);
}

/* The weights' layout (README.md), each group holding all layers' matrices (read_config checked
 * that every part starts 4-aligned). Points w into base (NULL: only counts) and returns the
 * section's bytes, SIZE_MAX when the header's sizes overflow. */
static size_t map_weights(TransformerWeights *w, const Config *c, uint8_t *base) {
    size_t L = (size_t)c->n_layers, dim = (size_t)c->dim, hid = (size_t)c->hidden_dim, at = 0;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t emb = mul_sz((size_t)c->vocab_size, dim);
    int q8 = c->weight_type == WEIGHTS_INT8;
    memset(w, 0, sizeof *w);
    take_matrix(base, &at, emb, q8, &w->token_embedding, &w->q_embedding);
    w->rms_att = take_f32(base, &at, L * dim);
    take_matrix(base, &at, mul_sz(L, qd * dim), q8, &w->wq, &w->q_wq);
    take_matrix(base, &at, mul_sz(L, kvd * dim), q8, &w->wk, &w->q_wk);
    take_matrix(base, &at, mul_sz(L, kvd * dim), q8, &w->wv, &w->q_wv);
    take_matrix(base, &at, mul_sz(L, dim * qd), q8, &w->wo, &w->q_wo);
    w->rms_ffn = take_f32(base, &at, L * dim);
    take_matrix(base, &at, mul_sz(L, hid * dim), q8, &w->w1, &w->q_w1);
    take_matrix(base, &at, mul_sz(L, dim * hid), q8, &w->w2, &w->q_w2);
    take_matrix(base, &at, mul_sz(L, hid * dim), q8, &w->w3, &w->q_w3);
    w->rms_final = take_f32(base, &at, dim);
    if (c->shared_classifier) { w->wcls = w->token_embedding; w->q_wcls = w->q_embedding; }
    else take_matrix(base, &at, emb, q8, &w->wcls, &w->q_wcls);
    return at;
}

/* Reads the header of a model file (h: all file_size bytes of it) into c and refuses anything
 * absurd before a single weight is touched. Returns NULL when the file is usable, else err holding
 * one line that names the problem; it never exits, so that tests/fuzz_load.c can call it on any bytes. */
static const char *read_config(Config *c, const uint8_t *h, size_t file_size, char *err, size_t errlen) {
#define BAD(...) do { snprintf(err, errlen, __VA_ARGS__); return err; } while (0)
    if (file_size < HEADER_BYTES) BAD("%zu bytes: too short for a model header (%d bytes)", file_size, HEADER_BYTES);
    if (memcmp(h, MODEL_MAGIC, 4) != 0) BAD("not a model.bin (magic is not " MODEL_MAGIC "); convert it with export.py");
    int version = rd_i32(h + 4);
    if (version != MODEL_VERSION) BAD("format version %d, this run reads version %d", version, MODEL_VERSION);
    /* the header (README.md): int32 fields from offset 8 (the first 14) and 104, floats at 64, sizes at 72 */
    int *f[] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads, &c->n_kv_heads, &c->head_dim, &c->vocab_size,
                &c->seq_len, &c->shared_classifier, &c->tokenizer_kind, &c->bos_id, &c->eos_id, &c->chat_start_id,
                &c->chat_end_id, &c->add_bos, &c->pretok, &c->weight_type, &c->group_size};
    size_t *sizes[] = {&c->tokenizer_offset, &c->tokenizer_bytes, &c->weights_offset, &c->weights_bytes};
    for (int i = 0; i < 18; i++) *f[i] = rd_i32(h + (i < 14 ? 8 + 4 * i : 104 + 4 * (i - 14)));
    for (int i = 0; i < 4; i++) *sizes[i] = rd_u64(h + 72 + 8 * i);
    c->rope_theta = rd_f32(h + 64);
    c->norm_eps = rd_f32(h + 68);

    const char *names[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "seq_len"};
    for (int i = 0; i < 8; i++)
        if (*f[i] <= 0 || *f[i] > (1 << 24)) BAD("config %s = %d is out of range [1, %d]", names[i], *f[i], 1 << 24);
    if (c->dim % c->n_heads) BAD("n_heads = %d does not divide dim = %d", c->n_heads, c->dim);
    if (c->n_heads % c->n_kv_heads) BAD("n_kv_heads = %d does not divide n_heads = %d", c->n_kv_heads, c->n_heads);
    if (c->head_dim % 2) BAD("head_dim = %d is odd; RoPE rotates pairs", c->head_dim);
    if ((long long)c->n_heads * c->head_dim > (1 << 24)) /* the forward pass indexes q in int */
        BAD("n_heads x head_dim = %lld is out of range [1, %d]", (long long)c->n_heads * c->head_dim, 1 << 24);
    if (c->shared_classifier != 0 && c->shared_classifier != 1) BAD("shared_classifier flag = %d (0 or 1)", c->shared_classifier);
    if (c->tokenizer_kind != 1 && c->tokenizer_kind != 2) BAD("unknown tokenizer kind %d", c->tokenizer_kind);
    if (c->pretok < 0 || c->pretok > 2) BAD("unknown pre-tokenizer %d", c->pretok);
    const char *id_names[] = {"bos_id", "eos_id", "chat_start_id", "chat_end_id"};
    for (int i = 0; i < 4; i++)
        if (*f[10 + i] < -1 || *f[10 + i] >= c->vocab_size)
            BAD("special token %s = %d is outside the vocabulary of %d", id_names[i], *f[10 + i], c->vocab_size);
    if (c->add_bos != 0 && c->add_bos != 1) BAD("add_bos flag = %d (0 or 1)", c->add_bos);
    if (c->add_bos && c->bos_id < 0) BAD("add_bos is set but there is no bos token (bos_id = -1)");
    if (!(c->rope_theta > 0 && isfinite(c->rope_theta))) BAD("rope_theta = %g is not a positive number", c->rope_theta);
    if (!(c->norm_eps > 0 && c->norm_eps < 1)) BAD("norm_eps = %g is not in (0, 1)", c->norm_eps);
    int int8 = c->weight_type == WEIGHTS_INT8;
    if (!int8 && c->weight_type != WEIGHTS_FP32) BAD("unknown weight type %d (0 fp32, 1 int8)", c->weight_type);
    if (!int8 && c->group_size != 0) BAD("fp32 weights with a group size of %d (must be 0)", c->group_size);
    if (int8 && c->group_size != TQ_QGROUP) BAD("int8 weights in groups of %d; this run reads groups of %d", c->group_size, TQ_QGROUP);
    const char *rows[] = {"dim", "n_heads x head_dim", "hidden_dim"};   /* the rows an int8 group must not straddle */
    long long len[] = {c->dim, (long long)c->n_heads * c->head_dim, c->hidden_dim};
    for (int i = 0; int8 && i < 3; i++)
        if (len[i] % TQ_QGROUP) BAD("int8 weights: %s = %lld is not a multiple of the group size %d", rows[i], len[i], TQ_QGROUP);
    if (c->tokenizer_offset != HEADER_BYTES) BAD("tokenizer offset %zu is not %d", c->tokenizer_offset, HEADER_BYTES);
    if (c->tokenizer_bytes > file_size || c->weights_offset > file_size || c->weights_offset % 64 ||
        c->tokenizer_offset + c->tokenizer_bytes > c->weights_offset)
        BAD("tokenizer section [%zu, +%zu) or weights offset %zu is out of bounds (file of %zu bytes)",
            c->tokenizer_offset, c->tokenizer_bytes, c->weights_offset, file_size);
    TransformerWeights none;
    size_t need = map_weights(&none, c, NULL);
    if (need == SIZE_MAX) BAD("the config's weights overflow 64 bits");
    if (c->weights_bytes != need) BAD("header says %zu weight bytes, the config needs %zu", c->weights_bytes, need);
    if (file_size - c->weights_offset < need)
        BAD("truncated: %zu bytes, the weights need %zu from offset %zu", file_size, need, c->weights_offset);
    if (file_size - c->weights_offset > need)
        BAD("%zu bytes past the end of the weights: the header does not describe this file", file_size - c->weights_offset - need);
    return NULL;
#undef BAD
}

static void load_model(Transformer *t, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s is not a regular file", path);
    t->file_size = (size_t)st.st_size;
    if (t->file_size < HEADER_BYTES) die("%s is %zu bytes: too short for a model header (%d bytes)", path, t->file_size, HEADER_BYTES);
    t->data = (uint8_t *)mmap(NULL, t->file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (t->data == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    char err[256];
    if (read_config(&t->config, t->data, t->file_size, err, sizeof err)) die("%s: %s", path, err);
    map_weights(&t->weights, &t->config, t->data + t->config.weights_offset);
}

/* ---------------------------------------------------------------------------
 * The cache and the activations. The KV cache is tq.h's tq_cache: tq_cache_build lays it out
 * (head-major: one head's codes contiguous) and counts it; the forward pass hands each layer's
 * batch to tq_cache_attention, which encodes its keys and values and attends over the cache. */

/* Allocates (alloc 1) or only counts (alloc 0: NULL) the activations of `batch` tokens, zeroed;
 * returns their bytes, so that build_transformer can count them before allocating anything. */
static double build_state(RunState *s, const Config *c, const tq_cache *kv, int batch, int all_logits, int alloc) {
    size_t B = (size_t)batch, qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t wide = qd > (size_t)c->dim ? qd : (size_t)c->dim, F = sizeof(float);
    double bytes = 0;
#define TAKE(n, what) (bytes += (double)(n) * F, alloc ? (float *)xcalloc((n), F, what) : NULL)
    memset(s, 0, sizeof *s);
    s->batch = batch;
    s->x = TAKE(B * c->dim, "activations");
    s->xb = TAKE(B * wide, "activations");
    s->xb2 = TAKE(B * c->dim, "activations");
    s->hb = TAKE(B * c->hidden_dim, "activations");
    s->hb2 = TAKE(B * c->hidden_dim, "activations");
    s->q = TAKE(B * qd, "activations");
    s->k = TAKE(B * kvd, "activations");
    s->v = TAKE(B * kvd, "activations");
    s->work = TAKE(tq_cache_work_floats(kv, c->n_heads / c->n_kv_heads, batch), "attention");
    s->logits = TAKE((all_logits ? B : 1) * c->vocab_size, "logits");
#undef TAKE
    if (c->weight_type == WEIGHTS_INT8) {   /* the longest input of a product: dim, q_dim (wo) or hidden_dim (w2) */
        double q8 = tq_q8_input_build(&s->q8, batch, (int)(wide > (size_t)c->hidden_dim ? wide : (size_t)c->hidden_dim), alloc);
        if (q8 < 0) die("out of memory: the quantized activations");
        bytes += q8;
    }
    return bytes;
}

/* qinput and simd: RunState's (int8 weights: quantize each product's input; the attention kernels) */
static void build_transformer(Transformer *t, const char *path, const tq_cache_opts *o, int ctx, int batch, int all_logits,
                              int qinput, tq_simd simd) {
    load_model(t, path);
    const Config *c = &t->config;
    int asked = ctx > 0;
    if (!asked) ctx = c->seq_len;
    if (ctx > c->seq_len) die("-c %d exceeds the model's context of %d tokens", ctx, c->seq_len);
    char err[160];
    if (tq_cache_check(o, c->head_dim, err, sizeof err)) die("%s", err);
    /* Linux overcommits, so calloc would succeed and the process die later: count what the cache
     * and the activations take and compare with the physical memory first (the weights are
     * mmap'd and not counted) */
    double cache = tq_cache_build(&t->cache, o, c->n_layers, c->n_kv_heads, c->head_dim, ctx, 0);
    if (cache < 0) die("out of memory setting up the formats %s:%s", tq_fmt_name(o->key_fmt), tq_fmt_name(o->value_fmt));
    double need = cache + build_state(&t->state, c, &t->cache, batch, all_logits, 0);
    tq_cache_free(&t->cache);
    double phys = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (phys > 0 && need > phys)
        die("%s%d tokens need %.0f bytes (%.1f GiB) of KV cache and activations, more than the %.1f GiB "
            "of memory here: give a smaller -c", asked ? "-c " : "the model's context of ", ctx,
            need, need / 1073741824.0, phys / 1073741824.0);
    if (tq_cache_build(&t->cache, o, c->n_layers, c->n_kv_heads, c->head_dim, ctx, 1) < 0)
        die("out of memory: the KV cache needs %.1f MiB", cache / 1048576.0);
    build_state(&t->state, c, &t->cache, batch, all_logits, 1);
    t->state.q8.qinput = qinput;
    t->state.simd = simd;
#ifdef RUN_CUDA
    gpu_build(t, o, all_logits);
#endif
}

static void free_transformer(Transformer *t) {
#ifdef RUN_CUDA
    gpu_free(t);
#endif
    RunState *s = &t->state;
    float *p[] = {s->x, s->xb, s->xb2, s->hb, s->hb2, s->q, s->k, s->v, s->work, s->logits};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++) free(p[i]);
    tq_q8_input_free(&s->q8);
    tq_cache_free(&t->cache);
    munmap(t->data, t->file_size);
}

/* ---------------------------------------------------------------------------
 * The forward pass */

/* RMSNorm of each of the B rows of x (B, n) into o (B, n): o = w * x / sqrt(mean(x^2) + eps) */
static void rmsnorm(float *o, const float *x, const float *w, int B, int n, float eps) {
    for (int b = 0; b < B; b++, o += n, x += n) {
        double ss = 0;
        for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
        float r = (float)(1.0 / sqrt(ss / n + eps));
        for (int i = 0; i < n; i++) o[i] = w[i] * (r * x[i]);
    }
}

#ifndef RUN_CUDA   /* run_cuda.cu multiplies with cuBLAS */
/* One matrix of a product: out (B, d) = x . W^T, W the (d, n) matrix `at` numbers into a
 * weight group held as fp32 (f) or, in an int8 file, as q. */
typedef struct {
    float *out;              /* (B, d) */
    const float *f;          /* fp32 weight group, or NULL in an int8 file */
    const QMatrix *q;        /* int8 weight group */
    size_t at;               /* offset of W (d, n) in its group, in numbers */
    int d;                   /* rows of W */
} Product;

/* The np (<= 3) products of one input x (B, n), such as a layer's Wq, Wk and Wv, in one
 * parallel loop over all their blocks of rows: the threads stream the weights of every
 * matrix without a barrier between them. */
static void linear(RunState *s, const float *x, int B, int n, const Product *p, int np) {
    int step = p[0].f ? TQ_F32_BLOCK : TQ_Q8_BLOCK, first[4] = {0}, j;   /* first[k]: product k's first block */
    if (!p[0].f) tq_q8_prepare(&s->q8, x, B, n);
    for (int k = 0; k < np; k++) first[k + 1] = first[k] + (p[k].d + step - 1) / step;
#pragma omp parallel for schedule(static)
    for (j = 0; j < first[np]; j++) {
        int k = 0;
        while (j >= first[k + 1]) k++;
        const Product *m = &p[k];
        int i = (j - first[k]) * step;
        if (m->f) tq_f32_rows(m->out, x, m->f + m->at, B, n, m->d, i);
        else tq_q8_rows(&s->q8, m->out, x, m->q->q + m->at, m->q->s + m->at / TQ_QGROUP, B, n, m->d, i);
    }
}

/* x (dim) = the embedding of token; int8 files dequantize its row */
static void embed(float *x, const TransformerWeights *w, int token, int dim) {
    size_t at = (size_t)token * dim;
    for (int j = 0; j < dim; j++)
        x[j] = w->token_embedding ? w->token_embedding[at + j] : w->q_embedding.q[at + j] * w->q_embedding.s[(at + j) / TQ_QGROUP];
}
#endif

/* RoPE (interleaved pairs, the layout of model.bin): (v[2i], v[2i+1]) is rotated by the angle
 * pos * theta^(-2i/head_dim). Here on token b's key head g and the query heads of its group, at
 * position pos + b (they share every angle): q (batch, n_heads*head_dim), k (batch, n_kv_heads*head_dim). */
static void rope_group(const Config *c, float *q, float *k, int b, int g, int pos) {
    int hd = c->head_dim, group = c->n_heads / c->n_kv_heads;
    float *kh = k + ((size_t)b * c->n_kv_heads + g) * hd, *qh = q + ((size_t)b * c->n_heads + (size_t)g * group) * hd;
    for (int i = 0; i < hd; i += 2) {
        double ang = (pos + b) * pow(c->rope_theta, -(double)i / hd);
        float cs = (float)cos(ang), sn = (float)sin(ang);
        for (int h = -1; h < group; h++) {   /* the key head, then the query heads */
            float *v = (h < 0 ? kh : qh + (size_t)h * hd) + i, x = v[0], y = v[1];
            v[0] = x * cs - y * sn;
            v[1] = x * sn + y * cs;
        }
    }
}

static void softmax(float *x, int n) {
    float mx = x[0];
    for (int i = 1; i < n; i++) if (x[i] > mx) mx = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* Runs n tokens (n <= batch) at positions pos..pos+n-1, storing their keys and
 * values in the cache. Returns the logits: of the last token (vocab_size), or
 * of all n tokens (n, vocab_size) when all_logits is set. (run_cuda.cu has its own.) */
static float *forward(Transformer *t, const int *tokens, int n, int pos, int all_logits);
#ifndef RUN_CUDA
static float *forward(Transformer *t, const int *tokens, int n, int pos, int all_logits) {
    Config *c = &t->config;
    TransformerWeights *w = &t->weights;
    RunState *s = &t->state;
    int dim = c->dim, hd = c->head_dim, hid = c->hidden_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;

    for (int b = 0; b < n; b++) embed(s->x + (size_t)b * dim, w, tokens[b], dim);

    for (int l = 0; l < c->n_layers; l++) {
        /* attention block: x += Wo . attn(RoPE(Wq xn), RoPE(Wk xn), Wv xn) */
        rmsnorm(s->xb, s->x, w->rms_att + (size_t)l * dim, n, dim, c->norm_eps);
        Product qkv[] = {{s->q, w->wq, &w->q_wq, (size_t)l * qd * dim, qd}, {s->k, w->wk, &w->q_wk, (size_t)l * kvd * dim, kvd},
                         {s->v, w->wv, &w->q_wv, (size_t)l * kvd * dim, kvd}};
        linear(s, s->xb, n, dim, qkv, 3);
#pragma omp parallel for schedule(static)
        for (int i = 0; i < n * c->n_kv_heads; i++) rope_group(c, s->q, s->k, i / c->n_kv_heads, i % c->n_kv_heads, pos);
        /* the cache: k and v are encoded into it, then token b attends to positions 0..pos+b */
        tq_cache_batch batch = {l, n, pos, c->n_heads / c->n_kv_heads, s->q, s->k, s->v, s->xb, s->work};
        if (tq_cache_attention(&t->cache, s->simd, &batch)) die("out of memory: key directions");
        linear(s, s->xb, n, qd, &(Product){s->xb2, w->wo, &w->q_wo, (size_t)l * dim * qd, dim}, 1);
        for (size_t j = 0; j < (size_t)n * dim; j++) s->x[j] += s->xb2[j];

        /* feed-forward block: x += W2 . (silu(W1 xn) * W3 xn)   (SwiGLU) */
        rmsnorm(s->xb, s->x, w->rms_ffn + (size_t)l * dim, n, dim, c->norm_eps);
        Product up[] = {{s->hb, w->w1, &w->q_w1, (size_t)l * hid * dim, hid}, {s->hb2, w->w3, &w->q_w3, (size_t)l * hid * dim, hid}};
        linear(s, s->xb, n, dim, up, 2);
        for (size_t j = 0; j < (size_t)n * hid; j++) s->hb[j] = s->hb[j] / (1.0f + expf(-s->hb[j])) * s->hb2[j];
        linear(s, s->hb, n, hid, &(Product){s->xb2, w->w2, &w->q_w2, (size_t)l * dim * hid, dim}, 1);
        for (size_t j = 0; j < (size_t)n * dim; j++) s->x[j] += s->xb2[j];
    }

    /* final norm and classifier, for the tokens whose logits are wanted */
    int first = all_logits ? 0 : n - 1;
    rmsnorm(s->x + (size_t)first * dim, s->x + (size_t)first * dim, w->rms_final, n - first, dim, c->norm_eps);
    linear(s, s->x + (size_t)first * dim, n - first, dim, &(Product){s->logits, w->wcls, &w->q_wcls, 0, c->vocab_size}, 1);
    return s->logits;
}
#endif

/* ---------------------------------------------------------------------------
 * The Tokenizer: text <-> token ids, read from the tokenizer section of model.bin.
 * Two kinds: SentencePiece (llama2.c's algorithm: per-character lookup, then greedy merges
 * by the score of the merged token) and GPT-2 byte-level BPE (special tokens split out,
 * a hand-coded pre-tokenizer regex, then merges by rank inside each piece).
 * The token bytes are not copied: they point into the mmap'd file. */

typedef struct { int left, right, result, rank; } MergeSlot; /* a merge rule (left = -1: empty slot) */
typedef struct { uint32_t lo, hi; int cls; } CodeRange; /* code points lo..hi have class cls */

enum { CLS_OTHER = 0, CLS_LETTER = 1, CLS_NUMBER = 2, CLS_SPACE = 3 };

typedef struct {
    int kind;                      /* 1 SentencePiece, 2 GPT-2 byte-level BPE */
    int pretok;                    /* 0 none, 1 smollm (each \p{N} alone, then the GPT-2 regex), 2 GPT-2 regex */
    int vocab_size;
    int max_token_len;             /* longest token in bytes (measured, not trusted from the file) */
    const unsigned char **vocab;   /* (vocab_size) each token's bytes, pointing into the mmap'd section */
    int *vocab_len;                /* (vocab_size) each token's byte count */
    float *scores;                 /* (vocab_size) SentencePiece merge scores (higher merges first) */
    int *byte_val;                 /* (vocab_size) SentencePiece: 0..255 for "<0xXX>" tokens, else -1 */
    int *vocab_hash;               /* (hash_size) open addressing: id+1 of a non-special token, 0 = empty */
    int hash_size;                 /* power of two */
    MergeSlot *merges;             /* (merge_size) hash table of the GPT-2 merges, keyed by (left, right) */
    int merge_size;                /* power of two (0 when there are no merges) */
    CodeRange *ranges;             /* (n_ranges) Unicode classes for the pre-tokenizer, sorted by lo */
    int n_ranges;
    int *special;                  /* (n_special) ids of special tokens (flags bit 0), matched in raw text */
    int n_special;
    int byte_id[256];              /* GPT-2: the single-byte token of each byte; SentencePiece: <0xXX>, or -1 */
    unsigned char byte_pieces[256]; /* byte_pieces[b] == b: what decode returns for <0xXX> */
    unsigned char *cat;            /* (2 * max_token_len + 1) concat_lookup's scratch (so encode is not reentrant) */
} Tokenizer;

/* The unread part of the tokenizer section; cur_read takes its next 4 bytes into *v (an int, uint32
 * or float: little-endian, the host's order, as the mmap'd weights assume), -1 at its end. */
typedef struct { const unsigned char *p; size_t left; } Cursor;
static int cur_read(Cursor *c, void *v) {
    if (c->left < 4) return -1;
    memcpy(v, c->p, 4); c->p += 4; c->left -= 4;
    return 0;
}

static uint32_t hash_bytes(const unsigned char *s, size_t n) { /* FNV-1a */
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) { h ^= s[i]; h *= 16777619u; }
    return h;
}
static uint32_t hash_pair(int a, int b) {
    uint32_t h = (uint32_t)a * 0x9E3779B1u ^ (uint32_t)b * 0x85EBCA77u;
    return h ^ (h >> 15);
}

/* the slot of t->vocab_hash that holds the non-special token with exactly these bytes, else the
 * empty slot where it would go (linear probing) */
static uint32_t vocab_slot(const Tokenizer *t, const unsigned char *s, size_t n) {
    uint32_t mask = (uint32_t)t->hash_size - 1, h = hash_bytes(s, n) & mask;
    for (int id; (id = t->vocab_hash[h] - 1) >= 0; h = (h + 1) & mask)
        if ((size_t)t->vocab_len[id] == n && memcmp(t->vocab[id], s, n) == 0) break;
    return h;
}

/* id of the non-special token with exactly these bytes, or -1 */
static int vocab_lookup(const Tokenizer *t, const unsigned char *s, size_t n) {
    return t->vocab_hash[vocab_slot(t, s, n)] - 1;
}

/* the token whose bytes are a's then b's, or -1 */
static int concat_lookup(const Tokenizer *t, int a, int b) {
    memcpy(t->cat, t->vocab[a], (size_t)t->vocab_len[a]);
    memcpy(t->cat + t->vocab_len[a], t->vocab[b], (size_t)t->vocab_len[b]);
    return vocab_lookup(t, t->cat, (size_t)t->vocab_len[a] + (size_t)t->vocab_len[b]);
}

/* the slot of t->merges that holds the rule (a, b), else the empty slot where it would go;
 * -1 when there are no merges */
static int merge_slot(const Tokenizer *t, int a, int b) {
    if (t->merge_size == 0) return -1;
    uint32_t mask = (uint32_t)t->merge_size - 1, h = hash_pair(a, b) & mask;
    while (t->merges[h].left >= 0 && (t->merges[h].left != a || t->merges[h].right != b)) h = (h + 1) & mask;
    return (int)h;
}

/* length of the valid UTF-8 character at s (n bytes available) with its code point, or 0
 * when invalid: overlong forms, surrogates and values past U+10FFFF are invalid too */
static int utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    int len; uint32_t v, min;
    if (s[0] < 0x80) { *cp = s[0]; return 1; }
    else if ((s[0] & 0xE0) == 0xC0) { len = 2; v = s[0] & 0x1F; min = 0x80; }
    else if ((s[0] & 0xF0) == 0xE0) { len = 3; v = s[0] & 0x0F; min = 0x800; }
    else if ((s[0] & 0xF8) == 0xF0) { len = 4; v = s[0] & 0x07; min = 0x10000; }
    else return 0;
    if ((size_t)len > n) return 0;
    for (int k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        v = v << 6 | (s[k] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
    *cp = v;
    return len;
}

/* 1 if the n bytes at s are whole, valid UTF-8 characters */
static int is_utf8(const unsigned char *s, size_t n) {
    uint32_t cp;
    for (size_t i = 0, l; i < n; i += l)
        if ((l = (size_t)utf8_decode(s + i, n - i, &cp)) == 0) return 0;
    return 1;
}

/* the Unicode class of code point cp: a binary search for the last range with lo <= cp */
static int code_class(const Tokenizer *t, uint32_t cp) {
    int lo = 0, hi = t->n_ranges - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (t->ranges[mid].lo <= cp) lo = mid + 1; else hi = mid - 1;
    }
    return (hi >= 0 && cp <= t->ranges[hi].hi) ? t->ranges[hi].cls : CLS_OTHER;
}

static int pow2_at_least(int n) { int p = 1; while (p < n) p *= 2; return p; }
static int hex_val(unsigned char ch) {
    return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

void free_tokenizer(Tokenizer *t) {
    free(t->vocab); free(t->vocab_len); free(t->scores); free(t->byte_val); free(t->vocab_hash);
    free(t->merges); free(t->ranges); free(t->special); free(t->cat);
    memset(t, 0, sizeof(*t));
}

/* Reads the tokenizer section (data, size bytes) of a file whose header read_config accepted
 * (vocab_size, kind and pretok from it). Returns 0, or -1 with err holding one line (never exits). */
int build_tokenizer(Tokenizer *t, const unsigned char *data, size_t size, int vocab_size,
                    int kind, int pretok, char *err, size_t errlen) {
    memset(t, 0, sizeof(*t));
    Cursor c = { data, size };
    int n, n_merges, n_ranges, file_max_len; /* our own max_token_len is measured below */
    #define TOK_FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); free_tokenizer(t); return -1; } while (0)
    if (cur_read(&c, &n) || cur_read(&c, &file_max_len)) TOK_FAIL("tokenizer section truncated in its header");
    if (n <= 0 || n != vocab_size || n > (1 << 28))
        TOK_FAIL("tokenizer has %d tokens, the header says vocab_size %d", n, vocab_size);
    t->kind = kind; t->pretok = pretok; t->vocab_size = n;
    t->vocab = (const unsigned char **)malloc((size_t)n * sizeof(*t->vocab));
    t->vocab_len = (int *)malloc((size_t)n * sizeof(int));
    t->scores = (float *)malloc((size_t)n * sizeof(float));
    t->byte_val = (int *)malloc((size_t)n * sizeof(int));
    t->hash_size = pow2_at_least(2 * n);
    t->vocab_hash = (int *)calloc((size_t)t->hash_size, sizeof(int));
    t->special = (int *)malloc((size_t)n * sizeof(int));
    if (!t->vocab || !t->vocab_len || !t->scores || !t->byte_val || !t->vocab_hash || !t->special)
        TOK_FAIL("out of memory for the tokenizer");
    for (int b = 0; b < 256; b++) { t->byte_id[b] = -1; t->byte_pieces[b] = (unsigned char)b; }

    /* the vocabulary: { float32 score; int32 flags; int32 len; bytes[len] } */
    for (int i = 0; i < n; i++) {
        int flags, len;
        if (cur_read(&c, &t->scores[i]) || cur_read(&c, &flags) || cur_read(&c, &len))
            TOK_FAIL("tokenizer section truncated at token %d", i);
        if (len < 0 || (size_t)len > c.left) TOK_FAIL("token %d has a bad length %d", i, len);
        const unsigned char *p = t->vocab[i] = c.p;
        t->vocab_len[i] = len;
        c.p += len; c.left -= (size_t)len;
        if (len > t->max_token_len) t->max_token_len = len;
        /* SentencePiece byte tokens are the text "<0xXX>"; decode turns them into the raw byte */
        t->byte_val[i] = -1;
        if (kind == 1 && len == 6 && memcmp(p, "<0x", 3) == 0 && p[5] == '>' && hex_val(p[3]) >= 0 && hex_val(p[4]) >= 0) {
            int v = t->byte_val[i] = hex_val(p[3]) * 16 + hex_val(p[4]);
            if (t->byte_id[v] < 0) t->byte_id[v] = i;
        }
        if (flags & 1) {
            /* special tokens are matched in the raw text only; BPE never produces them. GPT-2 kind: one that
             * is not whole UTF-8 characters could match inside a character, leaving a stray continuation byte */
            if (kind == 2 && !is_utf8(p, (size_t)len)) TOK_FAIL("special token %d is not valid UTF-8", i);
            if (len > 0) t->special[t->n_special++] = i;
            continue;
        }
        if (kind == 2 && len == 1 && t->byte_id[p[0]] < 0) t->byte_id[p[0]] = i;
        uint32_t h = vocab_slot(t, p, (size_t)len);
        if (!t->vocab_hash[h]) t->vocab_hash[h] = i + 1;   /* a duplicate keeps the lowest id */
    }

    /* merges: { int32 left; int32 right }, rank = position; the result is the token whose
     * bytes are left's + right's, found once here so that encode needs one hash probe per pair */
    if (cur_read(&c, &n_merges) || n_merges < 0 || n_merges > (1 << 28) || (size_t)n_merges > c.left / 8)
        TOK_FAIL("tokenizer section: bad or truncated merges list");
    t->merge_size = n_merges > 0 ? pow2_at_least(2 * n_merges) : 0;
    t->merges = (MergeSlot *)malloc((size_t)t->merge_size * sizeof(MergeSlot) + 1);
    t->cat = (unsigned char *)malloc(2 * (size_t)t->max_token_len + 1);
    if (!t->merges || !t->cat) TOK_FAIL("out of memory for the merges");
    for (int s = 0; s < t->merge_size; s++) t->merges[s].left = -1;
    for (int r = 0; r < n_merges; r++) {
        int a = -1, b = -1;
        cur_read(&c, &a); cur_read(&c, &b); /* cannot fail: the size was checked above */
        if (a < 0 || a >= n || b < 0 || b >= n) TOK_FAIL("merge %d refers to a token out of range", r);
        /* a merge into a token that is not in the vocabulary never applies; a repeated rule
         * keeps its first (lowest) rank */
        int res = concat_lookup(t, a, b), h = merge_slot(t, a, b);
        if (res >= 0 && t->merges[h].left < 0) t->merges[h] = (MergeSlot){ a, b, res, r };
    }

    /* Unicode classes: { uint32 lo; uint32 hi; int32 cls }, sorted, not overlapping */
    if (cur_read(&c, &n_ranges) || n_ranges < 0 || (size_t)n_ranges > c.left / 12)
        TOK_FAIL("tokenizer section: bad or truncated Unicode ranges");
    t->ranges = (CodeRange *)malloc((size_t)n_ranges * sizeof(CodeRange) + 1);
    if (!t->ranges) TOK_FAIL("out of memory for the Unicode ranges");
    t->n_ranges = n_ranges;
    for (int i = 0; i < n_ranges; i++) {
        CodeRange *r = &t->ranges[i];
        cur_read(&c, &r->lo); cur_read(&c, &r->hi); cur_read(&c, &r->cls);
        if (r->lo > r->hi || r->hi > 0x10FFFF || r->cls < 0 || r->cls > 3 || (i > 0 && r->lo <= r[-1].hi))
            TOK_FAIL("Unicode range %d is malformed or out of order", i);
    }
    #undef TOK_FAIL
    return 0;
}

/* ---------------------------------------------------------------------------
 * BPE merging, shared by both kinds. The symbols of one piece form a linked list; a binary
 * heap holds every adjacent pair that could merge, keyed by (priority, position): GPT-2
 * priority = merge rank, SentencePiece priority = -score of the merged token; lower first,
 * the leftmost pair on ties. Pairs whose symbols changed since they were pushed are skipped
 * when popped. This is the same result as llama2.c's "merge the best pair, rescan" loop,
 * in O(n log n) instead of O(n^2), so that a long piece (a run of spaces) stays cheap. */

typedef struct { float key; int pos; } HeapItem;
typedef struct {
    int *tok, *prev, *next;        /* (text bytes + 2) per symbol: token id (-1: merged away), list links */
    HeapItem *heap;                /* (3 * (text bytes + 2)) pairs: n-1 at first, at most 2 more per merge */
    int n_heap;
    int *out; int n_out, max_out;  /* the caller's token array */
    int full;                      /* set once max_out would be exceeded */
} Encoder;

static void emit(Encoder *e, int id) {
    if (e->n_out < e->max_out) e->out[e->n_out++] = id;
    else e->full = 1;
}

static int heap_less(HeapItem a, HeapItem b) { return a.key < b.key || (a.key == b.key && a.pos < b.pos); }

static void heap_push(Encoder *e, float key, int pos) {
    int i = e->n_heap++;
    HeapItem it = { key, pos };
    while (i > 0 && heap_less(it, e->heap[(i - 1) / 2])) { e->heap[i] = e->heap[(i - 1) / 2]; i = (i - 1) / 2; }
    e->heap[i] = it;
}

static HeapItem heap_pop(Encoder *e) {
    HeapItem top = e->heap[0], last = e->heap[--e->n_heap];
    int i = 0;
    for (int k = 1; k < e->n_heap; i = k, k = 2 * i + 1) {   /* the last item sifted down from the root */
        if (k + 1 < e->n_heap && heap_less(e->heap[k + 1], e->heap[k])) k++;
        if (!heap_less(e->heap[k], last)) break;
        e->heap[i] = e->heap[k];
    }
    if (e->n_heap > 0) e->heap[i] = last;
    return top;
}

/* can tokens a and b merge? Returns 1 with the merged token and its priority */
static int pair_merge(const Tokenizer *t, int a, int b, int *res, float *key) {
    if (t->kind == 2) {
        int s = merge_slot(t, a, b);
        if (s < 0 || t->merges[s].left < 0) return 0;
        *res = t->merges[s].result; *key = (float)t->merges[s].rank;
        return 1;
    }
    int id = concat_lookup(t, a, b);
    if (id < 0) return 0;
    *res = id; *key = -t->scores[id];
    return 1;
}

static void push_pair(const Tokenizer *t, Encoder *e, int i) {
    int res; float key;
    if (i >= 0 && e->next[i] >= 0 && pair_merge(t, e->tok[i], e->tok[e->next[i]], &res, &key))
        heap_push(e, key, i);
}

/* merge the n symbols in e->tok, then append the result to the output */
static void bpe_merge(const Tokenizer *t, Encoder *e, int n) {
    e->n_heap = 0;
    for (int i = 0; i < n; i++) { e->prev[i] = i - 1; e->next[i] = i + 1 < n ? i + 1 : -1; }
    for (int i = 0; i + 1 < n; i++) push_pair(t, e, i);
    while (e->n_heap > 0) {
        HeapItem it = heap_pop(e);
        int i = it.pos, j = e->next[i], res; float key;
        /* stale entry: i was merged away, or i's pair changed since it was pushed */
        if (e->tok[i] < 0 || j < 0 || !pair_merge(t, e->tok[i], e->tok[j], &res, &key) || key != it.key) continue;
        e->tok[i] = res; e->tok[j] = -1;
        e->next[i] = e->next[j];
        if (e->next[j] >= 0) e->prev[e->next[j]] = i;
        push_pair(t, e, e->prev[i]);
        push_pair(t, e, i);
    }
    for (int i = 0; i >= 0 && n > 0; i = e->next[i]) emit(e, e->tok[i]);
}

/* ---------------------------------------------------------------------------
 * GPT-2: pre-tokenizer and byte-level BPE */

/* byte-level BPE of one pre-tokenized piece: start from one token per byte */
static void bpe_piece(const Tokenizer *t, Encoder *e, const unsigned char *s, size_t n) {
    int m = 0;
    /* a byte without a token is dropped, as Hugging Face's BPE without an unk token does
     * (SmolLM2 has none for a few control bytes and for bytes that UTF-8 never uses) */
    for (size_t i = 0; i < n; i++) if (t->byte_id[s[i]] >= 0) e->tok[m++] = t->byte_id[s[i]];
    bpe_merge(t, e, m);
}

/* the end of the run of code points of class cls that starts at s[j] (text s[0..n)); *last:
 * where the run's last code point starts (unchanged for an empty run) */
static size_t class_run(const Tokenizer *t, const unsigned char *s, size_t j, size_t n, int cls, size_t *last) {
    uint32_t c;
    while (j < n) {
        size_t l = (size_t)utf8_decode(s + j, n - j, &c);
        if (code_class(t, c) != cls) break;
        *last = j;
        j += l;
    }
    return j;
}

/* end of the GPT-2 regex match that starts at s[i], within s[0..n):
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * alternatives are tried in this order, as the regex engine does */
static size_t gpt2_match(const Tokenizer *t, const unsigned char *s, size_t i, size_t n) {
    uint32_t c, c2;
    size_t j = i + (size_t)utf8_decode(s + i, n - i, &c), last = i; /* the text was validated before */
    if (c == '\'' && j < n) { /* contractions, case-sensitive ("I'LL" is not one) */
        unsigned char a = s[j], b = j + 1 < n ? s[j + 1] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return j + 1;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return j + 2;
    }
    int k = code_class(t, c);
    if (c == ' ' && j < n) { /* an optional leading ' ', then a run of one class */
        size_t j2 = j + (size_t)utf8_decode(s + j, n - j, &c2);
        int k2 = code_class(t, c2);
        if (k2 != CLS_SPACE) { k = k2; j = j2; }
    }
    if (k != CLS_SPACE) return class_run(t, s, j, n, k, &last); /* " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+" */
    /* "\s+(?!\S)|\s+": a run of blanks that is followed by a non-blank gives up its last
     * blank, which then prefixes the next word (" word"); a single blank stands alone */
    j = class_run(t, s, j, n, CLS_SPACE, &last);
    return (j == n || last == i) ? j : last;
}

static void gpt2_regex_pieces(const Tokenizer *t, Encoder *e, const unsigned char *s, size_t n) {
    for (size_t i = 0, end; i < n && !e->full; i = end) {
        end = gpt2_match(t, s, i, n);
        bpe_piece(t, e, s + i, end - i);
    }
}

/* one stretch of text without special tokens, GPT-2 kind */
static void encode_gpt2(const Tokenizer *t, Encoder *e, const unsigned char *s, size_t n) {
    if (t->pretok == 0) { bpe_piece(t, e, s, n); return; }
    if (t->pretok == 2) { gpt2_regex_pieces(t, e, s, n); return; }
    /* smollm: every \p{N} code point is a piece of its own (HF Digits(individual_digits)),
     * and the regex runs on the stretches between them (its lookahead stops at their ends) */
    size_t start = 0;
    for (size_t i = 0; i < n;) {
        uint32_t c;
        size_t l = (size_t)utf8_decode(s + i, n - i, &c);
        if (code_class(t, c) == CLS_NUMBER) {
            gpt2_regex_pieces(t, e, s + start, i - start);
            bpe_piece(t, e, s + i, l);
            start = i + l;
        }
        i += l;
    }
    gpt2_regex_pieces(t, e, s + start, n - start);
}

/* ---------------------------------------------------------------------------
 * SentencePiece, as llama2.c: a dummy " " in front, each UTF-8 character its own token if it
 * is in the vocabulary, else its bytes as <0xXX> tokens; then greedy merges by score */

static void encode_sp(const Tokenizer *t, Encoder *e, const unsigned char *s, size_t n, int dummy_prefix) {
    int m = 0;
    if (dummy_prefix) {
        int id = vocab_lookup(t, (const unsigned char *)" ", 1);
        if (id < 0) id = t->byte_id[' '];
        if (id >= 0) e->tok[m++] = id;
    }
    for (size_t i = 0; i < n;) {
        size_t l = 1; /* a lead byte and up to 3 continuation bytes, as llama2.c groups them */
        while (l < 4 && i + l < n && (s[i + l] & 0xC0) == 0x80) l++;
        int id = vocab_lookup(t, s + i, l);
        if (id >= 0) e->tok[m++] = id;
        else for (size_t k = 0; k < l; k++) /* byte fallback; a byte with no <0xXX> token is dropped */
            if (t->byte_id[s[i + k]] >= 0) e->tok[m++] = t->byte_id[s[i + k]];
        i += l;
    }
    bpe_merge(t, e, m);
}

/* the longest special token that starts at s (n bytes left), or -1 */
static int match_special(const Tokenizer *t, const unsigned char *s, size_t n) {
    int best = -1;
    for (int k = 0; k < t->n_special; k++) {
        int id = t->special[k];
        size_t l = (size_t)t->vocab_len[id];
        if (l <= n && memcmp(s, t->vocab[id], l) == 0 && (best < 0 || l > (size_t)t->vocab_len[best])) best = id;
    }
    return best;
}

/* Returns the number of tokens, -1: invalid UTF-8 (GPT-2 kind), -2: more than max_tokens,
 * -3: out of memory */
int encode(const Tokenizer *t, const char *text, size_t len, int bos_id, int *tokens, int max_tokens) {
    const unsigned char *s = (const unsigned char *)text;
    /* byte-level BPE would encode any bytes, but the pre-tokenizer needs characters */
    if (t->kind == 2 && !is_utf8(s, len)) return -1;
    if (len > (size_t)INT32_MAX / 3 - 2) return -3;
    size_t cap = len + 2;   /* symbols of a piece at most: its bytes, and SentencePiece's dummy " " */
    Encoder e = {.tok = (int *)malloc(cap * sizeof(int)), .prev = (int *)malloc(cap * sizeof(int)),
                 .next = (int *)malloc(cap * sizeof(int)), .heap = (HeapItem *)malloc(3 * cap * sizeof(HeapItem)), .n_heap = 0,
                 .out = tokens, .n_out = 0, .max_out = max_tokens < 0 ? 0 : max_tokens, .full = 0};
    int ok = e.tok && e.prev && e.next && e.heap;
    if (ok && bos_id >= 0) emit(&e, bos_id);
    /* split out special tokens (leftmost, then longest); the stretches between are plain text */
    size_t seg = 0;
    for (size_t i = 0; ok && i <= len && !e.full;) {
        int sp = i < len ? match_special(t, s + i, len - i) : -1;
        if (sp < 0 && i < len) { i++; continue; }
        if (i > seg && t->kind == 2) encode_gpt2(t, &e, s + seg, i - seg);
        else if (i > seg) encode_sp(t, &e, s + seg, i - seg, seg == 0);
        if (sp < 0) break;
        emit(&e, sp);
        i += (size_t)t->vocab_len[sp];
        seg = i;
    }
    free(e.tok); free(e.prev); free(e.next); free(e.heap);
    return !ok ? -3 : e.full ? -2 : e.n_out;
}

const char *decode_piece(const Tokenizer *t, int prev_token, int bos_id, int token, size_t *len) {
    if (token < 0 || token >= t->vocab_size) { *len = 0; return ""; }
    const unsigned char *p = t->vocab[token];
    size_t n = (size_t)t->vocab_len[token];
    if (t->kind == 1) {   /* SentencePiece: no dummy prefix space after bos (llama2.c PR #89); <0x0A> is that byte */
        if (bos_id >= 0 && prev_token == bos_id && n > 0 && p[0] == ' ') { p++; n--; }
        if (t->byte_val[token] >= 0) { *len = 1; return (const char *)&t->byte_pieces[t->byte_val[token]]; }
    }
    *len = n;
    return (const char *)p;
}

/* ---------------------------------------------------------------------------
 * The sampler: greedy, temperature, top-p (nucleus) */

typedef struct { float prob; int index; } ProbIndex;

typedef struct {
    int vocab_size;
    ProbIndex *probindex; /* (vocab_size) scratch for top-p                    */
    float temperature;
    float topp;
    unsigned long long rng_state;
} Sampler;

static unsigned int random_u32(unsigned long long *state) { /* xorshift* */
    *state ^= *state >> 12; *state ^= *state << 25; *state ^= *state >> 27;
    return (unsigned int)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float random_f32(unsigned long long *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static int sample_argmax(const float *p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (p[i] > p[best]) best = i;
    return best;
}

static int sample_mult(const float *p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) { cdf += p[i]; if (coin < cdf) return i; }
    return n - 1;
}

static int compare_prob(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->prob, pb = ((const ProbIndex *)b)->prob;
    return (pa < pb) - (pa > pb);
}

/* top-p: sample from the smallest set of tokens whose probabilities sum past topp.
 * Tokens below (1-topp)/(n-1) cannot be in that set and are dropped before sorting. */
static int sample_topp(const float *p, int n, float topp, ProbIndex *pi, float coin) {
    int m = 0;
    const float cutoff = (1.0f - topp) / (n - 1);
    for (int i = 0; i < n; i++) if (p[i] >= cutoff) { pi[m].index = i; pi[m].prob = p[i]; m++; }
    /* nothing passes the cutoff when topp < 1/n and p is nearly flat, or p holds NaN */
    if (m == 0) return sample_argmax(p, n);
    qsort(pi, m, sizeof(ProbIndex), compare_prob);
    float cum = 0.0f;
    int last = m - 1;
    for (int i = 0; i < m; i++) { cum += pi[i].prob; if (cum > topp) { last = i; break; } }
    float r = coin * cum, cdf = 0.0f;
    for (int i = 0; i <= last; i++) { cdf += pi[i].prob; if (r < cdf) return pi[i].index; }
    return pi[last].index;
}

static int sample(Sampler *s, float *logits) {
    if (s->temperature == 0.0f) return sample_argmax(logits, s->vocab_size);
    for (int i = 0; i < s->vocab_size; i++) logits[i] /= s->temperature;
    softmax(logits, s->vocab_size);
    float coin = random_f32(&s->rng_state);
    if (s->topp <= 0 || s->topp >= 1) return sample_mult(logits, s->vocab_size, coin);
    return sample_topp(logits, s->vocab_size, s->topp, s->probindex, coin);
}

/* ---------------------------------------------------------------------------
 * The modes: generate and chat; logits (and --stats) and score; eval. tokenize and detokenize are in main */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct { int prefill_tokens, decode_tokens; double prefill_s, decode_s; } Stats;   /* for the speed line */

/* The weights' line on stderr: their type and bytes (mmap'd from the file), e.g.
 * weights: int8 g64, 137.66 MiB (fp32 514.39 MiB); with the KV cache 138.05 MiB */
static void report_weights(const Config *c, double kv_mib) {
    Config f = *c;
    f.weight_type = WEIGHTS_FP32;
    TransformerWeights none;
    double mib = c->weights_bytes / 1048576.0, fp32 = map_weights(&none, &f, NULL) / 1048576.0;
    if (c->weight_type == WEIGHTS_INT8)
        fprintf(stderr, "weights: int8 g%d, %.2f MiB (fp32 %.2f MiB); with the KV cache %.2f MiB\n",
                c->group_size, mib, fp32, mib + kv_mib);
    else
        fprintf(stderr, "weights: fp32, %.2f MiB; with the KV cache %.2f MiB\n", mib, mib + kv_mib);
}

/* The memory / speed line on stderr, e.g.
 * kv: tq3/tq3 3.25 bits/elem, 4.6 MiB for 1024 tokens (fp16 22.5 MiB, 4.9x smaller; fp32 45.0 MiB) */
static void report(const Transformer *t, int n_pos, const Stats *speed) {
    const Config *c = &t->config;
    const tq_cache *kv = &t->cache;
    double bits = 0.5 * (tq_bits_per_elem(kv->kc.fmt, c->head_dim) + tq_bits_per_elem(kv->vc.fmt, c->head_dim));
    tq_cache_bytes b = tq_cache_size(kv, n_pos);
    double MiB = 1048576.0, mib = b.all / MiB, fp16 = (double)n_pos * c->n_layers * c->n_kv_heads * c->head_dim * 2 * 2 / MiB;
    double ratio = mib > 0 ? fp16 / mib : 1.0;
    fprintf(stderr, "kv: %s/%s %.2f bits/elem, %.2f MiB for %d tokens (fp16 %.2f MiB, %.1fx %s; fp32 %.2f MiB)\n",
            tq_fmt_name(kv->kc.fmt), tq_fmt_name(kv->vc.fmt), bits, mib, n_pos, fp16,
            ratio >= 1 ? ratio : 1 / ratio, ratio >= 1 ? "smaller" : "larger", 2 * fp16);
    if (b.projections + b.fixed > 0)
        fprintf(stderr, "kv: of which %.3f MiB codes, %.3f MiB key projections (%d %s per key), %.3f MiB fixed cost "
                "(%d sink + %d recent positions in fp16%s): %.2f bits/elem in all\n",
                b.codes / MiB, b.projections / MiB, kv->kproj, kv->kbeta8 ? "int8" : "fp16", b.fixed / MiB, kv->sink,
                kv->window, kv->kproj ? (kv->kbeta8 ? ", projection directions per block" : ", projection directions") : "",
                tq_cache_bits(kv, n_pos));
    report_weights(c, mib);
#ifdef RUN_CUDA
    const char *where = "cuda";   /* where attention runs: the GPU, or the codec's SIMD path */
#else
    const char *where = tq_simd_name(t->state.simd);
#endif
    if (speed)
        fprintf(stderr, "speed: prefill %.1f tok/s (%d tokens), decode %.1f tok/s (%d tokens), attention %s\n",
                speed->prefill_s > 0 ? speed->prefill_tokens / speed->prefill_s : 0.0, speed->prefill_tokens,
                speed->decode_s > 0 ? speed->decode_tokens / speed->decode_s : 0.0, speed->decode_tokens, where);
}

/* Prints a token's bytes. Unless raw (-m detokenize), ASCII control bytes other than whitespace
 * are left out (bytes >= 0x80 are parts of UTF-8 characters and are kept) and stdout is flushed. */
static void print_piece(const Tokenizer *tok, int prev, int bos, int token, int raw) {
    size_t n;
    const char *p = decode_piece(tok, prev, bos, token, &n);
    unsigned char b = (unsigned char)p[0];
    if (!raw && n == 1 && b < 0x80 && !isprint(b) && !isspace(b)) return;
    fwrite(p, 1, n, stdout);
    if (!raw) fflush(stdout);
}

static int *encode_or_die(const Tokenizer *tok, const char *text, size_t len, int bos, int *n_out) {
    int max = (int)(len + 3 > (size_t)1 << 30 ? (size_t)1 << 30 : len + 3);
    int *tokens = (int *)xcalloc((size_t)max, sizeof(int), "prompt tokens");
    int n = encode(tok, text, len, bos, tokens, max);
    if (n == -1) die("the prompt is not valid UTF-8");
    if (n < 0) die("the prompt could not be tokenized");
    *n_out = n;
    return tokens;
}

/* Feeds n tokens at positions pos.. in batches; returns the last token's logits. With all
 * (n, vocab) != NULL, every position's logits are copied there; with st, the time is added to it. */
static float *prefill(Transformer *t, const int *tokens, int n, int pos, float *all, Stats *st) {
    float *logits = NULL;
    double t0 = now_s();
    for (int i = 0; i < n; i += t->state.batch) {
        int m = n - i < t->state.batch ? n - i : t->state.batch;
        logits = forward(t, tokens + i, m, pos + i, all != NULL);
        if (all) memcpy(all + (size_t)i * t->config.vocab_size, logits, (size_t)m * t->config.vocab_size * sizeof(float));
        if (all) logits += (size_t)(m - 1) * t->config.vocab_size;
    }
    if (st) { st->prefill_tokens += n; st->prefill_s += now_s() - t0; }
    return logits;
}

/* Samples up to steps tokens after logits (position pos - 1, token prev), printing each and feeding
 * it to the cache, until a stop token or the end of the context; returns the next position. In chat
 * the stop token (the end of the turn) goes into the cache too, and no token is sampled that the
 * context could not take. */
static int reply(Transformer *t, const Tokenizer *tok, Sampler *sampler, float *logits, int pos, int prev, int steps,
                 int chat, Stats *st) {
    double t0 = now_s();
    for (int i = 0; i < steps && (!chat || pos < t->cache.ctx); i++) {
        int next = sample(sampler, logits);
        if (next == t->config.eos_id || next == t->config.chat_end_id) {
            if (chat) forward(t, &next, 1, pos++, 0);
            break;
        }
        print_piece(tok, prev, t->config.bos_id, next, 0);
        if (pos >= t->cache.ctx) { fprintf(stderr, "\n[stopped: reached the end of the context, %d tokens]", t->cache.ctx); break; }
        logits = forward(t, &next, 1, pos++, 0);
        prev = next; st->decode_tokens++;
    }
    st->decode_s += now_s() - t0;
    return pos;
}

/* Runs the prompt, then samples up to steps new tokens (stops at eos or at the end of the context). */
static void generate(Transformer *t, const Tokenizer *tok, Sampler *sampler, const char *prompt, int steps) {
    const Config *c = &t->config;
    int n, *tokens = encode_or_die(tok, prompt, strlen(prompt), c->add_bos ? c->bos_id : -1, &n);
    if (n == 0) die("empty prompt: give one with -i or -f");
    if (n >= t->cache.ctx) die("the prompt is %d tokens; the context is %d (raise it with -c, up to %d)", n, t->cache.ctx, c->seq_len);
    Stats st = {0, 0, 0, 0};
    for (int i = 0; i < n; i++) if (i > 0 || tokens[0] != c->bos_id) print_piece(tok, i ? tokens[i - 1] : -1, c->bos_id, tokens[i], 0);
    int pos = reply(t, tok, sampler, prefill(t, tokens, n, 0, NULL, &st), n, tokens[n - 1], steps, 0, &st);
    printf("\n");
    fflush(stdout);   /* the text before the report, also where stdout is a pipe */
    report(t, pos, &st);
    free(tokens);
}

/* Chat with the model's template: ChatML when the vocabulary has <|im_start|>
 * (SmolLM2), else Llama-2's [INST]. The first user turn may come from -i/-f;
 * later turns are read from stdin until it ends. */
static void chat(Transformer *t, const Tokenizer *tok, Sampler *sampler, const char *user0, const char *system, int steps) {
    const Config *c = &t->config;
    static char line[8192];           /* one typed line; -i / -f messages may be any length */
    int pos = 0, n;
    Stats st = {0, 0, 0, 0};
    for (int first = 1;; first = 0) {
        const char *user = first && user0 ? user0 : line, *sys = first ? system : NULL;
        if (user == line) {
            printf("User: ");
            fflush(stdout);
            if (!fgets(line, sizeof line, stdin)) break;
            line[strcspn(line, "\n")] = 0;
        }
        size_t cap = strlen(user) + (sys ? strlen(sys) : 0) + 128;
        char *turn = (char *)xcalloc(cap, 1, "a chat turn");
        if (c->chat_start_id >= 0)
            snprintf(turn, cap, "%s%s%s<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", sys ? "<|im_start|>system\n" : "",
                     sys ? sys : "", sys ? "<|im_end|>\n" : "", user);
        else   /* Llama 2: the system prompt inside the first [INST] */
            snprintf(turn, cap, sys ? "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]" : "[INST] %s%s [/INST]", sys ? sys : "", user);
        int *tokens = encode_or_die(tok, turn, strlen(turn), (first && c->add_bos) ? c->bos_id : -1, &n);
        free(turn);
        if (pos + n >= t->cache.ctx) {
            if (first) die("the first message is %d tokens; the context is %d (raise it with -c, up to %d)", n, t->cache.ctx, c->seq_len);
            free(tokens);
            fprintf(stderr, "[stopped: the conversation reached the end of the context, %d tokens]\n", t->cache.ctx);
            break;
        }
        printf("Assistant: ");
        pos = reply(t, tok, sampler, prefill(t, tokens, n, pos, NULL, &st), pos + n, tokens[n - 1], steps, 1, &st);
        free(tokens);
        printf("\n");
        if (c->chat_start_id >= 0 && pos < t->cache.ctx) {   /* ChatML's newline after <|im_end|> */
            tokens = encode_or_die(tok, "\n", 1, -1, &n);
            prefill(t, tokens, n, pos, NULL, NULL);
            pos += n;
            free(tokens);
        }
        if (pos >= t->cache.ctx) { fprintf(stderr, "[stopped: reached the end of the context, %d tokens]\n", t->cache.ctx); break; }
    }
    report(t, pos, &st);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot read %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0, got;
    char *buf = (char *)xcalloc(cap, 1, "the input file");
    while ((got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) { cap *= 2; buf = (char *)realloc(buf, cap); if (!buf) die("out of memory reading %s", path); }
    }
    if (ferror(f)) die("cannot read %s: %s", path, strerror(errno));
    fclose(f);
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

/* Parses whitespace-separated token ids; every id must be in the vocabulary. */
static int *parse_ids(const char *text, int vocab, int *n_out) {
    int n = 0, *ids = (int *)xcalloc(strlen(text) / 2 + 1, sizeof(int), "token ids");   /* an id and a blank: 2 bytes */
    for (const char *p = text;;) {
        while (isspace((unsigned char)*p)) p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= vocab || (*end && !isspace((unsigned char)*end)))
            die("bad token id near \"%.20s\" (ids are integers in [0, %d))", p, vocab);
        ids[n++] = (int)v;
        p = end;
    }
    *n_out = n;
    return ids;
}

/* The token ids of -m logits / score: at least `least`, and no more than the context holds. */
static int *ids_in_context(const Transformer *t, const char *text, int least, const char *mode, int *n) {
    int *ids = parse_ids(text, t->config.vocab_size, n);
    if (*n < least) die("-m %s needs at least %d token id%s, got %d", mode, least, least > 1 ? "s" : "", *n);
    if (*n > t->cache.ctx) die("%d tokens exceed the context of %d (raise -c)", *n, t->cache.ctx);
    return ids;
}

static void write_floats(const char *path, const float *x, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) die("cannot write %s: %s", path, strerror(errno));
    if (fwrite(x, sizeof(float), n, f) != n || fclose(f) != 0) die("error writing %s", path);
}

/* -m logits: feeds the given token ids (no bos added) and writes every position's logits as
 * float32 (n, vocab) to out, for the reference tests. --stats: the cache statistics this
 * sequence measured and stored, as float32, layer by layer (tq_cache_stats: the key directions
 * of the blocks in use, then every position's projections beta), which a reference model of the
 * cache can take instead of computing them again, so that a statistic on an fp16 rounding
 * boundary cannot differ between the two (tests/test_forward.py). */
static void dump_logits(Transformer *t, const char *ids_text, const char *out, const char *stats) {
    int n, layers = t->config.n_layers, *ids = ids_in_context(t, ids_text, 1, "logits", &n);
    size_t vocab = (size_t)t->config.vocab_size, per_layer = stats ? tq_cache_stats(&t->cache, 0, n, NULL) : 0;
    float *all = (float *)xcalloc((size_t)n * vocab, sizeof(float), "logits");
    prefill(t, ids, n, 0, all, NULL);
    write_floats(out, all, (size_t)n * vocab);
    if (stats) {
        float *x = (float *)xcalloc(layers * per_layer, sizeof(float), "statistics");
        for (int l = 0; l < layers; l++) tq_cache_stats(&t->cache, l, n, x + l * per_layer);
        write_floats(stats, x, layers * per_layer);
        free(x);
    }
    report(t, n, NULL);
    free(all); free(ids);
}

/* log-softmax of n logits into out, in double for stable KL sums */
static void log_softmax(const float *x, int n, double *out) {
    double mx = x[0], sum = 0;
    for (int i = 1; i < n; i++) if (x[i] > mx) mx = x[i];
    for (int i = 0; i < n; i++) sum += exp(x[i] - mx);
    double lse = mx + log(sum);
    for (int i = 0; i < n; i++) out[i] = x[i] - lse;
}

typedef struct { double nll, nll_ref, kld; long top1, n; } EvalSums;

/* Scores one position: the token `next` after logits (test cache) and ref (fp32 cache). */
static void eval_position(EvalSums *e, const float *logits, const float *ref, int vocab, int next, double *lp, double *lq) {
    log_softmax(logits, vocab, lq);
    log_softmax(ref, vocab, lp);
    double kl = 0;
    for (int i = 0; i < vocab; i++) kl += exp(lp[i]) * (lp[i] - lq[i]);  /* KL(p_fp32 || q) */
    e->kld += kl;
    e->nll -= lq[next]; e->nll_ref -= lp[next];
    e->top1 += sample_argmax(logits, vocab) == sample_argmax(ref, vocab);
    e->n++;
}

/* -m score: token ids in; for every position j >= 1 one line "j token logprob argmax": the
 * log-probability the model gave token j after tokens 0..j-1, and its most likely token
 * there. A part of a sequence can then be scored alone (bench/quality's copy test scores
 * only a repeated passage), with teacher forcing, which is far steadier than greedy text. */
static void score_tokens(Transformer *t, const char *ids_text) {
    int n, vocab = t->config.vocab_size, *ids = ids_in_context(t, ids_text, 2, "score", &n);
    double *lp = (double *)xcalloc(vocab, sizeof(double), "score");
    for (int i = 0; i < n - 1; i += t->state.batch) {
        int m = n - 1 - i < t->state.batch ? n - 1 - i : t->state.batch;
        float *lg = forward(t, ids + i, m, i, 1);
        for (int j = i + 1; j <= i + m; j++, lg += vocab) {   /* logits at j-1 predict token j */
            log_softmax(lg, vocab, lp);
            printf("%d %d %.6f %d\n", j, ids[j], lp[ids[j]], sample_argmax(lg, vocab));
        }
    }
    report(t, n - 1, NULL);
    free(lp); free(ids);
}

/* Cuts the tokenized text into chunks of ctx tokens; each chunk starts from an
 * empty cache and its second half is scored: the token at position j is
 * predicted from the logits at j-1. The same tokens run through a second model
 * with an fp32 cache (ref) alongside, for KL divergence and top-1 agreement. */
static void evaluate(Transformer *t, Transformer *ref, const Tokenizer *tok, const char *text, int max_chunks) {
    const Config *c = &t->config;
    int ctx = t->cache.ctx, n, vocab = c->vocab_size;
    double t0 = now_s();
    int *tokens = encode_or_die(tok, text, strlen(text), -1, &n);
    fprintf(stderr, "eval: %d tokens in %.1f s; ", n, now_s() - t0);
    int chunks = n / ctx;
    if (max_chunks > 0 && chunks > max_chunks) chunks = max_chunks;
    if (chunks == 0) die("the text is %d tokens, fewer than one chunk of %d", n, ctx);
    fprintf(stderr, "%d chunks of %d tokens, scoring the second half of each\n", chunks, ctx);
    report_weights(c, tq_cache_size(&t->cache, ctx).all / 1048576.0);
    double *lp = (double *)xcalloc(vocab, sizeof(double), "eval"), *lq = (double *)xcalloc(vocab, sizeof(double), "eval");
    EvalSums e = {0, 0, 0, 0, 0};
    double dsum = 0, dsq = 0, t1 = now_s();  /* per-chunk mean NLL difference d_c: its sum and sum of squares */
    for (int ch = 0; ch < chunks; ch++) {
        double nll0 = e.nll - e.nll_ref;
        long n0 = e.n;
        int *tk = tokens + (size_t)ch * ctx;
        if (c->add_bos) tk[0] = c->bos_id;
        for (int i = 0; i < ctx; i += t->state.batch) {
            int m = ctx - i < t->state.batch ? ctx - i : t->state.batch;
            float *lg = forward(t, tk + i, m, i, 1);
            float *lr = ref ? forward(ref, tk + i, m, i, 1) : lg;
            for (int j = i; j < i + m; j++)   /* logits at j predict token j+1 */
                if (j + 1 >= ctx / 2 && j + 1 < ctx)
                    eval_position(&e, lg + (size_t)(j - i) * vocab, lr + (size_t)(j - i) * vocab, vocab, tk[j + 1], lp, lq);
        }
        double d = (e.nll - e.nll_ref - nll0) / (double)(e.n - n0);
        dsum += d; dsq += d * d;
        double el = now_s() - t1;
        fprintf(stderr, "[chunk %d/%d] ppl %.4f (fp32 %.4f) kld %.5f top1 %.4f  %.0f s, %.0f s left\n", ch + 1, chunks,
                exp(e.nll / e.n), exp(e.nll_ref / e.n), e.kld / e.n, (double)e.top1 / e.n, el, el / (ch + 1) * (chunks - ch - 1));
    }
    double ppl = exp(e.nll / e.n), ppl_ref = exp(e.nll_ref / e.n);
    if (chunks > 1) {   /* chunks are equally long, so dPPL = exp(mean d_c) - 1; its spread gives the noise */
        double mean = dsum / chunks, var = (dsq - chunks * mean * mean) / (chunks - 1), se = sqrt(var > 0 ? var / chunks : 0);
        fprintf(stderr, "eval: dPPL %+.2f %%, 95 %% interval from the spread over the %d chunks: %+.2f .. %+.2f %%\n",
                100.0 * (ppl / ppl_ref - 1.0), chunks, 100.0 * expm1(mean - 2 * se), 100.0 * expm1(mean + 2 * se));
    }
    printf("eval fmt=%s/%s ctx=%d chunks=%d tokens=%ld ppl=%.4f ppl_fp32=%.4f dppl_pct=%.3f kld=%.6f top1=%.4f kv_bits=%.3f\n",
           tq_fmt_name(t->cache.kc.fmt), tq_fmt_name(t->cache.vc.fmt), ctx, chunks, e.n, ppl, ppl_ref,
           100.0 * (ppl / ppl_ref - 1.0), e.kld / e.n, (double)e.top1 / e.n, tq_cache_bits(&t->cache, ctx));   /* a full chunk's bits */
    free(lp); free(lq); free(tokens);
}

/* ---------------------------------------------------------------------------
 * main: the options */

/* -h prints this to stdout and exits 0; a missing model path prints it to stderr, exit 1 */
static void usage(int status) {
    FILE *out = status ? stderr : stdout;
    fprintf(out,
        "Usage:   " PROG " <model.bin> [options]\n"
        "Example: " PROG " model.bin -k tq3 -n 256 -i \"Once upon a time\"\n"
        "Options:\n"
        "  -t <float>  temperature in [0, inf), default 1.0 (0 = greedy)\n"
        "  -p <float>  top-p in [0, 1], default 0.9 (0 or 1 = off)\n"
        "  -s <int>    random seed, default time(NULL)\n"
        "  -n <int>    new tokens to generate, default 256 (per turn in chat)\n"
        "  -i <string> input prompt (chat: the first user message)\n"
        "  -f <file>   read the prompt (or the token ids / text of the other modes) from a file\n"
        "  -m <mode>   generate | chat | eval | logits | score | tokenize | detokenize, default generate\n"
        "  -y <string> system prompt in chat mode\n"
        "  -k <fmt>    KV cache format (below), or KFMT:VFMT for keys and values apart; default tq3\n"
        "  -c <int>    context length in tokens, default the model's (eval: the chunk length, default 512)\n"
        "  --chunks <int> eval: score at most this many chunks, default all\n"
        "  -o <file>   output file of -m logits (float32, n x vocab)\n"
        "  --paper     the paper's plain TurboQuant, without the fixes: --scale norm --kproj 0 --kblock 0 --sink 0 --window 0\n"
        "Research options, defaults shown (bench/README.md, \"Research options\"): --scale eden --kproj 2 "
        "--kblock %d --sink 1 --window 8 --batch 256 --qinput 1 --stats <file> -z <file>\n"
        "KV formats (bits per element at head_dim 64 / 128, scale or norm included):\n", KBLOCK_DEFAULT);
    for (int f = 0; f < TQ_NFMT; f++)
        fprintf(out, "  %-5s %6.3f / %6.3f  %s\n", tq_fmt_name((tq_fmt)f), tq_bits_per_elem((tq_fmt)f, 64),
                tq_bits_per_elem((tq_fmt)f, 128), tq_fmt_about((tq_fmt)f));
    exit(status);
}

/* an option's number in [lo, hi]; integer: it must be a whole number too */
static double parse_num(const char *flag, const char *s, double lo, double hi, int integer) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v)) die("%s wants a number, got \"%s\"", flag, s);
    if (v < lo || v > hi) die("%s %s is out of range [%g, %g]", flag, s, lo, hi);
    if (integer && v != floor(v)) die("%s wants an integer, got \"%s\"", flag, s);
    return v;
}

/* -k and --scale: "A" or "A:B" (keys:values) -> kv[0] = A, kv[1] = B (or A), 32 bytes each */
static void split_kv(const char *flag, const char *arg, char kv[2][32]) {
    const char *colon = strchr(arg, ':'), *vals = colon ? colon + 1 : arg;
    size_t kl = colon ? (size_t)(colon - arg) : strlen(arg), vl = strlen(vals);
    if (kl == 0 || kl >= 32 || vl == 0 || vl >= 32 || strchr(vals, ':')) die("bad %s \"%s\": give X or KEYS:VALUES (run -h)", flag, arg);
    memcpy(kv[0], arg, kl); kv[0][kl] = 0;
    memcpy(kv[1], vals, vl + 1);
}

#ifndef RUN_NO_MAIN
int main(int argc, char **argv) {
    const char *model_path = argv[1], *prompt = NULL, *prompt_file = NULL, *tok_path = NULL;   /* argv[argc] is NULL */
    const char *mode = "generate", *system = NULL, *out = NULL, *stats = NULL;
    float temperature = 1.0f, topp = 0.9f;
    unsigned long long seed = 0;
    char kv[2][32];
    int steps = 256, ctx = 0, chunks = 0, batch = 256, qinput = 1;
    tq_cache_opts co = {.key_fmt = TQ_TQ3, .value_fmt = TQ_TQ3, .kscale = TQ_SCALE_EDEN, .vscale = TQ_SCALE_EDEN,
                    .kproj = 2, .kblock = KBLOCK_DEFAULT, .sink = 1, .window = 8};   /* chosen by bench/quality */
    /* the options with one value, in [lo, hi] where it is a number (type: s string, i int, f float, u the seed) */
    struct { const char *flag; char type; void *value; double lo, hi; } opts[] = {
        {"-t", 'f', &temperature, 0, 1e6}, {"-p", 'f', &topp, 0, 1}, {"-s", 'u', &seed, 0, 1.8e19},
        {"-n", 'i', &steps, 0, 1 << 30}, {"-c", 'i', &ctx, 1, 1 << 24}, {"--chunks", 'i', &chunks, 1, 1 << 30},
        {"--batch", 'i', &batch, 1, 4096}, {"--qinput", 'i', &qinput, 0, 1}, {"--kproj", 'i', &co.kproj, 0, KPROJ_MAX},
        {"--sink", 'i', &co.sink, 0, 1 << 20}, {"--window", 'i', &co.window, 0, 1 << 20}, {"--kblock", 'i', &co.kblock, 0, 1 << 24},
        {"-i", 's', &prompt, 0, 0}, {"-f", 's', &prompt_file, 0, 0}, {"-z", 's', &tok_path, 0, 0}, {"-m", 's', &mode, 0, 0},
        {"-y", 's', &system, 0, 0}, {"-o", 's', &out, 0, 0}, {"--stats", 's', &stats, 0, 0}, {NULL, 0, NULL, 0, 0}};

    if (argc < 2) usage(1);
    for (int i = 1; i < argc; i++) {   /* argv[1]: the model, or -h */
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) usage(0);
        if (i == 1) continue;
        if (a[0] != '-' || !a[1]) die("expected an option, got \"%s\" (run -h)", a);
        if (!strcmp(a, "--paper")) {    /* the paper's TurboQuant as written: none of the fixes */
            co.kscale = co.vscale = TQ_SCALE_NORM;
            co.kproj = co.kblock = co.sink = co.window = 0;
            continue;
        }
        if (++i >= argc) die("option %s needs a value (run -h)", a);
        const char *v = argv[i];
        int o = 0;
        while (opts[o].flag && strcmp(a, opts[o].flag)) o++;
        char type = opts[o].type;   /* 0: not in the table */
        double lo = opts[o].lo, hi = opts[o].hi;
        if (type == 's') *(const char **)opts[o].value = v;
        else if (type == 'i') *(int *)opts[o].value = (int)parse_num(a, v, lo, hi, 1);
        else if (type == 'f') *(float *)opts[o].value = (float)parse_num(a, v, lo, hi, 0);
        else if (type == 'u') *(unsigned long long *)opts[o].value = (unsigned long long)parse_num(a, v, lo, hi, 0);
        else if (!strcmp(a, "-k") || !strcmp(a, "--scale")) {   /* keys and values: tq_cache_opts */
            int fmt = a[1] == 'k';
            split_kv(a, v, kv);
            for (int j = 0; j < 2; j++)
                if (fmt ? tq_parse_fmt(kv[j], j ? &co.value_fmt : &co.key_fmt) : tq_parse_scale(kv[j], j ? &co.vscale : &co.kscale))
                    die(fmt ? "unknown KV format \"%s\" (run -h lists the formats)" : "unknown --scale \"%s\" (norm, nc or eden)", kv[j]);
        }
        else die("unknown option %s (run -h)", a);
        if (!strcmp(a, "-t") && temperature > 0 && temperature < 1e-3f)
            die("-t %s is too small: 0 (greedy) or at least 0.001", v);   /* logits / t must stay finite */
        if (!strcmp(a, "--kblock") && co.kblock % 16)
            die("--kblock %s: positions per block of key directions must be a multiple of 16 (0: one set)", v);
    }
    tq_simd simd;                     /* TQ_SIMD, else the best this CPU runs: checked before anything is read */
    const char *simd_err = tq_simd_from_env(&simd);
    if (simd_err) die("%s", simd_err);
    enum { GENERATE, CHAT, EVAL, LOGITS, SCORE, TOKENIZE, DETOKENIZE, NMODES };
    static const struct { const char *name, *needs; } modes[NMODES] = {   /* needs: the error without -i or -f */
        {"generate", "no prompt: give one with -i or -f"}, {"chat", NULL}, {"eval", "-m eval needs a text: -f FILE"},
        {"logits", "-m logits needs token ids (-i or -f) and an output file (-o)"}, {"score", "-m score needs token ids (-i or -f)"},
        {"tokenize", "-m tokenize needs text (-i or -f)"}, {"detokenize", "-m detokenize needs token ids (-i or -f)"}};
    int m = 0;
    while (m < NMODES && strcmp(mode, modes[m].name)) m++;
    if (m == NMODES) die("unknown mode \"%s\" (generate, chat, eval, logits, score, tokenize, detokenize)", mode);
    if (prompt && prompt_file) die("give the prompt with -i or -f, not both");
    if (stats && m != LOGITS) die("--stats goes with -m logits");
    if (m == EVAL && ctx == 1) die("-c 1 is too short for -m eval: it scores the second half of each chunk");
    size_t file_len = 0;
    char *file_text = prompt_file ? read_file(prompt_file, &file_len) : NULL;
    if (file_text && m != TOKENIZE && strlen(file_text) != file_len)
        die("%s has a NUL byte at offset %zu (only -m tokenize reads NUL bytes)", prompt_file, strlen(file_text));
    if (file_text) prompt = file_text;
    if (seed == 0) seed = (unsigned long long)time(NULL);

    Transformer t;
    int all_logits = m == EVAL || m == LOGITS || m == SCORE;
    if (m == EVAL && ctx == 0) ctx = 512;
    if (m == TOKENIZE || m == DETOKENIZE) ctx = 1;  /* no cache needed */
    build_transformer(&t, model_path, &co, ctx, batch, all_logits, qinput, simd);
    Config *c = &t.config;

    Transformer tt, *from = &t;   /* the tokenizer: from model.bin, or from another exported file with -z */
    if (tok_path) {
        load_model(&tt, tok_path);
        from = &tt;
        if (tt.config.vocab_size != c->vocab_size)
            die("-z %s has a vocabulary of %d, the model %d", tok_path, tt.config.vocab_size, c->vocab_size);
    }
    const Config *tc = &from->config;
    Tokenizer tok;
    char err[256];
    if (build_tokenizer(&tok, from->data + tc->tokenizer_offset, tc->tokenizer_bytes, tc->vocab_size, tc->tokenizer_kind, tc->pretok,
                        err, sizeof err))
        die("%s: bad tokenizer section: %s", tok_path ? tok_path : model_path, err);

    Sampler sampler = {c->vocab_size, (ProbIndex *)xcalloc(c->vocab_size, sizeof(ProbIndex), "sampler"), temperature, topp, seed};
    if ((!prompt && modes[m].needs) || (m == LOGITS && !out)) die("%s", modes[m].needs);

    if (m == GENERATE) generate(&t, &tok, &sampler, prompt, steps);
    else if (m == CHAT) chat(&t, &tok, &sampler, prompt, system, steps);
    else if (m == SCORE) score_tokens(&t, prompt);
    else if (m == EVAL) {
        int same = co.key_fmt == TQ_FP32 && co.value_fmt == TQ_FP32;  /* the reference would be identical */
        tq_cache_opts fp32 = co;   /* projections, exact positions: none apply to fp32 */
        fp32.key_fmt = fp32.value_fmt = TQ_FP32;
        Transformer ref;
        if (!same) build_transformer(&ref, model_path, &fp32, ctx, batch, 1, qinput, simd);
        evaluate(&t, same ? NULL : &ref, &tok, prompt, chunks);
        if (!same) free_transformer(&ref);
    } else if (m == LOGITS) {
#ifdef RUN_CUDA
        if (stats) die("--stats: the GPU build keeps the key projections on the GPU; use ./run");
#endif
        dump_logits(&t, prompt, out, stats);
    } else if (m == TOKENIZE) {
        int n, *ids = encode_or_die(&tok, prompt, file_text ? file_len : strlen(prompt), -1, &n);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        free(ids);
    } else {   /* detokenize */
        int n, *ids = parse_ids(prompt, c->vocab_size, &n);
        for (int i = 0; i < n; i++) print_piece(&tok, i ? ids[i - 1] : -1, c->bos_id, ids[i], 1);
        free(ids);
    }
    free(sampler.probindex);
    free_tokenizer(&tok);
    if (tok_path) munmap(tt.data, tt.file_size);
    free_transformer(&t);
    free(file_text);
    return 0;
}
#endif
