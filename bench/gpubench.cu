/* bench/gpubench.cu - run_cuda's decode step and its attention kernels at long contexts.
 *
 *   nvcc -O3 -arch=sm_90 -o bench/gpubench bench/gpubench.cu -lcublas -lm -Xcompiler -fopenmp
 *   ./bench/gpubench MODEL [--formats fp16,q8,q4,tq4,tq3,tq2] [--ctx 8192,32768,131072] [--rounds 5] [--prefill N]
 *
 * MODEL: any model.bin, e.g. `export.py tok.bin model8b.bin --random llama-3.1-8b --layers 4`.
 * For each format one transformer (run.c's defaults otherwise: eden scale, --kproj 2, sink 1,
 * window 8) whose cache holds max(ctx) positions. The cache is filled without a prefill: random
 * vectors (uniform in [-1, 1)) go through the encode kernel, so the codes, the key projections
 * and the byte count are those of a real cache while what they encode is noise; the statistics
 * stay at their defaults (zero key directions, whose projections beta are still stored and read). Then, in interleaved rounds (every format once per round, medians reported):
 *   decode:    one token at position ctx - 1 through forward() (graph replay, logits copied
 *              back), wall time per token;
 *   attention: the last layer's attention alone (partials over chunks of the coded keys + merge,
 *              whose extra blocks store the decoded token's key and value beside it: the last
 *              forward()'s queries and key and value are that layer's, so the cache stays as
 *              forward() left it),
 *              CUDA events around each launch pair; where the build uses the tensor-core
 *              kernel (tq2/tq3), attention_kernel (CUDA cores) is timed too, on the same cache,
 *              and the two outputs are compared once (relative L2 difference);
 *   prefill:   (--prefill N) N tokens from position 0 through prefill() in batches of 256,
 *              statistics included, wall time; the first round (cold: kernels and cuBLAS
 *              loaded on first use) is reported apart from the median of the others;
 * with the bytes each must read: the cache's codes, betas and exact rows of the positions
 * attended to (attention), plus every fp16 weight (decode). A device-to-device copy gives the
 * bandwidth ceiling (bytes read + written over its time).
 */
#define RUN_NO_MAIN
#define PROG "gpubench"
#include "../run_cuda.cu"

#include <algorithm>
#include <vector>

#define MAX_FMT 16
#define MAX_CTX 16

