/* run_cuda.cu - run.c's program with the forward pass on an NVIDIA GPU.
 *
 * Everything but the forward pass is run.c's, included below: the loader, the
 * tokenizer, the sampler, the modes, the CLI, the cache's layout and the
 * statistics of a new sequence. tq.c is included as well, so the kernels
 * encode, score and accumulate the cache with the very codec functions the CPU
 * build uses (marked TQ_HD), and the cache holds the same bytes. What is new:
 *   - the weights, the KV cache and the activations live in GPU memory;
 *   - matrix products are cuBLAS SGEMMs (fp32; TF32 is never enabled);
 *   - one kernel per step of run.c's forward(); attention is one thread block
 *     per (token, query head) whose threads split the keys between them;
 *   - a sequence's statistics (offsets, key weights, key directions) come from
 *     its first batch, copied to the host and measured by run.c's functions.
 * The GPU rounds differently (fused multiply-adds, sums in another order), so
 * its logits match the CPU build's closely, not bit for bit: tests/test_cuda.py.
 *
 * Build: make run_cuda    Usage: ./run_cuda model.bin -h (run's options)
 */
#define RUN_CUDA
#define PROG "run_cuda"
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "tq.c"
#include "run.c"

#define CUDA(call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) die("CUDA: %s (%s line %d)", cudaGetErrorString(e_), __FILE__, __LINE__); } while (0)
#define BLAS(call) do { cublasStatus_t e_ = (call); \
    if (e_ != CUBLAS_STATUS_SUCCESS) die("cuBLAS: status %d (%s line %d)", (int)e_, __FILE__, __LINE__); } while (0)

#define ATT_THREADS 128   /* threads per attention block: they split a query's keys */
#define MAX_ALLOCS 64

/* The model on the GPU: run.c's structs, their pointers into GPU memory. */
struct Gpu {
    TransformerWeights w; /* the weights, copied once                            */
    KVCache kv;           /* the cache: same fields as the host's; the codecs' tables on the GPU too */
    RunState s;           /* activations for `batch` tokens; att is (batch*n_heads, ctx),
                             qperp is encode_kv's scratch, qp and acc are unused (shared memory) */
    int *tokens;          /* (batch) token ids of the forward pass                 */
    cublasHandle_t blas;
    size_t att_shared;    /* bytes of shared memory per attention block            */
    void *allocs[MAX_ALLOCS]; /* everything cudaMalloc'd, for gpu_free             */
    int n_allocs;
};

/* bytes of GPU memory, filled from host (or zeroed when host is NULL); NULL for 0 bytes */
static void *gpu_alloc(Gpu *g, const void *host, size_t bytes) {
    if (bytes == 0) return NULL;
    if (g->n_allocs == MAX_ALLOCS) die("internal: more than %d GPU allocations", MAX_ALLOCS);
    void *p;
    CUDA(cudaMalloc(&p, bytes));
    if (host) CUDA(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice));
    else CUDA(cudaMemset(p, 0, bytes));
    return g->allocs[g->n_allocs++] = p;
}

/* A codec whose tables (centroids, bounds, Hadamard signs, dense Pi, QJL S)
 * are copies in GPU memory: tq_init's own numbers, never redrawn (tq.c). */
static tq_codec gpu_codec(Gpu *g, const tq_codec *c) {
    tq_codec d = *c;
    size_t K = c->bits ? (size_t)1 << c->bits : 0, dd = (size_t)c->d * c->d, f = sizeof(float);
    d.centroids = (float *)gpu_alloc(g, c->centroids, c->centroids ? K * f : 0);
    d.bounds = (float *)gpu_alloc(g, c->bounds, c->bounds ? (K - 1) * f : 0);
    d.signs = (float *)gpu_alloc(g, c->signs, c->signs ? (size_t)c->rounds * c->d * f : 0);
    d.dense = (float *)gpu_alloc(g, c->dense, c->dense ? dd * f : 0);
    d.qjl = (float *)gpu_alloc(g, c->qjl, c->qjl ? dd * f : 0);
    return d;
}

static size_t att_shared_bytes(const KVCache *kv, const Config *c) {
    size_t qf = tq_query_floats(&kv->kc), af = tq_acc_floats(&kv->vc);
    return (qf + c->head_dim + KPROJ_MAX + ATT_THREADS + af + ATT_THREADS * (af + 1)) * sizeof(float);
}

