/* run_cuda.cu - run.c's program with the forward pass on an NVIDIA GPU.
 *
 * Everything but the forward pass is run.c's, included below: the loader, the
 * tokenizer, the sampler, the modes, the CLI, the cache's layout and the
 * statistics of a new sequence. tq.c is included as well: the GPU writes the
 * cache in tq.h's byte layout, and the serial pieces of the codec (bit
 * packing, fp16 rounding, the scale rule, the plain formats' encoders) are
 * tq.c's own TQ_HD functions. What is new:
 *
 *   - The weights live on the GPU in fp16, converted once at load (model.bin
 *     stays fp32); every product accumulates in fp32. A decoded token (one
 *     row) multiplies with a GEMV kernel that streams each weight row once
 *     with 16-byte loads, the RMSNorm of its input and the residual add or the
 *     SwiGLU of its output fused in. A batch (prefill) widens each matrix to
 *     fp32 once and multiplies with cuBLAS SGEMM (TF32 is never enabled).
 *     wq|wk|wv and w1|w3 are stored as one matrix each: one launch apiece.
 *   - One token's whole forward pass (7 kernels a layer) is captured once as
 *     a CUDA graph and replayed: the position and the token are read from
 *     device memory, so the graph never changes. Kernels are programmatic
 *     dependent launches: the next one's blocks start while this one runs, and
 *     do what does not depend on it (weights, codec tables, older cache rows)
 *     before they wait for it (pdl_wait_then_release).
 *   - RoPE, the cache encode and the query rotation of a (token, KV head)
 *     are one thread block (rope_encode_kernel) whose warps encode the key,
 *     the value and rotate the query heads side by side; the TurboQuant
 *     encode runs in parallel over the coordinates (the rotation's butterflies
 *     in the order tq.c uses, so the codes are the CPU's). A decoded token's
 *     key and value, exact positions of the window, are encoded later, by
 *     merge_kernel's extra blocks beside the attention: off the path the step waits on.
 *   - Attention is split over the sequence (flash-decoding): a block scores
 *     and accumulates one chunk of coded keys for up to ATT_ROWS query rows of
 *     a KV head (all its query heads at decode: each code is read and decoded
 *     once for the whole group), with an online softmax, the rotated queries
 *     readied for each block of key directions the chunk meets (tq.c's
 *     prepare_block: Pi q_perp = Pi q - sum_j <Pi q, Pi u_j> Pi u_j, the
 *     rotation being linear; a chunk is split at the blocks' edges, the
 *     tensor-core kernel's tiles of 16 never straddle one); merge_kernel then
 *     combines the chunks, adds the exact positions (sink and window, outside
 *     the hot loop) and applies the value codec's inverse rotation once. For
 *     tq2/tq3 keys and values the block is attention_mma_kernel: the codes
 *     decoded into fp16 fragments of tensor-core products (split in high and
 *     low parts, so the sums are as close to fp32's as the CUDA cores' are).
 *   - One-time work (CUDA's loading of kernels on first launch, cuBLAS's
 *     set-up, the decode graph's capture) happens at load, in gpu_warm_up.
 *   - The key directions per block of --kblock positions (tq.h, "Key
 *     projection"; the cache in tq_cache_build's layout: per-block kdir and
 *     kdir_rot, int8 betas with per-block steps, fp16 betas at --kblock 0)
 *     are measured on the GPU the way tq.c's tq_cache_key_dirs does: on a
 *     block's own tokens of the batch that starts it (stats_kernel, a thread
 *     block per KV head and block), or inherited from the previous block when
 *     that batch holds fewer than KBLOCK_MIN of them (inherit_kernel; a
 *     decoded token that starts a block: rope_encode_kernel, a branch on the
 *     position read from device memory, so the graph stays one).
 *     TQ_CUDA_HOST_STATS=1 runs run.c's own on the host instead.
 *
 * The GPU rounds differently (fused multiply-adds, sums in another order), so
 * its logits match the CPU build's on the same (fp16-representable) weights
 * closely, not bit for bit: tests/test_cuda.py.
 *
 * Build: make run_cuda    Usage: ./run_cuda model.bin -h (run's options)
 */
#define RUN_CUDA
#ifndef PROG
#define PROG "run_cuda"
#endif
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "tq.c"
#include "run.c"

/* run.c's KV cache (tq.h's tq_cache) by the kernels' name */
typedef tq_cache KVCache;
#define KBLOCK_MIN TQ_KBLOCK_MIN

#define CUDA(call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) die("CUDA: %s (%s line %d)", cudaGetErrorString(e_), __FILE__, __LINE__); } while (0)
#define BLAS(call) do { cublasStatus_t e_ = (call); \
    if (e_ != CUBLAS_STATUS_SUCCESS) die("cuBLAS: status %d (%s line %d)", (int)e_, __FILE__, __LINE__); } while (0)

#define FULL_MASK 0xffffffffu
#define GEMV_WARPS 8      /* output rows per GEMV block, one warp each                    */
#define ATT_WARPS 4       /* warps of an attention block: they split the block's keys       */
#define ATT_ROWS 4        /* query rows (token, head) of an attention block                 */
#define ATT_IT 8          /* keys a lane group scores per batch                             */
#define CHUNK_GRAIN 128   /* keys per attention block: a multiple of this                   */
#define MAX_PARTS 64      /* attention blocks per (row, KV head): partial results to merge  */
#define MERGE_THREADS 128
#define MAX_ALLOCS 64
#define NO_SCORE -1e30f   /* running max before any key: finite, so exp(m - m) = 1, not NaN */

/* The weights on the GPU, fp16 (norms fp32). Row-major like run.c's. */
typedef struct {
    __half *emb;      /* (vocab_size, dim) token embedding                            */
    __half *wcls;     /* (vocab_size, dim) classifier; = emb when shared               */
    __half *wqkv;     /* (n_layers, q_dim + 2 kv_dim, dim): rows of wq, then wk, then wv */
    __half *wo;       /* (n_layers, dim, q_dim)                                        */
    __half *w13;      /* (n_layers, 2 hidden_dim, dim): rows of w1 (gate), then w3 (up) */
    __half *w2;       /* (n_layers, dim, hidden_dim)                                   */
    float *rms_att;   /* (n_layers, dim)                                               */
    float *rms_ffn;   /* (n_layers, dim)                                               */
    float *rms_final; /* (dim)                                                         */
} GpuWeights;

/* What the attention kernels read and write besides the cache. */
typedef struct {
    const int *step;     /* (1 + batch) the position of the batch's first token, then its token ids */
    int n;               /* tokens in the batch                                              */
    int chunk;           /* coded keys per attention block; 0 (decode): ceil(len / units) rounded up to CHUNK_GRAIN */
    int units;           /* attention blocks per KV head at decode                           */
    int layer;
    int dk, dv;          /* floats of a prepared query and of a value accumulator (head_dim, or 2 head_dim for tq*p) */
    int emax;            /* exact positions a query reads at most                           */
    float *qkv;          /* (n, q_dim + 2 kv_dim) q (after RoPE) | k | v as stored */
    const float *rope;   /* (ctx, head_dim/2, 2) cos and sin of RoPE's angle for every position and pair */
    float *qext;         /* (n * n_heads, dk) queries rotated, Pi q (tq*p: then S Pi q); the attention
                            readies them for each chunk's block of key directions (tq.h, "Key projection") */
    float *kdir_qjl;     /* (n_layers, n_kv_heads, blocks, R, head_dim) S Pi u_j for tq*p keys, else NULL */
    float *part;         /* (n * n_heads, MAX_PARTS, 2 + dv) per block: running max, sum, accumulator */
    float *escore;       /* (n * n_heads, emax) scores of the exact positions, then their weights */
    float *knew;         /* (n_kv_heads, 2, head_dim) a decoded token's key (after RoPE) and value, which
                            merge_kernel stores in the cache (rope_encode_kernel's deferred STORE) */
} AttArgs;

typedef void (*AttKernel)(const KVCache, const Config, const AttArgs);   /* an attention kernel */

/* The model on the GPU. */
struct Gpu {
    GpuWeights w;
    KVCache kv;           /* the cache: the host's flags and codecs, every array in GPU memory */
    AttArgs att;          /* the attention buffers below, for the kernels                    */
    int batch;
    float *x;             /* (batch, dim) residual stream                                  */
    float *xb;            /* (batch, max(dim, q_dim)) normed input (batches), attention output */
    float *qkv;           /* (batch, q_dim + 2 kv_dim)                                     */
    float *hb;            /* (batch, 2 hidden_dim) gate | up (batches)                     */
    float *hh;            /* (batch, hidden_dim) silu(gate) * up                           */
    float *logits;        /* (batch, vocab_size) in eval / logits mode, else (1, vocab_size) */
    float *wide;          /* (wide_floats) one weight matrix widened to fp32 for cuBLAS     */
    size_t wide_floats;
    int *step;            /* (1 + batch) device copy of host_step                          */
    int *host_step;       /* (1 + batch) pinned: position, token ids                       */
    float *host_logits;   /* pinned copy of logits                                         */
    size_t enc_shared, att_shared, merge_shared; /* dynamic shared memory per block        */
    AttKernel att_kernel; /* attention_mma_kernel for tq2/tq3 keys and values, else attention_kernel */
    int att_rows, att_threads; /* query rows and threads of one of its blocks             */
    int pdl;              /* 1: programmatic dependent launches (TQ_CUDA_NO_PDL unset) */
    int defer;            /* 1: a decoded token's key and value stored by merge_kernel (TQ_CUDA_NO_DEFER unset) */
    int host_stats;       /* 1: statistics measured on the host by run.c (TQ_CUDA_HOST_STATS set) */
    double *stats_m;      /* (n_kv_heads, stats_blocks head_dim^2 + batch) scratch of stats_kernel */
    int stats_blocks;     /* blocks of key directions a batch can start, at most                  */
    int stats_m_shared;   /* 1: stats_kernel keeps the second moment in shared memory            */
    cudaStream_t stream;
    cublasHandle_t blas;
    cudaGraphExec_t decode; /* one token's forward pass at pos > 0, captured on first use  */
    void *allocs[MAX_ALLOCS]; /* everything cudaMalloc'd, for gpu_free                   */
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

static unsigned blocks(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }
__host__ __device__ static int ceil_div(int a, int b) { return (a + b - 1) / b; }

/* Key directions per block of kblock positions (tq.h, "Key projection"): block j of a KV head holds
 * R rows of head_dim at kdir + dir_at(head, j) (likewise kdir_rot, AttArgs.kdir_qjl) and R steps at
 * kscale + dir_at(head, j) / head_dim. */
__host__ __device__ static size_t dir_at(const KVCache &kv, size_t head, int blk, int hd) {
    return (head * kv.blocks + blk) * kv.kproj * hd;
}
/* ---------------------------------------------------------------------------
 * Small device helpers
 */

/* Programmatic dependent launch (sm_90): kernels are launched (launch() below) so that the
 * next one in the stream may start while this one finishes; every kernel first waits here
 * until its predecessor has completed and its writes are visible (so the order is plain
 * stream order), then lets its own successor start launching: the launch latency of one
 * kernel hides behind the tail of the one before. */
__device__ __forceinline__ void pdl_wait_then_release() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

/* Sum of v over the block (blockDim.x a multiple of 32); red: 32 T of shared memory.
 * Every thread gets the sum; red may be reused right after. */
template <typename T>
__device__ T block_sum(T v, T *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();                       /* a previous call's readers are done with red */
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    T s = 0;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) s += red[i];
    return s;
}

template <typename T>
__device__ T block_max(T v, T *red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    T s = red[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); i++) s = fmaxf(s, red[i]);
    return s;
}

__device__ __forceinline__ float ld_f16(const uint8_t *p) { return __half2float(__ldg((const __half *)p)); }

__device__ __forceinline__ void load8(const float *p, float v[8]) {
    float4 a = *(const float4 *)p, b = *(const float4 *)(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

/* ---------------------------------------------------------------------------
 * Weights: fp32 (model.bin) -> fp16 on the GPU, and back to fp32 for cuBLAS
 */

__global__ void to_half_kernel(__half *dst, const float *src, size_t n) {
    pdl_wait_then_release();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2half_rn(fminf(fmaxf(src[i], -65504.0f), 65504.0f));  /* saturate, as tq.c's fp16 */
}

__global__ void to_float_kernel(float *dst, const __half *src, size_t n) {
    pdl_wait_then_release();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __half2float(src[i]);
}

/* dst (n fp16) = host (n fp32), through the fp32 scratch g->wide in pieces */
static void upload_half(Gpu *g, __half *dst, const float *host, size_t n) {
    for (size_t off = 0; off < n; off += g->wide_floats) {
        size_t m = n - off < g->wide_floats ? n - off : g->wide_floats;
        CUDA(cudaMemcpy(g->wide, host + off, m * sizeof(float), cudaMemcpyHostToDevice));
        to_half_kernel<<<blocks(m, 256), 256>>>(dst + off, g->wide, m);
        CUDA(cudaGetLastError());
    }
    CUDA(cudaDeviceSynchronize());
}

/* ---------------------------------------------------------------------------
 * Element-wise steps
 */

__global__ void embed_kernel(float *x, const __half *emb, const int *step, int n, int dim) {
    pdl_wait_then_release();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n * dim) x[i] = __half2float(emb[(size_t)step[1 + i / dim] * dim + i % dim]);
}

/* run.c's rmsnorm for row blockIdx.x: o = w * (r x), r = 1/sqrt(mean(x^2) + eps), the sum in double */
__global__ void rmsnorm_kernel(float *o, const float *x, const float *w, int dim, float eps) {
    pdl_wait_then_release();
    __shared__ double red[32];
    const float *xr = x + (size_t)blockIdx.x * dim;
    double ss = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)xr[i] * xr[i];
    ss = block_sum(ss, red);
    float r = (float)(1.0 / sqrt(ss / dim + eps));
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[(size_t)blockIdx.x * dim + i] = w[i] * (r * xr[i]);
}

/* h (n, hid) = silu(gate) * up, from hb (n, 2 hid) = gate | up (run.c's formula) */
__global__ void swiglu_kernel(float *h, const float *hb, int n, int hid) {
    pdl_wait_then_release();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * hid) return;
    size_t b = i / hid, j = i % hid;
    float gt = hb[b * 2 * hid + j], up = hb[b * 2 * hid + hid + j];
    h[i] = gt / (1.0f + expf(-gt)) * up;
}

/* ---------------------------------------------------------------------------
 * GEMV: one token's out (n_out) = W (n_out, n_in) . xn, W fp16, fp32 sums.
 * A warp per output row; each lane streams 16 bytes (8 weights) at a time, so a
 * row is read once at full width, GEMV_DEPTH loads ahead of the arithmetic (the
 * first ones issued before the kernel waits for its predecessor, whose output x is:
 * the weights do not depend on it). NORM: xn = run.c's rmsnorm of x with weights
 * norm_w, computed by every block (x is a few KiB, read from L2). Epilogues:
 * store; add into out (the residual stream); SwiGLU, out[i] = silu(W_i xn) *
 * (W_{n_out+i} xn) with the up rows right after the gate rows.
 */
enum { EPI_STORE, EPI_ADD, EPI_SWIGLU };
#define GEMV_DEPTH 4      /* 16-byte weight loads a lane keeps in flight per row */

__device__ __forceinline__ float dot8_half(uint4 u, const float x[8]) {
    const __half2 *h = (const __half2 *)&u;
    float s = 0.0f;
    for (int k = 0; k < 4; k++) {
        float2 f = __half22float2(h[k]);
        s += f.x * x[2 * k] + f.y * x[2 * k + 1];
    }
    return s;
}

template <int EPI, bool NORM>
__global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_kernel(float *out, const __half *W, const float *x,
        const float *norm_w, int n_in, int n_out, float eps) {
    __shared__ double red[32];
    const int lane = threadIdx.x & 31, row = min((int)(blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)), n_out - 1);
    const __half *w0 = W + (size_t)row * n_in, *w1 = w0 + (size_t)n_out * n_in;
    uint4 a[GEMV_DEPTH], b[GEMV_DEPTH];       /* the first weights, in flight while x is computed and normed */
#pragma unroll
    for (int u = 0; u < GEMV_DEPTH; u++) {
        int j = lane * 8 + u * 256;
        if (j < n_in) a[u] = __ldcs((const uint4 *)(w0 + j));
        if (EPI == EPI_SWIGLU && j < n_in) b[u] = __ldcs((const uint4 *)(w1 + j));
    }
    pdl_wait_then_release();
    float r = 1.0f;
    if (NORM) {
        double ss = 0;
        for (int j = threadIdx.x; j < n_in; j += blockDim.x) ss += (double)x[j] * x[j];
        ss = block_sum(ss, red);
        r = (float)(1.0 / sqrt(ss / n_in + eps));
    }
    float a0 = 0.0f, a1 = 0.0f;
    for (int j0 = 0; j0 < n_in; j0 += GEMV_DEPTH * 256) {
#pragma unroll
        for (int u = 0; u < GEMV_DEPTH; u++) {
            int j = j0 + lane * 8 + u * 256;
            if (j >= n_in) break;
            float xv[8];
            load8(x + j, xv);
            if (NORM) {
                float nw[8];
                load8(norm_w + j, nw);
                for (int k = 0; k < 8; k++) xv[k] = nw[k] * (r * xv[k]);
            }
            a0 += dot8_half(a[u], xv);
            if (EPI == EPI_SWIGLU) a1 += dot8_half(b[u], xv);
            int jn = j + GEMV_DEPTH * 256;    /* the load GEMV_DEPTH chunks ahead */
            if (jn < n_in) {
                a[u] = __ldcs((const uint4 *)(w0 + jn));
                if (EPI == EPI_SWIGLU) b[u] = __ldcs((const uint4 *)(w1 + jn));
            }
        }
    }
    a0 = warp_sum(a0);
    if (EPI == EPI_SWIGLU) a1 = warp_sum(a1);
    if (lane || blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5) >= (unsigned)n_out) return;
    if (EPI == EPI_STORE) out[row] = a0;
    if (EPI == EPI_ADD) out[row] += a0;
    if (EPI == EPI_SWIGLU) out[row] = a0 / (1.0f + expf(-a0)) * a1;
}

