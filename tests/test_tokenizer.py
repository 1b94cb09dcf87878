"""The tokenizer of ./run through its two tool modes, against independent references.

    BIN model.bin -m tokenize -f FILE     token ids of FILE's bytes (no bos), space-separated + "\\n"
    BIN model.bin -m detokenize -f FILE   FILE's whitespace-separated ids -> the decoded bytes

BIN is ./run, or $TOK_BIN (e.g. tests/tok_harness, built from the tokenizer section alone).

GPT-2 kind (SmolLM2-135M-Instruct): the reference is Hugging Face `tokenizers`, configured from
the GGUF file's own metadata (read with `gguf`, never from model.bin): BPE(tokens, merges),
Sequence([Digits(individual_digits), ByteLevel(use_regex)]) and the control tokens as special
tokens. Ids must be identical on wiki.test.raw, on tricky strings and on every code point of
the BMP and plane 1 (which checks the exported Unicode classes), and decode(encode(s)) == s.
Small byte-level BPEs trained with `tokenizers` check the plain GPT-2 regex (pretok 2) and no
pre-tokenizer (pretok 0) the same way.

SentencePiece kind (llama2.c's algorithm): hand-checked cases on a tiny vocabulary, and, when
the `sentencepiece` package is installed, ids identical to a BPE model trained with it (its
encoder merges the pair whose result scores best, leftmost first, as llama2.c does).

Corrupt tokenizer sections must fail cleanly: an error message, a plain non-zero exit status,
no signal and no sanitizer report.
"""
import json
import os
import pathlib
import random
import struct
import sys
import time
import unicodedata

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from conftest import bytes_to_unicode, ROOT, RUN, SMOL_GGUF_PATHS, WIKI, run_cmd  # noqa: E402
from fuzz_seeds import pack_tokenizer  # noqa: E402


def tok_bin():
    p = pathlib.Path(os.environ.get("TOK_BIN", RUN))
    if not p.is_absolute() and not p.exists():
        p = ROOT / p
    return p


@pytest.fixture(scope="session")
def binary():
    p = tok_bin()
    if not p.exists():
        pytest.skip(f"{p} is not built")
    return p


@pytest.fixture(scope="session")
def model(request):
    """ROOT/model.bin (the smollm2 fixture); $TOK_MODEL overrides it during development."""
    if os.environ.get("TOK_MODEL"):
        return pathlib.Path(os.environ["TOK_MODEL"])
    return request.getfixturevalue("smollm2")


def tokenize(binary, model, data, tmp_path, name="in.txt", check=True):
    f = tmp_path / name
    f.write_bytes(data)
    p = run_cmd([model, "-m", "tokenize", "-f", f], binary=binary, check=check)
    if not check:
        return p
    assert p.stdout.endswith(b"\n") and b"  " not in p.stdout, p.stdout[:200]
    return [int(x) for x in p.stdout.split()]


def detokenize(binary, model, ids, tmp_path, name="ids.txt"):
    f = tmp_path / name
    f.write_text(" ".join(map(str, ids)) + "\n")
    return run_cmd([model, "-m", "detokenize", "-f", f], binary=binary).stdout


def clean_failure(p):
    """A refused input or model: non-zero exit, a message, no crash, no sanitizer report."""
    assert p.returncode > 0, f"exit status {p.returncode} (negative: killed by a signal)"
    assert p.stderr.strip(), "no error message on stderr"
    assert not sanitizer_error(p.stderr), p.stderr[-2000:]


def sanitizer_error(stderr):
    """An ASan or UBSan report (a leak report at an error exit is not one)."""
    return b"ERROR: AddressSanitizer" in stderr or b"runtime error" in stderr


# ----------------------------------------------------------------------------- model.bin writer



BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def unicode_ranges():
    """Oniguruma's classes from Python's unicodedata: L* letter, N* number, \\s (White_Space:
    isspace() less the information separators U+001C..U+001F)."""
    ranges, cur, lo = [], 0, 0
    for cp in range(0x110000):
        ch = chr(cp)
        c = unicodedata.category(ch)[0]
        k = 1 if c == "L" else 2 if c == "N" else 3 if ch.isspace() and not 0x1C <= cp <= 0x1F else 0
        if k != cur:
            if cur:
                ranges.append((lo, cp - 1, cur))
            cur, lo = k, cp
    if cur:
        ranges.append((lo, 0x10FFFF, cur))
    return ranges


def write_model(path, section, *, vocab, kind, pretok, bos=-1, eos=-1):
    """A complete, loadable model.bin around a tokenizer section: one layer of zero weights
    (dim = head_dim = hidden = 64), so that ./run's own checks pass."""
    dim = hid = hd = 64
    n_floats = vocab * dim + (dim + 4 * hd * dim) + (dim + 3 * hid * dim) + dim
    w_off = (256 + len(section) + 63) // 64 * 64
    h = bytearray(256)
    h[0:4] = b"TQLM"
    struct.pack_into("<14i", h, 4, 1, dim, hid, 1, 1, 1, hd, vocab, 64, 1, kind, bos, eos, -1)
    struct.pack_into("<iff", h, 60, -1, 10000.0, 1e-5)
    struct.pack_into("<QQQQii", h, 72, 256, len(section), w_off, 4 * n_floats, 0, pretok)
    with open(path, "wb") as f:
        f.write(bytes(h) + section + bytes(w_off - 256 - len(section)) + bytes(4 * n_floats))
    return path


# ----------------------------------------------------------------------------- SmolLM2 (GPT-2 kind)

@pytest.fixture(scope="session")
def hf_ref():
    """SmolLM2's tokenizer rebuilt with `tokenizers` from the GGUF metadata."""
    gguf = pytest.importorskip("gguf")
    tk_mod = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    path = next((p for p in SMOL_GGUF_PATHS if p.exists()), None)
    if path is None:
        pytest.skip("SmolLM2 GGUF missing: run `make model`")
    r = gguf.GGUFReader(str(path))
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    tk = tk_mod.Tokenizer(models.BPE({s: i for i, s in enumerate(toks)}, merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(toks[i], special=True) for i in range(len(toks)) if types[i] == 3])
    return tk


def hf_ids(tk, data: bytes):
    return tk.encode(data.decode("utf-8"), add_special_tokens=False).ids


TRICKY = [
    "", " ", "a", "Hello, world!", "hello world", "  leading and trailing  ",
    "a  \n\n  b", "trailing spaces   ", "\ttabs\t\tand\t \tmixed \t", "\n", "\n\n\n", "x\r\ny\r\n",
    "line one\nline two\n\n  indented\n", "   \n", " \n \n ",
    "1234567", "3.14", "x2y", "v1.2.3-rc4", "  42  ", "2024-01-31 12:00:00", "1,000,000", "½ ² Ⅷ ٣٤٥ १२३",
    "don't", "I'LL", "they're", "we've I'm she'd you'll it's", "'s 't 're 've 'm 'll 'd", "''''",
    "DON'T 'S", "rock'n'roll", "l'été",
    "!!!???...,,,;;;", "--==++**", "((([[[{{{}}}]]])))", "a...b", "e.g.,", "#!/bin/sh", "\"quoted\"",
    "émigré café naïve", "e\u0301migre\u0301 cafe\u0301 nai\u0308ve", "Ångström ÅNGSTRÖM",
    "日本語のテキスト、漢字とかな。", "中文测试 文本", "한국어 텍스트", "Ελληνικά Русский עברית العربية",
    "👋🌍", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "👍🏽 thumbs", "a👋b 👋 c", "🇫🇷🇩🇪",
    "\u00a0nbsp\u00a0 \u3000ideographic\u2028sep\u2029 \u200bzwsp \u180e", "x\x1cy\x1f z \x85w\x1e",
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>", "a<|im_end|>b", "<|im_start|", "<|im_start|><|im_end|>",
    "<repo_name>x<reponame>y", "<|im_startx|>", "text with <|im_end|> inside",
    "mixed: Tokyo東京2020年 🎌 x=3.5e-10 don't!\n",
]


