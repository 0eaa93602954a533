/* Prometheus metrics: request counters by route and status, latency histograms, cache counters. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "http_impl.h"

static const int codes[KVL_CODES] = {200, 201, 204, 400, 401, 403, 404, 405,
                                     413, 415, 429, 500, 501, 503, 504, 0 /* other */};
/* seconds; Prometheus convention */
static const double buckets[KVL_HIST_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                 0.25,  0.5,    1,     2.5,  5,    10,   30};
static const char *route_names[KVL_R_COUNT] = {
    "documents_post", "documents_get", "documents_delete", "generate", "context", "chunk_get",
    "chunk_kv", "chunk_delete", "admin_stats", "admin_evict", "admin_audit", "admin_tenants",
    "metrics", "healthz", "readyz", "other"};

const char *kvl_route_name(kvl_route r) { return r < KVL_R_COUNT ? route_names[r] : "other"; }

void kvl_metrics_init(kvl_metrics *m) {
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
}

void kvl_metrics_destroy(kvl_metrics *m) { pthread_mutex_destroy(&m->mu); }

static int code_index(int status) {
    for (int i = 0; i < KVL_CODES - 1; i++)
        if (codes[i] == status) return i;
    return KVL_CODES - 1;
}

static void observe(uint64_t *h, double *sum, uint64_t *count, double seconds) {
    int b = 0;
    while (b < KVL_HIST_BUCKETS && seconds > buckets[b]) b++;
    h[b]++;
    *sum += seconds;
    (*count)++;
}

void kvl_metrics_request(kvl_metrics *m, kvl_route r, int status, double ms) {
    if (r >= KVL_R_COUNT) r = KVL_R_OTHER;
    pthread_mutex_lock(&m->mu);
    m->requests[r][code_index(status)]++;
    observe(m->hist[r], &m->hist_sum[r], &m->hist_count[r], ms / 1e3);
    pthread_mutex_unlock(&m->mu);
}

void kvl_metrics_ttft(kvl_metrics *m, double ms) {
    pthread_mutex_lock(&m->mu);
    observe(m->ttft_hist, &m->ttft_sum, &m->ttft_count, ms / 1e3);
    pthread_mutex_unlock(&m->mu);
}

typedef struct sbuf {
    char *p;
    size_t n, cap;
    int oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->p + b->n, b->cap - b->n, fmt, ap);
        va_end(ap);
        if (k < 0) {
            b->oom = 1;
            return;
        }
        if ((size_t)k < b->cap - b->n) {
            b->n += (size_t)k;
            return;
        }
        size_t nc = b->cap * 2 + (size_t)k + 1;
        char *np = realloc(b->p, nc);
        if (!np) {
            b->oom = 1;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
}

static void render_hist(sbuf *b, const char *name, const char *labels, const uint64_t *h, double sum,
                        uint64_t count) {
    uint64_t cum = 0;
    for (int i = 0; i < KVL_HIST_BUCKETS; i++) {
        cum += h[i];
        sb_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, labels[0] ? "," : "", buckets[i],
                  (unsigned long long)cum);
    }
    cum += h[KVL_HIST_BUCKETS];
    sb_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, labels[0] ? "," : "",
              (unsigned long long)cum);
    if (labels[0]) {
        sb_printf(b, "%s_sum{%s} %.6f\n%s_count{%s} %llu\n", name, labels, sum, name, labels,
                  (unsigned long long)count);
    } else {
        sb_printf(b, "%s_sum %.6f\n%s_count %llu\n", name, sum, name, (unsigned long long)count);
    }
}

#define COUNTER(b, name, help, v)                                                                  \
    sb_printf(b, "# HELP " name " " help "\n# TYPE " name " counter\n" name " %llu\n",                \
              (unsigned long long)(v))