__global__ void attention_kernel(const __grid_constant__ KVCache kv, const __grid_constant__ Config c, int l,
                                 const __grid_constant__ Batch bt, float *q, float *att, float *out);

/* Copies the model into GPU memory and allocates the cache and activations
 * there (called by build_transformer once the host side is built). */
static void gpu_build(Transformer *t, const CacheOpts *o, int all_logits) {
    const Config *c = &t->config;
    KVCache *kv = &t->cache;
    const RunState *hs = &t->state;
    tq_fmt fmts[2] = {kv->kc.fmt, kv->vc.fmt};
    for (int i = 0; i < 2; i++)
        if (fmts[i] >= TQ_TQ2 && (c->head_dim > TQ_GPU_MAX_D || c->head_dim % 16))   /* even-sized rows: tq.c */
            die("format %s on the GPU handles head_dim up to %d in multiples of 16, the model's is %d "
                "(use run, or fp32, fp16, q8 or q4)", tq_fmt_name(fmts[i]), TQ_GPU_MAX_D, c->head_dim);
    int dev;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaFree(0) != cudaSuccess) die("no usable CUDA GPU (use run, the CPU build)");
    size_t B = (size_t)hs->batch, hd = (size_t)c->head_dim, heads = (size_t)c->n_layers * c->n_kv_heads;
    size_t qd = c->n_heads * hd, kvd = c->n_kv_heads * hd, wide = qd > (size_t)c->dim ? qd : (size_t)c->dim;
    size_t logit_rows = all_logits ? B : 1, f = sizeof(float), R = kv->kproj;
    /* what the host allocates (run_bytes), plus attention weights per (token, head) rather than per thread */
    double need = (double)c->weights_bytes + run_bytes(c, o, kv->ctx, hs->batch, all_logits)
                + 4.0 * B * c->n_heads * kv->ctx;
    size_t free_b, total_b;
    CUDA(cudaMemGetInfo(&free_b, &total_b));
    if (need > (double)free_b)
        die("the model, a %d-token KV cache and activations need %.2f GiB of GPU memory, %.2f GiB are free: "
            "give a smaller -c or --batch", kv->ctx, need / 1073741824.0, free_b / 1073741824.0);

    Gpu *g = (Gpu *)xcalloc(1, sizeof(Gpu), "the GPU state");
    map_weights(&g->w, c, (float *)gpu_alloc(g, t->data + c->weights_offset, c->weights_bytes));

    g->kv = *kv;   /* flags, ctx, sink, window, slots; then every array on the GPU */
    g->kv.kc = gpu_codec(g, &kv->kc);
    g->kv.vc = gpu_codec(g, &kv->vc);
    g->kv.key = (uint8_t *)gpu_alloc(g, NULL, heads * kv->ctx * kv->kc.bytes);
    g->kv.value = (uint8_t *)gpu_alloc(g, NULL, heads * kv->ctx * kv->vc.bytes);
    g->kv.koff = (float *)gpu_alloc(g, kv->koff, heads * hd * f);
    g->kv.voff = (float *)gpu_alloc(g, kv->voff, heads * hd * f);
    g->kv.kw = (float *)gpu_alloc(g, kv->kw, heads * hd * f);
    g->kv.kdir = (float *)gpu_alloc(g, NULL, heads * R * hd * f);
    g->kv.kbeta = (uint16_t *)gpu_alloc(g, NULL, heads * kv->ctx * R * 2);
    g->kv.exact_k = (uint16_t *)gpu_alloc(g, NULL, heads * kv->slots * hd * 2);
    g->kv.exact_v = (uint16_t *)gpu_alloc(g, NULL, heads * kv->slots * hd * 2);
    free(kv->key); free(kv->value); free(kv->kbeta);   /* the host copies are never used */
    kv->key = kv->value = NULL;
    kv->kbeta = NULL;

    RunState *s = &g->s;
    s->batch = hs->batch;
    s->x = (float *)gpu_alloc(g, NULL, B * c->dim * f);
    s->xb = (float *)gpu_alloc(g, NULL, B * wide * f);
    s->xb2 = (float *)gpu_alloc(g, NULL, B * c->dim * f);
    s->hb = (float *)gpu_alloc(g, NULL, B * c->hidden_dim * f);
    s->hb2 = (float *)gpu_alloc(g, NULL, B * c->hidden_dim * f);
    s->q = (float *)gpu_alloc(g, NULL, B * qd * f);
    s->k = (float *)gpu_alloc(g, NULL, B * kvd * f);
    s->v = (float *)gpu_alloc(g, NULL, B * kvd * f);
    s->qperp = (float *)gpu_alloc(g, NULL, B * kvd * f);
    s->att = (float *)gpu_alloc(g, NULL, B * c->n_heads * (size_t)kv->ctx * f);
    s->logits = (float *)gpu_alloc(g, NULL, logit_rows * c->vocab_size * f);
    g->tokens = (int *)gpu_alloc(g, NULL, B * sizeof(int));

    BLAS(cublasCreate(&g->blas));
    BLAS(cublasSetMathMode(g->blas, CUBLAS_DEFAULT_MATH));
    int shared_max;   /* the attribute is the kernel's, not this model's: set it to the device's limit */
    CUDA(cudaDeviceGetAttribute(&shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    g->att_shared = att_shared_bytes(kv, c);
    if (g->att_shared > (size_t)shared_max)
        die("attention needs %zu bytes of shared memory per block for %s/%s at head_dim %d, the GPU has %d",
            g->att_shared, tq_fmt_name(kv->kc.fmt), tq_fmt_name(kv->vc.fmt), c->head_dim, shared_max);
    CUDA(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_max));
    t->gpu = g;
}