@pytest.fixture(scope="session")
def wiki_tokens(binary, model, tmp_path_factory):
    t0 = time.time()
    ids = tokenize(binary, model, WIKI.read_bytes(), tmp_path_factory.mktemp("wiki"))
    return ids, time.time() - t0


def test_wiki_ids_match_tokenizers(hf_ref, wiki_tokens):
    ids, secs = wiki_tokens
    ref = hf_ids(hf_ref, WIKI.read_bytes())
    if ids != ref:
        i = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
        pytest.fail(f"first difference at token {i}: run {ids[max(0, i - 3):i + 5]} "
                    f"tokenizers {ref[max(0, i - 3):i + 5]} ({len(ids)} vs {len(ref)} tokens)")
    print(f"wiki.test.raw: {len(ids)} tokens in {secs:.2f} s")


def test_wiki_speed(wiki_tokens):
    _, secs = wiki_tokens
    assert secs < 20, f"tokenizing wiki.test.raw took {secs:.1f} s"  # ~0.2 s optimized


def test_wiki_roundtrip(binary, model, wiki_tokens, tmp_path):
    assert detokenize(binary, model, wiki_tokens[0], tmp_path) == WIKI.read_bytes()


@pytest.mark.parametrize("s", TRICKY, ids=lambda s: repr(s)[:40])
def test_tricky(binary, model, hf_ref, tmp_path, s):
    data = s.encode("utf-8")
    ids = tokenize(binary, model, data, tmp_path)
    assert ids == hf_ids(hf_ref, data)
    assert detokenize(binary, model, ids, tmp_path) == data


def test_all_code_points(binary, model, hf_ref, tmp_path):
    """Every code point of the BMP and plane 1, and a sample of the rest, in contexts that
    show its class: joined to a letter, after a space, before punctuation."""
    cps = [c for c in range(1, 0x20000) if not 0xD800 <= c <= 0xDFFF] + list(range(0x20000, 0x110000, 61))
    data = "".join(f"a{chr(c)} {chr(c)}.\n" for c in cps).encode("utf-8")
    assert tokenize(binary, model, data, tmp_path) == hf_ids(hf_ref, data)


def test_random_mix(binary, model, hf_ref, tmp_path):
    """A seeded random mix of the pieces the pre-tokenizer treats differently."""
    rnd = random.Random(1234)
    atoms = [" ", "  ", "\n", "\t", "\r\n", "'", "'s", "'ll", "'RE", "a", "Z", "word", " word", "é",
             "e\u0301", "日本", "7", "42", ".", ",", "!?", "--", "👍", "👨‍👩‍👧", "\u00a0", "\u3000",
             "<|im_start|>", "<|im_end|>", "<|im", "½", "x1", "\u0301", "ß", "İ"]
    data = "".join(rnd.choice(atoms) for _ in range(20000)).encode("utf-8")
    ids = tokenize(binary, model, data, tmp_path)
    assert ids == hf_ids(hf_ref, data)
    assert detokenize(binary, model, ids, tmp_path) == data


def test_nul_bytes(binary, model, hf_ref, tmp_path):
    """FILE's bytes are all tokenized: a NUL byte does not end the text."""
    data = b"a\x00b \x00 c\x00\x00\n\x00"
    ids = tokenize(binary, model, data, tmp_path)
    assert ids == hf_ids(hf_ref, data)
    assert detokenize(binary, model, ids, tmp_path) == data


def test_unmapped_bytes_are_dropped(binary, model, hf_ref, tmp_path):
    """SmolLM2 has no token for a few control bytes (e.g. 0x04): like tokenizers' BPE without
    an unk token, they are dropped, and their neighbours merge across them."""
    data = "a\x04b !\x06! \x13\x14".encode()
    assert tokenize(binary, model, data, tmp_path) == hf_ids(hf_ref, data)


def test_special_tokens_decode_as_text(binary, model, tmp_path):
    ids = tokenize(binary, model, b"<|im_start|>user\nhi<|im_end|>", tmp_path)
    assert ids[0] == 1 and ids[-1] == 2
    assert detokenize(binary, model, [1, 2, 0], tmp_path) == b"<|im_start|><|im_end|><|endoftext|>"


