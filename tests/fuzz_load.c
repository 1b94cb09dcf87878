/* tests/fuzz_load.c - libFuzzer harness for run.c's model-file loader (`make fuzz`).
 *
 * One input is a whole model.bin, held in a buffer of exactly its size (so ASan sees any
 * read past its end, as a read past the end of the mmap'd file would fault):
 *   1. read_config checks the header against the size, as load_model does after mmap;
 *   2. when it accepts, every weight tensor that map_weights points at (fp32, or
 *      int8 codes and scales) must lie inside the buffer (its first and last byte are read);
 *   3. build_tokenizer parses the tokenizer section, as main does;
 *   4. when that succeeds too, a fixed text with special tokens, digits, contractions and
 *      non-ASCII is encoded and every token decoded.
 * Rejections are fine; a crash, a sanitizer report or a weight outside the file is a bug.
 * run.c is compiled in whole (its main() left out with RUN_NO_MAIN).
 */
#define RUN_NO_MAIN
#include "run.c"

static volatile float sink;

/* n bytes at p must lie inside [lo, hi); reads the first and the last */
static void touch(const void *p, size_t n, const uint8_t *lo, const uint8_t *hi) {
    const uint8_t *b = (const uint8_t *)p;
    if (n == 0) return;
    if (b < lo || b > hi || (size_t)(hi - b) < n) {
        fprintf(stderr, "fuzz_load: a tensor of %zu bytes lies outside the file\n", n);
        abort();
    }
    sink = b[0] + b[n - 1];
}

/* a weight matrix of n numbers: fp32, or int8 codes and one fp32 scale per TQ_QGROUP */
static void touch_matrix(const float *f, const QMatrix *q, size_t n, const uint8_t *lo, const uint8_t *hi) {
    if (f) touch(f, n * sizeof(float), lo, hi);
    else {
        touch(q->q, n, lo, hi);
        touch(q->s, n / TQ_QGROUP * sizeof(float), lo, hi);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Config c;
    char err[256];
    if (read_config(&c, data, size, err, sizeof err)) return 0;

    TransformerWeights w;
    map_weights(&w, &c, (uint8_t *)data + c.weights_offset);
    size_t L = (size_t)c.n_layers, dim = (size_t)c.dim, hid = (size_t)c.hidden_dim;
    size_t qd = (size_t)c.n_heads * c.head_dim, kvd = (size_t)c.n_kv_heads * c.head_dim;
    const uint8_t *end = data + size;
    touch_matrix(w.token_embedding, &w.q_embedding, (size_t)c.vocab_size * dim, data, end);
    touch(w.rms_att, L * dim * sizeof(float), data, end);
    touch_matrix(w.wq, &w.q_wq, L * qd * dim, data, end);
    touch_matrix(w.wk, &w.q_wk, L * kvd * dim, data, end);
    touch_matrix(w.wv, &w.q_wv, L * kvd * dim, data, end);
    touch_matrix(w.wo, &w.q_wo, L * dim * qd, data, end);
    touch(w.rms_ffn, L * dim * sizeof(float), data, end);
    touch_matrix(w.w1, &w.q_w1, L * hid * dim, data, end);
    touch_matrix(w.w2, &w.q_w2, L * dim * hid, data, end);
    touch_matrix(w.w3, &w.q_w3, L * hid * dim, data, end);
    touch(w.rms_final, dim * sizeof(float), data, end);
    touch_matrix(w.wcls, &w.q_wcls, (size_t)c.vocab_size * dim, data, end);

    Tokenizer t;
    if (build_tokenizer(&t, data + c.tokenizer_offset, c.tokenizer_bytes, c.vocab_size,
                        c.tokenizer_kind, c.pretok, err, sizeof err) != 0)
        return 0;
    static const char text[] = "Hello world, it's 2024!\n<|im_start|>user\nh\xc3\xa9llo  \t<s> 12.5\xe2\x82\xac";
    int ids[256];
    int n = encode(&t, text, sizeof text - 1, c.bos_id, ids, 256);
    char out[4096];
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= c.vocab_size) { fprintf(stderr, "fuzz_load: token id %d\n", ids[i]); abort(); }
        size_t len;
        const char *p = decode_piece(&t, i ? ids[i - 1] : -1, c.bos_id, ids[i], &len);
        if (len > sizeof out - at) len = sizeof out - at;
        memcpy(out + at, p, len);
        at += len;
    }
    free_tokenizer(&t);
    return 0;
}
