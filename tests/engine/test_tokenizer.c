/* Tokenizer: encode/decode round trips (ASCII, punctuation, UTF-8 through byte fallback), BOS, and
 * known encodings. usage: test_tokenizer TOKENIZER.bin */
#include "kvl_test.h"
#include "kvl_tokenizer.h"

static void roundtrip(const kvl_tokenizer *t, const char *text) {
    int32_t ids[1024], n = 0;
    CHECK_OK(kvl_tokenizer_encode(t, text, 1, ids, 1024, &n));
    CHECK(n >= 1 && ids[0] == 1);
    char out[4096];
    kvl_tokenizer_decode(t, ids + 1, n - 1, ids[0], out, sizeof out);
    CHECK_MSG(strcmp(out, text) == 0, "'%s' came back as '%s'", text, out);
    /* encoding is deterministic and BPE-minimal enough to compress ASCII text */
    int32_t ids2[1024], n2 = 0;
    CHECK_OK(kvl_tokenizer_encode(t, text, 1, ids2, 1024, &n2));
    CHECK(n2 == n && memcmp(ids, ids2, (size_t)n * 4) == 0);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    kvl_tokenizer *t = NULL;
    CHECK_OK(kvl_tokenizer_load(argv[1], 512, &t));
    if (!t) KVL_TEST_END();
    roundtrip(t, "Once upon a time");
    roundtrip(t, "Once upon a time, there was a little girl named Lily. She loved to play outside.");
    roundtrip(t, "\"Hello!\" said Tom; 3 + 4 = 7? (yes)\nnew line\ttab");
    roundtrip(t, "caf\xc3\xa9 \xe2\x98\x83 snowman \xf0\x9f\x98\x80"); /* byte fallback for unknown codepoints */
    roundtrip(t, "x");
    /* llama2.c encodes "Once upon a time" with BOS into these ids (checked against run.c) */
    int32_t ids[64], n = 0;
    CHECK_OK(kvl_tokenizer_encode(t, "Once upon a time", 1, ids, 64, &n));
    int32_t want[] = {1, 403, 407, 261, 378};
    CHECK_MSG(n == 5 && memcmp(ids, want, sizeof want) == 0, "got %d ids: %d %d %d %d %d", n, ids[0], ids[1], ids[2], ids[3], ids[4]);
    /* empty text: no dummy prefix */
    CHECK_OK(kvl_tokenizer_encode(t, "", 1, ids, 64, &n));
    CHECK(n == 1 && ids[0] == 1);
    CHECK_OK(kvl_tokenizer_encode(t, "", 0, ids, 64, &n));
    CHECK(n == 0);
    /* not enough room */
    CHECK_ST(kvl_tokenizer_encode(t, "Once upon a time there was", 1, ids, 3, &n), KVL_ERR_LIMIT);
    kvl_tokenizer_free(t);
    KVL_TEST_END();
}
