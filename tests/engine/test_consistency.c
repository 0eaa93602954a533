/* Prefill in one call, in two calls over a cached prefix, token-by-token decode, and the layer-step
 * API must agree (relative error <= 1e-5) - on every shared model and both RoPE layouts. */
#include "kvl_engine.h"
#include "kvl_test.h"

static void run(const char *model, const char *tokfile) {
    kvl_model *m = NULL;
    CHECK_OK(kvl_model_load(model, NULL, &m));
    if (!m) return;
    const kvl_model_config *c = kvl_model_get_config(m);
    size_t nb;
    int32_t *tok = kvl_test_read(tokfile, &nb);
    CHECK(tok != NULL);
    if (!tok) { kvl_model_free(m); return; }
    int32_t n = (int32_t)(nb / 4);
    if (n > 96) n = 96;
    size_t V = (size_t)c->vocab_size;
    int32_t *pos = malloc((size_t)n * 4);
    for (int32_t i = 0; i < n; i++) pos[i] = i;
    float *ref = malloc((size_t)n * V * 4), *got = malloc((size_t)n * V * 4);
    kvl_kv *kv = NULL;
    CHECK_OK(kvl_kv_create(m, n, &kv));
    CHECK_OK(kvl_forward(m, kv, n, tok, pos, NULL, n, pos, ref));

    /* two calls: prefix of p tokens, then the rest on top of the cached prefix */
    int32_t p = n / 3;
    uint8_t *comp = calloc((size_t)n, 1);
    kvl_kv_clear(kv);
    CHECK_OK(kvl_forward(m, kv, p, tok, pos, NULL, p, pos, got));
    for (int32_t i = p; i < n; i++) comp[i] = 1;
    CHECK_OK(kvl_forward(m, kv, n, tok, pos, comp, n - p, pos + p, got + (size_t)p * V));
    double e2 = kvl_rel_err(got, ref, (size_t)n * V);
    printf("%s: two calls rel err %.3e\n", model, e2);
    CHECK_MSG(e2 <= 1e-5, "two-call prefill differs: %.3e", e2);

    /* token-by-token decode */
    kvl_kv_clear(kv);
    for (int32_t i = 0; i < n; i++) {
        memset(comp, 0, (size_t)n);
        comp[i] = 1;
        CHECK_OK(kvl_forward(m, kv, i + 1, tok, pos, comp, 1, &pos[i], got + (size_t)i * V));
    }
    double e3 = kvl_rel_err(got, ref, (size_t)n * V);
    printf("%s: decode rel err %.3e\n", model, e3);
    CHECK_MSG(e3 <= 1e-5, "token-by-token decode differs: %.3e", e3);

    /* the layer-step API with explicit qkv/commit/attn_ffn steps equals kvl_forward */
    kvl_kv_clear(kv);
    kvl_fwd *f = NULL;
    CHECK_OK(kvl_fwd_begin(m, kv, n, tok, pos, &f));
    for (int32_t l = 0; l < c->n_layers && f; l++) {
        CHECK_OK(kvl_fwd_qkv(f, l, pos, n, NULL, NULL));
        CHECK_OK(kvl_fwd_commit(f, pos, n));
        CHECK_OK(kvl_fwd_attn_ffn(f, pos, n));
    }
    CHECK_OK(kvl_fwd_logits(f, pos, n, got));
    kvl_fwd_free(f);
    double e4 = kvl_rel_err(got, ref, (size_t)n * V);
    CHECK_MSG(e4 <= 1e-6, "layer-step API differs: %.3e", e4);

    /* kv read/write round trip: reading the cache out and writing it into a fresh kv then
     * decoding the last token gives the same logits */
    size_t per = kvl_model_kv_elems_per_layer(m, n - 1) * 2 * (size_t)c->n_layers;
    float *kvbuf = malloc(per * 4);
    CHECK_OK(kvl_kv_read(kv, 0, c->n_layers, 0, n - 1, kvbuf));
    kvl_kv *kv2 = NULL;
    CHECK_OK(kvl_kv_create(m, n, &kv2));
    CHECK_OK(kvl_kv_write(kv2, 0, c->n_layers, 0, n - 1, kvbuf));
    memset(comp, 0, (size_t)n);
    comp[n - 1] = 1;
    int32_t last = n - 1;
    CHECK_OK(kvl_forward(m, kv2, n, tok, pos, comp, 1, &last, got));
    double e5 = kvl_rel_err(got, ref + (size_t)(n - 1) * V, V);
    CHECK_MSG(e5 <= 1e-6, "decode over a copied cache differs: %.3e", e5);

    /* deviation of fresh vs cached K/V is ~0 when the cache is exact */
    CHECK_OK(kvl_fwd_begin(m, kv2, n - 1, tok, pos, &f));
    float *dev = malloc((size_t)n * 4);
    CHECK_OK(kvl_fwd_qkv(f, 0, pos, n - 1, NULL, NULL));
    CHECK_OK(kvl_fwd_deviation(f, KVL_DEV_KV, dev));
    float mx = 0;
    for (int32_t i = 0; i < n - 1; i++) mx = dev[i] > mx ? dev[i] : mx;
    CHECK_MSG(mx < 1e-8f, "deviation of an exact cache is %g", mx);
    kvl_fwd_free(f);

    free(dev); free(kvbuf);
    kvl_kv_free(kv2);
    kvl_kv_free(kv);
    free(comp); free(ref); free(got); free(pos); free(tok);
    kvl_model_free(m);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    run(argv[1], argv[2]);
    KVL_TEST_END();
}
