/* Greedy generation of stories260K from "Once upon a time" (200 tokens) reproduces llama2.c's
 * reference output, from both the llama2.c checkpoint and the HF directory; seeded sampling is
 * reproducible. usage: test_generate MODEL.bin HF_DIR TOKENIZER.bin */
#include "kvl_engine.h"
#include "kvl_test.h"
#include "kvl_tokenizer.h"

/* llama2.c: ./run stories260K.bin -z tok512.bin -t 0 -n 200 -i "Once upon a time" */
static const char *REF =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One "
    "day, she saw a big, red ball. She wanted to play with it, but it was too high.\n";

static int32_t last_ng;

static void gen(const char *model, const kvl_tokenizer *t, float temp, uint64_t seed, char *out, size_t cap) {
    kvl_model *m = NULL;
    CHECK_OK(kvl_model_load(model, NULL, &m));
    if (!m) { out[0] = 0; return; }
    int32_t ids[64], n = 0, gen_ids[256], ng = 0;
    CHECK_OK(kvl_tokenizer_encode(t, "Once upon a time", 1, ids, 64, &n));
    CHECK_OK(kvl_generate(m, ids, n, 200 - n, temp, seed, NULL, NULL, gen_ids, &ng));
    last_ng = n + ng;
    size_t w = kvl_tokenizer_decode(t, ids + 1, n - 1, 1, out, cap);
    kvl_tokenizer_decode(t, gen_ids, ng, ids[n - 1], out + w, cap - w);
    kvl_model_free(m);
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    kvl_tokenizer *t = NULL;
    CHECK_OK(kvl_tokenizer_load(argv[3], 512, &t));
    if (!t) KVL_TEST_END();
    char a[8192], b[8192], c[8192], d[8192];
    gen(argv[1], t, 0, 0, a, sizeof a);
    CHECK_MSG(last_ng == 200, "%d tokens, want 200 (prompt included, as llama2.c counts)", last_ng);
    gen(argv[2], t, 0, 0, b, sizeof b);
    printf("%s\n", a);
    CHECK_MSG(strncmp(a, REF, strlen(REF)) == 0, "llama2.c checkpoint output differs from the reference");
    CHECK_MSG(strcmp(a, b) == 0, "HF directory and llama2.c checkpoint generate different text");
    gen(argv[1], t, 1.0f, 42, c, sizeof c);
    gen(argv[1], t, 1.0f, 42, d, sizeof d);
    CHECK(strcmp(c, d) == 0);
    gen(argv[1], t, 1.0f, 43, d, sizeof d);
    CHECK(strcmp(c, d) != 0);
    kvl_tokenizer_free(t);
    KVL_TEST_END();
}
