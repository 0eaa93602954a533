/* http_impl.h - private structures of the kvloom HTTP service (api/kvl_http.h). */
#ifndef KVL_HTTP_IMPL_H
#define KVL_HTTP_IMPL_H

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "kvl_engine.h"
#include "kvl_http.h"
#include "kvl_tokenizer.h"

struct MHD_Daemon;
struct MHD_Connection;

/* ---------------------------------------------------------------- auth (auth.c) */

#define KVL_TENANT_MAX 63
#define KVL_DEFAULT_TENANT "default"

typedef struct kvl_auth_entry {
    uint8_t digest[32];               /* SHA-256 of the token: compared in constant time */
    char tenant[KVL_TENANT_MAX + 1];
} kvl_auth_entry;

typedef struct kvl_auth {
    int enabled;                      /* 0: no auth file, every request is the default tenant */
    kvl_auth_entry *entries;
    int n_entries;
    uint8_t admin_digest[32];
    int has_admin;
} kvl_auth;

/* Parses the auth file ({"tenants": {token: tenant}, "admin_token": token}); strict: unknown fields,
 * empty or short tokens, bad tenant names and duplicate tokens are errors. */
kvl_status kvl_auth_load(const char *path, kvl_auth *out);
void kvl_auth_free(kvl_auth *a);
/* Tenant of a bearer token, or NULL. Walks every entry with CRYPTO_memcmp on SHA-256 digests so
 * the time taken does not depend on which token (if any) matched. */
const char *kvl_auth_tenant(const kvl_auth *a, const char *token);
/* 1 if token is the admin token (constant time). */
int kvl_auth_is_admin(const kvl_auth *a, const char *token);
/* 1 if s is a valid tenant / document id: [A-Za-z0-9._-], 1..max bytes, not "." or "..". */
int kvl_name_ok(const char *s, size_t max);

/* ---------------------------------------------------------------- metrics (metrics.c) */

typedef enum kvl_route {
    KVL_R_DOCS_POST, KVL_R_DOCS_GET, KVL_R_DOCS_DELETE, KVL_R_GENERATE, KVL_R_CONTEXT,
    KVL_R_CHUNK_GET, KVL_R_CHUNK_KV, KVL_R_CHUNK_DELETE, KVL_R_ADMIN_STATS, KVL_R_ADMIN_EVICT,
    KVL_R_ADMIN_AUDIT, KVL_R_ADMIN_TENANTS, KVL_R_METRICS, KVL_R_HEALTHZ, KVL_R_READYZ, KVL_R_OTHER,
    KVL_R_COUNT
} kvl_route;

#define KVL_HIST_BUCKETS 14
#define KVL_CODES 16

typedef struct kvl_metrics {
    pthread_mutex_t mu;
    uint64_t requests[KVL_R_COUNT][KVL_CODES]; /* by route and status (index into kvl_metric_codes) */
    uint64_t hist[KVL_R_COUNT][KVL_HIST_BUCKETS + 1]; /* latency buckets (+Inf last), cumulative
                                                         when rendered */
    double hist_sum[KVL_R_COUNT];
    uint64_t hist_count[KVL_R_COUNT];
    uint64_t ttft_hist[KVL_HIST_BUCKETS + 1];
    double ttft_sum;
    uint64_t ttft_count;
    _Atomic uint64_t chunks_hit, chunks_missed, chunks_recomputed, cached_tokens, recomputed_tokens, bytes_read,
        ingested_chunks, ingested_tokens, ingested_docs, generated_tokens, evictions, evicted_bytes,
        rejected_limit, rejected_busy, rejected_auth, timeouts;
    _Atomic int64_t inflight;
} kvl_metrics;

void kvl_metrics_init(kvl_metrics *m);
void kvl_metrics_destroy(kvl_metrics *m);
void kvl_metrics_request(kvl_metrics *m, kvl_route r, int status, double ms);
void kvl_metrics_ttft(kvl_metrics *m, double ms);
const char *kvl_route_name(kvl_route r);
/* Gauges the caller reads for a render: store_* negative are not exported; the load controller's
 * estimates only while it is on, each once known (> 0). */
