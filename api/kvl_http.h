/* kvl_http.h - the kvloom service: an HTTP/JSON API (libmicrohttpd) over the engine, the chunk
 * store, the codec and CacheBlend. kvloomd (tools/kvloomd.c) is a thin main around it.
 *
 * Two listeners: the API (/v1/..., /healthz, /readyz) and the admin listener (/admin/...,
 * /metrics, /healthz, /readyz). Both run libmicrohttpd with an internal epoll thread pool; request
 * callbacks never block: anything that touches the engine, the store or the disk runs on a worker
 * pool while the connection is suspended (MHD_suspend_connection / MHD_resume_connection).
 * The HTTP contract is docs/openapi.yaml.
 *
 * Tenants: with an auth file every API request needs "Authorization: Bearer <token>"; the token
 * alone decides the tenant, and the tenant is part of every key root, so tenants never share or
 * probe each other's caches. The admin listener accepts only the admin token. Without an auth file
 * one tenant ("default") is served without tokens and only loopback addresses may be listened on.
 *
 * Thread-safety: a kvl_http_server is created, started, drained and freed by one thread (the
 * daemon's main thread); its request handling is internally multi-threaded.
 */
#ifndef KVL_HTTP_H
#define KVL_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvl_http_server kvl_http_server; /* opaque */

/* Limits. Exceeding one gives 413 / 429 / 503 / 504 with a JSON error naming the limit. */
typedef struct kvl_http_limits {
    size_t max_body_bytes;      /* request body (413 "body_bytes"); default 8 MiB */
    int32_t max_tokens;         /* tokens in one request's documents / prompt (413 "tokens");
                                   default 65536 */
    int32_t max_chunks;         /* chunks in one ingest or one prompt (413 "chunks"); default 1024 */
    int32_t max_new_tokens;     /* generate max_tokens upper bound (413 "max_tokens"); default 512 */
    int32_t max_concurrent;     /* requests queued or running on the workers (429); default 64 */
    int32_t request_timeout_ms; /* queue wait + work (503 queued too long, 504 while running);
                                   default 30000 */
} kvl_http_limits;

typedef struct kvl_http_config {
    const char *model_path;   /* HF model directory or llama2.c .bin (borrowed for create) */
    const char *store_dir;    /* store directory (created if missing) */
    const char *listen;       /* "HOST:PORT" of the API; PORT 0 picks a free port */
    const char *admin_listen; /* "HOST:PORT" of the admin listener */
    const char *auth_file;    /* NULL: one default tenant, loopback only */
    int32_t gpu;              /* CUDA device ordinal, -1 = CPU backend */
    int32_t workers;          /* worker threads running engine/store work; <= 0: 2 */
    int32_t http_threads;     /* libmicrohttpd thread pool size per listener; <= 0: 2 */
    uint64_t store_capacity_bytes; /* 0: the store's setting (1 GiB for a new store) */
    uint64_t store_segment_bytes;  /* segment file size of a new store; 0: the store's default */
    int32_t load_controller;  /* 1 (default): for every chunk-cache hit of a blend/naive prompt the
                                 cost model (kvl_load_est_decide, api/kvl_gpu_load.h) says whether
                                 loading it is slower than recomputing it, and then it is recomputed
                                 from its tokens in the prompt; 0: every hit is loaded */
    const char *load_costs;   /* NULL: the controller's costs are measured online; else pinned costs
                                 "read_gbps=X,decode_gbps=Y,prefill_tok_s=Z,fixed_ms=W" (any subset;
                                 kvl_load_costs_parse; borrowed for create) */
    kvl_http_limits limits;
} kvl_http_config;

/* Defaults for everything but the paths and addresses (which are NULL). */
kvl_http_config kvl_http_config_default(void);

/* Loads the auth file, the model and tokenizer, opens the store; does not listen yet.
 * Errors: KVL_ERR_INVALID_ARG (bad address, non-loopback without auth, bad load_costs, load_costs
 * with the controller off), KVL_ERR_JSON / KVL_ERR_FORMAT
 * (auth file), model and store errors. *out is owned by the caller (kvl_http_server_free). */
kvl_status kvl_http_server_create(const kvl_http_config *cfg, kvl_http_server **out);

/* Binds both listeners and starts serving. KVL_ERR_IO when an address cannot be bound. */
kvl_status kvl_http_server_start(kvl_http_server *s);

/* The bound port of the API (admin == 0) or admin listener (admin != 0); 0 before start. */
int kvl_http_server_port(const kvl_http_server *s, int admin);

/* One-line description of what is served (model, backend, store, which modules are wired), for
 * the ready log line. Owned by s. */
const char *kvl_http_server_describe(const kvl_http_server *s);

/* Stops accepting connections, answers new requests on open connections with 503, waits up to
 * timeout_ms for requests in flight to finish. Returns the number of requests still in flight when it
 * gave up (0: drained). Call once, from the thread that started the server. */
int kvl_http_server_drain(kvl_http_server *s, int timeout_ms);

/* Stops the listeners (if running), joins the workers, closes the store and frees everything. NULL
 * is fine. */
void kvl_http_server_free(kvl_http_server *s);

#ifdef __cplusplus
}
#endif
#endif
