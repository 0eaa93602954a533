/* The seam between the HTTP layer and the cache machinery: keys, ingest of one chunk, building a
 * prompt's KV. This version runs on the engine alone: the store, the codec and CacheBlend are not
 * wired yet, so nothing is cached: every chunk is computed (reported as a miss) and only the
 * full-prefill mode exists. */
#include <openssl/evp.h>
#include <string.h>

#include "http_impl.h"

kvl_status kvl_svc_backend_open(kvl_http_server *s) {
    s->backend = NULL;
    return KVL_OK;
}

void kvl_svc_backend_close(kvl_http_server *s) { s->backend = NULL; }

const char *kvl_svc_backend_describe(kvl_http_server *s) {
    (void)s;
    return "chunk store NOT wired (caches are recomputed), modes: full";
}

json_t *kvl_svc_modes(kvl_http_server *s) {
    (void)s;
    return json_pack("[s]", "full");
}

static void le32(int32_t v, uint8_t b[4]) {
    uint32_t u = (uint32_t)v;
    b[0] = (uint8_t)u;
    b[1] = (uint8_t)(u >> 8);
    b[2] = (uint8_t)(u >> 16);
    b[3] = (uint8_t)(u >> 24);
}

/* root = SHA-256("kvloom-v1" | fingerprint | tenant) (BRIEF section 3) */
void kvl_svc_root(const kvl_http_server *s, const char *tenant, uint8_t root[32]) {
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    unsigned int n = 32;
    EVP_DigestInit_ex(c, EVP_sha256(), NULL);
    EVP_DigestUpdate(c, "kvloom-v1", 9);
    EVP_DigestUpdate(c, s->fingerprint, 32);
    EVP_DigestUpdate(c, tenant, strlen(tenant));
    EVP_DigestFinal_ex(c, root, &n);
    EVP_MD_CTX_free(c);
}

/* chunk key = SHA-256(root | "chunk" | LE token ids) */
void kvl_svc_chunk_key(const uint8_t root[32], const int32_t *tokens, int32_t n, char hex[65]) {
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    uint8_t h[32];
    unsigned int hn = 32;
    EVP_DigestInit_ex(c, EVP_sha256(), NULL);
    EVP_DigestUpdate(c, root, 32);
    EVP_DigestUpdate(c, "chunk", 5);
    for (int32_t i = 0; i < n; i++) {
        uint8_t b[4];
        le32(tokens[i], b);
        EVP_DigestUpdate(c, b, 4);
    }
    EVP_DigestFinal_ex(c, h, &hn);
    EVP_MD_CTX_free(c);
    for (int i = 0; i < 32; i++) {
        static const char d[] = "0123456789abcdef";
        hex[2 * i] = d[h[i] >> 4];
        hex[2 * i + 1] = d[h[i] & 15];
    }
    hex[64] = 0;
}

/* Prefill of BOS + tokens at positions 0..n; the chunk's K/V are slots 1..n. */
static kvl_status prefill_chunk(kvl_http_server *s, const int32_t *tokens, int32_t n, kvl_kv **kv_out) {
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    int32_t *t = malloc((size_t)(n + 1) * sizeof *t), *pos = malloc((size_t)(n + 1) * sizeof *pos);
    kvl_kv *kv = NULL;
    kvl_status st = t && pos ? KVL_OK : KVL_ERR_NOMEM;
    if (st == KVL_OK) {
        t[0] = mc->bos_id;
        memcpy(t + 1, tokens, (size_t)n * sizeof *t);
        for (int32_t i = 0; i <= n; i++) pos[i] = i;
        st = kvl_kv_create(s->model, n + 1, &kv);
    }
    if (st == KVL_OK) st = kvl_forward(s->model, kv, n + 1, t, pos, NULL, 0, NULL, NULL);
    free(t);
    free(pos);
    if (st != KVL_OK) {
        kvl_kv_free(kv);
        return st;
    }
    *kv_out = kv;
    return KVL_OK;
}

kvl_status kvl_svc_ingest(kvl_http_server *s, const char *tenant, const kvl_svc_seg *segs, int32_t n_segs,
                          int *stored, double deadline_ms, kvl_svc_timing *t) {
    (void)tenant;
    for (int32_t i = 0; i < n_segs; i++) {
        if (kvl_now_ms() > deadline_ms) return kvl_errorf(KVL_ERR_TIMEOUT, "ingest past its deadline");
        double t0 = kvl_now_ms();
        kvl_kv *kv = NULL;
        KVL_TRY(prefill_chunk(s, segs[i].tokens, segs[i].n, &kv));
        t->recompute_ms += kvl_now_ms() - t0;
        /* no store wired: the cache cannot be kept */
        kvl_kv_free(kv);
        stored[i] = 0;
    }
    return KVL_OK;
}

