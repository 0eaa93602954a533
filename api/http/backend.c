/* The seam between the HTTP layer and the cache machinery: the chunk store (kvl_store), the codec
 * (kvl_codec) and CacheBlend (kvl_blend). The engine never sees the store; this file is where a
 * request's chunks are looked up, read, decoded, blended, and where computed caches are written back.
 *
 * Conventions (docs/openapi.yaml, docs/architecture.md):
 *   - a chunk cache is prefilled behind BOS (ctx = [BOS]) and stored under its chunk key with the
 *     default lossy codec level; a prompt is BOS + chunks + query, so the first chunk is an exact
 *     prefix in every mode but full;
 *   - prefix mode keeps caches computed in context under prefix-chain keys (block 0 = BOS + the first
 *     chunk, then one block per chunk), stored losslessly so that a prefix hit is exact.
 */
#include <string.h>
#include <time.h>

#include "http_impl.h"
#include "kvl_blend.h"
#include "kvl_codec.h"
#include "kvl_gpu_load.h"
#include "kvl_store.h"
#include "kvl_store_admin.h"
#ifdef KVL_HAVE_CUDA
#include "kvl_codec_gpu.h"
#include "kvl_cuda_backend.h"
#endif

/* codec_id written into store metadata for values encoded by kvl_codec (KVLC bitstream) */
#define KVL_SVC_CODEC_KVLC 1

typedef struct svc_backend {
    kvl_store *store;
    char describe[512];
    /* the load controller (cfg.load_controller): per chunk-cache hit, load it or recompute it from
     * its tokens, on costs the daemon measures on its own reads, decodes and forward passes (or
     * pinned by --load-costs); the estimates are shared by the workers */
    int ctl;
    pthread_mutex_t emu;
    kvl_load_est est;
    size_t kv_elem_bytes; /* bytes of one element of the engine's KV: what a chunk decodes to */
#ifdef KVL_HAVE_CUDA
    /* a model on the GPU: chunk caches stay encoded until the GPU decoder puts them into the
     * request's kv (kvl_gpu_blend_load); one request at a time uses the decoder */
    kvl_codec_gpu *gdec;
    pthread_mutex_t gmu;
#endif
} svc_backend;

#ifdef KVL_HAVE_CUDA
static kvl_codec_gpu *gpu_dec_of(const kvl_http_server *s) { return ((svc_backend *)s->backend)->gdec; }
#else
static void *gpu_dec_of(const kvl_http_server *s) {
    (void)s;
    return NULL;
}
#endif

static kvl_store *store_of(const kvl_http_server *s) { return ((svc_backend *)s->backend)->store; }

/* One cost sample (kvl_load_est_add) from a worker. */
static void est_add(kvl_http_server *s, int which, double amount, double ms) {
    svc_backend *b = s->backend;
    pthread_mutex_lock(&b->emu);
    kvl_load_est_add(&b->est, which, amount, ms);
    pthread_mutex_unlock(&b->emu);
}

/* A copy of the estimates for one request's decisions; returns whether the controller is on. */
static int est_get(kvl_http_server *s, kvl_load_est *out) {
    svc_backend *b = s->backend;
    pthread_mutex_lock(&b->emu);
    *out = b->est;
    pthread_mutex_unlock(&b->emu);
    return b->ctl;
}

/* Bytes a chunk of n tokens decodes to in the engine's KV (every layer, K and V). */
static double kv_bytes(const kvl_http_server *s, int32_t n) {
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    return (double)mc->n_layers * 2.0 * (double)kvl_model_kv_elems_per_layer(s->model, n) *
           (double)((svc_backend *)s->backend)->kv_elem_bytes;
}

int kvl_svc_load_costs(kvl_http_server *s, double *read_gbps, double *decode_gbps, double *prefill_tok_s) {
    kvl_load_est e;
    int on = est_get(s, &e);
    *read_gbps = e.costs.read_gbps;
    *decode_gbps = e.costs.decode_gbps;
    *prefill_tok_s = e.costs.prefill_tok_s;
    return on;
}

kvl_status kvl_svc_backend_open(kvl_http_server *s) {
    svc_backend *b = calloc(1, sizeof *b);
    if (!b) return KVL_ERR_NOMEM;
    kvl_store_options o;
    kvl_store_options_default(&o);
    if (s->cfg.store_capacity_bytes) o.capacity_bytes = s->cfg.store_capacity_bytes;
    if (s->cfg.store_segment_bytes) o.segment_bytes = s->cfg.store_segment_bytes;
    b->ctl = s->cfg.load_controller != 0;
    b->kv_elem_bytes = sizeof(float);
    kvl_load_est_init(&b->est, 0);
    kvl_status st = s->cfg.load_costs ? kvl_load_costs_parse(s->cfg.load_costs, &b->est) : KVL_OK;
    if (st == KVL_OK) st = kvl_store_open(s->store_dir, &o, &b->store);
    if (st != KVL_OK) {
        free(b);
        return st;
    }
    pthread_mutex_init(&b->emu, NULL);
#ifdef KVL_HAVE_CUDA
    pthread_mutex_init(&b->gmu, NULL);
    if (strcmp(kvl_model_backend_name(s->model), "cuda") == 0) {
        /* the KV dtype of this model's kv (bf16 or f32, the engine's choice) */
        kvl_kv *probe = NULL;
        kvl_cuda_kv_view v;
        st = kvl_codec_gpu_create(NULL, &b->gdec);
        if (st == KVL_OK) st = kvl_kv_create(s->model, 1, &probe);
        if (st == KVL_OK) st = kvl_cuda_kv_view_get(probe, &v);
        if (st == KVL_OK) b->kv_elem_bytes = kvl_cuda_kv_elem_bytes(&v);
        kvl_kv_free(probe);
        if (st != KVL_OK) {
            kvl_codec_gpu_free(b->gdec);
            kvl_store_close(b->store);
            pthread_mutex_destroy(&b->gmu);
            pthread_mutex_destroy(&b->emu);
            free(b);
            return st;
        }
    }
#endif
    kvl_store_stats ss;
    char ctl[160];
    if (!b->ctl) snprintf(ctl, sizeof ctl, "load controller off");
    else if (!s->cfg.load_costs) snprintf(ctl, sizeof ctl, "load controller on (costs measured)");
    else snprintf(ctl, sizeof ctl, "load controller on (pinned %.100s)", s->cfg.load_costs);
    if (kvl_store_get_stats(b->store, &ss) == KVL_OK)
        snprintf(b->describe, sizeof b->describe,
                 "chunk store %llu entries / %llu of %llu bytes (%s), codec level %d, modes blend/prefix/naive/full, %s",
                 (unsigned long long)ss.entries, (unsigned long long)ss.used_bytes,
                 (unsigned long long)ss.capacity_bytes, ss.io_backend, KVL_CODEC_LEVEL_DEFAULT, ctl);
    s->backend = b;
    return KVL_OK;
}