typedef struct kvl_metrics_gauges {
    int64_t store_entries, store_bytes, store_capacity;
    int load_controller;
    double read_gbps, decode_gbps, prefill_tok_s;
} kvl_metrics_gauges;
/* Renders the Prometheus text exposition (version 0.0.4) into a malloc'ed string. */
char *kvl_metrics_render(kvl_metrics *m, const kvl_metrics_gauges *g);

/* ---------------------------------------------------------------- worker pool (workers.c) */

typedef void (*kvl_job_fn)(void *arg);

typedef struct kvl_job {
    kvl_job_fn fn;
    void *arg;
    struct kvl_job *next;
} kvl_job;

typedef struct kvl_workers {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    kvl_job *head, *tail;
    int stop;
    int n_threads;
    pthread_t *threads;
} kvl_workers;

kvl_status kvl_workers_start(kvl_workers *w, int n);
/* Queues a job (never blocks beyond the queue mutex). The job struct is owned by the caller and
 * must live until fn has run. */
void kvl_workers_submit(kvl_workers *w, kvl_job *job);
/* Runs the queued jobs to completion, then joins the threads. */
void kvl_workers_stop(kvl_workers *w);

/* ---------------------------------------------------------------- requests */

typedef enum kvl_listener { KVL_L_API = 0, KVL_L_ADMIN = 1 } kvl_listener;

/* One HTTP request from first callback to completion (MHD's con_cls). */
typedef struct kvl_req {
    kvl_http_server *srv;
    struct MHD_Connection *conn;
    kvl_listener listener;
    kvl_route route;
    char method[8];
    char path[512];
    char tenant[KVL_TENANT_MAX + 1];
    char format[16];        /* ?format= of GET /v1/chunks/{key}/kv and /v1/context */
    char *body;             /* upload, NUL-terminated */
    size_t body_len, body_cap;
    int body_too_large;
    int state;              /* 0 headers seen, 1 receiving, 2 on a worker, 3 response ready */
    int queued;             /* the response was handed to libmicrohttpd */
    double t_start;         /* monotonic ms */
    kvl_job job;
    /* response (set by a handler, sent by the MHD thread) */
    int status;
    char *resp;             /* malloc'ed body */
    size_t resp_len;
    const char *resp_type;
    char retry_after[8];
} kvl_req;

/* ---------------------------------------------------------------- documents (catalog.c) */

typedef struct kvl_doc_chunk {
    char key[65];
    int32_t n_tokens;
    int32_t *tokens;
} kvl_doc_chunk;

typedef struct kvl_doc {
    char doc_id[129];
    char tenant[KVL_TENANT_MAX + 1];
    int32_t chunk_tokens;
    int32_t n_chunks;
    kvl_doc_chunk *chunks;
    int64_t created_unix;
} kvl_doc;

void kvl_doc_free(kvl_doc *d);
/* The catalog keeps one JSON file per (tenant, doc_id) under <store>/docs/, named by a SHA-256 of
 * both, written atomically (temp file, fsync, rename, fsync of the directory). It holds the chunk
 * keys and token ids so that a document's chunks can always be recomputed. */
kvl_status kvl_catalog_put(const char *dir, const kvl_doc *d);
/* KVL_ERR_KEY_NOT_FOUND when absent. *out owned by the caller (kvl_doc_free). */
kvl_status kvl_catalog_get(const char *dir, const char *tenant, const char *doc_id, kvl_doc **out);
kvl_status kvl_catalog_delete(const char *dir, const char *tenant, const char *doc_id);
/* Counts documents per tenant: fn(tenant, doc, ctx) for every document. */
kvl_status kvl_catalog_foreach(const char *dir, void (*fn)(const kvl_doc *d, void *ctx), void *ctx);