@pytest.mark.parametrize("data", [b"\xff\xfe", b"abc\xe2\x82", b"\xe2\x82", b"ok \xc3", b"\xc0\xaf",
                                  b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80",
                                  b"<|im_start|>\xff<|im_end|>"],
                         ids=lambda d: d.hex())
def test_invalid_utf8(binary, model, tmp_path, data):
    p = tokenize(binary, model, data, tmp_path, check=False)
    clean_failure(p)
    assert b"utf-8" in p.stderr.lower(), p.stderr


# ----------------------------------------------------------------------------- small trained GPT-2 BPEs

@pytest.fixture(scope="session")
def small_gpt2(tmp_path_factory):
    """A 600-token byte-level BPE trained with `tokenizers` on part of wiki.test.raw, with two
    special tokens of which one is a prefix of the other (leftmost-longest matching)."""
    tk_mod = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, models, pre_tokenizers, trainers
    specials = ["<|x|>", "<|x|>y", "<|endoftext|>"]
    tk = tk_mod.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tk.train_from_iterator(WIKI.read_text(encoding="utf-8").split("\n")[:1500], trainer=trainer)
    m = json.loads(tk.to_str())["model"]
    vocab = m["vocab"]
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
    inv = sorted(vocab, key=vocab.get)
    assert [vocab[s] for s in inv] == list(range(len(inv)))
    tokens = [s.encode() if s in specials else bytes(BYTE_DECODER[c] for c in s) for s in inv]
    flags = [int(s in specials) for s in inv]
    section = pack_tokenizer(tokens, [0.0] * len(tokens), flags,
                             [(vocab[a], vocab[b]) for a, b in merges], unicode_ranges())
    d = tmp_path_factory.mktemp("gpt2")
    out = {}
    for pretok in (0, 2):
        ref = tk_mod.Tokenizer(models.BPE(vocab, merges))
        ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=(pretok == 2))
        ref.add_special_tokens([AddedToken(s, special=True) for s in specials])
        out[pretok] = (write_model(d / f"gpt2_p{pretok}.bin", section, vocab=len(tokens), kind=2,
                                   pretok=pretok), ref)
    out["section"] = section
    out["n"] = len(tokens)
    return out


@pytest.mark.parametrize("pretok", [0, 2])
def test_small_gpt2(binary, small_gpt2, tmp_path, pretok):
    path, ref = small_gpt2[pretok]
    rnd = random.Random(pretok)
    texts = TRICKY + ["<|x|>y <|x|>z <|x|<|x|>yy", WIKI.read_text(encoding="utf-8")[:200000]]
    texts.append("".join(rnd.choice(["  ", " ", "\n", "the", " the", "a1", "42", "'s", "!!", "é", "<|x|>", "<|x|>y"])
                         for _ in range(5000)))
    for s in texts:
        data = s.encode("utf-8")
        ids = tokenize(binary, path, data, tmp_path)
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s)[:80]
        assert detokenize(binary, path, ids, tmp_path) == data, repr(s)[:80]


def test_small_gpt2_long_piece(binary, small_gpt2, tmp_path):
    """One 300 KB pre-tokenizer piece (a run of spaces, then of punctuation) must stay fast."""
    path, ref = small_gpt2[2]
    s = " " * 150000 + "x" + "-=" * 75000
    t0 = time.time()
    ids = tokenize(binary, path, s.encode(), tmp_path)
    assert time.time() - t0 < 20
    assert ids == ref.encode(s, add_special_tokens=False).ids