kvl_status kvl_svc_prefill(kvl_http_server *s, const char *tenant, const kvl_svc_seg *segs, int32_t n_segs,
                           const int32_t *query, int32_t n_query, const char *mode, double ratio,
                           int32_t extra, kvl_kv **kv_out, int32_t **prompt_out, int32_t *n_prompt,
                           float *logits, kvl_svc_stats *st, kvl_svc_timing *t) {
    (void)tenant;
    (void)ratio;
    *kv_out = NULL;
    *prompt_out = NULL;
    if (strcmp(mode, "full") != 0)
        return kvl_errorf(KVL_ERR_UNSUPPORTED, "mode '%s' needs CacheBlend, which this build does not wire yet; "
                                               "use mode 'full'", mode);
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    int64_t total = 1 + n_query;
    for (int32_t i = 0; i < n_segs; i++) total += segs[i].n;
    if (total + extra > mc->max_seq)
        return kvl_errorf(KVL_ERR_CONTEXT_FULL, "prompt of %lld tokens plus %d to generate exceeds the model's context of %d",
                          (long long)total, extra, mc->max_seq);
    int32_t n = (int32_t)total;
    int32_t *prompt = malloc((size_t)n * sizeof *prompt), *pos = malloc((size_t)n * sizeof *pos);
    if (!prompt || !pos) {
        free(prompt);
        free(pos);
        return KVL_ERR_NOMEM;
    }
    int32_t k = 0;
    prompt[k++] = mc->bos_id;
    for (int32_t i = 0; i < n_segs; i++) {
        memcpy(prompt + k, segs[i].tokens, (size_t)segs[i].n * sizeof *prompt);
        k += segs[i].n;
        st->chunks_missed++;
    }
    memcpy(prompt + k, query, (size_t)n_query * sizeof *prompt);
    for (int32_t i = 0; i < n; i++) pos[i] = i;
    double t0 = kvl_now_ms();
    kvl_kv *kv = NULL;
    kvl_status s2 = kvl_kv_create(s->model, n + extra, &kv);
    int32_t last = n - 1;
    if (s2 == KVL_OK) s2 = kvl_forward(s->model, kv, n, prompt, pos, NULL, 1, &last, logits);
    t->recompute_ms += kvl_now_ms() - t0;
    free(pos);
    if (s2 != KVL_OK) {
        kvl_kv_free(kv);
        free(prompt);
        return s2;
    }
    st->prompt_tokens = n;
    st->recomputed_tokens = n;
    *kv_out = kv;
    *prompt_out = prompt;
    *n_prompt = n;
    return KVL_OK;
}

kvl_status kvl_svc_chunk_tokens(kvl_http_server *s, const char *tenant, const char *key_hex, int32_t **tokens,
                                int32_t *n) {
    (void)s;
    (void)tenant;
    *tokens = NULL;
    *n = 0;
    return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %s (no chunk store is wired in this build)", key_hex);
}

/* ---------------------------------------------------------------- not wired without the store */

static kvl_status no_store(const char *what) {
    return kvl_errorf(KVL_ERR_UNSUPPORTED, "%s needs the chunk store, which this build does not wire yet", what);
}

kvl_status kvl_svc_chunk_meta(kvl_http_server *s, const char *tenant, const char *key_hex, json_t **out) {
    (void)s, (void)tenant;
    *out = NULL;
    return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %s (no chunk store is wired in this build)", key_hex);
}

kvl_status kvl_svc_chunk_kv(kvl_http_server *s, const char *tenant, const char *key_hex, int raw, char **body,
                            size_t *len) {
    (void)s, (void)tenant, (void)raw;
    *body = NULL;
    *len = 0;
    return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %s (no chunk store is wired in this build)", key_hex);
}

kvl_status kvl_svc_chunk_delete(kvl_http_server *s, const char *tenant, const char *key_hex) {
    (void)s, (void)tenant;
    return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %s (no chunk store is wired in this build)", key_hex);
}

kvl_status kvl_svc_encode_kv(kvl_http_server *s, const float *kv, int32_t n, uint8_t **out, size_t *len) {
    (void)s, (void)kv, (void)n;
    *out = NULL;
    *len = 0;
    return kvl_errorf(KVL_ERR_UNSUPPORTED, "format 'cachegen' needs the codec, which this build does not wire yet");
}

int kvl_svc_chunk_cached(kvl_http_server *s, const char *tenant, const char *key_hex) {
    (void)s, (void)tenant, (void)key_hex;
    return 0;
}

kvl_status kvl_svc_store_stats(kvl_http_server *s, json_t **out) {
    (void)s;
    *out = NULL;
    return no_store("store statistics");
}

kvl_status kvl_svc_store_gauges(kvl_http_server *s, int64_t *entries, int64_t *bytes, int64_t *capacity) {
    (void)s;
    *entries = *bytes = *capacity = -1;
    return no_store("store gauges");
}

kvl_status kvl_svc_audit(kvl_http_server *s, int check_data, json_t **out) {
    (void)s, (void)check_data;
    *out = NULL;
    return no_store("the audit");
}

kvl_status kvl_svc_evict(kvl_http_server *s, const kvl_svc_evict_req *q, json_t **out) {
    (void)s, (void)q;
    *out = NULL;
    return no_store("eviction");
}

kvl_status kvl_svc_tenant_usage(kvl_http_server *s, json_t **out) {
    (void)s;
    *out = NULL;
    return no_store("store usage");
}
