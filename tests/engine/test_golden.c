/* Golden test: logits of every ../shared/golden/<model>/seqNN against Hugging Face (float64).
 * usage: test_golden MODEL_PATH GOLDEN_DIR [max_rel_err]
 * Passes when ||logits - golden|| / ||golden|| <= 1e-4 and the argmax agrees at every position. */
#include "kvl_engine.h"
#include "kvl_test.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL GOLDEN_DIR [tol]\n", argv[0]);
        return 2;
    }
    double tol = argc > 3 ? atof(argv[3]) : 1e-4;
    kvl_model *m = NULL;
    kvl_status s = kvl_model_load(argv[1], NULL, &m);
    if (s != KVL_OK) {
        fprintf(stderr, "load %s: %s: %s\n", argv[1], kvl_status_str(s), kvl_last_error());
        return 1;
    }
    const kvl_model_config *c = kvl_model_get_config(m);
    int seen = 0;
    for (int q = 0; q < 100; q++) {
        char tp[4096], lp[4096];
        snprintf(tp, sizeof tp, "%s/seq%02d.tokens.i32", argv[2], q);
        snprintf(lp, sizeof lp, "%s/seq%02d.logits.f32", argv[2], q);
        size_t nt, nl;
        int32_t *tok = kvl_test_read(tp, &nt);
        if (!tok) break;
        float *gold = kvl_test_read(lp, &nl);
        int32_t n = (int32_t)(nt / 4);
        CHECK_MSG(gold && nl == (size_t)n * (size_t)c->vocab_size * 4, "%s: golden size mismatch", lp);
        if (!gold || nl != (size_t)n * (size_t)c->vocab_size * 4) { free(tok); free(gold); continue; }
        int32_t *pos = malloc((size_t)n * 4);
        float *lg = malloc(nl);
        for (int32_t i = 0; i < n; i++) pos[i] = i;
        kvl_kv *kv = NULL;
        CHECK_OK(kvl_kv_create(m, n, &kv));
        CHECK_OK(kvl_forward(m, kv, n, tok, pos, NULL, n, pos, lg));
        double rel = kvl_rel_err(lg, gold, (size_t)n * (size_t)c->vocab_size);
        int agree = 0;
        for (int32_t i = 0; i < n; i++)
            agree += kvl_argmax(lg + (size_t)i * (size_t)c->vocab_size, (size_t)c->vocab_size) ==
                     kvl_argmax(gold + (size_t)i * (size_t)c->vocab_size, (size_t)c->vocab_size);
        printf("seq%02d: %d tokens, rel err %.3e, argmax %d/%d\n", q, n, rel, agree, n);
        CHECK_MSG(rel <= tol, "seq%02d rel err %.3e > %.1e", q, rel, tol);
        CHECK_MSG(agree == n, "seq%02d argmax agrees at %d of %d positions", q, agree, n);
        kvl_kv_free(kv);
        free(tok); free(gold); free(pos); free(lg);
        seen++;
    }
    CHECK_MSG(seen > 0, "no golden sequences in %s", argv[2]);
    kvl_model_free(m);
    KVL_TEST_END();
}
