/* tests/fuzz_load.c - libFuzzer harness for run.c's model-file loader (`make fuzz`).
 *
 * One input is a whole model.bin, held in a buffer of exactly its size (so ASan sees any
 * read past its end, as a read past the end of the mmap'd file would fault):
 *   1. read_config checks the header against the size, as load_model does after mmap;
 *   2. when it accepts, every weight tensor that map_weights points at must lie inside
 *      the buffer (its first and last float are read);
 *   3. build_tokenizer parses the tokenizer section, as main does;
 *   4. when that succeeds too, a fixed text with special tokens, digits, contractions and
 *      non-ASCII is encoded and every token decoded.
 * Rejections are fine; a crash, a sanitizer report or a weight outside the file is a bug.
 * run.c is compiled in whole (its main() left out with RUN_NO_MAIN).
 */
#define RUN_NO_MAIN
#include "run.c"

static volatile float sink;

static void touch(const float *p, size_t n, const uint8_t *lo, const uint8_t *hi) {
    if (n == 0) return;
    if ((const uint8_t *)p < lo || (const uint8_t *)(p + n) > hi) {
        fprintf(stderr, "fuzz_load: a tensor of %zu floats lies outside the file\n", n);
        abort();
    }
    sink = p[0] + p[n - 1];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Config c;
    char err[256];
    if (read_config(&c, data, size, err, sizeof err)) return 0;

    TransformerWeights w;
    map_weights(&w, &c, (float *)(data + c.weights_offset));
    size_t L = (size_t)c.n_layers, dim = (size_t)c.dim, hid = (size_t)c.hidden_dim;
    size_t qd = (size_t)c.n_heads * c.head_dim, kvd = (size_t)c.n_kv_heads * c.head_dim;
    const uint8_t *end = data + size;
    touch(w.token_embedding, (size_t)c.vocab_size * dim, data, end);
    touch(w.rms_att, L * dim, data, end);
    touch(w.wq, L * qd * dim, data, end);
    touch(w.wk, L * kvd * dim, data, end);
    touch(w.wv, L * kvd * dim, data, end);
    touch(w.wo, L * dim * qd, data, end);
    touch(w.rms_ffn, L * dim, data, end);
    touch(w.w1, L * hid * dim, data, end);
    touch(w.w2, L * dim * hid, data, end);
    touch(w.w3, L * hid * dim, data, end);
    touch(w.rms_final, dim, data, end);
    touch(w.wcls, (size_t)c.vocab_size * dim, data, end);

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