static void gpu_free(Transformer *t) {
    Gpu *g = t->gpu;
    if (!g) return;
    cublasDestroy(g->blas);
    for (int i = 0; i < g->n_allocs; i++) cudaFree(g->allocs[i]);
    free(g);
    t->gpu = NULL;
}

/* ---------------------------------------------------------------------------
 * Kernels: each runs one step of run.c's forward() for every token (and head)
 * at once, calling the same TQ_HD functions.
 */

static unsigned blocks(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

__global__ void embed_kernel(float *x, const float *emb, const int *tokens, int n, int dim) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n * dim) x[i] = emb[(size_t)tokens[i / dim] * dim + i % dim];
}

__global__ void rmsnorm_kernel(float *o, const float *x, const float *w, int n, int dim, float eps) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < n) rmsnorm(o + (size_t)b * dim, x + (size_t)b * dim, w, dim, eps);
}

__global__ void rope_kernel(const __grid_constant__ Config c, float *q, float *k, int n, int pos) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n * c.n_kv_heads) rope_group(&c, q, k, i / c.n_kv_heads, i % c.n_kv_heads, pos);
}

__global__ void encode_kernel(const __grid_constant__ KVCache kv, const __grid_constant__ Config c, int l,
                              float *k, float *v, float *scratch, int n, int pos) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * c.n_kv_heads) return;
    size_t hd = c.head_dim, kvd = c.n_kv_heads * hd;
    int b = i / c.n_kv_heads, g = i % c.n_kv_heads;
    encode_kv(&kv, &c, l, g, pos + b, k + b * kvd + g * hd, v + b * kvd + g * hd, scratch + (size_t)i * hd);
}

__global__ void store_exact_kernel(const __grid_constant__ KVCache kv, const __grid_constant__ Config c, int l,
                                   const float *k, const float *v, int n, int pos) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * c.n_kv_heads) return;
    size_t hd = c.head_dim, kvd = c.n_kv_heads * hd;
    int b = i / c.n_kv_heads, g = i % c.n_kv_heads;
    store_exact(&kv, &c, l, g, pos, b, n, k + b * kvd + g * hd, v + b * kvd + g * hd);
}

__global__ void add_kernel(float *x, const float *y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

__global__ void swiglu_kernel(float *h, const float *h2, size_t n) {   /* h = silu(h) * h2 */
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) h[i] = h[i] / (1.0f + expf(-h[i])) * h2[i];
}

/* max (take_max) or sum of v over the block's ATT_THREADS threads, red: ATT_THREADS floats */
__device__ float block_reduce(float v, float *red, int take_max) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = ATT_THREADS / 2; s > 0; s /= 2) {
        if ((int)threadIdx.x < s) red[threadIdx.x] = take_max ? fmaxf(red[threadIdx.x], red[threadIdx.x + s])
                                                              : red[threadIdx.x] + red[threadIdx.x + s];
        __syncthreads();
    }
    float r = red[0];
    __syncthreads();
    return r;
}