void kvl_svc_backend_close(kvl_http_server *s) {
    svc_backend *b = s->backend;
    if (!b) return;
    kvl_store_close(b->store);
#ifdef KVL_HAVE_CUDA
    kvl_codec_gpu_free(b->gdec);
    pthread_mutex_destroy(&b->gmu);
#endif
    pthread_mutex_destroy(&b->emu);
    free(b);
    s->backend = NULL;
}

const char *kvl_svc_backend_describe(kvl_http_server *s) { return ((svc_backend *)s->backend)->describe; }

json_t *kvl_svc_modes(kvl_http_server *s) {
    (void)s;
    return json_pack("[s,s,s,s]", "blend", "prefix", "naive", "full");
}

void kvl_svc_root(const kvl_http_server *s, const char *tenant, uint8_t root[32]) {
    kvl_store_key k;
    kvl_store_root_key(s->fingerprint, tenant, &k);
    memcpy(root, k.b, 32);
}

void kvl_svc_chunk_key(const uint8_t root[32], const int32_t *tokens, int32_t n, char hex[65]) {
    kvl_store_key r, k;
    memcpy(r.b, root, 32);
    kvl_store_chunk_key(&r, tokens, (size_t)n, &k);
    kvl_store_key_hex(&k, hex);
}

/* ---------------------------------------------------------------- encode / decode */

static kvl_status encode(kvl_http_server *s, const float *kv, int32_t n, int32_t level, uint8_t **out, size_t *len) {
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    kvl_codec_shape sh = {mc->n_layers, n, mc->n_kv_heads, mc->head_dim};
    kvl_codec_opts o = kvl_codec_opts_default();
    o.level = level;
    return kvl_codec_encode(&sh, KVL_CODEC_F32, kv, &o, out, len);
}

/* Decodes a stored value into float32 K/V [layers][k|v][n][kv_heads][head_dim] (*kv malloc'ed),
 * after checking that it is a KVLC chunk of this model's shape for the entry's tokens. */
static kvl_status decode_floats(kvl_http_server *s, const kvl_store_value *v, float **kv_out) {
    *kv_out = NULL;
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    const kvl_store_meta *meta = kvl_store_value_meta(v);
    if (meta->codec_id != KVL_SVC_CODEC_KVLC)
        return kvl_errorf(KVL_ERR_FORMAT, "store entry with codec id %u, expected %d", meta->codec_id, KVL_SVC_CODEC_KVLC);
    kvl_codec_info info;
    KVL_TRY(kvl_codec_info_get(kvl_store_value_data(v), kvl_store_value_size(v), &info));
    int32_t n = (int32_t)kvl_store_value_n_tokens(v);
    if (info.shape.n_layers != mc->n_layers || info.shape.n_kv_heads != mc->n_kv_heads ||
        info.shape.head_dim != mc->head_dim || info.shape.n_tokens != n)
        return kvl_errorf(KVL_ERR_SHAPE, "stored cache shape does not match the model / its tokens");
    size_t floats = (size_t)mc->n_layers * 2 * (size_t)n * (size_t)mc->n_kv_heads * (size_t)mc->head_dim;
    float *kv = malloc(floats * sizeof *kv);
    if (!kv) return KVL_ERR_NOMEM;
    kvl_status st = kvl_codec_decode(kvl_store_value_data(v), kvl_store_value_size(v), NULL, 0, 0, KVL_CODEC_F32, kv,
                                     floats * sizeof *kv, 1);
    if (st != KVL_OK) {
        free(kv);
        return st;
    }
    *kv_out = kv;
    return KVL_OK;
}

/* K/V of tokens prefilled behind BOS at positions 1..n (the chunk-cache convention), float32 in the
 * codec layout; *kv_out malloc'ed. */
static kvl_status prefill_chunk(kvl_http_server *s, const int32_t *tokens, int32_t n, float **kv_out) {
    *kv_out = NULL;
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    int32_t *t = malloc((size_t)(n + 1) * sizeof *t), *pos = malloc((size_t)(n + 1) * sizeof *pos);
    float *f = malloc((size_t)mc->n_layers * 2 * kvl_model_kv_elems_per_layer(s->model, n) * sizeof *f);
    kvl_kv *kv = NULL;
    kvl_status st = t && pos && f ? KVL_OK : KVL_ERR_NOMEM;
    if (st == KVL_OK) {
        t[0] = mc->bos_id;
        memcpy(t + 1, tokens, (size_t)n * sizeof *t);
        for (int32_t i = 0; i <= n; i++) pos[i] = i;
        st = kvl_kv_create(s->model, n + 1, &kv);
    }
    if (st == KVL_OK) st = kvl_forward(s->model, kv, n + 1, t, pos, NULL, 0, NULL, NULL);
    if (st == KVL_OK) st = kvl_kv_read(kv, 0, mc->n_layers, 1, n, f);
    kvl_kv_free(kv);
    free(t);
    free(pos);
    if (st != KVL_OK) {
        free(f);
        return st;
    }
    *kv_out = f;
    return KVL_OK;
}

static void fill_meta(kvl_http_server *s, const char *tenant, int mode, int level, int32_t n, kvl_store_meta *m) {
    memset(m, 0, sizeof *m);
    memcpy(m->fingerprint, s->fingerprint, 32);
    snprintf(m->tenant, sizeof m->tenant, "%s", tenant);
    m->codec_id = KVL_SVC_CODEC_KVLC;
    m->codec_level = (uint16_t)level;
    m->mode = (uint8_t)mode;
    m->recompute_cost = (uint64_t)n;
}

