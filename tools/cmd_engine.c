/* kvloom logits / generate */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "kvl_tokenizer.h"

int kvl_cmd_logits(int argc, char **argv);
int kvl_cmd_generate(int argc, char **argv);

static const char *LOGITS_USAGE = "kvloom logits --model PATH --tokens IN.i32 --out OUT.f32";

int kvl_cmd_logits(int argc, char **argv) {
    const char *model = NULL, *tokens = NULL, *outp = NULL;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--model") == 0) model = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--tokens") == 0) tokens = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--out") == 0) outp = argv[++i];
        else return kvl_cli_usage("logits", LOGITS_USAGE, "unknown or incomplete argument '%s'", argv[i]);
    }
    if (!model || !tokens || !outp) return kvl_cli_usage("logits", LOGITS_USAGE, "--model, --tokens and --out are required");
    int32_t *ids = NULL, n = 0;
    kvl_status s = kvl_cli_read_i32(tokens, &ids, &n);
    if (s != KVL_OK) return kvl_cli_fail("logits", s);
    if (n == 0) {
        free(ids);
        return kvl_cli_usage("logits", LOGITS_USAGE, "%s holds no tokens", tokens);
    }
    kvl_model *m = NULL;
    if ((s = kvl_cli_load_model(model, &m)) != KVL_OK) {
        free(ids);
        return kvl_cli_fail("logits", s);
    }
    const kvl_model_config *c = kvl_model_get_config(m);
    if (n > c->max_seq) {
        kvl_errorf(KVL_ERR_POSITION_RANGE, "%d tokens exceed the model's context of %d", n, c->max_seq);
        s = KVL_ERR_POSITION_RANGE;
    }
    int32_t *pos = malloc((size_t)n * sizeof *pos), *li = malloc((size_t)n * sizeof *li);
    float *logits = malloc((size_t)n * (size_t)c->vocab_size * sizeof *logits);
    kvl_kv *kv = NULL;
    if (s == KVL_OK && (!pos || !li || !logits)) s = KVL_ERR_NOMEM;
    if (s == KVL_OK) s = kvl_kv_create(m, n, &kv);
    if (s == KVL_OK) {
        for (int32_t i = 0; i < n; i++) pos[i] = li[i] = i;
        s = kvl_forward(m, kv, n, ids, pos, NULL, n, li, logits);
    }
    if (s == KVL_OK) s = kvl_cli_write_file(outp, logits, (size_t)n * (size_t)c->vocab_size * sizeof *logits);
    int rc = s == KVL_OK ? 0 : kvl_cli_fail("logits", s);
    kvl_kv_free(kv);
    kvl_model_free(m);
    free(ids); free(pos); free(li); free(logits);
    return rc;
}

static const char *GEN_USAGE = "kvloom generate --model PATH --prompt TEXT -n N [--temp T --seed S]";

typedef struct {
    const kvl_tokenizer *tok;
    int32_t prev;
} gen_ctx;

static int print_tok(int32_t t, void *user) {
    gen_ctx *g = user;
    char b[8];
    fputs(kvl_tokenizer_piece(g->tok, g->prev, t, b), stdout);
    fflush(stdout);
    g->prev = t;
    return 0;
}

int kvl_cmd_generate(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL;
    long n = -1, seed = 0;
    double temp = 0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--model") == 0) model = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--prompt") == 0) prompt = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "-n") == 0) {
            if (kvl_cli_int(argv[++i], 0, 1 << 20, &n)) return kvl_cli_usage("generate", GEN_USAGE, "-n needs a count >= 0, got '%s'", argv[i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--temp") == 0) {
            if (kvl_cli_float(argv[++i], 0, 100, &temp)) return kvl_cli_usage("generate", GEN_USAGE, "--temp needs a number in [0, 100], got '%s'", argv[i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--seed") == 0) {
            if (kvl_cli_int(argv[++i], 0, __LONG_MAX__, &seed)) return kvl_cli_usage("generate", GEN_USAGE, "--seed needs a non-negative integer, got '%s'", argv[i]);
        } else return kvl_cli_usage("generate", GEN_USAGE, "unknown or incomplete argument '%s'", argv[i]);
    }
    if (!model || !prompt || n < 0) return kvl_cli_usage("generate", GEN_USAGE, "--model, --prompt and -n are required");
    kvl_model *m = NULL;
    kvl_tokenizer *tok = NULL;
    char tpath[4096];
    kvl_status s = kvl_cli_load_model(model, &m);
    if (s == KVL_OK) s = kvl_tokenizer_find(model, tpath, sizeof tpath);
    if (s == KVL_OK) s = kvl_tokenizer_load(tpath, kvl_model_get_config(m)->vocab_size, &tok);
    int32_t *ids = NULL, np = 0;
    if (s == KVL_OK) {
        size_t cap = strlen(prompt) + 3;
        ids = malloc(cap * sizeof *ids);
        s = ids ? kvl_tokenizer_encode(tok, prompt, 1, ids, (int32_t)cap, &np) : KVL_ERR_NOMEM;
    }
    if (s == KVL_OK) {
        gen_ctx g = {tok, 1};
        for (int32_t i = 1; i < np; i++) print_tok(ids[i], &g); /* echo the prompt as llama2.c does */
        s = kvl_generate(m, ids, np, (int32_t)n, (float)temp, (uint64_t)seed, print_tok, &g, NULL, NULL);
        printf("\n");
    }
    int rc = s == KVL_OK ? 0 : kvl_cli_fail("generate", s);
    free(ids);
    kvl_tokenizer_free(tok);
    kvl_model_free(m);
    return rc;
}