/* ---------------------------------------------------------------------------
 * The codec on a team of threads (TEAM_WARP: the calling warp alone, synchronized
 * with __syncwarp; TEAM_BLOCK: the whole block): nvec vectors of length d in
 * shared memory. tq.c's rotation is d-point Walsh-Hadamard butterflies of span
 * 1, 2, 4, ... after random signs, 3 rounds (or a dense matrix); here each
 * stage's d/2 butterflies are spread over the team, in the same order per
 * element, so the results are tq.c's to the bit.
 */
enum { TEAM_BLOCK = 0, TEAM_WARP = 1 };

template <int T> __device__ __forceinline__ int team_tid() { return T == TEAM_WARP ? (int)(threadIdx.x & 31) : (int)threadIdx.x; }
template <int T> __device__ __forceinline__ int team_size() { return T == TEAM_WARP ? 32 : (int)blockDim.x; }
template <int T> __device__ __forceinline__ void team_sync() { if (T == TEAM_WARP) __syncwarp(); else __syncthreads(); }

/* sum / max over the team; red: 32 of shared memory (a block's warps) */
template <int T, typename V> __device__ __forceinline__ V team_sum(V v, V *red) {
    if (T == TEAM_BLOCK) return block_sum(v, red);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
template <int T, typename V> __device__ __forceinline__ V team_max(V v, V *red) {
    if (T == TEAM_BLOCK) return block_max(v, red);
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

template <int T>
__device__ void fwht_team(float *y, int nvec, int d) {      /* d a power of two: shifts, not divisions */
    const int lh = __ffs(d) - 2;                            /* log2(d / 2) */
    for (int len = 1; len < d; len *= 2) {
        for (int p = team_tid<T>(); p < nvec << lh; p += team_size<T>()) {
            int q = p & ((d >> 1) - 1), i = (p >> lh) * d + ((q & ~(len - 1)) << 1) + (q & (len - 1));
            float a = y[i], b = y[i + len];
            y[i] = a + b; y[i + len] = a - b;
        }
        team_sync<T>();
    }
    float norm = 1.0f / sqrtf((float)d);
    for (int i = team_tid<T>(); i < nvec * d; i += team_size<T>()) y[i] *= norm;
    team_sync<T>();
}

/* tq.c's fwht on one warp, in registers: lane holds elements EPL lane + j (d = 32 EPL).
 * Spans below EPL are a lane's own butterflies, the others pair lane with lane ^ (span/EPL):
 * the lower element becomes a + b, the upper a - b, as in tq.c, so the bits are tq.c's. */
template <int EPL> __device__ __forceinline__ void fwht_regs(float v[EPL], int lane) {
#pragma unroll
    for (int len = 1; len < EPL; len *= 2)
#pragma unroll
        for (int j = 0; j < EPL; j++)
            if (!(j & len)) { float a = v[j], b = v[j + len]; v[j] = a + b; v[j + len] = a - b; }
#pragma unroll
    for (int lm = 1; lm < 32; lm *= 2) {
        const bool upper = lane & lm;
#pragma unroll
        for (int j = 0; j < EPL; j++) {
            float o = __shfl_xor_sync(FULL_MASK, v[j], lm);
            v[j] = upper ? o - v[j] : v[j] + o;
        }
    }
    const float norm = 1.0f / sqrtf((float)(32 * EPL));
#pragma unroll
    for (int j = 0; j < EPL; j++) v[j] *= norm;
}

/* y (d = 32 EPL, shared memory) <- Pi y (inverse: Pi^T y) by the calling warp: tq_rotate's
 * (tq_unrotate's) rounds of signs and butterflies */
template <int EPL> __device__ void rotate_regs(const tq_codec *c, float *y, bool inverse) {
    const int lane = threadIdx.x & 31, d = 32 * EPL;
    float v[EPL];
#pragma unroll
    for (int j = 0; j < EPL; j++) v[j] = y[EPL * lane + j];
    for (int k = 0; k < c->rounds; k++) {
        const int r = inverse ? c->rounds - 1 - k : k;
        const float *sg = c->signs + (size_t)r * d + EPL * lane;
        if (inverse) fwht_regs<EPL>(v, lane);
#pragma unroll
        for (int j = 0; j < EPL; j++) v[j] *= sg[j];
        if (!inverse) fwht_regs<EPL>(v, lane);
    }
#pragma unroll
    for (int j = 0; j < EPL; j++) y[EPL * lane + j] = v[j];
    __syncwarp();
}

/* whether rotate_warp applies: the Hadamard rotation of a d one warp holds in registers */
__host__ __device__ static bool warp_rotation(const tq_codec *c) { return !c->dense && c->d >= 32 && c->d <= 256; }

__device__ void rotate_warp(const tq_codec *c, float *y, bool inverse) {
    switch (c->d) {
    case 32: rotate_regs<1>(c, y, inverse); break;
    case 64: rotate_regs<2>(c, y, inverse); break;
    case 128: rotate_regs<4>(c, y, inverse); break;
    default: rotate_regs<8>(c, y, inverse); break;
    }
}

/* y = Pi y for each vector (tq_rotate); tmp: nvec*d floats, for the dense matrix */
template <int T>
__device__ void rotate_team(const tq_codec *c, float *y, int nvec, float *tmp) {
    int d = c->d;
    if (T == TEAM_WARP && nvec == 1 && warp_rotation(c)) {
        rotate_warp(c, y, false);
        return;
    }
    if (c->dense) {
        for (int i = team_tid<T>(); i < nvec * d; i += team_size<T>()) tmp[i] = dot8(c->dense + (size_t)(i % d) * d, y + (i / d) * d, d);
        team_sync<T>();
        for (int i = team_tid<T>(); i < nvec * d; i += team_size<T>()) y[i] = tmp[i];
        team_sync<T>();
        return;
    }
    for (int r = 0; r < c->rounds; r++) {
        for (int i = team_tid<T>(); i < nvec * d; i += team_size<T>()) y[i] *= c->signs[(size_t)r * d + (i & (d - 1))];
        team_sync<T>();
        fwht_team<T>(y, nvec, d);
    }
}

/* y = Pi^T y (tq_unrotate), one vector */
template <int T>
__device__ void unrotate_team(const tq_codec *c, float *y, float *tmp) {
    int d = c->d;
    if (c->dense) {
        for (int j = team_tid<T>(); j < d; j += team_size<T>()) {
            float t = 0.0f;
            for (int i = 0; i < d; i++) t += y[i] * c->dense[(size_t)i * d + j];
            tmp[j] = t;
        }
        team_sync<T>();
        for (int j = team_tid<T>(); j < d; j += team_size<T>()) y[j] = tmp[j];
        team_sync<T>();
        return;
    }
    for (int r = c->rounds - 1; r >= 0; r--) {
        fwht_team<T>(y, 1, d);
        for (int i = team_tid<T>(); i < d; i += team_size<T>()) y[i] *= c->signs[(size_t)r * d + i];
        team_sync<T>();
    }
}

/* Scratch of encode_team in shared memory. */
typedef struct {
    float *y, *cy, *tmp;   /* (d) each */
    uint8_t *idx;          /* (d) */
    double *red;           /* (32) */
    float *hs;             /* (1): the stored scale, shared by the team */
} EncScratch;

/* code = tq_encode(c, x) with the team's threads: x (d) in shared memory, code in
 * global memory. The plain formats and the tq formats' serial steps are tq.c's. */
template <int T>
__device__ void encode_team(const tq_codec *c, const float *x, uint8_t *code, EncScratch s) {
    int d = c->d, b = c->bits, tid = team_tid<T>(), nt = team_size<T>();
    if (c->fmt == TQ_FP32) {
        for (int i = tid; i < d; i += nt) ((float *)code)[i] = x[i];
        return;
    }
    if (c->fmt == TQ_FP16) {
        for (int i = tid; i < d; i += nt) put_f16(code + 2 * i, tq_f32_to_f16(clampf(x[i], -(float)F16_MAX, (float)F16_MAX)));
        return;
    }
    if (c->fmt == TQ_Q4) {     /* one thread per block of 32: tq.c's loop on that block */
        tq_codec one = *c;
        one.d = 32;
        for (int blk = tid; blk < d / 32; blk += nt) encode_plain(&one, x + 32 * blk, code + 18 * blk);
        return;
    }
    if (c->fmt == TQ_Q8) {
        float amax = 0.0f;
        for (int i = tid; i < d; i += nt) amax = fmaxf(amax, fabsf(x[i]));
        amax = team_max<T>(amax, (float *)s.red);
        uint16_t h = scale_f16(amax / 127.0);
        float sc = tq_f16_to_f32(h);
        for (int i = tid; i < d; i += nt) {
            float q = sc > 0 ? roundf(x[i] / sc) : 0.0f;
            code[i] = (uint8_t)(int8_t)clampf(q, -127.0f, 127.0f);
        }
        if (tid == 0) put_f16(code + d, h);
        return;
    }
    /* TurboQuant: u = x/|x|, y = Pi u, idx = nearest centroid, scale, (QJL signs) */
    double ss = 0;
    for (int i = tid; i < d; i += nt) ss += (double)x[i] * x[i];
    double norm = sqrt(team_sum<T>(ss, s.red)), inv = norm > 0 ? 1.0 / norm : 0.0;
    for (int i = tid; i < d; i += nt) s.y[i] = (float)(x[i] * inv);
    team_sync<T>();
    rotate_team<T>(c, s.y, 1, s.tmp);
    for (int i = tid; i < d; i += nt) {
        uint8_t k = 0;
        for (int j = 0; j + 1 < (1 << b); j++) k += s.y[i] > c->bounds[j];
        s.idx[i] = k;
        s.cy[i] = c->centroids[k];
    }
    team_sync<T>();
    for (int grp = tid; grp < d / 8; grp += nt) pack(s.idx + 8 * grp, 8, b, code + b * grp);
    uint8_t *p = code + (size_t)d * b / 8;
    if (tid == 0) *s.hs = tq_f16_to_f32(scale_f16(norm > 0 ? scale_rule(c, norm, s.y, s.cy) : 0.0));
    team_sync<T>();
    uint16_t h = tq_f32_to_f16(*s.hs);
    if (!is_prod(c->fmt)) {
        if (tid == 0) put_f16(p, h);
        return;
    }
    /* Algorithm 2's sketch of the rotated residual r = y - (s/|x|) c (tq.c's qjl_signs) */
    float ratio = norm > 0 ? (float)(*s.hs / norm) : 0.0f;
    for (int i = tid; i < d; i += nt) s.tmp[i] = s.y[i] - ratio * s.cy[i];
    team_sync<T>();
    for (int k = tid; k < d; k += nt) s.idx[k] = norm > 0 && dot8(c->qjl + (size_t)k * d, s.tmp, d) > 0;
    team_sync<T>();
    for (int grp = tid; grp < d / 8; grp += nt) pack(s.idx + 8 * grp, 8, 1, p + grp);
    if (tid == 0) {
        put_f16(p + d / 8, h);
        put_f16(p + d / 8 + 2, scale_f16(norm > 0 ? norm * sqrt(dot8(s.tmp, s.tmp, d)) : 0.0));
    }
}

/* ---------------------------------------------------------------------------
 * RoPE, cache encode and query preparation of token b's KV head g: block
 * (b * n_kv_heads + g) of 2 + ENC_QWARPS warps. mode: ROPE rotates q and k;
 * STORE stores the key and value (tq.c's tq_store: projections beta on the directions of
 * the token's block, fp16 or int8, and codes); QUERY rotates the group's queries (qext = Pi q,
 * plus S Pi q for tq*p: the attention readies them per block of directions); EXACT also puts
 * the token in the exact store right away (one token: the ring row it takes is no longer read
 * by this step's attention); INHERIT (a decoded token, inside the replayed graph): a token that
 * starts a block of directions first gives it the previous block's (tq_cache_key_dirs:
 * one token is too few to measure on). A decoded token with a window of exact positions is
 * QUERY | EXACT without STORE: its codes are read only once it has left the
 * window, so the key and value go to AttArgs.knew and merge_kernel stores them,
 * in blocks of their own that run beside the attention (the query's chain alone
 * is then what the attention waits for). The block copies the codecs' small tables
 * and RoPE's cos and sin of its position to shared memory before it waits for its
 * predecessor (they do not depend on it: pdl_wait_then_release), then its block's
 * directions and steps and the token's q, k, v (one round trip to memory); then the chains
 * run side by side: warp 0 the key, warp 1 the value, the other warps prepare a
 * query head each. RoPE's table is the host's, computed exactly as run.c's
 * rope_group() does.
 */
enum { MODE_ROPE = 1, MODE_STORE = 2, MODE_QUERY = 4, MODE_EXACT = 8, MODE_INHERIT = 16, MODE_ENCODE = MODE_STORE | MODE_QUERY };
#define ENC_QWARPS 4   /* warps preparing queries (a group's heads are shared among them) */

/* floats of a warp's scratch in store_kv_warp: the vector, encode_team's y, cy, tmp, idx, scale */
__host__ __device__ static int enc_warp_floats(int hd) { return 4 * hd + hd / 4 + 2; }

/* floats of the codecs' tables in shared memory (codec_to_shared, both codecs) */
static size_t enc_table_floats(const KVCache *kv, int hd) { return (size_t)(kv->kc.rounds + kv->vc.rounds) * hd + 64; }

/* floats of shared memory: the two codecs' tables, the block's directions and steps, q, k, v,
 * RoPE's cos and sin, two encoders' scratch, a query warp's scratch each (+ 33 doubles for reductions) */
static size_t enc_shared_bytes(const Config *c, const KVCache *kv) {
    size_t hd = c->head_dim, G = c->n_heads / c->n_kv_heads;
    return (enc_table_floats(kv, (int)hd) + KPROJ_MAX * (hd + 1) + (G + 2) * hd + hd + 2 * enc_warp_floats((int)hd)
            + ENC_QWARPS * hd) * sizeof(float) + 33 * sizeof(double);
}

/* Block blk (> 0) of KV head `head` takes block blk - 1's directions, rotated copies, sketches and
 * steps (tq_key_dirs_inherit), by the calling block's threads. */
__device__ void inherit_dirs(const KVCache &kv, const AttArgs &a, size_t head, int blk, int hd) {
    const size_t n = (size_t)kv.kproj * hd, at = dir_at(kv, head, blk, hd);
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        kv.kdir[at + i] = kv.kdir[at - n + i];
        kv.kdir_rot[at + i] = kv.kdir_rot[at - n + i];
        if (a.kdir_qjl) a.kdir_qjl[at + i] = a.kdir_qjl[at - n + i];
    }
    if (kv.kscale)
        for (int i = threadIdx.x; i < kv.kproj; i += blockDim.x) kv.kscale[at / hd + i] = kv.kscale[at / hd - kv.kproj + i];
}

/* part[r] = u_r . x for r < R (0 beyond) by the calling warp: each lane's float sum over its
 * coordinates, then the warp's sum in double; the R sums side by side (one chain of shuffles) */
__device__ __forceinline__ void projections(const float *u, const float *x, int hd, int R, double part[KPROJ_MAX]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < KPROJ_MAX; r++) {
        float pr = 0.0f;
        if (r < R)
            for (int i = lane; i < hd; i += 32) pr += u[r * hd + i] * x[i];
        part[r] = pr;
    }
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int r = 0; r < KPROJ_MAX; r++) part[r] += __shfl_xor_sync(FULL_MASK, part[r], o);
}

/* a copy of codec c whose signs, bounds and centroids sit in shared memory at *sm (advanced) */
__device__ tq_codec codec_to_shared(const tq_codec *c, float **sm) {
    tq_codec s = *c;
    int d = c->d, K = c->bits ? 1 << c->bits : 0;
    if (c->signs) { s.signs = *sm; *sm += c->rounds * d; }
    if (K) { s.bounds = *sm; s.centroids = *sm + 16; *sm += 32; }
    for (int i = threadIdx.x; i < c->rounds * d; i += blockDim.x) s.signs[i] = c->signs[i];
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
        s.centroids[i] = c->centroids[i];
        if (i + 1 < K) s.bounds[i] = c->bounds[i];
    }
    return s;
}

/* Warp `which` (0: the key, 1: the value) stores x (head_dim, shared memory), position p of
 * (layer l, KV head g), in the cache with codec cod: for the key its projections
 * beta_r = u_r . x (u: the R directions of p's block, shared memory) in fp16, or as int8 codes of
 * the block's steps step (R, shared memory; NULL: fp16), clamped at +-127 (tq.c's tq_store), and the
 * codes of x - sum_r beta_r u_r with beta_r as stored; for the value its codes. scratch: enc_warp_floats. */
__device__ __forceinline__ void store_kv_warp(const KVCache &kv, const Config &c, int l, int g, int p, int which, const float *x,
                              const float *u, const float *step, const tq_codec *cod, float *scratch) {
    const int lane = threadIdx.x & 31, hd = c.head_dim, R = kv.kproj;
    const size_t head = (size_t)l * c.n_kv_heads + g;
    float *xp = scratch;
    EncScratch es = {xp + hd, xp + 2 * hd, xp + 3 * hd, (uint8_t *)(xp + 4 * hd), NULL, xp + 4 * hd + hd / 4};
    for (int i = lane; i < hd; i += 32) xp[i] = x[i];
    __syncwarp();
    if (which == 0 && R) {      /* beta_r = u_r . k, as stored; the codes get k - sum_r beta_r u_r */
        double part[KPROJ_MAX];
        projections(u, x, hd, R, part);
        float bf[KPROJ_MAX];
#pragma unroll
        for (int r = 0; r < KPROJ_MAX; r++) {
            if (r >= R) { bf[r] = 0.0f; continue; }
            if (step) {                  /* int8 codes of the block's step */
                int8_t code = beta_code((float)part[r], step[r]);
                if (lane == 0) kv.kbeta8[(head * kv.ctx + p) * R + r] = code;
                bf[r] = code * step[r];
            } else {
                uint16_t beta = tq_f32_to_f16((float)part[r]);
                if (lane == 0) kv.kbeta[(head * kv.ctx + p) * R + r] = beta;
                bf[r] = tq_f16_to_f32(beta);
            }
        }
        for (int i = lane; i < hd; i += 32)
            for (int r = 0; r < R; r++) xp[i] -= bf[r] * u[r * hd + i];
    }
    __syncwarp();
    encode_team<TEAM_WARP>(cod, xp, (which ? kv.value : kv.key) + tq_cache_row(&kv, l, g, p) * cod->bytes, es);
}