/* x (n) = uniform in [-1, 1) from a counter-based hash of (seed, i) */
__global__ void random_fill_kernel(float *x, size_t n, uint32_t seed) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t h = (uint32_t)i * 0x9E3779B1u ^ seed * 0x85EBCA77u ^ (uint32_t)(i >> 32);
    h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
    x[i] = (float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

/* positions [0, n) of every layer: random k, v through the encode kernel, `batch` at a time */
static void fill_cache(Transformer *t, int n) {
    Gpu *g = t->gpu;
    const Config *c = &t->config;
    size_t QKV = (size_t)(c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < n; p += g->batch) {
            int m = n - p < g->batch ? n - p : g->batch;
            g->host_step[0] = p;
            CUDA(cudaMemcpyAsync(g->step, g->host_step, sizeof(int), cudaMemcpyHostToDevice, g->stream));
            random_fill_kernel<<<blocks(m * QKV, 256), 256, 0, g->stream>>>(g->qkv, m * QKV, (uint32_t)(l * 1000003 + p));
            AttArgs a = g->att;
            a.n = m;
            rope_encode_kernel<<<m * c->n_kv_heads, 32 * (2 + ENC_QWARPS), g->enc_shared, g->stream>>>(g->kv, *c, l, a, MODE_ENCODE);
            CUDA(cudaStreamSynchronize(g->stream));   /* the host step buffer is reused */
        }
    CUDA(cudaGetLastError());
}

/* bytes attention reads for one layer of a query at position T-1: codes, betas, exact rows */
static double att_bytes(const Transformer *t, int T) {
    const Config *c = &t->config;
    const KVCache *kv = &t->cache;
    int coded = T - kv->sink - kv->window, exact = T - (coded > 0 ? coded : 0);
    if (coded < 0) coded = 0;
    return (double)c->n_kv_heads * ((double)coded * (kv->kc.bytes + kv->vc.bytes + 2 * kv->kproj)
                                    + (double)exact * c->head_dim * 2 * 2);
}

static double gpu_weight_bytes(const Config *c) {
    double L = c->n_layers, dim = c->dim, hid = c->hidden_dim, V = c->vocab_size;
    double qd = (double)c->n_heads * c->head_dim, kvd = (double)c->n_kv_heads * c->head_dim;
    return 2.0 * (V * dim + L * dim * (qd + 2 * kvd + qd + 3 * hid));   /* what one token reads (the embedding: one row) */
}

/* The attention kernel a transformer uses, and the CUDA-core one (attention_kernel) to swap in:
 * its block shape and the decode split its occupancy gives (gpu_build's rule). */
typedef struct { AttKernel kernel; int rows, threads, units; size_t shared; } AttChoice;

static AttChoice att_choice(const Gpu *g) { return AttChoice{g->att_kernel, g->att_rows, g->att_threads, g->att.units, g->att_shared}; }

static AttChoice simt_choice(const Gpu *g, const Config *c) {
    AttChoice s = {attention_kernel, ATT_ROWS, ATT_WARPS * 32, 1, att_shared_bytes(g->att.dv)};
    int per_sm = 1, sms = 1, dev;
    CUDA(cudaGetDevice(&dev));
    CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, attention_kernel, s.threads, s.shared));
    CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    s.units = per_sm * sms / c->n_kv_heads;
    s.units = s.units > MAX_PARTS ? MAX_PARTS : s.units < 1 ? 1 : s.units;
    return s;
}

static void use_att(Gpu *g, AttChoice a) {
    g->att_kernel = a.kernel; g->att_rows = a.rows; g->att_threads = a.threads; g->att.units = a.units; g->att_shared = a.shared;
}