/* ---------------------------------------------------------------- the server */

struct kvl_http_server {
    kvl_http_config cfg;
    char *model_path, *store_dir, *listen, *admin_listen;
    char docs_dir[4096];
    kvl_auth auth;
    kvl_model *model;
    kvl_tokenizer *tok;
    uint8_t fingerprint[32];
    char fingerprint_hex[65];
    kvl_workers workers;            /* API requests: engine, store and disk work */
    kvl_workers admin_workers;      /* admin listener: never queued behind API work */
    int workers_started, admin_workers_started;
    kvl_metrics metrics;
    struct MHD_Daemon *d_api, *d_admin;
    kvl_http_server *ctx_api, *ctx_admin; /* callback cls: &ctx_api / &ctx_admin tell the listener */
    void *backend;                        /* chunk-cache backend state (backend.c) */
    int port_api, port_admin;
    _Atomic int draining;
    _Atomic int64_t open_requests;  /* kvl_req alive (created .. completed) */
    _Atomic int64_t queued;         /* requests queued or running on the workers */
    pthread_mutex_t catalog_mu;     /* serialises catalog writes of one (tenant, doc) */
    double started_ms;
    char describe[512];
};

/* ---------------------------------------------------------------- chunk caches (backend.c)
 * The seam between the HTTP layer and the cache machinery (store, codec, CacheBlend). */

kvl_status kvl_svc_backend_open(kvl_http_server *s);
void kvl_svc_backend_close(kvl_http_server *s);
/* What is wired, for logs and /admin/stats. */
const char *kvl_svc_backend_describe(kvl_http_server *s);
/* JSON array of the generate/context modes this build serves (new reference). */
json_t *kvl_svc_modes(kvl_http_server *s);

/* Key root of a tenant for the server's model, and a chunk's key in hex. */
void kvl_svc_root(const kvl_http_server *s, const char *tenant, uint8_t root[32]);
void kvl_svc_chunk_key(const uint8_t root[32], const int32_t *tokens, int32_t n, char hex[65]);

/* Token context every chunk is prefilled behind (BOS): a prompt is BOS + chunks + query, so the
 * first chunk's cache is an exact prefix. */
typedef struct kvl_svc_timing {
    double lookup_ms, read_ms, decode_ms, recompute_ms, encode_ms, write_ms;
} kvl_svc_timing;

typedef struct kvl_svc_stats {
    int32_t cached_tokens, recomputed_tokens, chunks_hit, chunks_missed, prompt_tokens;
    int32_t chunks_recomputed; /* hits the load controller recomputed instead of loading (in chunks_hit) */
    uint64_t bytes_read;
} kvl_svc_stats;

/* One prompt segment: a chunk (key + tokens). */
typedef struct kvl_svc_seg {
    char key[65];
    const int32_t *tokens;
    int32_t n;
} kvl_svc_seg;

/* Ingest: prefills each chunk (behind BOS) that the store does not already hold, encodes it and
 * stores it (in batches: one fsync per batch). stored[i] = 1 when chunk i's cache is in the store
 * afterwards. KVL_ERR_TIMEOUT when the monotonic clock passes deadline_ms between chunks (chunks
 * stored until then stay stored: they are caches). */
kvl_status kvl_svc_ingest(kvl_http_server *s, const char *tenant, const kvl_svc_seg *segs, int32_t n_segs,
                          int *stored, double deadline_ms, kvl_svc_timing *t);

/* Builds the prompt BOS + segs + query into a new kv (capacity n_prompt + extra slots) with mode
 * ("full", "naive", "blend", "prefix") and recompute ratio, and writes the logits of the last prompt
 * token into logits[vocab]. *kv_out owned by the caller. Missing caches are recomputed (counted in
 * stats). In blend and naive mode, with the load controller on, a cached chunk whose load is
 * estimated slower than its recompute is not read: its tokens are computed in the prompt like the
 * query's (stats: a hit, and chunks_recomputed). */