/* ---------------------------------------------------------------- ingest */

/* Puts are grouped so that one fdatasync and one index commit cover several chunks. */
#define KVL_INGEST_BATCH 16

kvl_status kvl_svc_ingest(kvl_http_server *s, const char *tenant, const kvl_svc_seg *segs, int32_t n_segs,
                          int *stored, double deadline_ms, kvl_svc_timing *t) {
    kvl_store_put_item items[KVL_INGEST_BATCH];
    kvl_store_meta metas[KVL_INGEST_BATCH];
    uint8_t *bufs[KVL_INGEST_BATCH];
    int32_t idx[KVL_INGEST_BATCH];
    int nb = 0;
    kvl_status st = KVL_OK;
    for (int32_t i = 0; i <= n_segs && st == KVL_OK; i++) {
        if (nb && (i == n_segs || nb == KVL_INGEST_BATCH)) {
            double t0 = kvl_now_ms();
            st = kvl_store_put_batch(store_of(s), (size_t)nb, items);
            t->write_ms += kvl_now_ms() - t0;
            for (int b = 0; b < nb; b++) {
                if (st == KVL_OK) stored[idx[b]] = 1;
                free(bufs[b]);
            }
            nb = 0;
        }
        if (i == n_segs || st != KVL_OK) break;
        stored[i] = 0;
        if (kvl_now_ms() > deadline_ms) {
            st = kvl_errorf(KVL_ERR_TIMEOUT, "ingest past its deadline after %d of %d chunks", i, n_segs);
            break;
        }
        kvl_store_key key;
        if ((st = kvl_store_key_parse(segs[i].key, &key)) != KVL_OK) break;
        double t0 = kvl_now_ms();
        kvl_store_meta have;
        int dup = kvl_store_stat(store_of(s), &key, &have) == KVL_OK && !memcmp(have.fingerprint, s->fingerprint, 32) &&
                  !strcmp(have.tenant, tenant);
        for (int b = 0; b < nb && !dup; b++) dup = !memcmp(items[b].key.b, key.b, sizeof key.b);
        t->lookup_ms += kvl_now_ms() - t0;
        if (dup) { /* the same tokens for the same tenant and model: already cached */
            stored[i] = 1;
            continue;
        }
        float *kvf = NULL;
        t0 = kvl_now_ms();
        if ((st = prefill_chunk(s, segs[i].tokens, segs[i].n, &kvf)) != KVL_OK) break;
        double pms = kvl_now_ms() - t0;
        t->recompute_ms += pms;
        est_add(s, KVL_LOAD_PREFILL, segs[i].n + 1, pms); /* BOS + the chunk */
        size_t len = 0;
        t0 = kvl_now_ms();
        st = encode(s, kvf, segs[i].n, KVL_CODEC_LEVEL_DEFAULT, &bufs[nb], &len);
        t->encode_ms += kvl_now_ms() - t0;
        free(kvf);
        if (st != KVL_OK) break;
        fill_meta(s, tenant, KVL_STORE_MODE_CHUNK, KVL_CODEC_LEVEL_DEFAULT, segs[i].n, &metas[nb]);
        items[nb] = (kvl_store_put_item){key, &metas[nb], segs[i].tokens, (size_t)segs[i].n, bufs[nb], len};
        idx[nb] = i;
        nb++;
    }
    for (int b = 0; b < nb; b++) free(bufs[b]); /* left over after an error */
    return st;
}

/* ---------------------------------------------------------------- chunk lookups by key */

/* Reads key as an entry of tenant: KVL_ERR_KEY_NOT_FOUND for absent keys, other tenants' keys and
 * other models' entries alike, so a key says nothing about anyone else's data. */
static kvl_status get_own(kvl_http_server *s, const char *tenant, const char *key_hex, kvl_store_value **out) {
    *out = NULL;
    kvl_store_key key;
    if (kvl_store_key_parse(key_hex, &key) != KVL_OK) return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %.64s", key_hex);
    kvl_store_meta m;
    if (kvl_store_stat(store_of(s), &key, &m) != KVL_OK || strcmp(m.tenant, tenant) != 0 ||
        memcmp(m.fingerprint, s->fingerprint, 32) != 0)
        return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %s", key_hex);
    kvl_status st = kvl_store_get(store_of(s), &key, s->fingerprint, out);
    if (st == KVL_ERR_KEY_NOT_FOUND) return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %s", key_hex);
    return st;
}

kvl_status kvl_svc_chunk_tokens(kvl_http_server *s, const char *tenant, const char *key_hex, int32_t **tokens,
                                int32_t *n) {
    *tokens = NULL;
    *n = 0;
    kvl_store_value *v = NULL;
    KVL_TRY(get_own(s, tenant, key_hex, &v));
    size_t k = kvl_store_value_n_tokens(v);
    int32_t *t = malloc((k ? k : 1) * sizeof *t);
    if (!t) {
        kvl_store_value_free(v);
        return KVL_ERR_NOMEM;
    }
    memcpy(t, kvl_store_value_tokens(v), k * sizeof *t);
    kvl_store_value_free(v);
    *tokens = t;
    *n = (int32_t)k;
    return KVL_OK;
}

kvl_status kvl_svc_chunk_meta(kvl_http_server *s, const char *tenant, const char *key_hex, json_t **out) {
    *out = NULL;
    kvl_store_value *v = NULL;
    KVL_TRY(get_own(s, tenant, key_hex, &v));
    const kvl_store_meta *m = kvl_store_value_meta(v);
    json_t *ids = json_array();
    const int32_t *t = kvl_store_value_tokens(v);
    for (size_t i = 0; i < kvl_store_value_n_tokens(v); i++) json_array_append_new(ids, json_integer(t[i]));
    *out = json_pack("{s:s,s:i,s:o,s:b,s:I,s:f,s:f,s:I,s:s,s:i}", "key", key_hex, "tokens",
                     (int)kvl_store_value_n_tokens(v), "token_ids", ids, "cached", 1, "bytes",
                     (json_int_t)m->value_bytes, "created_unix", (double)m->created_ns / 1e9, "last_access_unix",
                     (double)m->last_access_ns / 1e9, "hits", (json_int_t)m->hits, "kind",
                     m->mode == KVL_STORE_MODE_PREFIX ? "prefix" : "chunk", "codec_level", (int)m->codec_level);
    kvl_store_value_free(v);
    return *out ? KVL_OK : KVL_ERR_NOMEM;
}