__global__ void __launch_bounds__(32 * (2 + ENC_QWARPS)) rope_encode_kernel(const __grid_constant__ KVCache kv,
        const __grid_constant__ Config c, int l, const __grid_constant__ AttArgs a, int mode) {
    extern __shared__ double shd[];
    float *sm = (float *)(shd + 33);
    const int hd = c.head_dim, G = c.n_heads / c.n_kv_heads, R = kv.kproj, tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, lhd = __ffs(hd) - 1;
    const int b = blockIdx.x / c.n_kv_heads, g = blockIdx.x % c.n_kv_heads, pos = a.step[0], p = pos + b;
    const size_t qd = (size_t)c.n_heads * hd, kvd = (size_t)c.n_kv_heads * hd, head = (size_t)l * c.n_kv_heads + g;
    float *row = a.qkv + (size_t)b * (qd + 2 * kvd), *q = row + (size_t)g * G * hd, *k = row + qd + g * hd, *v = k + kvd;

    /* before the wait: what does not depend on the predecessor (constants, the position) */
    tq_codec kc = codec_to_shared(&kv.kc, &sm), vc = codec_to_shared(&kv.vc, &sm);
    float *u = sm, *step = u + KPROJ_MAX * hd, *sq = step + KPROJ_MAX, *sk = sq + G * hd, *sv = sk + hd, *cs = sv + hd;
    float *scratch = cs + hd;
    if (mode & MODE_ROPE)
        for (int i = tid; i < hd; i += nt) cs[i] = a.rope[(size_t)p * hd + i];
    pdl_wait_then_release();
    /* the directions of p's block; a decoded token that starts a block (one token: too few to
     * measure on, tq_cache_key_dirs) first gives it the previous block's, read from there */
    int blk = p / kv.kblock, src = blk;
    if ((mode & MODE_INHERIT) && R && blk > 0 && p % kv.kblock == 0) {
        inherit_dirs(kv, a, head, blk, hd);
        src = blk - 1;
    }
    const size_t du = R ? dir_at(kv, head, src, hd) : 0;
    for (int i = tid; i < hd; i += nt) {
        for (int r = 0; r < R; r++) u[r * hd + i] = kv.kdir[du + r * hd + i];
        sk[i] = k[i]; sv[i] = v[i];
    }
    if (tid < R && kv.kbeta8) step[tid] = kv.kscale[du / hd + tid];
    for (int i = tid; i < G * hd; i += nt) sq[i] = q[i];
    __syncthreads();
    if (mode & MODE_ROPE) {      /* run.c's rope_group(): pair (2i, 2i+1) turned by pos * theta^(-2i/head_dim) */
        for (int t = tid; t < (G + 1) * (hd / 2); t += nt) {
            int j = t >> (lhd - 1), i = 2 * (t & (hd / 2 - 1));
            float *vec = j < G ? sq + j * hd : sk, co = cs[i], si = cs[i + 1], x0 = vec[i], x1 = vec[i + 1];
            vec[i] = x0 * co - x1 * si;
            vec[i + 1] = x0 * si + x1 * co;
            if (!(mode & MODE_ENCODE)) {         /* RoPE alone (statistics come next): back to memory */
                float *out = j < G ? q + j * hd : k;
                out[i] = vec[i]; out[i + 1] = vec[i + 1];
            }
        }
        __syncthreads();
    }
    if (!(mode & MODE_ENCODE)) return;

    if (warp < 2) {              /* warp 0: the key; warp 1: the value */
        const float *x = warp == 0 ? sk : sv;
        float *out = warp == 0 ? k : v;
        if (mode & MODE_STORE) {  /* (a branch per codec: one known at compile time keeps it in registers) */
            float *ws = scratch + warp * enc_warp_floats(hd);
            if (warp == 0) store_kv_warp(kv, c, l, g, p, 0, x, u, kv.kbeta8 ? step : NULL, &kc, ws);
            else store_kv_warp(kv, c, l, g, p, 1, x, u, NULL, &vc, ws);
        } else                     /* for merge_kernel's store */
            for (int i = lane; i < hd; i += 32) a.knew[((size_t)g * 2 + warp) * hd + i] = x[i];
        uint16_t *ex = warp == 0 ? kv.exact_k : kv.exact_v;
        size_t er = (mode & MODE_EXACT) && (p < kv.sink || kv.window > 0) ? tq_exact_row(&kv, l, g, p) : SIZE_MAX;
        for (int i = lane; i < hd; i += 32) {   /* the vector as the exact store keeps it (store_exact's rule) */
            uint16_t h = tq_f32_to_f16(x[i]);
            out[i] = tq_f16_to_f32(h);
            if (er != SIZE_MAX) ex[er + i] = h;
        }
        return;
    }
    if (!(mode & MODE_QUERY)) return;
    /* the other warps, a query head each: Pi q (the attention takes off the parts along each
     * chunk's block of directions, in the rotated domain: tq.c's prepare_block) */
    float *tmp = scratch + 2 * enc_warp_floats(hd) + (size_t)(warp - 2) * hd;
    for (int j = warp - 2; j < G; j += nt / 32 - 2) {
        float *qj = sq + j * hd, *qg = q + j * hd;
        for (int i = lane; i < hd; i += 32) qg[i] = qj[i];   /* q after RoPE, for the exact positions */
        __syncwarp();
        if (is_tq(kc.fmt)) rotate_team<TEAM_WARP>(&kc, qj, 1, tmp);
        float *qe = a.qext + ((size_t)b * c.n_heads + g * G + j) * a.dk;
        for (int i = lane; i < hd; i += 32) qe[i] = qj[i];
        if (is_prod(kc.fmt))             /* S Pi q: the QJL half of the query */
            for (int i = lane; i < hd; i += 32) qe[hd + i] = dot8(kc.qjl + (size_t)i * hd, qj, hd);
        __syncwarp();
    }
}

/* ---------------------------------------------------------------------------
 * The key directions of the blocks that start in a batch (n tokens of layer l at pos, after
 * RoPE), tq.c's tq_cache_key_dirs on the GPU: block (g, j) for KV head g and the j-th block of
 * positions that starts in the batch, measured on its own tokens of the batch (a block with fewer
 * than KBLOCK_MIN of them, past position 0, is inherit_kernel's). Every step is spread over the
 * block's threads, so the sums run in another order than run.c's and the last bits of a double
 * may differ before they are rounded to float and fp16; the second moment's sums over tokens
 * keep run.c's order. Scratch: per KV head, stats_blocks head_dim^2 doubles for each block's
 * second moment where shared memory cannot hold it (m_shared 0), then a batch of doubles: every
 * token's |r_b|^2.
 */
#define STATS_THREADS 256
#define STATS_LANES 8                            /* threads per key where a step takes one key each */
#define STATS_TILE (STATS_THREADS / STATS_LANES) /* keys whose r_b sit in shared memory at once */

/* stats_kernel's dynamic shared memory: v, mv (head_dim doubles each), the second moment m
 * (head_dim^2 doubles) when m_shared, a tile of r_b (STATS_TILE, head_dim) doubles, and y, tmp
 * (R, head_dim) floats each */
static size_t stats_shared_bytes(int hd, int m_shared) {
    size_t doubles = 2 * (size_t)hd + (m_shared ? (size_t)hd * hd : 0) + (size_t)STATS_TILE * hd;
    return doubles * sizeof(double) + 2 * (size_t)KPROJ_MAX * hd * sizeof(float);
}

__device__ float f16_round(float x) { return tq_f16_to_f32(tq_f32_to_f16(x)); }

/* run.c's store_direction: u (n) rounded to fp16, made orthogonal to prev, normalized */
__device__ void store_direction_block(float *u, const float *prev, int n, double *red) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) u[i] = f16_round(u[i]);
    __syncthreads();
    if (prev) {
        float part = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) part += u[i] * prev[i];
        float pr = (float)block_sum((double)part, red);
        for (int i = threadIdx.x; i < n; i += blockDim.x) u[i] -= pr * prev[i];
        __syncthreads();
    }
    double ss = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)u[i] * u[i];
    double norm = block_sum(ss, red);
    for (int i = threadIdx.x; i < n; i += blockDim.x) u[i] = norm > 0 ? (float)(u[i] / sqrt(norm)) : 0.0f;
    __syncthreads();
}

/* What follows the R directions u (R, hd) of a block, at `at` (dir_at): their rotated copies Pi u_j
 * (tq_rotate; the identity for the plain formats), for tq*p keys their sketches S Pi u_j, and with
 * int8 betas the steps 2 max_b |u_j.k_b| / 127 over the block's measured keys k + b*ldk, b < nk
 * (tq.c's beta_steps). y, tmp: R hd floats of shared memory each. */
__device__ void finish_dirs(const KVCache &kv, const AttArgs &a, size_t at, const float *k, size_t ldk, int nk,
                            float *y, float *tmp, double *red) {
    const int hd = kv.kc.d, R = kv.kproj, tid = threadIdx.x, nt = blockDim.x;
    for (int i = tid; i < R * hd; i += nt) y[i] = kv.kdir[at + i];
    __syncthreads();
    if (is_tq(kv.kc.fmt)) rotate_team<TEAM_BLOCK>(&kv.kc, y, R, tmp);
    for (int i = tid; i < R * hd; i += nt) kv.kdir_rot[at + i] = y[i];
    if (a.kdir_qjl)
        for (int i = tid; i < R * hd; i += nt) a.kdir_qjl[at + i] = dot8(kv.kc.qjl + (size_t)(i % hd) * hd, y + (i / hd) * hd, hd);
    if (!kv.kbeta8) return;
    const int sub = tid % STATS_LANES;
    for (int j = 0; j < R; j++) {
        const float *u = kv.kdir + at + (size_t)j * hd;
        float mx = 0.0f;
        for (int b0 = 0; b0 < nk; b0 += nt / STATS_LANES) {   /* STATS_LANES threads per key: |u_j . k_b| */
            int b = b0 + tid / STATS_LANES;
            float pr = 0.0f;
            if (b < nk)
                for (int i = sub; i < hd; i += STATS_LANES) pr += u[i] * k[b * ldk + i];
            for (int o = 1; o < STATS_LANES; o <<= 1) pr += __shfl_xor_sync(FULL_MASK, pr, o);
            mx = fmaxf(mx, fabsf(pr));
        }
        mx = block_max(mx, (float *)red);
        if (tid == 0) kv.kscale[at / hd + j] = beta_step(mx);
    }
}

/* r = k - (u.k) u for one key k (hd), as STATS_LANES threads (sub = 0..STATS_LANES-1, neighbouring
 * lanes, all of `mask`'s lanes calling) compute it: each a strided share of the channels, so that
 * every caller gets the same bits; returns |r|^2 to all of them */
__device__ double key_rest(const float *k, const float *u, double *r, int hd, int sub, unsigned mask) {
    double p = 0, len = 0;
    for (int i = sub; i < hd; i += STATS_LANES) p += (double)k[i] * u[i];
    for (int o = 1; o < STATS_LANES; o <<= 1) p += __shfl_xor_sync(mask, p, o);
    for (int i = sub; i < hd; i += STATS_LANES) { r[i] = k[i] - p * u[i]; len += r[i] * r[i]; }
    for (int o = 1; o < STATS_LANES; o <<= 1) len += __shfl_xor_sync(mask, len, o);
    return len;
}

__global__ void __launch_bounds__(STATS_THREADS) stats_kernel(const __grid_constant__ KVCache kv,
        const __grid_constant__ Config c, int l, const __grid_constant__ AttArgs a, double *scratch, int blocks_max,
        int m_shared) {
    pdl_wait_then_release();
    __shared__ double red[33];
    __shared__ int best_at;
    extern __shared__ double sd[];     /* stats_shared_bytes' layout */
    const int hd = c.head_dim, G = c.n_heads / c.n_kv_heads, g = blockIdx.x, n = a.n, B = kv.kblock, pos = a.step[0];
    const int p = ceil_div(pos, B) * B + blockIdx.y * B, b0 = p - pos, m_tok = min(B, pos + n - p);
    const int tid = threadIdx.x, nt = blockDim.x, R = kv.kproj, lane = tid & 31, warp = tid >> 5;
    if (!R || p >= pos + n || (p > 0 && m_tok < KBLOCK_MIN)) return;
    const int first = b0 + (p == 0 && m_tok > 1 ? 1 : 0), end = b0 + m_tok;   /* tokens [first, end) of the batch */
    const size_t qd = (size_t)c.n_heads * hd, kvd = (size_t)c.n_kv_heads * hd, QKV = qd + 2 * kvd, head = (size_t)l * c.n_kv_heads + g;
    const float *q = a.qkv + (size_t)g * G * hd, *k = a.qkv + qd + (size_t)g * hd;
    const size_t at = dir_at(kv, head, p / B, hd);
    double *vv = sd, *mv = vv + hd, *m_sh = mv + hd, *tile = m_sh + (m_shared ? (size_t)hd * hd : 0);
    float *u1 = kv.kdir + at, *y = (float *)(tile + (size_t)STATS_TILE * hd), *tmp = y + R * hd;
    double *mine = scratch + (size_t)g * ((size_t)blocks_max * hd * hd + n);
    double *m = m_shared ? m_sh : mine + (size_t)blockIdx.y * hd * hd, *lens = mine + (size_t)blocks_max * hd * hd;
    /* tq_key_dirs: u_1 = the group's mean query, normalized. Thread (quad, slice) sums four channels
     * over a slice of the tokens; the slices' sums meet in the tile's memory */
    const int quads = hd / 4, slices = min(nt / quads, STATS_TILE), quad = tid % quads, slice = tid / quads;
    const int per = ceil_div(end - first, slices), s0 = first + slice * per, s1 = min(end, s0 + per);
    if (slice < slices) {
        double qs[4] = {0, 0, 0, 0};
        for (int b = s0; b < s1; b++)
            for (int h = 0; h < G; h++) {
                float4 v = *(const float4 *)(q + b * QKV + h * hd + 4 * quad);
                qs[0] += v.x; qs[1] += v.y; qs[2] += v.z; qs[3] += v.w;
            }
        for (int x = 0; x < 4; x++) tile[(size_t)slice * hd + 4 * quad + x] = qs[x];
    }
    __syncthreads();
    double ss = 0;
    for (int i = tid; i < hd; i += nt) {
        double sum = 0;
        for (int sl = 0; sl < slices; sl++) sum += tile[(size_t)sl * hd + i];
        u1[i] = (float)sum;
        ss += (double)u1[i] * u1[i];
    }
    double norm = block_sum(ss, red);
    for (int i = tid; i < hd; i += nt) u1[i] = norm > 0 ? (float)(u1[i] / sqrt(norm)) : 0.0f;
    __syncthreads();
    store_direction_block(u1, NULL, hd, red);
    if (R >= 2) {
        /* u_2: top principal direction of the keys, less their part along u_1: the second moment
         * m = sum_b r_b r_b^T, r_b = k_b - (u_1.k_b) u_1, a tile of STATS_TILE keys' r_b at a time
         * (STATS_LANES threads each); every thread sums a 4 x 4 block of m in registers, tokens in
         * order, and as many passes over the tokens run as there are blocks per thread */
        const int sub = tid % STATS_LANES, kt = tid / STATS_LANES, nb = hd / 4, nblocks = nb * nb;
        for (int pass = 0; pass * nt < nblocks; pass++) {
            const int bi = pass * nt + tid, rb = 4 * (bi / nb), cb = 4 * (bi % nb);
            double acc[16] = {0};
            for (int t0 = first; t0 < end; t0 += STATS_TILE) {
                const int tn = min(STATS_TILE, end - t0);
                __syncthreads();                         /* the previous tile is read */
                {   /* every lane takes part in the shuffles: those past the tile's end redo its last key */
                    double len = key_rest(k + (size_t)min(t0 + kt, end - 1) * QKV, u1, tile + (size_t)kt * hd, hd, sub, FULL_MASK);
                    if (sub == 0 && kt < tn) lens[t0 + kt] = len;
                }
                __syncthreads();
                if (bi < nblocks)
                    for (int t = 0; t < tn; t++) {
                        const double *r = tile + (size_t)t * hd;
#pragma unroll
                        for (int x = 0; x < 4; x++)
#pragma unroll
                            for (int z = 0; z < 4; z++) acc[4 * x + z] += r[rb + x] * r[cb + z];
                    }
            }
            if (bi < nblocks)
#pragma unroll
                for (int x = 0; x < 4; x++)
#pragma unroll
                    for (int z = 0; z < 4; z++) m[(size_t)(rb + x) * hd + cb + z] = acc[4 * x + z];
        }
        __syncthreads();
        /* the start vector: the longest r_b, the first of equals (tq.c's), warp 0's argmax */
        if (warp == 0) {
            double top = -1;
            int best = end;
            for (int b = first + lane; b < end; b += 32)
                if (lens[b] > top) { top = lens[b]; best = b; }
            for (int o = 16; o > 0; o >>= 1) {
                double t2 = __shfl_xor_sync(FULL_MASK, top, o);
                int b2 = __shfl_xor_sync(FULL_MASK, best, o);
                if (t2 > top || (t2 == top && b2 < best)) { top = t2; best = b2; }
            }
            if (lane == 0) best_at = best;
            __syncwarp();
            if (lane < STATS_LANES) key_rest(k + (size_t)best_at * QKV, u1, vv, hd, lane, (1u << STATS_LANES) - 1);   /* its tile row's bits */
        }
        __syncthreads();
        /* power iteration v <- m v / |m v| until it stops moving (tq.c's), in warp 0 alone: no
         * block barrier per step; each lane's outputs sum over j in 4 chains */
        if (warp == 0)
            for (int it = 0; it < 200; it++) {
                double part = 0, moved = 0;
                for (int i = lane; i < hd; i += 32) {
                    double s4[4] = {0, 0, 0, 0};
                    for (int j = 0; j < hd; j += 4)
#pragma unroll
                        for (int e = 0; e < 4; e++) s4[e] += m[(size_t)(j + e) * hd + i] * vv[j + e];   /* m is symmetric: coalesced */
                    mv[i] = (s4[0] + s4[1]) + (s4[2] + s4[3]);
                    part += mv[i] * mv[i];
                }
                for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(FULL_MASK, part, o);
                __syncwarp();
                double inv = part > 0 ? 1.0 / sqrt(part) : 0.0;
                for (int i = lane; i < hd; i += 32) {
                    double x = mv[i] * inv;
                    moved = fmax(moved, fabs(x - vv[i]));
                    vv[i] = x;
                }
                for (int o = 16; o > 0; o >>= 1) moved = fmax(moved, __shfl_xor_sync(FULL_MASK, moved, o));
                __syncwarp();
                if (moved < 1e-12) break;            /* far below the fp16 step it is rounded to */
            }
        __syncthreads();
        float *u2 = u1 + hd;
        for (int i = tid; i < hd; i += nt) u2[i] = (float)vv[i];
        __syncthreads();
        store_direction_block(u2, u1, hd, red);
    }
    finish_dirs(kv, a, at, k + (size_t)first * QKV, QKV, end - first, y, tmp, red);
}