/* Block (b, h): query head h of token b, at position bt.pos + b, over its T
 * keys; run.c's attention() with the keys split over the threads:
 *   thread 0 prepares the query (shared memory);
 *   each thread scores its keys t = tid, tid + ATT_THREADS, ... (key_score);
 *   softmax over the block (max and sum reduced in shared memory);
 *   each thread accumulates its keys' value codes into its own accumulator
 *   (tq_axpy, a row of shared memory padded by one float against bank clashes);
 *   the rows are summed, and thread 0 rotates the sum back (tq_finish) and adds
 *   the exact positions and mu_v (add_exact_values). */
__global__ void __launch_bounds__(ATT_THREADS) attention_kernel(const __grid_constant__ KVCache kv,
        const __grid_constant__ Config c, int l, const __grid_constant__ Batch bt, float *q, float *att, float *out) {
    extern __shared__ float sh[];
    int hd = c.head_dim, tid = threadIdx.x, b = blockIdx.x / c.n_heads, h = blockIdx.x % c.n_heads;
    int g = h / (c.n_heads / c.n_kv_heads), T = bt.pos + b + 1;
    size_t qf = tq_query_floats(&kv.kc), af = tq_acc_floats(&kv.vc);
    float *qp = sh, *qperp = qp + qf, *qu = qperp + hd, *red = qu + KPROJ_MAX, *sum = red + ATT_THREADS;
    float *accs = sum + af, *acc = accs + (size_t)tid * (af + 1);
    float *qh = q + (size_t)blockIdx.x * hd, *p = att + (size_t)blockIdx.x * kv.ctx;

    if (tid == 0) prepare_query(&kv, &c, l, g, qh, qperp, qu, qp);
    __syncthreads();
    float mx = -INFINITY, scale = 1.0f / sqrtf((float)hd);
    for (int t = tid; t < T; t += ATT_THREADS) {
        p[t] = scale * key_score(&kv, &c, l, g, t, T, qh, qp, qu, &bt);
        mx = fmaxf(mx, p[t]);
    }
    mx = block_reduce(mx, red, 1);
    float z = 0.0f;
    for (int t = tid; t < T; t += ATT_THREADS) { p[t] = expf(p[t] - mx); z += p[t]; }
    z = block_reduce(z, red, 0);
    for (size_t j = 0; j < af; j++) acc[j] = 0.0f;
    for (int t = tid; t < T; t += ATT_THREADS) {
        p[t] /= z;
        if (!is_exact(&kv, t, T)) tq_axpy(&kv.vc, p[t], cache_row(&kv, kv.value, kv.vc.bytes, &c, l, g, t), acc);
    }
    __syncthreads();
    for (size_t j = tid; j < af; j += ATT_THREADS) {
        float s = 0.0f;
        for (int i = 0; i < ATT_THREADS; i++) s += accs[(size_t)i * (af + 1) + j];
        sum[j] = s;
    }
    __syncthreads();
    if (tid == 0) {
        float *o = out + (size_t)blockIdx.x * hd;
        tq_finish(&kv.vc, sum, o);
        add_exact_values(&kv, &c, l, g, T, p, &bt, o);
    }
}

/* out (B, d) = x (B, n) . W^T with W (d, n) row-major: in cuBLAS's column-major
 * terms out^T (d, B) = W^T(as stored: n x d)^T . x^T (n, B). */
static void matmul(Gpu *g, float *out, const float *x, const float *w, int B, int n, int d) {
    const float one = 1.0f, zero = 0.0f;
    BLAS(cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, d, B, n, &one, w, n, x, n, &zero, out, d));
}

/* A new sequence: layer l's first-batch q, k, v go to the host, run.c's
 * measure_stats fills the host cache's statistics, and they come back. */