kvl_status kvl_svc_chunk_kv(kvl_http_server *s, const char *tenant, const char *key_hex, int raw, char **body,
                            size_t *len) {
    *body = NULL;
    *len = 0;
    kvl_store_value *v = NULL;
    KVL_TRY(get_own(s, tenant, key_hex, &v));
    kvl_status st = KVL_OK;
    if (!raw) {
        *len = kvl_store_value_size(v);
        *body = malloc(*len ? *len : 1);
        if (!*body) st = KVL_ERR_NOMEM;
        else memcpy(*body, kvl_store_value_data(v), *len);
    } else {
        float *kvf = NULL;
        st = decode_floats(s, v, &kvf);
        if (st == KVL_OK) {
            const kvl_model_config *mc = kvl_model_get_config(s->model);
            int32_t n = (int32_t)kvl_store_value_n_tokens(v);
            const int32_t *tk = kvl_store_value_tokens(v);
            json_t *ids = json_array();
            for (int32_t i = 0; i < n; i++) json_array_append_new(ids, json_integer(tk[i]));
            json_t *h = json_pack("{s:s,s:s,s:s,s:[i,i,i,i,i],s:o,s:s}", "format", "raw", "dtype", "f32", "layout",
                                  "[layer][k|v][token][kv_head][head_dim]", "shape", mc->n_layers, 2, n,
                                  mc->n_kv_heads, mc->head_dim, "tokens", ids, "model", s->fingerprint_hex);
            char *hs = json_dumps(h, JSON_COMPACT);
            json_decref(h);
            size_t hl = hs ? strlen(hs) : 0,
                   kb = (size_t)mc->n_layers * 2 * kvl_model_kv_elems_per_layer(s->model, n) * sizeof(float);
            *body = hs ? malloc(4 + hl + kb) : NULL;
            if (!*body) st = KVL_ERR_NOMEM;
            else {
                for (int i = 0; i < 4; i++) (*body)[i] = (char)((hl >> (8 * i)) & 0xff);
                memcpy(*body + 4, hs, hl);
                memcpy(*body + 4 + hl, kvf, kb);
                *len = 4 + hl + kb;
            }
            free(hs);
        }
        free(kvf);
    }
    kvl_store_value_free(v);
    return st;
}

kvl_status kvl_svc_chunk_delete(kvl_http_server *s, const char *tenant, const char *key_hex) {
    kvl_store_key key;
    kvl_store_meta m;
    if (kvl_store_key_parse(key_hex, &key) != KVL_OK || kvl_store_stat(store_of(s), &key, &m) != KVL_OK ||
        strcmp(m.tenant, tenant) != 0)
        return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %s", key_hex);
    kvl_status st = kvl_store_delete(store_of(s), &key);
    if (st == KVL_ERR_KEY_NOT_FOUND) return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no chunk %s", key_hex);
    return st;
}

int kvl_svc_chunk_cached(kvl_http_server *s, const char *tenant, const char *key_hex) {
    kvl_store_key key;
    kvl_store_meta m;
    return kvl_store_key_parse(key_hex, &key) == KVL_OK && kvl_store_stat(store_of(s), &key, &m) == KVL_OK &&
           !strcmp(m.tenant, tenant) && !memcmp(m.fingerprint, s->fingerprint, 32);
}

/* ---------------------------------------------------------------- the prompt */

/* A stored value as a chunk cache (tokens from the store entry, computed behind ctx). */
static kvl_status decode_value(kvl_http_server *s, const kvl_store_value *v, const int32_t *ctx, int32_t n_ctx,
                               kvl_chunk_cache **out) {
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    float *kv = NULL;
    KVL_TRY(decode_floats(s, v, &kv));
    kvl_status st = kvl_chunk_cache_create(s->fingerprint, mc->n_layers, mc->n_kv_heads, mc->head_dim,
                                           kvl_store_value_tokens(v), (int32_t)kvl_store_value_n_tokens(v), ctx, n_ctx,
                                           kv, out);
    free(kv);
    return st;
}

/* For the GPU path: a chunk cache that borrows the stored bytes (still encoded), after the same
 * checks decode_floats makes (codec id, shape, tokens). */
static kvl_status encoded_value(kvl_http_server *s, const kvl_store_value *v, const int32_t *ctx, int32_t n_ctx,
                                kvl_chunk_cache **out) {
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    const kvl_store_meta *meta = kvl_store_value_meta(v);
    if (meta->codec_id != KVL_SVC_CODEC_KVLC)
        return kvl_errorf(KVL_ERR_FORMAT, "store entry with codec id %u, expected %d", meta->codec_id, KVL_SVC_CODEC_KVLC);
    return kvl_chunk_cache_create_encoded(s->fingerprint, mc->n_layers, mc->n_kv_heads, mc->head_dim, kvl_store_value_tokens(v),
                                          (int32_t)kvl_store_value_n_tokens(v), ctx, n_ctx, kvl_store_value_data(v),
                                          kvl_store_value_size(v), out);
}

typedef struct seg_cache {
    kvl_chunk_cache *cc;
    int missed;
    int recompute; /* a hit the controller recomputes in the prompt (not read: cc NULL) */
    kvl_store_value *val; /* the stored bytes an encoded cache borrows (GPU path), or NULL */
} seg_cache;

/* Chunk caches of segs: the hits the load controller sends to recompute are marked (out[i].recompute)
 * and not read; the others are read in one batch and decoded; misses are prefilled (behind BOS) and
 * written back in one batch so the next request hits. */