/* The block of positions that starts at pos (> 0) with fewer than KBLOCK_MIN of its tokens in
 * this batch takes the previous block's directions (block g: KV head g), after stats_kernel
 * measured that one. */
__global__ void inherit_kernel(const __grid_constant__ KVCache kv, const __grid_constant__ Config c, int l,
                               const __grid_constant__ AttArgs a, int pos) {
    pdl_wait_then_release();
    inherit_dirs(kv, a, (size_t)l * c.n_kv_heads + blockIdx.x, pos / kv.kblock, c.head_dim);
}

/* S Pi u_j of the directions of layer l's blocks [blk0, blk0 + nblk) (block (g, j)), when the
 * host measured them (TQ_CUDA_HOST_STATS) */
__global__ void sketch_kernel(const __grid_constant__ KVCache kv, const __grid_constant__ Config c, int l,
                              const __grid_constant__ AttArgs a, int blk0) {
    pdl_wait_then_release();
    const int hd = c.head_dim;
    const size_t at = dir_at(kv, (size_t)l * c.n_kv_heads + blockIdx.x, blk0 + blockIdx.y, hd);
    for (int i = threadIdx.x; i < kv.kproj * hd; i += blockDim.x)
        a.kdir_qjl[at + i] = dot8(kv.kc.qjl + (size_t)(i % hd) * hd, kv.kdir_rot + at + (i / hd) * hd, hd);
}

/* a batch's tokens enter the exact store after its attention (run.c's store_exact, its
 * head_dim conversions spread over the block's threads): block (b * n_kv_heads + g) */
__global__ void store_exact_kernel(const __grid_constant__ KVCache kv, const __grid_constant__ Config c, int l,
                                   const __grid_constant__ AttArgs a) {
    pdl_wait_then_release();
    int b = blockIdx.x / c.n_kv_heads, g = blockIdx.x % c.n_kv_heads, pos = a.step[0];
    if (!(pos + b < kv.sink || (kv.window > 0 && b >= a.n - kv.window))) return;
    size_t hd = c.head_dim, qd = c.n_heads * hd, kvd = c.n_kv_heads * hd, r = tq_exact_row(&kv, l, g, pos + b);
    const float *k = a.qkv + b * (qd + 2 * kvd) + qd + g * hd;
    for (size_t j = threadIdx.x; j < hd; j += blockDim.x) {
        kv.exact_k[r + j] = tq_f32_to_f16(k[j]);
        kv.exact_v[r + j] = tq_f32_to_f16(k[kvd + j]);
    }
}

/* ---------------------------------------------------------------------------
 * Attention over the coded keys. A key or value row is decoded in groups of 8
 * coordinates (decode_group: 8 floats and the group's scale); lane layout:
 * lane = key_lane * (D/8) + group, so a warp covers 32/(D/8) rows at a time and
 * all loads of a row sit side by side. For the tq formats the decoded floats are
 * codebook centroids in the rotated domain, for tq*p the QJL signs (+-1) follow
 * (groups >= d/8), for the plain formats the stored numbers.
 */

/* asks for the L1 line holding p: a later load of it will not wait for memory */
__device__ __forceinline__ void prefetch_l1(const void *p) { asm volatile("prefetch.global.L1 [%0];" :: "l"(p)); }

/* the lines of rows t0 + kl + kpw*it (it < its, clamped below c1) that a lane decodes:
 * one prefetch per row, at byte off (the lane's group's share of the row) */
__device__ __forceinline__ void prefetch_rows(const uint8_t *base, size_t bytes, size_t off, int t0, int c1,
                                              int kl, int kpw, int its) {
    for (int it = 0; it < its; it++) prefetch_l1(base + (size_t)min(t0 + kl + kpw * it, c1 - 1) * bytes + off);
}

template <int B>     /* B bytes at p, little-endian (B <= 4) */
__device__ __forceinline__ uint32_t load_bytes(const uint8_t *p) {
    uint32_t w = 0;
    for (int k = 0; k < B; k++) w |= (uint32_t)__ldg(p + k) << (8 * k);
    return w;
}

template <int F>
__device__ __forceinline__ float decode_group(const uint8_t *row, int gi, int d, const float *cent, float v[8]) {
    if constexpr (F == TQ_FP32) {
        load8((const float *)row + 8 * gi, v);
        return 1.0f;
    } else if constexpr (F == TQ_FP16) {
        uint4 u = __ldg((const uint4 *)(row + 16 * gi));
        const __half2 *h = (const __half2 *)&u;
        for (int k = 0; k < 4; k++) { float2 f = __half22float2(h[k]); v[2 * k] = f.x; v[2 * k + 1] = f.y; }
        return 1.0f;
    } else if constexpr (F == TQ_Q8) {
        for (int k = 0; k < 8; k++) v[k] = (float)(int8_t)__ldg(row + 8 * gi + k);
        return ld_f16(row + d);
    } else if constexpr (F == TQ_Q4) {          /* q4_0: element 2k in the low nibble of byte k */
        const uint8_t *blk = row + 18 * (gi / 4);
        uint32_t w = load_bytes<4>(blk + 4 * (gi % 4));
        for (int k = 0; k < 4; k++) {
            v[2 * k] = (float)((int)((w >> (8 * k)) & 15) - 8);
            v[2 * k + 1] = (float)((int)((w >> (8 * k + 4)) & 15) - 8);
        }
        return ld_f16(blk + 16);
    } else if constexpr (F == TQ_TQ2 || F == TQ_TQ3 || F == TQ_TQ4) {
        const int b = F - TQ_TQ2 + 2;
        uint32_t w = load_bytes<b>(row + b * gi);
        for (int k = 0; k < 8; k++) v[k] = cent[(w >> (b * k)) & ((1u << b) - 1)];
        return ld_f16(row + d * b / 8);
    } else {                           /* tq*p: (b-1)-bit centroids, then the signs */
        const int b = F - TQ_TQ2P + 1, so = d * b / 8;
        if (gi < d / 8) {
            uint32_t w = load_bytes<b>(row + b * gi);
            for (int k = 0; k < 8; k++) v[k] = cent[(w >> (b * k)) & ((1u << b) - 1)];
            return ld_f16(row + so + d / 8);
        }
        uint32_t sg = __ldg(row + so + gi - d / 8);
        for (int k = 0; k < 8; k++) v[k] = (sg >> k) & 1 ? 1.0f : -1.0f;
        return sqrtf((float)(PI / 2)) / d * ld_f16(row + so + d / 8 + 2);
    }
}

/* The rows of one attention block and their running softmax state. */
typedef struct {
    int hi[ATT_ROWS];       /* coded keys of row r: [lo, hi[r]); hi = lo for a row past the batch */
    int gr[ATT_ROWS];       /* global row: token * n_heads + head                            */
} AttRows;

/* s[it][r] = q_r . k_t for the batch's keys t = t0 + kl + kpw*it (it < itk), from the
 * codes of key format F, plus the exact parts along the key directions (betas fp16, or int8
 * codes beta8 times the chunk's block's steps st), scaled by 1/sqrt(head_dim); -inf outside
 * [.., c1) and the row's range. */
template <int F>
__device__ __forceinline__ void score_keys(const KVCache &kv, const uint8_t *base, const uint16_t *beta,
        const int8_t *beta8, const float st[KPROJ_MAX], int t0,
        int c1, int kl, int gi, int gk, int kpw, int itk, const float q[ATT_ROWS][8], const float qu[ATT_ROWS][KPROJ_MAX],
        const AttRows &rw, const float *cent, float scale, float s[ATT_IT][ATT_ROWS]) {
    const int d = kv.kc.d, R = kv.kproj;
    const size_t bytes = kv.kc.bytes;
#pragma unroll
    for (int it = 0; it < ATT_IT; it++) {
        if (it >= itk) break;
        int t = min(t0 + kl + kpw * it, c1 - 1);
        float v[8], sc = decode_group<F>(base + t * bytes, gi, d, cent, v);
        for (int r = 0; r < ATT_ROWS; r++) {
            float acc = 0.0f;
            for (int k = 0; k < 8; k++) acc += q[r][k] * v[k];
            s[it][r] = sc * acc;
        }
    }
    for (int o = 1; o < gk; o <<= 1)
#pragma unroll
        for (int it = 0; it < ATT_IT; it++)
            for (int r = 0; r < ATT_ROWS; r++) s[it][r] += __shfl_xor_sync(FULL_MASK, s[it][r], o);
#pragma unroll
    for (int it = 0; it < ATT_IT; it++) {
        if (it >= itk) break;
        int t = t0 + kl + kpw * it, tc = min(t, c1 - 1);
        float b0 = 0.0f, b1 = 0.0f;
        if (beta8) {
            b0 = R > 0 ? (float)__ldg(beta8 + (size_t)tc * R) * st[0] : 0.0f;
            b1 = R > 1 ? (float)__ldg(beta8 + (size_t)tc * R + 1) * st[1] : 0.0f;
        } else {
            b0 = R > 0 ? tq_f16_to_f32(__ldg(beta + (size_t)tc * R)) : 0.0f;
            b1 = R > 1 ? tq_f16_to_f32(__ldg(beta + (size_t)tc * R + 1)) : 0.0f;
        }
        for (int r = 0; r < ATT_ROWS; r++) {
            float x = s[it][r] + qu[r][0] * b0 + qu[r][1] * b1;
            s[it][r] = t < c1 && t < rw.hi[r] ? scale * x : -INFINITY;
        }
    }
}

/* acc[r][k] += p[key][r] * value_t (group gi) for the batch's keys key = kl + kpw*it */
template <int F>
__device__ __forceinline__ void accumulate_values(const KVCache &kv, const uint8_t *base, int t0, int c1, int kl,
        int gi, int kpw, int itv, const float *p, const float *cent, float acc[ATT_ROWS][8]) {
    const int d = kv.vc.d;
    const size_t bytes = kv.vc.bytes;
#pragma unroll
    for (int it = 0; it < ATT_IT; it++) {
        if (it >= itv) break;
        int key = kl + kpw * it, t = min(t0 + key, c1 - 1);
        float v[8], sc = decode_group<F>(base + t * bytes, gi, d, cent, v);
        for (int r = 0; r < ATT_ROWS; r++) {
            float w = p[key * ATT_ROWS + r] * sc;
            for (int k = 0; k < 8; k++) acc[r][k] += w * v[k];
        }
    }
}

#define FMT_CASES(M) M(TQ_FP32) M(TQ_FP16) M(TQ_Q8) M(TQ_Q4) M(TQ_TQ2) M(TQ_TQ3) M(TQ_TQ4) M(TQ_TQ2P) M(TQ_TQ3P) M(TQ_TQ4P)

static size_t att_shared_bytes(int dv) {
    return (32 + ATT_WARPS * (ATT_IT * 32 * ATT_ROWS) + ATT_WARPS * ATT_ROWS * (2 + dv)) * sizeof(float);
}

/* Block (chunk, row tile, KV head g): query rows rt*ATT_ROWS.. of the batch (row =
 * token * group + j: head g*group + j of that token), keys [c0, c1) of the coded
 * range [sink, T - window), in pieces that end at the edges of the blocks of key directions:
 * for each, the rows' rotated queries are readied for its block (prepare), then the warps take
 * batches of KB keys in turn, each with its own online softmax (running max m, sum l,
 * accumulator acc) across the pieces; the block then merges its warps and writes one partial
 * result per row. */
__global__ void __launch_bounds__(ATT_WARPS * 32, 3) attention_kernel(const __grid_constant__ KVCache kv,
        const __grid_constant__ Config c, const __grid_constant__ AttArgs a) {
    pdl_wait_then_release();
    extern __shared__ float sh[];
    const int hd = c.head_dim, G = c.n_heads / c.n_kv_heads, g = blockIdx.z, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int pos = a.step[0], rows = a.n * G, rho0 = blockIdx.y * ATT_ROWS, lo = kv.sink;
    const int last = min(rho0 + ATT_ROWS, rows) - 1, hi_max = pos + last / G + 1 - kv.window;
    if (hi_max <= lo) return;
    const int chunk = a.chunk ? a.chunk : ceil_div(ceil_div(hi_max - lo, gridDim.x), CHUNK_GRAIN) * CHUNK_GRAIN;
    const int c0 = lo + blockIdx.x * chunk, c1 = min(c0 + chunk, hi_max);
    if (c0 >= c1) return;

    AttRows rw;
    for (int r = 0; r < ATT_ROWS; r++) {
        int rho = min(rho0 + r, rows - 1), tok = rho / G;
        rw.hi[r] = rho0 + r < rows ? pos + tok + 1 - kv.window : lo;
        rw.gr[r] = tok * c.n_heads + g * G + rho % G;
    }
    const int gk = a.dk / 8, kpwk = 32 / gk, gv = a.dv / 8, kpwv = 32 / gv;
    const int kb = ATT_IT * min(kpwk, kpwv), itk = kb / kpwk, itv = kb / kpwv;
    const int kl = lane / gk, gik = lane % gk, klv = lane / gv, giv = lane % gv;
    float *cent_k = sh, *cent_v = sh + 16, *p = sh + 32 + warp * (ATT_IT * 32 * ATT_ROWS);
    if (threadIdx.x < 16 && kv.kc.centroids && threadIdx.x < (1u << kv.kc.bits)) cent_k[threadIdx.x] = kv.kc.centroids[threadIdx.x];
    if (threadIdx.x < 16 && kv.vc.centroids && threadIdx.x < (1u << kv.vc.bits)) cent_v[threadIdx.x] = kv.vc.centroids[threadIdx.x];
    __syncthreads();

    float q[ATT_ROWS][8], qu[ATT_ROWS][KPROJ_MAX], m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][8], bst[KPROJ_MAX] = {0.0f, 0.0f};
    const size_t head = (size_t)a.layer * c.n_kv_heads + g;
    const int R = kv.kproj;
    for (int r = 0; r < ATT_ROWS; r++) {
        m[r] = NO_SCORE; l[r] = 0.0f;
        for (int k = 0; k < 8; k++) acc[r][k] = 0.0f;
    }
    /* the rows' rotated queries readied for block blk's directions (tq.c's prepare_block):
     * along_j = <Pi q, Pi u_j> = q.u_j (over the first head_dim coordinates: the lane groups of
     * a key lane), then Pi q_perp = Pi q - sum_j along_j Pi u_j (tq*p: the lane groups past
     * head_dim hold S Pi q, less along_j S Pi u_j); bst: the block's int8 steps */
    auto prepare = [&](int blk) {
        const size_t at = dir_at(kv, head, blk, hd);
        float ud[KPROJ_MAX][8];
        for (int j = 0; j < R; j++) {
            load8(8 * gik < hd ? kv.kdir_rot + at + (size_t)j * hd + 8 * gik : a.kdir_qjl + at + (size_t)j * hd + 8 * gik - hd, ud[j]);
            bst[j] = kv.kbeta8 ? kv.kscale[at / hd + j] : 0.0f;
        }
        for (int r = 0; r < ATT_ROWS; r++) {
            load8(a.qext + (size_t)rw.gr[r] * a.dk + 8 * gik, q[r]);
            for (int j = 0; j < KPROJ_MAX; j++) {
                float pr = 0.0f;
                if (j < R && 8 * gik < hd)
                    for (int k = 0; k < 8; k++) pr += q[r][k] * ud[j][k];
                for (int o = 1; o < gk; o <<= 1) pr += __shfl_xor_sync(FULL_MASK, pr, o);
                qu[r][j] = j < R ? pr : 0.0f;
            }
            for (int j = 0; j < R; j++)
                for (int k = 0; k < 8; k++) q[r][k] -= qu[r][j] * ud[j][k];
        }
    };
    const uint8_t *kbase = kv.key + tq_cache_row(&kv, a.layer, g, 0) * kv.kc.bytes;
    const uint8_t *vbase = kv.value + tq_cache_row(&kv, a.layer, g, 0) * kv.vc.bytes;
    const uint16_t *beta = R && kv.kbeta ? kv.kbeta + head * kv.ctx * R : NULL;
    const int8_t *beta8 = R && kv.kbeta8 ? kv.kbeta8 + head * kv.ctx * R : NULL;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t koff_lane = gik * kv.kc.bytes / gk, voff_lane = giv * kv.vc.bytes / gv;

    /* the chunk in pieces [p0, p1) that end at the blocks' edges (tq.h, "Key projection"): each
     * meets the queries readied for its block's directions */
    for (int p0 = c0, p1; p0 < c1; p0 = p1) {
    p1 = R ? min(c1, (p0 / kv.kblock + 1) * kv.kblock) : c1;
    prepare(p0 / kv.kblock);
    for (int t0 = p0 + warp * kb; t0 < p1; t0 += ATT_WARPS * kb) {
        float s[ATT_IT][ATT_ROWS];
        /* the values of this batch and the keys of the next are on their way while this one is scored */
        prefetch_rows(vbase, kv.vc.bytes, voff_lane, t0, p1, klv, kpwv, itv);
        if (t0 + ATT_WARPS * kb < p1) prefetch_rows(kbase, kv.kc.bytes, koff_lane, t0 + ATT_WARPS * kb, p1, kl, kpwk, itk);
        for (int it = 0; it < ATT_IT; it++)
            for (int r = 0; r < ATT_ROWS; r++) s[it][r] = -INFINITY;
        switch (kv.kc.fmt) {     /* one branch per batch of keys, never per key */
#define SCORE_CASE(F) case F: score_keys<F>(kv, kbase, beta, beta8, bst, t0, p1, kl, gik, gk, kpwk, itk, q, qu, rw, cent_k, scale, s); break;
        FMT_CASES(SCORE_CASE)
        default: break;
        }
        /* online softmax: the batch's max over its keys (lanes kl), rescale, p = exp(s - m) */
        for (int r = 0; r < ATT_ROWS; r++) {
            float bm = -INFINITY;
            for (int it = 0; it < ATT_IT; it++) bm = fmaxf(bm, s[it][r]);
            for (int o = gk; o < 32; o <<= 1) bm = fmaxf(bm, __shfl_xor_sync(FULL_MASK, bm, o));
            float mn = fmaxf(m[r], bm), alpha = expf(m[r] - mn), ls = 0.0f;
            for (int it = 0; it < ATT_IT; it++) { s[it][r] = expf(s[it][r] - mn); ls += s[it][r]; }
            for (int o = gk; o < 32; o <<= 1) ls += __shfl_xor_sync(FULL_MASK, ls, o);
            l[r] = l[r] * alpha + ls;
            m[r] = mn;
            for (int k = 0; k < 8; k++) acc[r][k] *= alpha;
        }
        if (gik == 0)
            for (int it = 0; it < ATT_IT; it++)
                if (it < itk)
                    for (int r = 0; r < ATT_ROWS; r++) p[(kl + kpwk * it) * ATT_ROWS + r] = s[it][r];
        __syncwarp();
        switch (kv.vc.fmt) {
#define VALUE_CASE(F) case F: accumulate_values<F>(kv, vbase, t0, p1, klv, giv, kpwv, itv, p, cent_v, acc); break;
        FMT_CASES(VALUE_CASE)
        default: break;
        }
        __syncwarp();
    }
    }
    /* the lanes of one group hold sums over different keys: add them up */
    for (int o = gv; o < 32; o <<= 1)
        for (int r = 0; r < ATT_ROWS; r++)
            for (int k = 0; k < 8; k++) acc[r][k] += __shfl_xor_sync(FULL_MASK, acc[r][k], o);

    /* merge the warps: wm, wl (ATT_WARPS, ATT_ROWS), wacc (ATT_WARPS, ATT_ROWS, dv) */
    float *wm = sh + 32 + ATT_WARPS * (ATT_IT * 32 * ATT_ROWS), *wl = wm + ATT_WARPS * ATT_ROWS, *wacc = wl + ATT_WARPS * ATT_ROWS;
    if (klv == 0)
        for (int r = 0; r < ATT_ROWS; r++)
            for (int k = 0; k < 8; k++) wacc[((size_t)warp * ATT_ROWS + r) * a.dv + 8 * giv + k] = acc[r][k];
    if (lane == 0)
        for (int r = 0; r < ATT_ROWS; r++) { wm[warp * ATT_ROWS + r] = m[r]; wl[warp * ATT_ROWS + r] = l[r]; }
    __syncthreads();
    for (int i = threadIdx.x; i < ATT_ROWS * (2 + a.dv); i += blockDim.x) {
        int r = i / (2 + a.dv), j = i % (2 + a.dv);
        if (rho0 + r >= rows) continue;
        float mx = NO_SCORE, sum = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, wm[w * ATT_ROWS + r]);
        for (int w = 0; w < ATT_WARPS; w++) {
            float e = expf(wm[w * ATT_ROWS + r] - mx);
            sum += e * (j == 0 ? 0.0f : j == 1 ? wl[w * ATT_ROWS + r] : wacc[((size_t)w * ATT_ROWS + r) * a.dv + j - 2]);
        }
        a.part[((size_t)rw.gr[r] * MAX_PARTS + blockIdx.x) * (2 + a.dv) + j] = j == 0 ? mx : sum;
    }
}