def corrupt_sections(section, n):
    """(name, bytes) pairs: truncations at many points and broken fields."""
    cuts = sorted({0, 3, 4, 7, 8, 11, 12, 19, 20, 21, len(section) // 3, len(section) // 2,
                   len(section) - 12 * 40, len(section) - 13, len(section) - 5, len(section) - 1})
    out = [(f"cut{c}", section[:c]) for c in cuts]
    after_vocab = 8
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", section, after_vocab + 8)
        after_vocab += 12 + ln
    (n_merges,) = struct.unpack_from("<i", section, after_vocab)
    ranges_at = after_vocab + 4 + 8 * n_merges

    def patch(off, fmt, *v):
        b = bytearray(section)
        struct.pack_into(fmt, b, off, *v)
        return bytes(b)

    out += [("n_vocab", patch(0, "<i", n + 1)), ("n_vocab_neg", patch(0, "<i", -1)),
            ("len_huge", patch(16, "<i", 0x7FFFFFFF)), ("len_neg", patch(16, "<i", -5)),
            ("len_past_end", patch(16, "<i", len(section))),
            ("n_merges_neg", patch(after_vocab, "<i", -1)),
            ("n_merges_huge", patch(after_vocab, "<i", 0x7FFFFFFF)),
            ("merge_id_high", patch(after_vocab + 4, "<i", n)), ("merge_id_neg", patch(after_vocab + 8, "<i", -7)),
            ("n_ranges_huge", patch(ranges_at, "<i", 0x10000000)), ("n_ranges_neg", patch(ranges_at, "<i", -2)),
            ("range_unsorted", patch(ranges_at + 4 + 12, "<II", 0, 0)),
            ("range_reversed", patch(ranges_at + 4, "<II", 50, 40)),
            ("range_past_unicode", patch(ranges_at + 4 + 4, "<I", 0x7FFFFFFF))]
    return out


def test_corrupt_sections_fail_cleanly(binary, small_gpt2, tmp_path):
    n = small_gpt2["n"]
    (tmp_path / "t.txt").write_bytes(b"hello world")
    for name, sec in corrupt_sections(small_gpt2["section"], n):
        path = write_model(tmp_path / "bad.bin", sec, vocab=n, kind=2, pretok=2)
        p = run_cmd([path, "-m", "tokenize", "-f", tmp_path / "t.txt"], binary=binary, check=False)
        try:
            clean_failure(p)
        except AssertionError as e:
            raise AssertionError(f"corruption {name}: {e}") from None


def test_mutated_sections_never_crash(binary, small_gpt2, tmp_path):
    """Random byte changes: the binary may accept or refuse the model, but never crash."""
    n, sec = small_gpt2["n"], small_gpt2["section"]
    rnd = random.Random(7)
    (tmp_path / "t.txt").write_bytes("héllo world 123 don't <|x|>y\n".encode())
    for k in range(40):
        b = bytearray(sec)
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(b)) if k % 2 else rnd.randrange(min(len(b), 4000))
            b[i] = rnd.choice([0, 0xFF, 0x7F, 0x80, rnd.randrange(256)])
        path = write_model(tmp_path / "mut.bin", bytes(b), vocab=n, kind=2, pretok=2)
        p = run_cmd([path, "-m", "tokenize", "-f", tmp_path / "t.txt"], binary=binary, check=False)
        assert p.returncode >= 0, f"mutation {k}: killed by signal {-p.returncode}"
        assert not sanitizer_error(p.stderr), p.stderr[-2000:]


# ----------------------------------------------------------------------------- SentencePiece kind

# A tiny llama2.c-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces whose
# scores make the greedy merge order visible.
SP_PIECES = [(" ", -10), ("a", -10), ("b", -10), ("c", -10), (" a", -1), ("ab", -2), ("bc", -0.5),
             (" ab", -3), ("é", -10), ("aa", -4)]
SP_SPECIAL = ["<x>", "<x>y"]


def sp_id(piece):
    return 259 + ([p for p, _ in SP_PIECES] + SP_SPECIAL).index(piece)


@pytest.fixture(scope="session")
def tiny_sp(tmp_path_factory):
    tokens = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    scores = [0.0] * len(tokens)
    flags = [1, 1, 1] + [0] * 256
    for p, s in SP_PIECES:
        tokens.append(p.encode()); scores.append(s); flags.append(0)
    for p in SP_SPECIAL:
        tokens.append(p.encode()); scores.append(0.0); flags.append(1)
    section = pack_tokenizer(tokens, scores, flags)
    return write_model(tmp_path_factory.mktemp("sp") / "sp.bin", section, vocab=len(tokens),
                       kind=1, pretok=0, bos=1, eos=2)