static kvl_status load_chunks(kvl_http_server *s, const char *tenant, const kvl_svc_seg *segs, int32_t n_segs,
                              seg_cache *out, kvl_svc_stats *st, kvl_svc_timing *t) {
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    int32_t bos = mc->bos_id;
    kvl_store_key *keys = calloc((size_t)n_segs + 1, sizeof *keys);
    kvl_store_value **vals = calloc((size_t)n_segs + 1, sizeof *vals);
    kvl_status *vst = calloc((size_t)n_segs + 1, sizeof *vst);
    kvl_store_put_item *puts = calloc((size_t)n_segs + 1, sizeof *puts);
    kvl_store_meta *metas = calloc((size_t)n_segs + 1, sizeof *metas);
    uint8_t **bufs = calloc((size_t)n_segs + 1, sizeof *bufs);
    int32_t *ridx = calloc((size_t)n_segs + 1, sizeof *ridx);
    kvl_store_key *rkeys = calloc((size_t)n_segs + 1, sizeof *rkeys);
    kvl_store_value **rvals = calloc((size_t)n_segs + 1, sizeof *rvals);
    kvl_status *rvst = calloc((size_t)n_segs + 1, sizeof *rvst);
    kvl_status r = keys && vals && vst && puts && metas && bufs && ridx && rkeys && rvals && rvst ? KVL_OK : KVL_ERR_NOMEM;
    for (int32_t i = 0; i < n_segs && r == KVL_OK; i++) r = kvl_store_key_parse(segs[i].key, &keys[i]);
    /* the controller decides from the index (the stored value's size) before anything is read, so
     * a chunk it recomputes costs no read and no decode */
    kvl_load_est est;
    int ctl = est_get(s, &est) && kvl_load_est_ready(&est);
    int32_t n_read = 0;
    for (int32_t i = 0; i < n_segs && r == KVL_OK; i++) {
        kvl_store_meta m;
        if (ctl && kvl_store_stat(store_of(s), &keys[i], &m) == KVL_OK && !strcmp(m.tenant, tenant) &&
            !memcmp(m.fingerprint, s->fingerprint, 32) && m.codec_id == KVL_SVC_CODEC_KVLC &&
            (int32_t)m.n_tokens == segs[i].n &&
            kvl_load_est_decide(&est, m.value_bytes, (uint64_t)kv_bytes(s, segs[i].n), segs[i].n, NULL, NULL)) {
            out[i].recompute = 1;
            st->chunks_hit++;
            st->chunks_recomputed++;
            continue;
        }
        ridx[n_read] = i;
        rkeys[n_read++] = keys[i];
    }
    double t0 = kvl_now_ms();
    if (r == KVL_OK && n_read) r = kvl_store_get_batch(store_of(s), (size_t)n_read, rkeys, s->fingerprint, rvals, rvst);
    double read_ms = kvl_now_ms() - t0;
    t->read_ms += read_ms;
    uint64_t read_bytes = 0;
    for (int32_t j = 0; j < n_read; j++) { /* every value read is freed with vals */
        vals[ridx[j]] = rvals[j];
        vst[ridx[j]] = rvst[j];
        if (rvst[j] == KVL_OK) read_bytes += kvl_store_value_size(rvals[j]);
    }
    if (r == KVL_OK) est_add(s, KVL_LOAD_READ, (double)read_bytes, read_ms);
    int32_t n_puts = 0;
    for (int32_t i = 0; i < n_segs && r == KVL_OK; i++) {
        if (out[i].recompute) continue;
        if (vst[i] == KVL_OK && strcmp(kvl_store_value_meta(vals[i])->tenant, tenant) != 0) vst[i] = KVL_ERR_KEY_NOT_FOUND;
        if (vst[i] == KVL_OK) {
            st->bytes_read += kvl_store_value_size(vals[i]);
            t0 = kvl_now_ms();
            kvl_status d = gpu_dec_of(s) ? encoded_value(s, vals[i], &bos, 1, &out[i].cc) : decode_value(s, vals[i], &bos, 1, &out[i].cc);
            double dms = kvl_now_ms() - t0;
            t->decode_ms += dms;
            /* on the GPU the decode happens later (kvl_gpu_blend_load) and is measured there */
            if (d == KVL_OK && !gpu_dec_of(s)) est_add(s, KVL_LOAD_DECODE, kv_bytes(s, segs[i].n), dms);
            if (d == KVL_OK) {
                st->chunks_hit++;
                if (!out[i].cc->kv) { /* the cache borrows the value's bytes */
                    out[i].val = vals[i];
                    vals[i] = NULL;
                }
                continue;
            }
            /* a cache that does not decode is recomputed like a miss; the store verified its
             * checksum, so this means a codec/version mismatch */
            fprintf(stderr, "kvloomd: chunk %s: cached value unusable (%s: %s); recomputing\n", segs[i].key,
                    kvl_status_str(d), kvl_last_error());
        } else if (vst[i] != KVL_ERR_KEY_NOT_FOUND) {
            fprintf(stderr, "kvloomd: chunk %s: store read failed (%s); recomputing\n", segs[i].key, kvl_status_str(vst[i]));
        }
        out[i].missed = 1;
        st->chunks_missed++;
        t0 = kvl_now_ms();
        r = kvl_chunk_cache_prefill(s->model, segs[i].tokens, segs[i].n, &bos, 1, &out[i].cc);
        double pms = kvl_now_ms() - t0;
        t->recompute_ms += pms;
        if (r == KVL_OK) est_add(s, KVL_LOAD_PREFILL, segs[i].n + 1, pms); /* BOS + the chunk */
        st->recomputed_tokens += segs[i].n;
        if (r != KVL_OK) break;
        size_t len = 0;
        t0 = kvl_now_ms();
        r = encode(s, out[i].cc->kv, segs[i].n, KVL_CODEC_LEVEL_DEFAULT, &bufs[n_puts], &len);
        t->recompute_ms += kvl_now_ms() - t0;
        if (r != KVL_OK) break;
        fill_meta(s, tenant, KVL_STORE_MODE_CHUNK, KVL_CODEC_LEVEL_DEFAULT, segs[i].n, &metas[n_puts]);
        kvl_store_put_item *p = &puts[n_puts];
        p->key = keys[i];
        p->meta = &metas[n_puts];
        p->tokens = segs[i].tokens;
        p->n_tokens = (size_t)segs[i].n;
        p->value = bufs[n_puts];
        p->len = len;
        n_puts++;
    }
    if (r == KVL_OK && n_puts) {
        /* write-back is a cache fill: a full store must not fail the request */
        kvl_status w = kvl_store_put_batch(store_of(s), (size_t)n_puts, puts);
        if (w != KVL_OK) fprintf(stderr, "kvloomd: write-back of %d chunk caches failed: %s: %s\n", n_puts,
                                 kvl_status_str(w), kvl_last_error());
    }
    for (int32_t i = 0; i < n_segs; i++)
        if (vals) kvl_store_value_free(vals[i]);
    for (int32_t i = 0; i < n_puts; i++) free(bufs[i]);
    free(keys);
    free(vals);
    free(vst);
    free(puts);
    free(metas);
    free(bufs);
    free(ridx);
    free(rkeys);
    free(rvals);
    free(rvst);
    return r;
}