/* ---------------------------------------------------------------------------
 * Attention on the tensor cores, for tq2 and tq3 keys and values (head_dim 64 or 128).
 * The scores and the value sums are matrix products in the rotated domain (the paper's
 * Section 3: <q, k~> = s <Pi q, c[idx]>), so they run as mma.sync m16n8k16 products of
 * fp16 operands with fp32 sums:
 *   S (16 keys x 8 query rows) = K~ (16 keys x head_dim codes' centroids) . Q (rotated)^T
 *   O^T (head_dim x 8 rows)  += V~^T (head_dim x 16 keys) . (P diag(s_v))^T
 * A tile of 16 keys is copied to shared memory as it lies in the cache (cp.async, 16-byte
 * pieces from the 16-byte boundary below its first byte, MMA_STAGES tiles ahead), and
 * each lane decodes its share of the codes straight into the products' fragments. Keys: each
 * pair of codes indexes a table of the codebook's pairs in shared memory (one 8-byte load
 * gives both coordinates' fp16 parts). Values, whose fragments pair one coordinate of two
 * keys: 8 codes (b bytes) are spread to 8 nibbles with shifts, and each nibble selects the
 * low and the high byte of its fp16 centroid with a byte permute (prmt) from the codebook
 * held in registers (up to 8 centroids, so b <= 3).
 * A lane's coordinates are a contiguous run of the row (the products sum over any order
 * of coordinates, as long as the query's fragment uses the same one): so each code is read
 * and decoded once, for all 8 query rows of the block. The online softmax (exp2 of scores
 * pre-multiplied by log2 e) runs on the score fragments; P goes to the value product's
 * operand through an 8x8 transpose in registers (movmatrix). The block's warps take tiles
 * in turn and merge at the end, writing one partial result per row, as attention_kernel.
 * Rounding: each fp16 operand (centroid, query, probability times value scale) is the sum of
 * two, x = fp16(x) + fp16(x - fp16(x)), good to about 2^-22 of x, and each product is three
 * (hi hi + hi lo + lo hi): the sums come out as close to fp32 arithmetic as the CUDA-core
 * kernel's (one fp16 rounding of each operand alone, 2^-11, puts the GPU's logits far outside
 * the CPU's own rounding noise, which tests/test_cuda.py holds the GPU to: bench/gpu_notes.md).
 * The plain and prod formats keep attention_kernel.
 */
#define MMA_WARPS 4
#define MMA_ROWS 8        /* query rows of a block: the n of the products                  */
#define MMA_KEYS 16       /* keys of a tile                                                */
#define MMA_STAGES 3      /* tiles in flight per warp                                      */
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ void mma16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* the 8x8 fp16 matrix whose row lane/4, columns 2(lane%4) + {0, 1} this lane holds, transposed */
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {   /* fp16 pair, lo in the low half; saturated */
    __half2 h = __floats2half2_rn(fminf(fmaxf(lo, -65504.0f), 65504.0f), fminf(fmaxf(hi, -65504.0f), 65504.0f));
    return *(uint32_t *)&h;
}

/* x = hi + lo to about 2^-22 of x: hi = fp16(x), lo = fp16(x - hi), as fp16 pairs of (x0, x1) */
__device__ __forceinline__ void split_half2(float x0, float x1, uint32_t *hi, uint32_t *lo) {
    *hi = half2_bits(x0, x1);
    float2 h = __half22float2(*(const __half2 *)hi);
    *lo = half2_bits(x0 - h.x, x1 - h.y);
}

/* 8 b-bit codes (bits [0, 8b) of x) to 8 nibbles: code j moves from bit b*j to bit 4*j,
 * in three steps (moves of 4, 2, 1 codes' widths for b = 3; 8, 4, 2 bits for b = 2) */
template <int B> __device__ __forceinline__ uint32_t spread_nibbles(uint32_t x) {
    if (B == 3) {
        x = (x & 0x00000fffu) | ((x << 4) & 0x0fff0000u);
        x = (x & 0x003f003fu) | ((x << 2) & 0x3f003f00u);
        return (x & 0x07070707u) | ((x << 1) & 0x70707070u);
    }
    x = (x & 0x000000ffu) | ((x << 8) & 0x00ff0000u);
    x = (x & 0x000f000fu) | ((x << 4) & 0x0f000f00u);
    return (x & 0x03030303u) | ((x << 2) & 0x30303030u);
}

/* group i of 8 codes (8b bits from bit 8b*i) of the little-endian words w */
template <int B> __device__ __forceinline__ uint32_t code_group(const uint32_t *w, int i) {
    const int o = i * 8 * B, wi = o >> 5, sh = o & 31;
    uint32_t x = w[wi] >> sh;
    if (sh + 8 * B > 32) x |= w[wi + 1] << (32 - sh);
    return x;
}

/* NW little-endian words from shared memory at p (2-byte aligned): aligned loads, funnel shifts
 * (reads up to 4 bytes past the NW words) */
template <int NW> __device__ __forceinline__ void load_words(const uint8_t *p, uint32_t w[NW]) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p), q = a & ~3u, sh = (a & 3) * 8;
    uint32_t x[NW + 1];
#pragma unroll
    for (int i = 0; i <= NW; i++) asm volatile("ld.shared.b32 %0, [%1];" : "=r"(x[i]) : "r"(q + 4 * i));
#pragma unroll
    for (int i = 0; i < NW; i++) w[i] = __funnelshift_r(x[i], x[i + 1], sh);
}

/* The codebook as two 8-byte tables: low bytes (t[0], t[1]) and high bytes (t[2], t[3]) of
 * the fp16 centroids: part 0 = fp16(c), part 1 = fp16(c - part 0) */
__device__ void codebook_bytes(const float *cent, int K, int part, uint32_t t[4]) {
    t[0] = t[1] = t[2] = t[3] = 0;
    for (int i = 0; i < K; i++) {
        __half hc = __float2half_rn(cent[i]);
        uint16_t h = __half_as_ushort(part ? __float2half_rn(cent[i] - __half2float(hc)) : hc);
        t[i >> 2] |= (uint32_t)(h & 255) << (8 * (i & 3));
        t[2 + (i >> 2)] |= (uint32_t)(h >> 8) << (8 * (i & 3));
    }
}

/* nibbles n (codes c0..c7 of one row) -> fp16 pairs h[j] = (c[2j], c[2j+1]) */
__device__ __forceinline__ void decode_pairs(uint32_t n, const uint32_t t[4], uint32_t h[4]) {
    uint32_t lo = __byte_perm(t[0], t[1], n), hi = __byte_perm(t[2], t[3], n);
    h[0] = __byte_perm(lo, hi, 0x5140);
    h[1] = __byte_perm(lo, hi, 0x7362);
    lo = __byte_perm(t[0], t[1], n >> 16);
    hi = __byte_perm(t[2], t[3], n >> 16);
    h[2] = __byte_perm(lo, hi, 0x5140);
    h[3] = __byte_perm(lo, hi, 0x7362);
}

/* nibbles na, nb (codes of rows a and b) -> fp16 pairs h[j] = (a[4 half + j], b[4 half + j]),
 * one coordinate of two rows, for half 0 (codes 0..3) or 1 (codes 4..7) */
__device__ __forceinline__ void decode_across(uint32_t na, uint32_t nb, const uint32_t t[4], int half, uint32_t h[4]) {
    const uint32_t x = (na & 0x0f0f0f0fu) | ((nb << 4) & 0xf0f0f0f0u);   /* a0 b0 a2 b2 a4 b4 a6 b6 */
    const uint32_t y = ((na >> 4) & 0x0f0f0f0fu) | (nb & 0xf0f0f0f0u);   /* a1 b1 a3 b3 a5 b5 a7 b7 */
    const uint32_t sel[2] = {half ? x >> 16 : x, half ? y >> 16 : y};
#pragma unroll
    for (int s = 0; s < 2; s++) {                     /* coordinates 0, 2 (s = 0) and 1, 3 (s = 1) of the half */
        uint32_t lo = __byte_perm(t[0], t[1], sel[s]), hi = __byte_perm(t[2], t[3], sel[s]);
        h[s] = __byte_perm(lo, hi, 0x5140);
        h[s + 2] = __byte_perm(lo, hi, 0x7362);
    }
}

/* the 2b-bit index of code pair p (codes 2p, 2p+1) of the little-endian words w */
template <int B> __device__ __forceinline__ uint32_t pair_index(const uint32_t *w, int p) {
    const int o = p * 2 * B, wi = o >> 5, sh = o & 31;
    uint32_t x = w[wi] >> sh;
    if (sh + 2 * B > 32) x |= w[wi + 1] << (32 - sh);
    return x & ((1u << (2 * B)) - 1);
}

template <int D, int KB, int VB> struct MmaShape {
    /* the key codebook's pairs: entry e = (code c0 | code c1 << KB) holds the fp16 pairs
     * (c[c0], c[c1]) high and low parts, once per lane (lane l's copy at 8 (32 e + l) bytes:
     * a warp's 8-byte loads never share a bank beyond the two passes 256 bytes take) */
    static constexpr int PAIRS = 1 << (2 * KB), PTAB = PAIRS * 32 * 8;
    static constexpr int KROW = D * KB / 8 + 2, VROW = D * VB / 8 + 2;   /* bytes of a key, a value row */
    static constexpr int LK = D * KB / 32, LV = D * VB / 64;            /* bytes of a row a lane decodes */
    /* a tile in shared memory: its keys, values and betas as they lie in the cache, each from the
     * 16-byte boundary below its first byte (so 16 bytes more each) */
    static constexpr int KREG = MMA_KEYS * KROW + 16, VREG = MMA_KEYS * VROW + 16, BREG = MMA_KEYS * KPROJ_MAX * 2 + 16;
    static constexpr int TILE = KREG + VREG + BREG;
    static constexpr int WARP_BUF = MMA_STAGES * TILE + 16;                            /* + room for load_words */
    static constexpr int MERGE = (2 * MMA_WARPS * MMA_ROWS + MMA_WARPS * MMA_ROWS * D) * 4;
    static constexpr int SHARED = PTAB + MMA_WARPS * WARP_BUF > MERGE ? PTAB + MMA_WARPS * WARP_BUF : MERGE;
};

/* Block (chunk, row tile, KV head g) as attention_kernel's, with MMA_ROWS rows. */
template <int KB, int VB, int D>
__global__ void __launch_bounds__(MMA_WARPS * 32) attention_mma_kernel(const __grid_constant__ KVCache kv,
        const __grid_constant__ Config c, const __grid_constant__ AttArgs a) {
    typedef MmaShape<D, KB, VB> S;
    constexpr int KSTEPS = D / 16, MTILES = D / 16, NWK = (S::LK + 3) / 4, NWV = (S::LV + 3) / 4;
    extern __shared__ __align__(16) uint8_t smem[];
    const int G = c.n_heads / c.n_kv_heads, g = blockIdx.z, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gq = lane >> 2, tq = lane & 3;    /* the products' fragments: row group, thread in group */
    const int pos = a.step[0], rows = a.n * G, rho0 = blockIdx.y * MMA_ROWS, lo = kv.sink, R = kv.kproj;
    const int last = min(rho0 + MMA_ROWS, rows) - 1, hi_max = pos + last / G + 1 - kv.window;
    const int chunk = a.chunk ? a.chunk : ceil_div(ceil_div(hi_max - lo, gridDim.x), CHUNK_GRAIN) * CHUNK_GRAIN;
    const int c0 = lo + blockIdx.x * chunk, c1 = min(c0 + chunk, hi_max);
    const bool work = hi_max > lo && c0 < c1;

    /* Before the wait for the predecessor (pdl_wait_then_release), what does not depend on it:
     * the codebooks' tables, and for a decoded token with a window of exact positions its first
     * tiles, whose keys were all stored by earlier steps (its own is in the window, not among
     * them; a tile's rows past the range, masked out below, may be being written meanwhile: any
     * bytes decode to finite numbers, which the zero weights cancel). The value codebook's high
     * and low parts: */
    uint32_t tv[4], tvl[4];
    codebook_bytes(kv.vc.centroids, 1 << VB, 0, tv);
    codebook_bytes(kv.vc.centroids, 1 << VB, 1, tvl);
    uint2 *ptab = (uint2 *)smem;
    for (int i = threadIdx.x; i < S::PAIRS * 32; i += blockDim.x) {
        const int e = i >> 5, code0 = e & ((1 << KB) - 1), code1 = e >> KB;
        uint32_t hi, lo;
        split_half2(kv.kc.centroids[code0], kv.kc.centroids[code1], &hi, &lo);
        ptab[i] = make_uint2(hi, lo);
    }
    /* the head's rows; a tile starts at a multiple of 16 keys, so at 16 k row bytes: its first
     * byte lies as far past a 16-byte boundary (mk, mv, mb) as the head's first row does */
    const size_t head = (size_t)a.layer * c.n_kv_heads + g;
    const uint8_t *kbase = kv.key + head * kv.ctx * S::KROW, *vbase = kv.value + head * kv.ctx * S::VROW;
    const int bsz = kv.kbeta8 ? 1 : 2;              /* bytes of a beta: int8 code, or fp16 */
    const uint8_t *bbase = kv.kbeta8 ? (const uint8_t *)(kv.kbeta8 + head * kv.ctx * R) : (const uint8_t *)(kv.kbeta + head * kv.ctx * R);
    const int mk = (int)((uintptr_t)kbase & 15), mv = (int)((uintptr_t)vbase & 15), mb = (int)((uintptr_t)bbase & 15);
    const int nk = (mk + MMA_KEYS * S::KROW + 15) / 16, nv = (mv + MMA_KEYS * S::VROW + 15) / 16;
    const int nb = R ? (mb + MMA_KEYS * R * bsz + 15) / 16 : 0;
    const int tfirst = (c0 & ~(MMA_KEYS - 1)) + MMA_KEYS * warp, tstep = MMA_KEYS * MMA_WARPS;
    const int ntiles = work && tfirst < c1 ? ceil_div(c1 - tfirst, tstep) : 0;
    uint8_t *buf = smem + S::PTAB + warp * S::WARP_BUF;
    /* tile i's keys, values and betas in 16-byte pieces */
    auto load_tile = [&](int i) {
        if (i < ntiles) {
            const size_t t = (size_t)(tfirst + i * tstep);
            uint8_t *st = buf + (i % MMA_STAGES) * S::TILE;
            const uint8_t *ks = kbase - mk + t * S::KROW, *vs = vbase - mv + t * S::VROW, *bs = bbase - mb + t * R * bsz;
            for (int p = lane; p < nk + nv + nb; p += 32) {
                if (p < nk) cp_async16(st + 16 * p, ks + 16 * p);
                else if (p < nk + nv) cp_async16(st + S::KREG + 16 * (p - nk), vs + 16 * (p - nk));
                else cp_async16(st + S::KREG + S::VREG + 16 * (p - nk - nv), bs + 16 * (p - nk - nv));
            }
        }
        cp_async_commit();
    };
    const bool early = a.n == 1 && kv.window > 0;
    if (early)
        for (int i = 0; i < MMA_STAGES - 1; i++) load_tile(i);
    __syncthreads();
    pdl_wait_then_release();
    if (!work) return;
    if (!early)
        for (int i = 0; i < MMA_STAGES - 1; i++) load_tile(i);
    const int hi_min = min(c1, pos + rho0 / G + 1 - kv.window);   /* keys below it count for every row */

    /* this lane's score rows 2tq, 2tq+1: their key ranges */
    int hi2[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int rho = rho0 + 2 * tq + r, tok = rho / G;
        hi2[r] = rho < rows ? pos + tok + 1 - kv.window : hi_max;
    }
    /* the rotated query of row gq, coordinates D/4 tq + 4j + {0, 1 | 2, 3}, readied for block blk's
     * directions (tq.c's prepare_block: along_j = <Pi q, Pi u_j>, summed over the row's four
     * lanes, then Pi q_perp = Pi q - sum_j along_j Pi u_j): the score product's B, high and low
     * fp16 parts, in registers: the kernel takes what ptxas gives it (104-161), since a cap of 128
     * for a fourth block per multiprocessor (these low parts then in shared memory, a few spills)
     * costs more than the extra warps give (bench/gpu_notes.md). The parts along the directions
     * of rows 2tq, 2tq+1 (qu2) come from those rows' lanes; bstep: the block's int8 steps. A
     * warp readies them again where its tiles enter another block (a tile of 16 keys never
     * straddles two: blocks are multiples of 16). */
    uint32_t qf[KSTEPS][2], ql[KSTEPS][2];
    float qu2[2][KPROJ_MAX], bstep[KPROJ_MAX] = {0.0f, 0.0f};
    auto prepare = [&](int blk) {
        int rho = rho0 + gq, tok = rho / G;
        const size_t at = R ? dir_at(kv, head, blk, D) : 0;
        const float *q = a.qext + ((size_t)tok * c.n_heads + g * G + rho % G) * a.dk + tq * (D / 4);
        float4 v[KSTEPS];
#pragma unroll
        for (int j = 0; j < KSTEPS; j++) v[j] = rho < rows ? *(const float4 *)(q + 4 * j) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        float along[KPROJ_MAX];
#pragma unroll
        for (int d = 0; d < KPROJ_MAX; d++) {
            float pr = 0.0f;
            if (d < R) {
                const float *u = kv.kdir_rot + at + (size_t)d * D + tq * (D / 4);
#pragma unroll
                for (int j = 0; j < KSTEPS; j++) {
                    float4 w = *(const float4 *)(u + 4 * j);
                    pr += v[j].x * w.x + v[j].y * w.y + v[j].z * w.z + v[j].w * w.w;
                }
                bstep[d] = kv.kbeta8 ? kv.kscale[at / D + d] : 0.0f;
            }
            pr += __shfl_xor_sync(FULL_MASK, pr, 1);
            pr += __shfl_xor_sync(FULL_MASK, pr, 2);
            along[d] = pr;
        }
#pragma unroll
        for (int d = 0; d < KPROJ_MAX; d++) {
            if (d < R) {
                const float *u = kv.kdir_rot + at + (size_t)d * D + tq * (D / 4);
#pragma unroll
                for (int j = 0; j < KSTEPS; j++) {
                    float4 w = *(const float4 *)(u + 4 * j);
                    v[j].x -= along[d] * w.x; v[j].y -= along[d] * w.y; v[j].z -= along[d] * w.z; v[j].w -= along[d] * w.w;
                }
            }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float x = __shfl_sync(FULL_MASK, along[d], 4 * (2 * tq + r));
                qu2[r][d] = rho0 + 2 * tq + r < rows && d < R ? x : 0.0f;
            }
        }
#pragma unroll
        for (int j = 0; j < KSTEPS; j++) {
            split_half2(v[j].x, v[j].y, &qf[j][0], &ql[j][0]);
            split_half2(v[j].z, v[j].w, &qf[j][1], &ql[j][1]);
        }
    };
    int ready = -1;                                   /* the block the query is readied for */

    const float sl = LOG2E / sqrtf((float)D);     /* scores in log2 units: exp2 below */
    float m2[2] = {NO_SCORE, NO_SCORE}, l2[2] = {0.0f, 0.0f}, acc[MTILES][4];