/* the last layer's attention output at position pos (n_heads * head_dim floats) with kernel choice k */
static std::vector<float> att_output(Transformer *t, AttChoice k, int pos) {
    Gpu *g = t->gpu;
    const Config *c = &t->config;
    AttChoice keep = att_choice(g);
    use_att(g, k);
    attention_layer(g, c, c->n_layers - 1, 1, pos);
    std::vector<float> out((size_t)c->n_heads * c->head_dim);
    CUDA(cudaMemcpyAsync(out.data(), g->xb, out.size() * sizeof(float), cudaMemcpyDeviceToHost, g->stream));
    CUDA(cudaStreamSynchronize(g->stream));
    use_att(g, keep);
    return out;
}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static int split_list(char *s, char **out, int max) {
    int n = 0;
    for (char *tok = strtok(s, ","); tok && n < max; tok = strtok(NULL, ",")) out[n++] = tok;
    return n;
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') {
        fprintf(stderr, "usage: gpubench MODEL [--formats fp16,q8,q4,tq4,tq3,tq2] [--ctx 8192,32768,131072] [--rounds 5]\n");
        return 1;
    }
    char fmts_arg[256] = "fp16,q8,q4,tq4,tq3,tq2", ctx_arg[256] = "8192,32768,131072";
    int rounds = 5, steps = 10, reps = 20, npre = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--formats")) snprintf(fmts_arg, sizeof fmts_arg, "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--ctx")) snprintf(ctx_arg, sizeof ctx_arg, "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--rounds")) rounds = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prefill")) npre = atoi(argv[i + 1]);
        else die("unknown option %s", argv[i]);
    }
    char *fnames[MAX_FMT], *cnames[MAX_CTX];
    int nf = split_list(fmts_arg, fnames, MAX_FMT), nc = split_list(ctx_arg, cnames, MAX_CTX), ctxs[MAX_CTX], maxctx = 0;
    for (int i = 0; i < nc; i++) { ctxs[i] = atoi(cnames[i]); maxctx = ctxs[i] > maxctx ? ctxs[i] : maxctx; }

    static Transformer tr[MAX_FMT];
    for (int f = 0; f < nf; f++) {
        tq_cache_opts o = {TQ_TQ3, TQ_TQ3, TQ_SCALE_EDEN, TQ_SCALE_EDEN, 2, KBLOCK_DEFAULT, 1, 8};   /* run's defaults */
        char *colon = strchr(fnames[f], ':'), *vname = colon ? colon + 1 : fnames[f];   /* KEYS or KEYS:VALUES, as -k */
        if (colon) *colon = 0;
        if (tq_parse_fmt(fnames[f], &o.key_fmt) || tq_parse_fmt(vname, &o.value_fmt)) die("unknown KV format in --formats");
        if (colon) *colon = ':';
        double t0 = now_s();
        build_transformer(&tr[f], argv[1], &o, maxctx > npre ? maxctx : npre, 256, 0, 1, TQ_SIMD_PORTABLE);
        fill_cache(&tr[f], maxctx);
        fprintf(stderr, "gpubench: %s: built and filled %d positions in %.1f s\n", fnames[f], maxctx, now_s() - t0);
    }
    const Config *c = &tr[0].config;

    /* the ceiling: a device-to-device copy of 2 GiB, bytes read + written */
    size_t cb = (size_t)1 << 31;
    void *src, *dst;
    CUDA(cudaMalloc(&src, cb));
    CUDA(cudaMalloc(&dst, cb));
    CUDA(cudaMemset(src, 1, cb));
    cudaEvent_t e0, e1;
    CUDA(cudaEventCreate(&e0));
    CUDA(cudaEventCreate(&e1));
    std::vector<double> copy_ms;
    for (int r = 0; r < 10; r++) {
        CUDA(cudaEventRecord(e0));
        CUDA(cudaMemcpyAsync(dst, src, cb, cudaMemcpyDeviceToDevice));
        CUDA(cudaEventRecord(e1));
        CUDA(cudaEventSynchronize(e1));
        float ms;
        CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (r > 0) copy_ms.push_back(ms);
    }
    double copy_bw = 2.0 * cb / (median(copy_ms) * 1e-3);
    CUDA(cudaFree(src));
    CUDA(cudaFree(dst));

    static std::vector<double> dec[MAX_FMT][MAX_CTX], att[MAX_FMT][MAX_CTX], simt[MAX_FMT][MAX_CTX], pre[MAX_FMT];
    int tok = c->bos_id >= 0 ? c->bos_id : 0;
    int *ptoks = (int *)xcalloc(npre > 0 ? npre : 1, sizeof(int), "prefill tokens");
    for (int i = 0; i < npre; i++) ptoks[i] = (int)((1103515245u * (unsigned)i + 12345u) % (unsigned)c->vocab_size);
    for (int r = 0; r < rounds; r++) {
        for (int f = 0; f < nf && npre > 0; f++) {
            double t0 = now_s();
            prefill(&tr[f], ptoks, npre, 0, NULL, NULL);
            pre[f].push_back(now_s() - t0);
        }
        for (int ci = 0; ci < nc; ci++)
            for (int f = 0; f < nf; f++) {
                Transformer *t = &tr[f];
                Gpu *g = t->gpu;
                int pos = ctxs[ci] - 1;
                forward(t, &tok, 1, pos, 0);                 /* warm-up (and the graph's capture) */
                double t0 = now_s();
                for (int s = 0; s < steps; s++) forward(t, &tok, 1, pos, 0);
                dec[f][ci].push_back((now_s() - t0) / steps);
                AttChoice mine = att_choice(g), other = simt_choice(g, c);
                for (int k = 0; k < (mine.kernel != attention_kernel ? 2 : 1); k++) {   /* this build's kernel, then attention_kernel */
                    use_att(g, k ? other : mine);
                    for (int s = 0; s < reps; s++) {         /* the step's position is on the GPU already */
                        CUDA(cudaEventRecord(e0, g->stream));
                        attention_layer(g, c, c->n_layers - 1, 1, pos);
                        CUDA(cudaEventRecord(e1, g->stream));
                        CUDA(cudaEventSynchronize(e1));
                        float ms;
                        CUDA(cudaEventElapsedTime(&ms, e0, e1));
                        (k ? simt : att)[f][ci].push_back(ms * 1e-3);
                    }
                }
                use_att(g, mine);
                CUDA(cudaGetLastError());
            }
    }

    cudaDeviceProp prop;
    CUDA(cudaGetDeviceProperties(&prop, 0));
    time_t now = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d", localtime(&now));
    printf("gpubench %s, %s, model %s: dim %d, %d layers, %d heads, %d kv heads, head_dim %d, vocab %d; "
           "device copy %.0f GB/s (read + write); median of %d rounds (%d decode steps, %d attention runs each)\n\n",
           date, prop.name, argv[1], c->dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->vocab_size,
           copy_bw / 1e9, rounds, steps, reps);
    /* the tensor-core kernel against attention_kernel on the same cache and queries (last layer, last position) */
    for (int f = 0; f < nf; f++) {
        Gpu *g = tr[f].gpu;
        if (g->att_kernel == attention_kernel) continue;
        std::vector<float> a = att_output(&tr[f], att_choice(g), maxctx - 1), b = att_output(&tr[f], simt_choice(g, c), maxctx - 1);
        double dd = 0, bb = 0;
        for (size_t i = 0; i < a.size(); i++) { dd += (double)(a[i] - b[i]) * (a[i] - b[i]); bb += (double)b[i] * b[i]; }
        printf("check %s at %d: |mma - attention_kernel| / |attention_kernel| = %.3g over %zu outputs%s\n", fnames[f], maxctx,
               sqrt(dd / bb), a.size(), std::isfinite(dd) ? "" : " (NOT FINITE)");
    }
    printf("\n| ctx | format | decode tok/s | vs fp16 | MB read/token | GB/s | attention us/layer | fp16/this | MB read/layer | GB/s | of copy | attention_kernel us |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int ci = 0; ci < nc; ci++) {
        int base = 0;
        for (int f = 0; f < nf; f++) if (!strcmp(fnames[f], "fp16")) base = f;
        double dbase = median(dec[base][ci]), abase = median(att[base][ci]);
        for (int f = 0; f < nf; f++) {
            double d = median(dec[f][ci]), a = median(att[f][ci]), ab = att_bytes(&tr[f], ctxs[ci]);
            double db = gpu_weight_bytes(c) + c->n_layers * ab;
            char other[32] = "-";
            if (!simt[f][ci].empty()) snprintf(other, sizeof other, "%.1f", median(simt[f][ci]) * 1e6);
            printf("| %d | %s | %.1f | %.2fx | %.1f | %.0f | %.1f | %.2fx | %.2f | %.0f | %.0f%% | %s |\n", ctxs[ci], fnames[f],
                   1 / d, dbase / d, db / 1e6, db / d / 1e9, a * 1e6, abase / a, ab / 1e6, ab / a / 1e9, 100 * ab / a / copy_bw, other);
        }
    }
    if (npre > 0) {
        printf("\n| format | prefill of %d tokens: tok/s (median of rounds 2..%d) | first round (cold) |\n|---|---|---|\n", npre, rounds);
        for (int f = 0; f < nf; f++) {
            std::vector<double> warm(pre[f].begin() + (pre[f].size() > 1), pre[f].end());
            printf("| %s | %.0f | %.0f |\n", fnames[f], npre / median(warm), npre / pre[f][0]);
        }
    }
    free(ptoks);
    for (int f = 0; f < nf; f++) free_transformer(&tr[f]);
    return 0;
}