/* Prefix mode: walks the prefix chain (block 0 = BOS + chunk 0, then one block per chunk) and
 * returns how many leading blocks are cached, with their caches (ctx = the prompt in front). */
static kvl_status load_prefix(kvl_http_server *s, const char *tenant, const int32_t *prompt, const kvl_svc_seg *segs,
                              int32_t n_segs, seg_cache *blocks, kvl_store_key *chain, int32_t *n_hit,
                              kvl_svc_stats *st, kvl_svc_timing *t) {
    *n_hit = 0;
    kvl_store_key prev;
    kvl_store_root_key(s->fingerprint, tenant, &prev);
    int32_t at = 0;
    int stop = 0;
    for (int32_t i = 0; i < n_segs; i++) {
        int32_t len = segs[i].n + (i == 0);
        kvl_store_prefix_key(&prev, prompt + at, (size_t)len, &chain[i]);
        prev = chain[i];
        if (!stop) {
            kvl_store_value *v = NULL;
            double t0 = kvl_now_ms();
            kvl_status g = kvl_store_get(store_of(s), &chain[i], s->fingerprint, &v);
            double rms = kvl_now_ms() - t0;
            t->read_ms += rms;
            if (g == KVL_OK && strcmp(kvl_store_value_meta(v)->tenant, tenant) == 0 &&
                (int32_t)kvl_store_value_n_tokens(v) == len) {
                st->bytes_read += kvl_store_value_size(v);
                est_add(s, KVL_LOAD_READ, (double)kvl_store_value_size(v), rms);
                t0 = kvl_now_ms();
                g = decode_value(s, v, prompt, at, &blocks[i].cc);
                double dms = kvl_now_ms() - t0;
                t->decode_ms += dms;
                /* the CPU decoder: a rate for the controller only where chunk caches decode there too */
                if (g == KVL_OK && !gpu_dec_of(s)) est_add(s, KVL_LOAD_DECODE, kv_bytes(s, len), dms);
            } else if (g == KVL_OK) {
                g = KVL_ERR_KEY_NOT_FOUND;
            }
            kvl_store_value_free(v);
            if (g == KVL_OK) {
                (*n_hit)++;
                st->chunks_hit++;
            } else {
                if (g != KVL_ERR_KEY_NOT_FOUND) return g;
                stop = 1;
            }
        }
        if (stop) {
            blocks[i].missed = 1;
            st->chunks_missed++;
        }
        at += len;
    }
    return KVL_OK;
}

/* Stores the in-context K/V of blocks [from, n_segs) of kv under their prefix keys (lossless). */
static void store_prefix(kvl_http_server *s, const char *tenant, kvl_kv *kv, const int32_t *prompt,
                         const kvl_svc_seg *segs, int32_t n_segs, const kvl_store_key *chain, int32_t from,
                         kvl_svc_timing *t) {
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    int32_t at = 0;
    for (int32_t i = 0; i < from; i++) at += segs[i].n + (i == 0);
    double t0 = kvl_now_ms();
    for (int32_t i = from; i < n_segs; i++) {
        int32_t len = segs[i].n + (i == 0);
        size_t floats = (size_t)mc->n_layers * 2 * kvl_model_kv_elems_per_layer(s->model, len);
        float *f = malloc(floats * sizeof *f);
        uint8_t *buf = NULL;
        size_t blen = 0;
        kvl_status r = f ? kvl_kv_read(kv, 0, mc->n_layers, at, len, f) : KVL_ERR_NOMEM;
        if (r == KVL_OK) r = encode(s, f, len, KVL_CODEC_LEVEL_LOSSLESS, &buf, &blen);
        if (r == KVL_OK) {
            kvl_store_meta m;
            fill_meta(s, tenant, KVL_STORE_MODE_PREFIX, KVL_CODEC_LEVEL_LOSSLESS, len, &m);
            r = kvl_store_put(store_of(s), &chain[i], &m, prompt + at, (size_t)len, buf, blen);
        }
        if (r != KVL_OK)
            fprintf(stderr, "kvloomd: prefix block %d not stored: %s: %s\n", i, kvl_status_str(r), kvl_last_error());
        free(f);
        free(buf);
        at += len;
    }
    t->write_ms += kvl_now_ms() - t0;
}