#pragma unroll
    for (int i = 0; i < MTILES; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

    for (int i = 0; i < ntiles; i++) {
        cp_async_wait<MMA_STAGES - 2>();
        __syncwarp();
        load_tile(i + MMA_STAGES - 1);
        const uint8_t *tile = buf + (i % MMA_STAGES) * S::TILE, *st = tile + mk, *vst = tile + S::KREG + mv;
        const int t = tfirst + i * tstep;
        if (t / kv.kblock != ready) { ready = t / kv.kblock; prepare(ready); }

        /* scores of keys gq and gq+8 for rows 2tq, 2tq+1: s[0], s[1] and s[2], s[3] */
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s2[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s3[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        uint32_t wa[NWK], wb[NWK];
        load_words<NWK>(st + gq * S::KROW + tq * S::LK, wa);
        load_words<NWK>(st + (gq + 8) * S::KROW + tq * S::LK, wb);
#pragma unroll
        for (int j = 0; j < KSTEPS; j++) {                /* coordinates 4j.. of the lane's run: code pairs 2j, 2j+1 */
            const uint2 a0 = ptab[(pair_index<KB>(wa, 2 * j) << 5) + lane], a1 = ptab[(pair_index<KB>(wa, 2 * j + 1) << 5) + lane];
            const uint2 b0 = ptab[(pair_index<KB>(wb, 2 * j) << 5) + lane], b1 = ptab[(pair_index<KB>(wb, 2 * j + 1) << 5) + lane];
            /* c q = ch qh + ch ql + cl qh (cl ql is below fp32's rounding), three independent sums */
            mma16816(s, a0.x, b0.x, a1.x, b1.x, qf[j][0], qf[j][1]);
            mma16816(s2, a0.x, b0.x, a1.x, b1.x, ql[j][0], ql[j][1]);
            mma16816(s3, a0.y, b0.y, a1.y, b1.y, qf[j][0], qf[j][1]);
        }
#pragma unroll
        for (int e = 0; e < 4; e++) s[e] += s2[e] + s3[e];
        const float ska = __half2float(*(const __half *)(st + gq * S::KROW + S::KROW - 2));
        const float skb = __half2float(*(const __half *)(st + (gq + 8) * S::KROW + S::KROW - 2));
        float ba0 = 0.0f, bb0 = 0.0f, ba1 = 0.0f, bb1 = 0.0f;   /* the keys' betas, as stored */
        if (kv.kbeta8) {
            const int8_t *beta = (const int8_t *)(tile + S::KREG + S::VREG + mb);
            if (R > 0) { ba0 = beta[gq * R] * bstep[0]; bb0 = beta[(gq + 8) * R] * bstep[0]; }
            if (R > 1) { ba1 = beta[gq * R + 1] * bstep[1]; bb1 = beta[(gq + 8) * R + 1] * bstep[1]; }
        } else {
            const __half *beta = (const __half *)(tile + S::KREG + S::VREG + mb);
            if (R > 0) { ba0 = __half2float(beta[gq * R]); bb0 = __half2float(beta[(gq + 8) * R]); }
            if (R > 1) { ba1 = __half2float(beta[gq * R + 1]); bb1 = __half2float(beta[(gq + 8) * R + 1]); }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            s[r] = sl * (ska * s[r] + qu2[r][0] * ba0 + qu2[r][1] * ba1);
            s[2 + r] = sl * (skb * s[2 + r] + qu2[r][0] * bb0 + qu2[r][1] * bb1);
        }
        if (t < c0 || t + MMA_KEYS > hi_min)              /* a tile at an end of the range: keys outside it out */
#pragma unroll
            for (int r = 0; r < 2; r++) {
                int ka = t + gq, kb = ka + 8, h = min(c1, hi2[r]);
                if (ka < c0 || ka >= h) s[r] = -INFINITY;
                if (kb < c0 || kb >= h) s[2 + r] = -INFINITY;
            }

        /* online softmax per row: the max over the tile's keys (lanes gq), rescale, p = 2^(s - m) */
        float p[4];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = fmaxf(s[r], s[2 + r]);
            for (int o = 4; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, o));
            float mn = fmaxf(m2[r], mx), alpha = exp2f(m2[r] - mn);
            m2[r] = mn;
            p[r] = exp2f(s[r] - mn);
            p[2 + r] = exp2f(s[2 + r] - mn);
            l2[r] = l2[r] * alpha + p[r] + p[2 + r];
            if (__any_sync(FULL_MASK, alpha != 1.0f))
#pragma unroll
                for (int k = 0; k < MTILES; k++) { acc[k][r] *= alpha; acc[k][2 + r] *= alpha; }
        }
        /* P diag(s_v) as the value product's B: (row gq, keys 2tq, 2tq+1) and keys + 8 */
        const float sva = __half2float(*(const __half *)(vst + gq * S::VROW + S::VROW - 2));
        const float svb = __half2float(*(const __half *)(vst + (gq + 8) * S::VROW + S::VROW - 2));
        uint32_t ph0, pl0, ph1, pl1;
        split_half2(p[0] * sva, p[1] * sva, &ph0, &pl0);
        split_half2(p[2] * svb, p[3] * svb, &ph1, &pl1);
        const uint32_t pb0 = transpose8x8(ph0), pb1 = transpose8x8(ph1), pc0 = transpose8x8(pl0), pc1 = transpose8x8(pl1);

        /* values of keys 2tq, 2tq+1 (a, b) and 2tq+8, 2tq+9 (c, d), coordinates D/8 gq ..: the A of m-tiles */
        uint32_t va[NWV], vb[NWV], vc[NWV], vd[NWV];
        load_words<NWV>(vst + (2 * tq) * S::VROW + gq * S::LV, va);
        load_words<NWV>(vst + (2 * tq + 1) * S::VROW + gq * S::LV, vb);
        load_words<NWV>(vst + (2 * tq + 8) * S::VROW + gq * S::LV, vc);
        load_words<NWV>(vst + (2 * tq + 9) * S::VROW + gq * S::LV, vd);
#pragma unroll
        for (int grp = 0; grp < D / 64; grp++) {          /* 8 coordinates: four m-tiles */
            const uint32_t na = spread_nibbles<VB>(code_group<VB>(va, grp)), nb = spread_nibbles<VB>(code_group<VB>(vb, grp));
            const uint32_t nc = spread_nibbles<VB>(code_group<VB>(vc, grp)), nd = spread_nibbles<VB>(code_group<VB>(vd, grp));
#pragma unroll
            for (int half = 0; half < 2; half++) {        /* coordinates 4 half + 0..3: two m-tiles */
                uint32_t hab[4], hcd[4], lab[4], lcd[4];
                decode_across(na, nb, tv, half, hab);
                decode_across(nc, nd, tv, half, hcd);
                decode_across(na, nb, tvl, half, lab);
                decode_across(nc, nd, tvl, half, lcd);
#pragma unroll
                for (int k = 0; k < 2; k++) {             /* m-tile 4 grp + 2 half + k: coordinates 8 grp + 4 half + 2k (row gq), + 1 (row gq + 8) */
                    float *ak = acc[4 * grp + 2 * half + k];
                    mma16816(ak, hab[2 * k], hab[2 * k + 1], hcd[2 * k], hcd[2 * k + 1], pb0, pb1);
                    mma16816(ak, hab[2 * k], hab[2 * k + 1], hcd[2 * k], hcd[2 * k + 1], pc0, pc1);
                    mma16816(ak, lab[2 * k], lab[2 * k + 1], lcd[2 * k], lcd[2 * k + 1], pb0, pb1);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++)                           /* the row sums: over the lanes gq */
        for (int o = 4; o < 32; o <<= 1) l2[r] += __shfl_xor_sync(FULL_MASK, l2[r], o);

    /* merge the warps: wm, wl (MMA_WARPS, MMA_ROWS), wacc (MMA_WARPS, MMA_ROWS, D), over the staging buffers */
    cp_async_wait<0>();
    __syncthreads();
    float *wm = (float *)smem, *wl = wm + MMA_WARPS * MMA_ROWS, *wacc = wl + MMA_WARPS * MMA_ROWS;
    if (gq == 0)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            wm[warp * MMA_ROWS + 2 * tq + r] = m2[r] * (float)LN2;
            wl[warp * MMA_ROWS + 2 * tq + r] = l2[r];
        }
#pragma unroll
    for (int k = 0; k < MTILES; k++)
#pragma unroll
        for (int e = 0; e < 4; e++)                       /* row 2tq + e%2, coordinate D/8 gq + 2k + e/2 */
            wacc[(warp * MMA_ROWS + 2 * tq + (e & 1)) * D + gq * (D / 8) + 2 * k + (e >> 1)] = acc[k][e];
    __syncthreads();
    for (int i = threadIdx.x; i < MMA_ROWS * (2 + D); i += blockDim.x) {
        int r = i / (2 + D), j = i % (2 + D), rho = rho0 + r, tok = rho / G;
        if (rho >= rows) continue;
        float mx = NO_SCORE, sum = 0.0f;
        for (int w = 0; w < MMA_WARPS; w++) mx = fmaxf(mx, wm[w * MMA_ROWS + r]);
        for (int w = 0; w < MMA_WARPS; w++) {
            float e = expf(wm[w * MMA_ROWS + r] - mx);
            sum += e * (j == 0 ? 0.0f : j == 1 ? wl[w * MMA_ROWS + r] : wacc[(w * MMA_ROWS + r) * D + j - 2]);
        }
        size_t gr = (size_t)tok * c.n_heads + g * G + rho % G;
        a.part[(gr * MAX_PARTS + blockIdx.x) * (2 + D) + j] = j == 0 ? mx : sum;
    }
}

/* the tensor-core kernel for these formats and head_dim, or NULL */
static AttKernel mma_kernel(const KVCache *kv, int hd, size_t *shared) {
    int kb = kv->kc.fmt == TQ_TQ2 ? 2 : kv->kc.fmt == TQ_TQ3 ? 3 : 0;
    int vb = kv->vc.fmt == TQ_TQ2 ? 2 : kv->vc.fmt == TQ_TQ3 ? 3 : 0;
#define MMA_CASE(KB, VB, D) \
    if (kb == KB && vb == VB && hd == D) { *shared = MmaShape<D, KB, VB>::SHARED; return attention_mma_kernel<KB, VB, D>; }
    MMA_CASE(2, 2, 64) MMA_CASE(2, 3, 64) MMA_CASE(3, 2, 64) MMA_CASE(3, 3, 64)
    MMA_CASE(2, 2, 128) MMA_CASE(2, 3, 128) MMA_CASE(3, 2, 128) MMA_CASE(3, 3, 128)
#undef MMA_CASE
    return NULL;
}

#define MERGE_EXACT 64   /* exact positions whose scores the merge keeps in shared memory */

/* bytes of merge_kernel's shared memory: a row's (the value codec's tables, y, yt, the parts'
 * weights, reductions, exact scores) or a deferred store's (the codecs' tables, the directions,
 * the key and the value, two encoders' scratch) */
static size_t merge_shared_bytes(const Config *c, const KVCache *kv, int dv) {
    size_t hd = c->head_dim, tables = enc_table_floats(kv, (int)hd);
    size_t row = tables + 2 * (size_t)dv + MAX_PARTS + MERGE_EXACT + 32;
    size_t store = tables + KPROJ_MAX * (hd + 1) + 2 * hd + 2 * (size_t)enc_warp_floats((int)hd);
    return (row > store ? row : store) * sizeof(float);
}

/* merge_kernel's blocks past its rows: KV head g's key and value of a decoded token
 * (AttArgs.knew) into the cache, while the attention runs. Nothing of this step reads those
 * rows (the token is an exact position of the window), and knew was written two kernels back
 * (every kernel waits for its predecessor before it lets its successor start), so the block
 * never waits. */
__device__ __forceinline__ void store_deferred(const KVCache &kv, const Config &c, const AttArgs &a, int g, float *sm) {
    const int hd = c.head_dim, R = kv.kproj, tid = threadIdx.x, warp = tid >> 5, p = a.step[0];
    const size_t head = (size_t)a.layer * c.n_kv_heads + g, du = R ? dir_at(kv, head, p / kv.kblock, hd) : 0;
    tq_codec kc = codec_to_shared(&kv.kc, &sm), vc = codec_to_shared(&kv.vc, &sm);
    float *u = sm, *step = u + KPROJ_MAX * hd, *x = step + KPROJ_MAX, *scratch = x + 2 * hd;
    for (int i = tid; i < hd; i += blockDim.x) {
        for (int r = 0; r < R; r++) u[r * hd + i] = kv.kdir[du + r * hd + i];
        x[i] = a.knew[(size_t)g * 2 * hd + i];
        x[hd + i] = a.knew[(size_t)g * 2 * hd + hd + i];
    }
    if (tid < R && kv.kbeta8) step[tid] = kv.kscale[du / hd + tid];
    __syncthreads();
    if (warp == 0) store_kv_warp(kv, c, a.layer, g, p, 0, x, u, kv.kbeta8 ? step : NULL, &kc, scratch);
    if (warp == 1) store_kv_warp(kv, c, a.layer, g, p, 1, x + hd, u, NULL, &vc, scratch + enc_warp_floats(hd));
}

/* Row (token b, head h): the partials of its chunks, the exact positions (the
 * first `sink` and the last `window`, from the batch or the fp16 store), the
 * value codec's finish (S^T for tq*p, then Pi^T): run.c's
 * attention() output for that head, into out (n, q_dim). Blocks past the rows: store_deferred.
 * What does not depend on the attention's partials (the codec's tables, the exact positions'
 * scores: q, k and the exact store were written two kernels back or earlier) is done before the
 * block waits for the attention to finish. */
__global__ void __launch_bounds__(MERGE_THREADS) merge_kernel(const __grid_constant__ KVCache kv,
        const __grid_constant__ Config c, const __grid_constant__ AttArgs a, float *out) {
    extern __shared__ float sh[];
    if (blockIdx.x >= a.n * c.n_heads) {
        store_deferred(kv, c, a, blockIdx.x - a.n * c.n_heads, sh);
        return;
    }
    const int hd = c.head_dim, G = c.n_heads / c.n_kv_heads, row = blockIdx.x, b = row / c.n_heads, h = row % c.n_heads;
    const int g = h / G, l = a.layer, tid = threadIdx.x, nt = blockDim.x, warp = tid >> 5;
    const int pos = a.step[0], T = pos + b + 1, lo = kv.sink, hi = T - kv.window, len = hi > lo ? hi - lo : 0;
    const size_t qd = (size_t)c.n_heads * hd, kvd = (size_t)c.n_kv_heads * hd, QKV = qd + 2 * kvd, dv = a.dv;
    const int chunk = a.chunk ? a.chunk : ceil_div(ceil_div(len, a.units), CHUNK_GRAIN) * CHUNK_GRAIN;
    const int nparts = len > 0 ? ceil_div(len, chunk) : 0;
    const int n1 = min(kv.sink, T), e2 = max(hi, kv.sink), ne = n1 + max(0, T - e2);   /* exact: [0, n1), [e2, T) */
    float *sm = sh;
    const tq_codec vcs = codec_to_shared(&kv.vc, &sm), *vc = &vcs;
    float *y = sm, *yt = y + dv, *wu = yt + dv, *red = wu + MAX_PARTS, *es = red + 32;
    if (a.emax > MERGE_EXACT) es = a.escore + (size_t)row * a.emax;    /* many exact positions: global memory */
    const float *part = a.part + (size_t)row * MAX_PARTS * (2 + dv), *q = a.qkv + b * QKV + (size_t)h * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int e = tid; e < ne; e += nt) {            /* the exact values, needed last */
        int t = e < n1 ? e : e2 + e - n1;
        prefetch_l1(t >= pos ? (const void *)(a.qkv + (size_t)(t - pos) * QKV + qd + kvd + (size_t)g * hd)
                             : (const void *)(kv.exact_v + tq_exact_row(&kv, l, g, t)));
    }

    /* run.c's key_score for the exact positions: 8 lanes a position, so that a block's 128
     * threads score 16 positions (a sink and a window of 8: all) in one round of loads */
    for (int e0 = 0; e0 < ne; e0 += nt / 8) {
        const int e = e0 + tid / 8, part8 = tid & 7;
        float s = 0.0f;
        if (e < ne) {
            const int t = e < n1 ? e : e2 + e - n1;
            if (t >= pos) {
                const float *k = a.qkv + (size_t)(t - pos) * QKV + qd + (size_t)g * hd;
                for (int i = part8; i < hd; i += 8) s += q[i] * k[i];
            } else {
                const uint16_t *k = kv.exact_k + tq_exact_row(&kv, l, g, t);
                for (int i = part8; i < hd; i += 8) s += q[i] * tq_f16_to_f32(k[i]);
            }
        }
        for (int o = 1; o < 8; o <<= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
        if (e < ne && part8 == 0) es[e] = scale * s;
    }
    pdl_wait_then_release();
    for (size_t i = (size_t)tid * 32; i < (size_t)nparts * (2 + dv); i += (size_t)nt * 32) prefetch_l1(part + i);
    __syncthreads();
    float mx = NO_SCORE;
    for (int u = tid; u < nparts; u += nt) mx = fmaxf(mx, part[(size_t)u * (2 + dv)]);
    for (int e = tid; e < ne; e += nt) mx = fmaxf(mx, es[e]);
    mx = block_max(mx, red);
    float z = 0.0f;
    for (int u = tid; u < nparts; u += nt) {
        wu[u] = expf(part[(size_t)u * (2 + dv)] - mx);
        z += wu[u] * part[(size_t)u * (2 + dv) + 1];
    }
    for (int e = tid; e < ne; e += nt) { es[e] = expf(es[e] - mx); z += es[e]; }
    z = block_sum(z, red);          /* (synchronizes wu and es too) */
    for (size_t i = tid; i < dv; i += nt) {
        float s = 0.0f;
        for (int u = 0; u < nparts; u++) s += wu[u] * part[(size_t)u * (2 + dv) + 2 + i];
        y[i] = s / z;
    }
    __syncthreads();
    for (int i = tid; i < hd; i += nt) {            /* tq_finish: yt = acc + S^T acc_qjl, then Pi^T */
        float s = y[i];
        if (is_prod(vc->fmt))
            for (int k = 0; k < hd; k++) s += y[hd + k] * vc->qjl[(size_t)k * hd + i];
        yt[i] = s;
    }
    __syncthreads();
    if (is_tq(vc->fmt) && warp_rotation(vc)) {        /* one warp, in registers */
        if (warp == 0) rotate_warp(vc, yt, true);
        __syncthreads();
    } else if (is_tq(vc->fmt)) {
        unrotate_team<TEAM_BLOCK>(vc, yt, y);
    }
    for (int i = tid; i < hd; i += nt) {            /* add_exact_values: p_t v_t */
        float o = yt[i];
        for (int e = 0; e < ne; e++) {
            int t = e < n1 ? e : e2 + e - n1;
            float p = es[e] / z;
            o += t >= pos ? p * a.qkv[(size_t)(t - pos) * QKV + qd + kvd + (size_t)g * hd + i]
                          : p * tq_f16_to_f32(kv.exact_v[tq_exact_row(&kv, l, g, t) + i]);
        }
        out[(size_t)b * qd + (size_t)h * hd + i] = o;
    }
}

/* ---------------------------------------------------------------------------
 * Building the GPU side
 */

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

/* floats of a prepared query (key codec) or a value accumulator: the decoded groups */
static int ext_floats(const tq_codec *c) { return c->fmt >= TQ_TQ2P ? 2 * c->d : c->d; }

/* What the GPU cannot take; one line naming it. */
static void gpu_check(const Config *c, const KVCache *kv) {
    int hd = c->head_dim;
    if (c->weight_type != WEIGHTS_FP32)
        die("int8 weights are not supported by the GPU build yet; export with --weights fp32");
    if (c->dim % 8 || c->hidden_dim % 8 || (c->n_heads * hd) % 8)
        die("the GPU build needs dim, hidden_dim and n_heads x head_dim in multiples of 8 (use run)");
    if (hd < 16 || hd > 256 || (hd & (hd - 1)))
        die("the GPU build's attention handles head_dim 16, 32, 64, 128 or 256, the model's is %d (use run)", hd);
    const tq_codec *cs[2] = {&kv->kc, &kv->vc};
    for (int i = 0; i < 2; i++)
        if (ext_floats(cs[i]) > 256)
            die("format %s on the GPU handles head_dim up to 128, the model's is %d (use run, or another format)",
                tq_fmt_name(cs[i]->fmt), hd);
}

static void gpu_warm_up(Transformer *t, int all_logits);

/* Copies the model into GPU memory (fp16) and allocates the cache and
 * activations there (called by build_transformer once the host side is built). */
static void gpu_build(Transformer *t, const tq_cache_opts *o, int all_logits) {
    const Config *c = &t->config;
    KVCache *kv = &t->cache;
    gpu_check(c, kv);
    int dev;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaFree(0) != cudaSuccess) die("no usable CUDA GPU (use run, the CPU build)");
    size_t B = (size_t)t->state.batch, hd = (size_t)c->head_dim, heads = (size_t)c->n_layers * c->n_kv_heads;
    size_t L = c->n_layers, dim = c->dim, hid = c->hidden_dim, V = c->vocab_size;
    size_t qd = c->n_heads * hd, kvd = c->n_kv_heads * hd, QKV = qd + 2 * kvd, wide = qd > dim ? qd : dim;
    size_t logit_rows = all_logits ? B : 1, f = sizeof(float), h2 = sizeof(__half), R = kv->kproj;
    int dk = ext_floats(&kv->kc), dv = ext_floats(&kv->vc), emax = kv->sink + kv->window < kv->ctx ? kv->sink + kv->window : kv->ctx;
    size_t wide_floats = QKV * dim;                       /* the largest matrix of a layer */
    if (2 * hid * dim > wide_floats) wide_floats = 2 * hid * dim;
    if (qd * dim > wide_floats) wide_floats = qd * dim;
    size_t wbytes = h2 * (V * dim * (c->shared_classifier ? 1 : 2) + L * dim * (QKV + qd + 3 * hid)) + f * (2 * L + 1) * dim;
    double act = (double)f * (B * (2 * dim + wide + QKV + 3 * hid + c->n_heads * (dk + MAX_PARTS * (2.0 + dv) + emax))
                              + logit_rows * V + wide_floats);
    size_t dirs = heads * kv->blocks * R * hd, beta_bytes = kv->kbeta8 ? 1 : 2;   /* (heads, blocks, R, head_dim) */
    int stats_blocks = ceil_div((int)B, kv->kblock) + 1;   /* blocks a batch can start */
    double cache = (double)heads * kv->ctx * (kv->kc.bytes + kv->vc.bytes + beta_bytes * R) + 4.0 * heads * kv->slots * hd
                   + (double)f * dirs * (is_prod(kv->kc.fmt) ? 3 : 2) + (double)f * heads * kv->blocks * R
                   + 8.0 * c->n_kv_heads * ((double)stats_blocks * hd * hd + B);
    double need = wbytes + act + cache;
    size_t free_b, total_b;
    CUDA(cudaMemGetInfo(&free_b, &total_b));
    if (need > (double)free_b)
        die("the model, a %d-token KV cache and activations need %.2f GiB of GPU memory, %.2f GiB are free: "
            "give a smaller -c or --batch", kv->ctx, need / 1073741824.0, free_b / 1073741824.0);

    Gpu *g = (Gpu *)xcalloc(1, sizeof(Gpu), "the GPU state");
    g->batch = (int)B;
    g->wide_floats = wide_floats;
    g->wide = (float *)gpu_alloc(g, NULL, wide_floats * f);
    const TransformerWeights *hw = &t->weights;     /* the host's fp32 weights (mmap) */
    GpuWeights *w = &g->w;
    w->emb = (__half *)gpu_alloc(g, NULL, V * dim * h2);
    upload_half(g, w->emb, hw->token_embedding, V * dim);
    w->wcls = w->emb;
    if (!c->shared_classifier) {
        w->wcls = (__half *)gpu_alloc(g, NULL, V * dim * h2);
        upload_half(g, w->wcls, hw->wcls, V * dim);
    }
    w->wqkv = (__half *)gpu_alloc(g, NULL, L * QKV * dim * h2);
    w->wo = (__half *)gpu_alloc(g, NULL, L * dim * qd * h2);
    w->w13 = (__half *)gpu_alloc(g, NULL, L * 2 * hid * dim * h2);
    w->w2 = (__half *)gpu_alloc(g, NULL, L * dim * hid * h2);
    for (size_t l = 0; l < L; l++) {
        __half *qkv = w->wqkv + l * QKV * dim, *w13 = w->w13 + l * 2 * hid * dim;
        upload_half(g, qkv, hw->wq + l * qd * dim, qd * dim);
        upload_half(g, qkv + qd * dim, hw->wk + l * kvd * dim, kvd * dim);
        upload_half(g, qkv + (qd + kvd) * dim, hw->wv + l * kvd * dim, kvd * dim);
        upload_half(g, w->wo + l * dim * qd, hw->wo + l * dim * qd, dim * qd);
        upload_half(g, w13, hw->w1 + l * hid * dim, hid * dim);
        upload_half(g, w13 + hid * dim, hw->w3 + l * hid * dim, hid * dim);
        upload_half(g, w->w2 + l * dim * hid, hw->w2 + l * dim * hid, dim * hid);
    }
    w->rms_att = (float *)gpu_alloc(g, hw->rms_att, L * dim * f);
    w->rms_ffn = (float *)gpu_alloc(g, hw->rms_ffn, L * dim * f);
    w->rms_final = (float *)gpu_alloc(g, hw->rms_final, dim * f);

    g->kv = *kv;   /* flags, ctx, sink, window, slots; then every array on the GPU */
    g->kv.kc = gpu_codec(g, &kv->kc);
    g->kv.vc = gpu_codec(g, &kv->vc);
    /* (+ 2 MMA_KEYS rows: attention_mma_kernel reads whole tiles of 16 rows and up to 16 bytes
     * more, the last tile past the end) */
    g->kv.key = (uint8_t *)gpu_alloc(g, NULL, (heads * kv->ctx + 2 * MMA_KEYS) * kv->kc.bytes);
    g->kv.value = (uint8_t *)gpu_alloc(g, NULL, (heads * kv->ctx + 2 * MMA_KEYS) * kv->vc.bytes);
    /* the key directions in tq_cache_build's layout (the host's copies stay: TQ_CUDA_HOST_STATS
     * measures into them), the betas fp16 (--kblock 0) or int8 with their steps */
    g->kv.kdir = (float *)gpu_alloc(g, NULL, dirs * f);
    g->kv.kdir_rot = (float *)gpu_alloc(g, NULL, dirs * f);
    g->kv.kbeta = kv->kbeta ? (uint16_t *)gpu_alloc(g, NULL, (heads * kv->ctx + 2 * MMA_KEYS) * R * 2) : NULL;
    g->kv.kbeta8 = kv->kbeta8 ? (int8_t *)gpu_alloc(g, NULL, (heads * kv->ctx + 2 * MMA_KEYS) * R) : NULL;
    g->kv.kscale = kv->kscale ? (float *)gpu_alloc(g, NULL, heads * kv->blocks * R * f) : NULL;
    g->kv.exact_k = (uint16_t *)gpu_alloc(g, NULL, heads * kv->slots * hd * 2);
    g->kv.exact_v = (uint16_t *)gpu_alloc(g, NULL, heads * kv->slots * hd * 2);
    free(kv->key); free(kv->value); free(kv->kbeta);   /* the host copies are never used (kbeta8: its being */
    kv->key = kv->value = NULL;                        /* there tells tq_key_dirs and tq_cache_size the betas are int8) */
    kv->kbeta = NULL;

    g->x = (float *)gpu_alloc(g, NULL, B * dim * f);
    g->xb = (float *)gpu_alloc(g, NULL, B * wide * f);
    g->qkv = (float *)gpu_alloc(g, NULL, B * QKV * f);
    g->hb = (float *)gpu_alloc(g, NULL, B * 2 * hid * f);
    g->hh = (float *)gpu_alloc(g, NULL, B * hid * f);
    g->logits = (float *)gpu_alloc(g, NULL, logit_rows * V * f);
    g->step = (int *)gpu_alloc(g, NULL, (1 + B) * sizeof(int));
    AttArgs *a = &g->att;
    a->step = g->step;
    a->units = MAX_PARTS;       /* set below, once the kernel's occupancy is known */
    a->dk = dk; a->dv = dv; a->emax = emax > 0 ? emax : 1;
    a->qkv = g->qkv;
    float *cs = (float *)xcalloc((size_t)kv->ctx * hd, sizeof(float), "RoPE table");
    for (size_t p = 0; p < (size_t)kv->ctx; p++)      /* run.c's rope_group(), angle for angle */
        for (size_t i = 0; i < hd; i += 2) {
            double ang = p * pow(c->rope_theta, -(double)i / hd);
            cs[p * hd + i] = (float)cos(ang);
            cs[p * hd + i + 1] = (float)sin(ang);
        }
    a->rope = (float *)gpu_alloc(g, cs, (size_t)kv->ctx * hd * f);
    free(cs);
    a->qext = (float *)gpu_alloc(g, NULL, B * c->n_heads * dk * f);
    a->kdir_qjl = is_prod(kv->kc.fmt) ? (float *)gpu_alloc(g, NULL, dirs * f) : NULL;
    a->part = (float *)gpu_alloc(g, NULL, B * c->n_heads * MAX_PARTS * (2 + dv) * f);
    a->escore = (float *)gpu_alloc(g, NULL, B * c->n_heads * a->emax * f);
    a->knew = (float *)gpu_alloc(g, NULL, 2 * kvd * f);
    g->stats_blocks = stats_blocks;
    g->stats_m = (double *)gpu_alloc(g, NULL, (size_t)c->n_kv_heads * (stats_blocks * hd * hd + B) * sizeof(double));
    CUDA(cudaMallocHost((void **)&g->host_step, (1 + B) * sizeof(int)));
    CUDA(cudaMallocHost((void **)&g->host_logits, logit_rows * V * f));

    g->pdl = getenv("TQ_CUDA_NO_PDL") == NULL;   /* a knob for measuring what PDL gains */
    g->defer = getenv("TQ_CUDA_NO_DEFER") == NULL;   /* and one for the deferred store */
    g->host_stats = getenv("TQ_CUDA_HOST_STATS") != NULL;   /* run.c's own statistics, to check stats_kernel */
    CUDA(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking));
    BLAS(cublasCreate(&g->blas));
    BLAS(cublasSetMathMode(g->blas, CUBLAS_DEFAULT_MATH));
    BLAS(cublasSetStream(g->blas, g->stream));
    int shared_max;
    CUDA(cudaDeviceGetAttribute(&shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    g->enc_shared = enc_shared_bytes(c, kv);
    /* the tensor-core kernel where it applies (TQ_CUDA_NO_MMA=1 keeps attention_kernel, for comparisons) */
    size_t mma_shared = 0;
    AttKernel mk = getenv("TQ_CUDA_NO_MMA") ? NULL : mma_kernel(kv, c->head_dim, &mma_shared);
    g->att_kernel = mk ? mk : attention_kernel;
    g->att_rows = mk ? MMA_ROWS : ATT_ROWS;
    g->att_threads = 32 * (mk ? MMA_WARPS : ATT_WARPS);
    g->att_shared = mk ? mma_shared : att_shared_bytes(dv);
    g->merge_shared = merge_shared_bytes(c, kv, dv);
    if (g->enc_shared > (size_t)shared_max || g->att_shared > (size_t)shared_max || g->merge_shared > (size_t)shared_max)
        die("the GPU's %d bytes of shared memory per block are too few for head_dim %d", shared_max, c->head_dim);
    /* the attribute is the kernel's, for every model of the process: the device's limit */
    CUDA(cudaFuncSetAttribute(rope_encode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_max));
    CUDA(cudaFuncSetAttribute(g->att_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_max));
    cudaFuncAttributes fa;                 /* stats_kernel has static shared memory besides */
    CUDA(cudaFuncGetAttributes(&fa, stats_kernel));
    int stats_max = shared_max - (int)fa.sharedSizeBytes;
    CUDA(cudaFuncSetAttribute(stats_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, stats_max));
    g->stats_m_shared = stats_shared_bytes(c->head_dim, 1) <= (size_t)stats_max;
    /* decode: as many attention blocks per KV head as fill the GPU once (a second, partial
     * wave would leave most multiprocessors idle), at most MAX_PARTS */
    int per_sm = 1, sms = 1;
    CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, g->att_kernel, g->att_threads, g->att_shared));
    CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    a->units = per_sm * sms / c->n_kv_heads;
    if (a->units > MAX_PARTS) a->units = MAX_PARTS;
    if (a->units < 1) a->units = 1;
    CUDA(cudaDeviceSynchronize());
    (void)o;
    t->gpu = g;
    gpu_warm_up(t, all_logits);
}