char *kvl_metrics_render(kvl_metrics *m, const kvl_metrics_gauges *g) {
    int64_t store_entries = g->store_entries, store_bytes = g->store_bytes, store_capacity = g->store_capacity;
    sbuf b = {malloc(8192), 0, 8192, 0};
    if (!b.p) return NULL;
    pthread_mutex_lock(&m->mu);
    sb_printf(&b, "# HELP kvloom_http_requests_total HTTP requests by route and status code.\n"
                  "# TYPE kvloom_http_requests_total counter\n");
    for (int r = 0; r < KVL_R_COUNT; r++)
        for (int c = 0; c < KVL_CODES; c++)
            if (m->requests[r][c])
            {
                char code[8];
                if (codes[c]) snprintf(code, sizeof code, "%d", codes[c]);
                else strcpy(code, "other");
                sb_printf(&b, "kvloom_http_requests_total{route=\"%s\",code=\"%s\"} %llu\n",
                          route_names[r], code, (unsigned long long)m->requests[r][c]);
            }
    sb_printf(&b, "# HELP kvloom_http_request_duration_seconds Time from the first byte of a request "
                  "to its response being queued.\n"
                  "# TYPE kvloom_http_request_duration_seconds histogram\n");
    for (int r = 0; r < KVL_R_COUNT; r++) {
        if (!m->hist_count[r]) continue;
        char labels[64];
        snprintf(labels, sizeof labels, "route=\"%s\"", route_names[r]);
        render_hist(&b, "kvloom_http_request_duration_seconds", labels, m->hist[r], m->hist_sum[r],
                    m->hist_count[r]);
    }
    sb_printf(&b, "# HELP kvloom_ttft_seconds Time to first token of generate requests.\n"
                  "# TYPE kvloom_ttft_seconds histogram\n");
    render_hist(&b, "kvloom_ttft_seconds", "", m->ttft_hist, m->ttft_sum, m->ttft_count);
    pthread_mutex_unlock(&m->mu);

    COUNTER(&b, "kvloom_chunk_hits_total", "Prompt chunks whose cache was found in the store.", m->chunks_hit);
    COUNTER(&b, "kvloom_chunk_misses_total", "Prompt chunks recomputed from their tokens (no cache).",
            m->chunks_missed);
    COUNTER(&b, "kvloom_chunk_recomputed_total",
            "Cached prompt chunks the load controller recomputed because loading them was estimated slower "
            "(counted in the hits too).",
            m->chunks_recomputed);
    COUNTER(&b, "kvloom_cached_tokens_total", "Prompt tokens served from caches.", m->cached_tokens);
    COUNTER(&b, "kvloom_recomputed_tokens_total", "Prompt tokens computed by the engine.", m->recomputed_tokens);
    COUNTER(&b, "kvloom_store_read_bytes_total", "Encoded cache bytes read from the store.", m->bytes_read);
    COUNTER(&b, "kvloom_ingested_documents_total", "Documents ingested.", m->ingested_docs);
    COUNTER(&b, "kvloom_ingested_chunks_total", "Chunks prefilled at ingest.", m->ingested_chunks);
    COUNTER(&b, "kvloom_ingested_tokens_total", "Tokens prefilled at ingest.", m->ingested_tokens);
    COUNTER(&b, "kvloom_generated_tokens_total", "Tokens generated.", m->generated_tokens);
    COUNTER(&b, "kvloom_evictions_total", "Store entries evicted through the admin API.", m->evictions);
    COUNTER(&b, "kvloom_evicted_bytes_total", "Bytes evicted through the admin API.", m->evicted_bytes);
    COUNTER(&b, "kvloom_rejected_limit_total", "Requests refused by a size limit (413).", m->rejected_limit);
    COUNTER(&b, "kvloom_rejected_busy_total", "Requests refused by the concurrency limit (429).", m->rejected_busy);
    COUNTER(&b, "kvloom_rejected_auth_total", "Requests refused by authentication (401/403).", m->rejected_auth);
    COUNTER(&b, "kvloom_timeouts_total", "Requests past the request time limit (503/504).", m->timeouts);
    sb_printf(&b, "# HELP kvloom_inflight_requests Requests queued or running on the workers.\n"
                  "# TYPE kvloom_inflight_requests gauge\nkvloom_inflight_requests %lld\n",
              (long long)m->inflight);
    if (store_entries >= 0)
        sb_printf(&b, "# HELP kvloom_store_entries Live entries in the chunk store.\n"
                      "# TYPE kvloom_store_entries gauge\nkvloom_store_entries %lld\n",
                  (long long)store_entries);
    if (store_bytes >= 0)
        sb_printf(&b, "# HELP kvloom_store_used_bytes Bytes used by live store entries.\n"
                      "# TYPE kvloom_store_used_bytes gauge\nkvloom_store_used_bytes %lld\n",
                  (long long)store_bytes);
    if (store_capacity >= 0)
        sb_printf(&b, "# HELP kvloom_store_capacity_bytes Store capacity.\n"
                      "# TYPE kvloom_store_capacity_bytes gauge\nkvloom_store_capacity_bytes %lld\n",
                  (long long)store_capacity);
    if (g->load_controller) {
        static const char *const names[3] = {"kvloom_load_read_gbps", "kvloom_load_decode_gbps",
                                             "kvloom_load_prefill_tokens_per_second"};
        static const char *const helps[3] = {
            "Load controller: store read throughput estimate (encoded bytes), GB/s.",
            "Load controller: decode throughput estimate (bytes of the engine's KV), GB/s.",
            "Load controller: prefill throughput estimate, tokens per second."};
        double v[3] = {g->read_gbps, g->decode_gbps, g->prefill_tok_s};
        for (int i = 0; i < 3; i++)
            if (v[i] > 0)
                sb_printf(&b, "# HELP %s %s\n# TYPE %s gauge\n%s %.6g\n", names[i], helps[i], names[i], names[i], v[i]);
    }
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}