kvl_status kvl_svc_prefill(kvl_http_server *s, const char *tenant, const kvl_svc_seg *segs, int32_t n_segs,
                           const int32_t *query, int32_t n_query, const char *mode_name, double ratio,
                           int32_t extra, kvl_kv **kv_out, int32_t **prompt_out, int32_t *n_prompt,
                           float *logits, kvl_svc_stats *st, kvl_svc_timing *t) {
    *kv_out = NULL;
    *prompt_out = NULL;
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    int mode = kvl_blend_mode_parse(mode_name);
    if (mode < 0) return kvl_errorf(KVL_ERR_INVALID_ARG, "unknown mode '%s'", mode_name);
    int64_t total = 1 + n_query;
    for (int32_t i = 0; i < n_segs; i++) total += segs[i].n;
    if (total + extra > mc->max_seq)
        return kvl_errorf(KVL_ERR_CONTEXT_FULL, "prompt of %lld tokens plus %d to generate exceeds the model's context of %d",
                          (long long)total, extra, mc->max_seq);
    int32_t n = (int32_t)total, bos = mc->bos_id;
    int32_t *prompt = malloc((size_t)n * sizeof *prompt);
    seg_cache *sc = calloc((size_t)n_segs + 1, sizeof *sc);
    kvl_store_key *chain = calloc((size_t)n_segs + 1, sizeof *chain);
    kvl_blend_segment *bs = calloc((size_t)n_segs + 2, sizeof *bs);
    kvl_blend_plan *plan = NULL;
    kvl_kv *kv = NULL;
    kvl_status r = prompt && sc && chain && bs ? KVL_OK : KVL_ERR_NOMEM;
    int32_t n_bs = 0, n_hit = 0;
    if (r == KVL_OK) {
        int32_t k = 0;
        prompt[k++] = bos;
        for (int32_t i = 0; i < n_segs; i++) {
            memcpy(prompt + k, segs[i].tokens, (size_t)segs[i].n * sizeof *prompt);
            k += segs[i].n;
        }
        memcpy(prompt + k, query, (size_t)n_query * sizeof *prompt);
    }
    double t0 = kvl_now_ms();
    if (r == KVL_OK && mode == KVL_BLEND_FULL) {
        /* full prefill reads nothing; the index says which chunks a cached mode would have hit */
        for (int32_t i = 0; i < n_segs; i++) {
            kvl_store_key key;
            kvl_store_meta m;
            int hit = kvl_store_key_parse(segs[i].key, &key) == KVL_OK && kvl_store_stat(store_of(s), &key, &m) == KVL_OK &&
                      !strcmp(m.tenant, tenant);
            if (hit) st->chunks_hit++;
            else st->chunks_missed++;
        }
        t->lookup_ms += kvl_now_ms() - t0;
        bs[n_bs++] = (kvl_blend_segment){NULL, prompt, n};
    } else if (r == KVL_OK && mode == KVL_BLEND_PREFIX) {
        r = load_prefix(s, tenant, prompt, segs, n_segs, sc, chain, &n_hit, st, t);
        t->lookup_ms += kvl_now_ms() - t0 - t->read_ms - t->decode_ms;
        int32_t at = 0;
        for (int32_t i = 0; i < n_hit; i++) {
            bs[n_bs++] = (kvl_blend_segment){sc[i].cc, NULL, 0};
            at += segs[i].n + (i == 0);
        }
        bs[n_bs++] = (kvl_blend_segment){NULL, prompt + at, n - at};
    } else if (r == KVL_OK) {
        bs[n_bs++] = (kvl_blend_segment){NULL, prompt, 1};
        r = load_chunks(s, tenant, segs, n_segs, sc, st, t);
        t->lookup_ms += kvl_now_ms() - t0 - t->read_ms - t->decode_ms - t->recompute_ms;
        /* a chunk the controller recomputes is uncached text of the prompt, like the query */
        for (int32_t i = 0; i < n_segs && r == KVL_OK; i++)
            bs[n_bs++] = sc[i].recompute ? (kvl_blend_segment){NULL, segs[i].tokens, segs[i].n}
                                         : (kvl_blend_segment){sc[i].cc, NULL, 0};
        bs[n_bs++] = (kvl_blend_segment){NULL, query, n_query};
    }
    if (t->lookup_ms < 0) t->lookup_ms = 0;
    kvl_blend_opts o = kvl_blend_opts_default();
    o.mode = mode;
    o.ratio = (float)ratio;
    int32_t last = n - 1;
    if (r == KVL_OK) r = kvl_blend_plan_build(s->model, bs, n_bs, &last, 1, &o, &plan);
    if (r == KVL_OK) r = kvl_kv_create(s->model, n + extra, &kv);
    t0 = kvl_now_ms();
#ifdef KVL_HAVE_CUDA
    if (r == KVL_OK && gpu_dec_of(s)) {
        /* on the GPU: the encoded caches decoded there, straight into the request's kv. Not the
         * layer-pipelined kvl_gpu_blend_run: the default policy's naive pass reads every layer
         * before the blend pass and computes only the uncached tokens, so it hides little decoding
         * (and that combination has not run on a GPU yet) */
        svc_backend *b = s->backend;
        double enc_bytes = 0; /* what the GPU decodes: the chunks whose cache is still encoded */
        for (int32_t i = 0; i < n_segs; i++)
            if (sc[i].val) enc_bytes += kv_bytes(s, segs[i].n);
        pthread_mutex_lock(&b->gmu);
        double g0 = kvl_now_ms();
        r = kvl_gpu_blend_load(s->model, plan, bs, kv, b->gdec, NULL);
        double gms = kvl_now_ms() - g0;
        pthread_mutex_unlock(&b->gmu);
        if (r == KVL_OK) est_add(s, KVL_LOAD_DECODE, enc_bytes, gms);
    } else
#endif
        if (r == KVL_OK) r = kvl_blend_load(s->model, plan, bs, kv);
    t->decode_ms += kvl_now_ms() - t0;
    t0 = kvl_now_ms();
    if (r == KVL_OK) r = kvl_blend_run(s->model, plan, kv, logits);
    double run_ms = kvl_now_ms() - t0;
    t->recompute_ms += run_ms;
    if (r == KVL_OK) {
        kvl_blend_cost c = kvl_blend_plan_cost(plan);
        /* the prefill rate: the pass's token-layers in whole tokens per second */
        est_add(s, KVL_LOAD_PREFILL, (double)c.token_layers / mc->n_layers, run_ms);
        /* tokens whose final-layer K/V came from a cache vs were computed for this prompt */
        int32_t computed = plan->n_uncached + c.final_cached;
        if (mode == KVL_BLEND_FULL) computed = n;
        st->recomputed_tokens += computed;
        st->cached_tokens = n - computed;
        st->prompt_tokens = n;
        if (mode == KVL_BLEND_PREFIX && n_hit < n_segs) store_prefix(s, tenant, kv, prompt, segs, n_segs, chain, n_hit, t);
    }
    for (int32_t i = 0; i < n_segs && sc; i++) {
        kvl_chunk_cache_free(sc[i].cc);
        kvl_store_value_free(sc[i].val);
    }
    free(sc);
    free(chain);
    free(bs);
    kvl_blend_plan_free(plan);
    if (r != KVL_OK) {
        kvl_kv_free(kv);
        free(prompt);
        return r;
    }
    *kv_out = kv;
    *prompt_out = prompt;
    *n_prompt = n;
    return KVL_OK;
}