static void gpu_free(Transformer *t) {
    Gpu *g = t->gpu;
    if (!g) return;
    if (g->decode) cudaGraphExecDestroy(g->decode);
    cublasDestroy(g->blas);
    cudaStreamDestroy(g->stream);
    cudaFreeHost(g->host_step);
    cudaFreeHost(g->host_logits);
    for (int i = 0; i < g->n_allocs; i++) cudaFree(g->allocs[i]);
    free(g);
    t->gpu = NULL;
}

/* ---------------------------------------------------------------------------
 * The forward pass
 */

/* kernel<<<grid, block, shared, g->stream>>>(args...), as a programmatic dependent launch
 * (pdl_wait_then_release) unless g->pdl is 0 */
template <typename... KArgs, typename... Args>
static void launch(const Gpu *g, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t shared, Args... args) {
    cudaLaunchAttribute at;
    at.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at.val.programmaticStreamSerializationAllowed = g->pdl;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = shared;
    cfg.stream = g->stream;
    cfg.attrs = &at;
    cfg.numAttrs = 1;
    CUDA(cudaLaunchKernelEx(&cfg, kernel, args...));
}

/* out (B, d; row stride ldo) = x (B, n; row stride ldx) . W^T + beta * out, W (d, n) fp16:
 * W widened to fp32 (in pieces of rows when it is larger than the scratch), then
 * cuBLAS SGEMM; column-major, out^T (d, B) = W (n x d as stored)^T . x^T (n, B). */