static void gpu_stats(Transformer *t, int l, int n) {
    const Config *c = &t->config;
    Gpu *g = t->gpu;
    KVCache *kv = &t->cache;
    RunState *hs = &t->state;
    size_t hd = c->head_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd, R = kv->kproj, f = sizeof(float);
    CUDA(cudaMemcpy(hs->q, g->s.q, n * qd * f, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hs->k, g->s.k, n * kvd * f, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(hs->v, g->s.v, n * kvd * f, cudaMemcpyDeviceToHost));
    measure_stats(kv, c, l, hs->q, hs->k, hs->v, n);
    CUDA(cudaMemcpy(g->kv.koff + l * kvd, kv->koff + l * kvd, kvd * f, cudaMemcpyHostToDevice));
    CUDA(cudaMemcpy(g->kv.voff + l * kvd, kv->voff + l * kvd, kvd * f, cudaMemcpyHostToDevice));
    CUDA(cudaMemcpy(g->kv.kw + l * kvd, kv->kw + l * kvd, kvd * f, cudaMemcpyHostToDevice));
    if (R) CUDA(cudaMemcpy(g->kv.kdir + l * R * kvd, kv->kdir + l * R * kvd, R * kvd * f, cudaMemcpyHostToDevice));
}

/* run.c's forward(), step for step, on the GPU. */
static float *forward(Transformer *t, const int *tokens, int n, int pos, int all_logits) {
    const Config *c = &t->config;
    Gpu *g = t->gpu;
    const TransformerWeights *w = &g->w;
    RunState *s = &g->s;
    const KVCache *kv = &t->cache;
    int dim = c->dim, hd = c->head_dim, hid = c->hidden_dim, TH = 256;
    int qd = c->n_heads * hd, kvd = c->n_kv_heads * hd, nkv = n * c->n_kv_heads;
    int stats = pos == 0 && (kv->koffsets || kv->voffsets || kv->kweights || kv->kproj);

    CUDA(cudaMemcpy(g->tokens, tokens, n * sizeof(int), cudaMemcpyHostToDevice));
    embed_kernel<<<blocks((size_t)n * dim, TH), TH>>>(s->x, w->token_embedding, g->tokens, n, dim);
    for (int l = 0; l < c->n_layers; l++) {
        /* attention block: x += Wo . attn(RoPE(Wq xn), RoPE(Wk xn), Wv xn) */
        rmsnorm_kernel<<<blocks(n, 32), 32>>>(s->xb, s->x, w->rms_att + (size_t)l * dim, n, dim, c->norm_eps);
        matmul(g, s->q, s->xb, w->wq + (size_t)l * qd * dim, n, dim, qd);
        matmul(g, s->k, s->xb, w->wk + (size_t)l * kvd * dim, n, dim, kvd);
        matmul(g, s->v, s->xb, w->wv + (size_t)l * kvd * dim, n, dim, kvd);
        rope_kernel<<<blocks(nkv, 32), 32>>>(*c, s->q, s->k, n, pos);
        if (stats) gpu_stats(t, l, n);
        encode_kernel<<<blocks(nkv, 32), 32>>>(g->kv, *c, l, s->k, s->v, s->qperp, n, pos);
        Batch bt = {pos, s->k, s->v};
        attention_kernel<<<n * c->n_heads, ATT_THREADS, g->att_shared>>>(g->kv, *c, l, bt, s->q, s->att, s->xb);
        store_exact_kernel<<<blocks(nkv, 32), 32>>>(g->kv, *c, l, s->k, s->v, n, pos);
        matmul(g, s->xb2, s->xb, w->wo + (size_t)l * dim * qd, n, qd, dim);
        add_kernel<<<blocks((size_t)n * dim, TH), TH>>>(s->x, s->xb2, (size_t)n * dim);

        /* feed-forward block: x += W2 . (silu(W1 xn) * W3 xn)   (SwiGLU) */
        rmsnorm_kernel<<<blocks(n, 32), 32>>>(s->xb, s->x, w->rms_ffn + (size_t)l * dim, n, dim, c->norm_eps);
        matmul(g, s->hb, s->xb, w->w1 + (size_t)l * hid * dim, n, dim, hid);
        matmul(g, s->hb2, s->xb, w->w3 + (size_t)l * hid * dim, n, dim, hid);
        swiglu_kernel<<<blocks((size_t)n * hid, TH), TH>>>(s->hb, s->hb2, (size_t)n * hid);
        matmul(g, s->xb2, s->hb, w->w2 + (size_t)l * dim * hid, n, hid, dim);
        add_kernel<<<blocks((size_t)n * dim, TH), TH>>>(s->x, s->xb2, (size_t)n * dim);
    }
    CUDA(cudaGetLastError());

    /* final norm and classifier, for the tokens whose logits are wanted */
    int first = all_logits ? 0 : n - 1;
    float *x = s->x + (size_t)first * dim;
    rmsnorm_kernel<<<blocks(n - first, 32), 32>>>(x, x, w->rms_final, n - first, dim, c->norm_eps);
    matmul(g, s->logits, x, w->wcls, n - first, dim, c->vocab_size);
    CUDA(cudaMemcpy(t->state.logits, s->logits, (size_t)(n - first) * c->vocab_size * sizeof(float),
                    cudaMemcpyDeviceToHost));
    return t->state.logits;
}