kvl_status kvl_svc_encode_kv(kvl_http_server *s, const float *kv, int32_t n, uint8_t **out, size_t *len) {
    return encode(s, kv, n, KVL_CODEC_LEVEL_DEFAULT, out, len);
}

/* ---------------------------------------------------------------- admin */

kvl_status kvl_svc_store_stats(kvl_http_server *s, json_t **out) { return kvl_store_admin_stat(store_of(s), out); }

kvl_status kvl_svc_store_gauges(kvl_http_server *s, int64_t *entries, int64_t *bytes, int64_t *capacity) {
    kvl_store_stats ss;
    KVL_TRY(kvl_store_get_stats(store_of(s), &ss));
    *entries = (int64_t)ss.entries;
    *bytes = (int64_t)ss.used_bytes;
    *capacity = (int64_t)ss.capacity_bytes;
    return KVL_OK;
}

kvl_status kvl_svc_audit(kvl_http_server *s, int check_data, json_t **out) {
    return kvl_store_audit(store_of(s), check_data, out);
}

typedef struct age_ctx {
    uint64_t cutoff_ns;
    kvl_store_key *keys;
    size_t n, cap;
    int oom;
} age_ctx;

static int collect_old(const kvl_store_key *key, const kvl_store_meta *m, void *ctx) {
    age_ctx *a = ctx;
    uint64_t last = m->last_access_ns ? m->last_access_ns : m->created_ns;
    if (last > a->cutoff_ns) return 0;
    if (a->n == a->cap) {
        size_t nc = a->cap ? a->cap * 2 : 256;
        kvl_store_key *nk = realloc(a->keys, nc * sizeof *nk);
        if (!nk) {
            a->oom = 1;
            return 1;
        }
        a->keys = nk;
        a->cap = nc;
    }
    a->keys[a->n++] = *key;
    return 0;
}

/* Deletes keys one by one, counting what went (entries another admin call removed meanwhile count
 * as not found). */
static kvl_status delete_keys(kvl_http_server *s, const kvl_store_key *keys, size_t n, const char *tenant,
                              uint64_t *evicted, uint64_t *bytes, json_t *not_found) {
    for (size_t i = 0; i < n; i++) {
        kvl_store_meta m;
        kvl_status r = kvl_store_stat(store_of(s), &keys[i], &m);
        if (r == KVL_OK && tenant && strcmp(m.tenant, tenant) != 0) r = KVL_ERR_KEY_NOT_FOUND;
        if (r == KVL_OK) r = kvl_store_delete(store_of(s), &keys[i]);
        if (r == KVL_OK) {
            (*evicted)++;
            *bytes += m.extent_bytes;
        } else if (r == KVL_ERR_KEY_NOT_FOUND) {
            char hex[65];
            if (not_found) json_array_append_new(not_found, json_string(kvl_store_key_hex(&keys[i], hex)));
        } else {
            return r;
        }
    }
    return KVL_OK;
}

kvl_status kvl_svc_evict(kvl_http_server *s, const kvl_svc_evict_req *q, json_t **out) {
    *out = NULL;
    uint64_t n = 0, b = 0;
    kvl_status r = KVL_OK;
    json_t *nf = NULL;
    if (q->n_keys) {
        kvl_store_key *keys = calloc(q->n_keys, sizeof *keys);
        nf = json_array();
        if (!keys || !nf) r = KVL_ERR_NOMEM;
        for (size_t i = 0; i < q->n_keys && r == KVL_OK; i++) r = kvl_store_key_parse(q->keys[i], &keys[i]);
        if (r == KVL_OK) r = delete_keys(s, keys, q->n_keys, q->tenant, &n, &b, nf);
        free(keys);
    } else if (q->has_age) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        uint64_t age = q->older_than_s * 1000000000ull;
        age_ctx a = {now > age ? now - age : 0, NULL, 0, 0, 0};
        r = kvl_store_foreach(store_of(s), q->tenant, collect_old, &a);
        if (r == KVL_OK && a.oom) r = KVL_ERR_NOMEM;
        if (r == KVL_OK) r = delete_keys(s, a.keys, a.n, NULL, &n, &b, NULL);
        free(a.keys);
    } else {
        kvl_store_evict_req req = {q->cost_policy ? KVL_STORE_EVICT_COST : KVL_STORE_EVICT_LRU,
                                   q->has_target ? q->target_bytes : UINT64_MAX, q->expired_only, q->tenant,
                                   q->max_entries};
        r = kvl_store_evict(store_of(s), &req, &n, &b);
    }
    if (r != KVL_OK) {
        json_decref(nf);
        return r;
    }
    *out = json_pack("{s:I,s:I}", "evicted", (json_int_t)n, "bytes", (json_int_t)b);
    if (nf) json_object_set_new(*out, "not_found", nf);
    return KVL_OK;
}

typedef struct usage_ctx {
    json_t *obj;
} usage_ctx;

static int count_entry(const kvl_store_key *key, const kvl_store_meta *m, void *ctx) {
    (void)key;
    usage_ctx *u = ctx;
    json_t *t = json_object_get(u->obj, m->tenant);
    if (!t) {
        t = json_pack("{s:I,s:I}", "store_entries", (json_int_t)0, "store_bytes", (json_int_t)0);
        json_object_set_new(u->obj, m->tenant, t);
    }
    json_object_set_new(t, "store_entries", json_integer(json_integer_value(json_object_get(t, "store_entries")) + 1));
    json_object_set_new(t, "store_bytes",
                        json_integer(json_integer_value(json_object_get(t, "store_bytes")) + (json_int_t)m->extent_bytes));
    return 0;
}

kvl_status kvl_svc_tenant_usage(kvl_http_server *s, json_t **out) {
    usage_ctx u = {json_object()};
    kvl_status r = kvl_store_foreach(store_of(s), NULL, count_entry, &u);
    if (r != KVL_OK) {
        json_decref(u.obj);
        return r;
    }
    *out = u.obj;
    return KVL_OK;
}