B = lambda byte: 3 + byte  # noqa: E731  (the <0xXX> token of a byte)

SP_CASES = [
    ("", []),
    ("abc", [sp_id(" a"), sp_id("bc")]),           # "bc" (-0.5) first, then " a" (-1)
    ("ab", [sp_id(" ab")]),                        # " a" (-1), then " a"+"b" = " ab"
    ("aaa", [sp_id(" a"), sp_id("aa")]),
    ("xaaa", [sp_id(" "), B(ord("x")), sp_id("aa"), sp_id("a")]),   # ties: the leftmost pair
    ("é", [sp_id(" "), sp_id("é")]),               # a 2-byte character in the vocabulary
    ("€", [sp_id(" "), B(0xE2), B(0x82), B(0xAC)]),  # not in it: byte fallback
    ("a\n", [sp_id(" a"), B(0x0A)]),
    ("a<x>yb", [sp_id(" a"), sp_id("<x>y"), sp_id("b")]),  # longest special; no dummy prefix after it
    ("<x>", [sp_id("<x>")]),
    ("<x>c<x", [sp_id("<x>"), sp_id("c"), B(ord("<")), B(ord("x"))]),
]


@pytest.mark.parametrize("text,ids", SP_CASES, ids=[repr(c[0]) for c in SP_CASES])
def test_sentencepiece_hand_checked(binary, tiny_sp, tmp_path, text, ids):
    assert tokenize(binary, tiny_sp, text.encode(), tmp_path) == ids


def test_sentencepiece_decode(binary, tiny_sp, tmp_path):
    # the dummy prefix space stays unless the previous token is bos; <0xXX> -> the raw byte
    assert detokenize(binary, tiny_sp, [sp_id(" a"), sp_id("bc")], tmp_path) == b" abc"
    assert detokenize(binary, tiny_sp, [1, sp_id(" a"), sp_id("bc")], tmp_path) == b"<s>abc"
    assert detokenize(binary, tiny_sp, [B(0xE2), B(0x82), B(0xAC), B(0), B(0x0A)], tmp_path) == "€\0\n".encode()
    assert detokenize(binary, tiny_sp, [sp_id("<x>y"), 0], tmp_path) == b"<x>y<unk>"


@pytest.fixture(scope="session")
def trained_sp(tmp_path_factory):
    """A 700-piece SentencePiece BPE (byte fallback, no normalization) and the same vocabulary
    written as llama2.c does: '▁' as ' ', byte pieces as "<0xXX>" text, scores kept."""
    spm = pytest.importorskip("sentencepiece")
    import io
    lines = [ln for ln in WIKI.read_text(encoding="utf-8").split("\n") if ln.strip()][:3000]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   vocab_size=700, byte_fallback=True, normalization_rule_name="identity",
                                   add_dummy_prefix=True, remove_extra_whitespaces=False,
                                   character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i).replace("\u2581", " ").encode() for i in range(n)]
    flags = [int(sp.is_control(i) or sp.is_unknown(i)) for i in range(n)]
    section = pack_tokenizer(tokens, [sp.get_score(i) for i in range(n)], flags)
    path = write_model(tmp_path_factory.mktemp("spm") / "spm.bin", section, vocab=n, kind=1, pretok=0,
                       bos=1, eos=2)
    return path, sp


def test_sentencepiece_matches_library(binary, trained_sp, tmp_path):
    path, sp = trained_sp
    wiki = WIKI.read_text(encoding="utf-8")
    texts = [s for s in TRICKY if "<" not in s] + [wiki[:100000], wiki[-50000:], "€→∞ " * 50]
    for s in texts:
        ids = tokenize(binary, path, s.encode(), tmp_path)
        assert ids == sp.encode(s), repr(s)[:80]
        assert detokenize(binary, path, ids, tmp_path) == (b" " + s.encode() if s else b""), repr(s)[:80]
