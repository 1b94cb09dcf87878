/* tests/fuzz_tok.c - libFuzzer harness for run.c's tokenizer (`make fuzz`).
 *
 * The tokenizer is the one of $FUZZ_MODEL (default model.bin: SmolLM2's GPT-2 byte-level
 * BPE), loaded once with run.c's own load_model and build_tokenizer. For every input s:
 *   1. encode(s) fails with -1 exactly when s is not valid UTF-8 (checked against the
 *      independent validator below, written from RFC 3629's table);
 *   2. every id it returns is in the vocabulary;
 *   3. decode(encode(s)) == s, when s is valid UTF-8 and the vocabulary has a token for
 *      each of its bytes (SmolLM2 has none for 0x04 0x06 0x13 0x14 0x16 0x1D and for bytes
 *      UTF-8 never uses: encode drops those, as Hugging Face's BPE does).
 * A violated property aborts with the input's hex, so libFuzzer saves it as a crash.
 * run.c is compiled in whole (its main() left out with RUN_NO_MAIN).
 */
#define RUN_NO_MAIN
#include "run.c"

static Tokenizer tok;
static int bos_id;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    const char *path = getenv("FUZZ_MODEL") ? getenv("FUZZ_MODEL") : "model.bin";
    static Transformer t; /* the mmap stays for the whole run */
    load_model(&t, path);
    char err[256];
    if (build_tokenizer(&tok, t.data + t.config.tokenizer_offset, t.config.tokenizer_bytes,
                        t.config.vocab_size, t.config.tokenizer_kind, t.config.pretok, err, sizeof err) != 0)
        die("%s: %s", path, err);
    if (tok.kind != 2) die("%s: fuzz_tok checks a GPT-2 kind tokenizer", path);
    bos_id = t.config.bos_id;
    return 0;
}

/* 1 when s[0..n) is valid UTF-8: RFC 3629's table of well-formed byte sequences */
static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        int len; uint8_t lo = 0x80, hi = 0xBF;     /* the range of the second byte */
        if (b <= 0x7F) { i++; continue; }
        else if (b >= 0xC2 && b <= 0xDF) len = 2;
        else if (b == 0xE0) { len = 3; lo = 0xA0; }
        else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) len = 3;
        else if (b == 0xED) { len = 3; hi = 0x9F; }
        else if (b == 0xF0) { len = 4; lo = 0x90; }
        else if (b >= 0xF1 && b <= 0xF3) len = 4;
        else if (b == 0xF4) { len = 4; hi = 0x8F; }
        else return 0;
        if (n - i < (size_t)len || s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (int k = 2; k < len; k++) if (s[i + k] < 0x80 || s[i + k] > 0xBF) return 0;
        i += (size_t)len;
    }
    return 1;
}

static void fail(const char *what, const uint8_t *s, size_t n) {
    fprintf(stderr, "fuzz_tok: %s for the input (hex):", what);
    for (size_t i = 0; i < n && i < 200; i++) fprintf(stderr, " %02x", s[i]);
    fprintf(stderr, "\n");
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int max = (int)size + 3;
    int *ids = malloc((size_t)max * sizeof(int));
    if (!ids) return 0;
    int n = encode(&tok, (const char *)data, size, -1, ids, max);
    int valid = utf8_valid(data, size);
    if (!valid) {
        if (n != -1) fail("encode accepted invalid UTF-8", data, size);
        free(ids);
        return 0;
    }
    if (n < 0) fail("encode refused valid UTF-8", data, size);
    int representable = 1;
    for (size_t i = 0; i < size; i++) if (tok.byte_id[data[i]] < 0) representable = 0;
    char *out = malloc(size + 1);
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= tok.vocab_size) fail("a token id outside the vocabulary", data, size);
        size_t len;
        const char *p = decode_piece(&tok, i ? ids[i - 1] : -1, bos_id, ids[i], &len);
        if (at + len > size) fail("decode is longer than the input", data, size);
        memcpy(out + at, p, len);
        at += len;
    }
    if (representable && (at != size || memcmp(out, data, size) != 0))
        fail("decode(encode(s)) != s", data, size);
    free(out);
    free(ids);
    return 0;
}