kvl_status kvl_svc_prefill(kvl_http_server *s, const char *tenant, const kvl_svc_seg *segs, int32_t n_segs,
                           const int32_t *query, int32_t n_query, const char *mode, double ratio,
                           int32_t extra, kvl_kv **kv_out, int32_t **prompt_out, int32_t *n_prompt,
                           float *logits, kvl_svc_stats *st, kvl_svc_timing *t);

/* Looks up a chunk's tokens by key for a tenant (store): KVL_ERR_KEY_NOT_FOUND when unknown.
 * *tokens malloc'ed. */
kvl_status kvl_svc_chunk_tokens(kvl_http_server *s, const char *tenant, const char *key_hex, int32_t **tokens,
                                int32_t *n);

/* Chunk endpoints by key, scoped to tenant: another tenant's key is KVL_ERR_KEY_NOT_FOUND, exactly
 * like an absent one. */
kvl_status kvl_svc_chunk_meta(kvl_http_server *s, const char *tenant, const char *key_hex, json_t **out);
/* raw != 0: 4-byte LE header length + JSON header + f32 tensor; raw == 0: the stored CacheGen bytes.
 * *body malloc'ed. */
kvl_status kvl_svc_chunk_kv(kvl_http_server *s, const char *tenant, const char *key_hex, int raw, char **body,
                            size_t *len);
kvl_status kvl_svc_chunk_delete(kvl_http_server *s, const char *tenant, const char *key_hex);
/* 1 when the store holds the chunk's cache for tenant (index lookup only). */
int kvl_svc_chunk_cached(kvl_http_server *s, const char *tenant, const char *key_hex);

/* CacheGen-encodes a [layers][k|v][n][kv_heads][head_dim] f32 tensor at the default lossy level
 * (*out malloc'ed). */
kvl_status kvl_svc_encode_kv(kvl_http_server *s, const float *kv, int32_t n, uint8_t **out, size_t *len);

/* The load controller's current cost estimates (0: not measured yet); returns 1 when it is on. */
int kvl_svc_load_costs(kvl_http_server *s, double *read_gbps, double *decode_gbps, double *prefill_tok_s);

/* Admin: store statistics (JSON), gauges for /metrics, the audit report, eviction, per-tenant store
 * usage ({tenant: {store_entries, store_bytes}}). */
typedef struct kvl_svc_evict_req {
    int has_target;
    uint64_t target_bytes;
    int has_age;
    uint64_t older_than_s;
    const char *tenant;        /* NULL: every tenant */
    const char *const *keys;   /* explicit keys (hex) */
    size_t n_keys;
    int expired_only;
    int cost_policy;           /* 0: least recently used first; 1: cost-aware (hits x recompute cost) */
    uint64_t max_entries;      /* 0: no limit */
} kvl_svc_evict_req;
kvl_status kvl_svc_store_stats(kvl_http_server *s, json_t **out);
kvl_status kvl_svc_store_gauges(kvl_http_server *s, int64_t *entries, int64_t *bytes, int64_t *capacity);
kvl_status kvl_svc_audit(kvl_http_server *s, int check_data, json_t **out);
kvl_status kvl_svc_evict(kvl_http_server *s, const kvl_svc_evict_req *q, json_t **out);
kvl_status kvl_svc_tenant_usage(kvl_http_server *s, json_t **out);

/* Handlers (handlers.c) run on a worker thread and fill r->status / r->resp. */
void kvl_handle_request(kvl_req *r);

/* Response helpers (server.c): set r's response to a JSON value (takes ownership of v) or to the
 * standard error body {"error": {"code", "message", ...extra}} (extra may be NULL; taken). */
void kvl_req_json(kvl_req *r, int status, json_t *v);
void kvl_req_error(kvl_req *r, int status, const char *code, json_t *extra, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
double kvl_now_ms(void);

#endif