static void gemm(Gpu *g, float *out, int ldo, const float *x, int ldx, const __half *w, int B, int n, int d, float beta) {
    const float one = 1.0f;
    int rows = (int)(g->wide_floats / n < (size_t)d ? g->wide_floats / n : (size_t)d);
    for (int r0 = 0; r0 < d; r0 += rows) {
        int m = d - r0 < rows ? d - r0 : rows;
        launch(g, to_float_kernel, dim3(blocks((size_t)m * n, 256)), dim3(256), 0, g->wide, w + (size_t)r0 * n, (size_t)m * n);
        BLAS(cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, m, B, n, &one, g->wide, n, x, ldx, &beta, out + r0, ldo));
    }
}

/* The blocks of key directions that start in layer l's batch of n tokens at pos, the host's way
 * (TQ_CUDA_HOST_STATS): the batch's q, k and the block before those (which a block with too few
 * tokens inherits) go to the host, tq_cache_key_dirs fills the host cache's blocks, and they
 * come back (for tq*p keys sketch_kernel adds S Pi u_j). stats_kernel does the same on the GPU. */
static void gpu_stats(Transformer *t, int l, int n, int pos) {
    const Config *c = &t->config;
    Gpu *g = t->gpu;
    KVCache *kv = &t->cache;
    RunState *hs = &t->state;
    size_t hd = c->head_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd, QKV = qd + 2 * kvd, R = kv->kproj, f = sizeof(float);
    int B = kv->kblock, blk0 = ceil_div(pos, B), nblk = ceil_div(pos + n - blk0 * B, B), nkv = c->n_kv_heads;
    CUDA(cudaMemcpy2DAsync(hs->q, qd * f, g->qkv, QKV * f, qd * f, n, cudaMemcpyDeviceToHost, g->stream));
    CUDA(cudaMemcpy2DAsync(hs->k, kvd * f, g->qkv + qd, QKV * f, kvd * f, n, cudaMemcpyDeviceToHost, g->stream));
    /* blocks [j, j + nb) of layer l's KV heads, one way or the other: (heads, blocks, R, hd) rows of a pitch */
    auto copy = [&](int j, int nb, cudaMemcpyKind dir) {
        size_t at = dir_at(*kv, (size_t)l * nkv, j, (int)hd), pitch = kv->blocks * R * hd * f, w = nb * R * hd * f;
        float *hsrc[2] = {kv->kdir + at, kv->kdir_rot + at}, *dsrc[2] = {g->kv.kdir + at, g->kv.kdir_rot + at};
        for (int i = 0; i < 2; i++)
            CUDA(cudaMemcpy2DAsync(dir == cudaMemcpyHostToDevice ? dsrc[i] : hsrc[i], pitch, dir == cudaMemcpyHostToDevice ? hsrc[i] : dsrc[i],
                                   pitch, w, nkv, dir, g->stream));
        if (kv->kscale)
            CUDA(cudaMemcpy2DAsync(dir == cudaMemcpyHostToDevice ? g->kv.kscale + at / hd : kv->kscale + at / hd, pitch / hd,
                                   dir == cudaMemcpyHostToDevice ? kv->kscale + at / hd : g->kv.kscale + at / hd, pitch / hd, w / hd, nkv, dir, g->stream));
    };
    if (blk0 > 0) copy(blk0 - 1, 1, cudaMemcpyDeviceToHost);
    CUDA(cudaStreamSynchronize(g->stream));
    tq_cache_batch b = {l, n, pos, c->n_heads / c->n_kv_heads, hs->q, hs->k, NULL, NULL, NULL};
    if (tq_cache_key_dirs(kv, &b)) die("out of memory: key directions");
    copy(blk0, nblk, cudaMemcpyHostToDevice);
    if (g->att.kdir_qjl) launch(g, sketch_kernel, dim3(nkv, nblk), dim3(128), 0, g->kv, *c, l, g->att, blk0);
    CUDA(cudaStreamSynchronize(g->stream));   /* the host arrays may change before the copies ran otherwise */
}

/* whether a batch of n tokens stores its keys and values in merge_kernel (store_deferred) rather
 * than in rope_encode_kernel: one decoded token that is an exact position of the window */
static bool defer_store(const Gpu *g, int n) { return g->defer && n == 1 && g->kv.window > 0; }

/* Layer l's attention for the batch of n tokens at pos (RoPE'd, encoded, prepared
 * already): partials per chunk of coded keys, then the merge into g->xb. */
static void attention_layer(Gpu *g, const Config *c, int l, int n, int pos) {
    AttArgs a = g->att;
    a.n = n;
    a.layer = l;
    int G = c->n_heads / c->n_kv_heads, tiles = ceil_div(n * G, g->att_rows), chunks = a.units;
    a.chunk = 0;                                   /* decode: chunks follow the position on the GPU */
    if (n > 1) {                                   /* a batch: fixed chunks for its longest range */
        int len = pos + n - g->kv.window - g->kv.sink;
        a.chunk = len > 0 ? ceil_div(ceil_div(len, MAX_PARTS), CHUNK_GRAIN) * CHUNK_GRAIN : CHUNK_GRAIN;
        if (a.chunk < 2 * CHUNK_GRAIN) a.chunk = 2 * CHUNK_GRAIN;
        chunks = len > 0 ? ceil_div(len, a.chunk) : 1;
    }
    dim3 grid(chunks, tiles, c->n_kv_heads);
    launch(g, g->att_kernel, dim3(grid), dim3(g->att_threads), g->att_shared, g->kv, *c, a);
    int stores = defer_store(g, n) ? c->n_kv_heads : 0;   /* the token's key and value: store_deferred */
    launch(g, merge_kernel, dim3(n * c->n_heads + stores), dim3(MERGE_THREADS), g->merge_shared, g->kv, *c, a, g->xb);
}

/* Every kernel of run.c's forward() for n tokens at pos (read from g->step). */
static void forward_kernels(Transformer *t, int n, int pos, int all_logits) {
    const Config *c = &t->config;
    Gpu *g = t->gpu;
    const GpuWeights *w = &g->w;
    const KVCache *kv = &t->cache;
    int dim = c->dim, hd = c->head_dim, hid = c->hidden_dim, V = c->vocab_size;
    int qd = c->n_heads * hd, kvd = c->n_kv_heads * hd, QKV = qd + 2 * kvd, nkv = n * c->n_kv_heads;
    /* the blocks of key directions that start in this batch (a decoded token inherits in rope_encode_kernel) */
    int B = kv->kblock, p0 = ceil_div(pos, B) * B, nblk = p0 < pos + n ? ceil_div(pos + n - p0, B) : 0;
    int stats = kv->kproj && nblk && (n > 1 || pos == 0), plast = p0 + (nblk - 1) * B;
    int inherit = stats && plast > 0 && pos + n - plast < KBLOCK_MIN;   /* the last one, on too few tokens */
    float eps = c->norm_eps;
    AttArgs a = g->att;
    a.n = n;
    unsigned gemv_blocks_qkv = blocks(QKV, GEMV_WARPS), gemv_blocks_dim = blocks(dim, GEMV_WARPS);

    launch(g, embed_kernel, dim3(blocks((size_t)n * dim, 256)), dim3(256), 0, g->x, w->emb, g->step, n, dim);
    for (int l = 0; l < c->n_layers; l++) {
        const float *rms_att = w->rms_att + (size_t)l * dim, *rms_ffn = w->rms_ffn + (size_t)l * dim;
        const __half *wqkv = w->wqkv + (size_t)l * QKV * dim, *wo = w->wo + (size_t)l * dim * qd;
        const __half *w13 = w->w13 + (size_t)l * 2 * hid * dim, *w2 = w->w2 + (size_t)l * dim * hid;
        /* attention block: x += Wo . attn(RoPE(Wq xn), RoPE(Wk xn), Wv xn) */
        if (n == 1) {
            launch(g, (gemv_kernel<EPI_STORE, true>), dim3(gemv_blocks_qkv), dim3(GEMV_WARPS * 32), 0, g->qkv, wqkv, g->x, rms_att, dim, QKV, eps);
        } else {
            launch(g, rmsnorm_kernel, dim3(n), dim3(256), 0, g->xb, g->x, rms_att, dim, eps);
            gemm(g, g->qkv, QKV, g->xb, dim, wqkv, n, dim, QKV, 0.0f);
        }
        if (stats) {
            launch(g, rope_encode_kernel, dim3(nkv), dim3(32 * (2 + ENC_QWARPS)), g->enc_shared, g->kv, *c, l, a, MODE_ROPE);
            if (g->host_stats) gpu_stats(t, l, n, pos);
            else {
                launch(g, stats_kernel, dim3(c->n_kv_heads, nblk), dim3(STATS_THREADS), stats_shared_bytes(hd, g->stats_m_shared),
                       g->kv, *c, l, a, g->stats_m, g->stats_blocks, g->stats_m_shared);
                if (inherit) launch(g, inherit_kernel, dim3(c->n_kv_heads), dim3(128), 0, g->kv, *c, l, a, plast);
            }
        }
        int mode = (stats ? 0 : MODE_ROPE) | MODE_QUERY | (defer_store(g, n) ? 0 : MODE_STORE) | (n == 1 ? MODE_EXACT : 0)
                   | (n == 1 && !stats ? MODE_INHERIT : 0);
        launch(g, rope_encode_kernel, dim3(nkv), dim3(32 * (2 + ENC_QWARPS)), g->enc_shared, g->kv, *c, l, a, mode);
        attention_layer(g, c, l, n, pos);
        if (n > 1) launch(g, store_exact_kernel, dim3(nkv), dim3(64), 0, g->kv, *c, l, a);
        if (n == 1) launch(g, (gemv_kernel<EPI_ADD, false>), dim3(gemv_blocks_dim), dim3(GEMV_WARPS * 32), 0, g->x, wo, g->xb, (const float *)NULL, qd, dim, eps);
        else gemm(g, g->x, dim, g->xb, qd, wo, n, qd, dim, 1.0f);

        /* feed-forward block: x += W2 . (silu(W1 xn) * W3 xn)   (SwiGLU) */
        if (n == 1) {
            launch(g, (gemv_kernel<EPI_SWIGLU, true>), dim3(blocks(hid, GEMV_WARPS)), dim3(GEMV_WARPS * 32), 0, g->hh, w13, g->x, rms_ffn, dim, hid, eps);
            launch(g, (gemv_kernel<EPI_ADD, false>), dim3(gemv_blocks_dim), dim3(GEMV_WARPS * 32), 0, g->x, w2, g->hh, (const float *)NULL, hid, dim, eps);
        } else {
            launch(g, rmsnorm_kernel, dim3(n), dim3(256), 0, g->xb, g->x, rms_ffn, dim, eps);
            gemm(g, g->hb, 2 * hid, g->xb, dim, w13, n, dim, 2 * hid, 0.0f);
            launch(g, swiglu_kernel, dim3(blocks((size_t)n * hid, 256)), dim3(256), 0, g->hh, g->hb, n, hid);
            gemm(g, g->x, dim, g->hh, hid, w2, n, hid, dim, 1.0f);
        }
    }
    /* final norm and classifier, for the tokens whose logits are wanted */
    int first = all_logits ? 0 : n - 1;
    if (n - first == 1) {
        launch(g, (gemv_kernel<EPI_STORE, true>), dim3(blocks(V, GEMV_WARPS)), dim3(GEMV_WARPS * 32), 0, g->logits, w->wcls,
                g->x + (size_t)first * dim, w->rms_final, dim, V, eps);
    } else {
        launch(g, rmsnorm_kernel, dim3(n - first), dim3(256), 0, g->xb, g->x + (size_t)first * dim, w->rms_final, dim, eps);
        gemm(g, g->logits, V, g->xb, dim, w->wcls, n - first, dim, V, 0.0f);
    }
    CUDA(cudaGetLastError());
}

/* run.c's forward(), on the GPU: the batch's position and tokens go to the
 * device, then its kernels run (one token past the first position: a replay of
 * the captured graph), then the logits come back. */
static float *forward(Transformer *t, const int *tokens, int n, int pos, int all_logits) {
    Gpu *g = t->gpu;
    const KVCache *kv = &t->cache;
    int stats = pos == 0 && kv->kproj;
    g->host_step[0] = pos;
    memcpy(g->host_step + 1, tokens, (size_t)n * sizeof(int));
    CUDA(cudaMemcpyAsync(g->step, g->host_step, (size_t)(1 + n) * sizeof(int), cudaMemcpyHostToDevice, g->stream));
    if (n == 1 && !stats) {
        if (!g->decode) {
            cudaGraph_t graph;
            CUDA(cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeThreadLocal));
            forward_kernels(t, 1, pos, 0);
            CUDA(cudaStreamEndCapture(g->stream, &graph));
            CUDA(cudaGraphInstantiate(&g->decode, graph, 0));
            CUDA(cudaGraphDestroy(graph));
        }
        CUDA(cudaGraphLaunch(g->decode, g->stream));
    } else {
        forward_kernels(t, n, pos, all_logits);
    }
    size_t rows = all_logits ? (size_t)n : 1;
    CUDA(cudaMemcpyAsync(g->host_logits, g->logits, rows * t->config.vocab_size * sizeof(float), cudaMemcpyDeviceToHost, g->stream));
    CUDA(cudaStreamSynchronize(g->stream));
    return g->host_logits;
}

/* One-time work done at load rather than inside the first prompt: CUDA loads a module's
 * kernels on their first launch, cuBLAS sets itself up and picks its kernels on its first
 * products, and the decode graph is captured on the first decoded token. So a batch of the
 * full size, one of an odd size and a single token run through forward() from position 0
 * (statistics included), then one decoded token (the graph's capture and a replay); then
 * every array of the cache is cleared, so the first real sequence finds the cache exactly as
 * an unwarmed build would (its statistics are measured anew at position 0 in any case). */
static void gpu_warm_up(Transformer *t, int all_logits) {
    Gpu *g = t->gpu;
    KVCache *kv = &g->kv;
    const Config *c = &t->config;
    int B = g->batch < kv->ctx - 1 ? g->batch : kv->ctx - 1, sizes[3] = {B, B / 2 + 1, 1};
    int *tokens = (int *)xcalloc(B > 0 ? B : 1, sizeof(int), "warm-up tokens");
    for (int i = 0; i < 3 && B > 0; i++) forward(t, tokens, sizes[i], 0, all_logits);
    if (kv->ctx > 1) forward(t, tokens, 1, 1, 0);
    free(tokens);
    size_t heads = (size_t)c->n_layers * c->n_kv_heads, hd = c->head_dim, R = kv->kproj;
    CUDA(cudaMemsetAsync(kv->key, 0, heads * kv->ctx * kv->kc.bytes, g->stream));
    CUDA(cudaMemsetAsync(kv->value, 0, heads * kv->ctx * kv->vc.bytes, g->stream));
    if (R) {
        size_t dirs = heads * kv->blocks * R * hd * sizeof(float);
        CUDA(cudaMemsetAsync(kv->kdir, 0, dirs, g->stream));
        CUDA(cudaMemsetAsync(kv->kdir_rot, 0, dirs, g->stream));
        if (g->att.kdir_qjl) CUDA(cudaMemsetAsync(g->att.kdir_qjl, 0, dirs, g->stream));
        if (kv->kbeta) CUDA(cudaMemsetAsync(kv->kbeta, 0, heads * kv->ctx * R * sizeof(uint16_t), g->stream));
        if (kv->kbeta8) CUDA(cudaMemsetAsync(kv->kbeta8, 0, heads * kv->ctx * R, g->stream));
        if (kv->kscale) CUDA(cudaMemsetAsync(kv->kscale, 0, heads * kv->blocks * R * sizeof(float), g->stream));
    }
    if (kv->slots) {
        CUDA(cudaMemsetAsync(kv->exact_k, 0, heads * kv->slots * hd * sizeof(uint16_t), g->stream));
        CUDA(cudaMemsetAsync(kv->exact_v, 0, heads * kv->slots * hd * sizeof(uint16_t), g->stream));
    }
    CUDA(cudaStreamSynchronize(g->stream));
}
