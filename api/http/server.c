/* The libmicrohttpd side of the service: listeners, request lifecycle, routing, auth, limits.
 *
 * Callbacks never block: a request is checked (route, auth, content type, size) while its headers
 * arrive, its body is collected, and then either answered at once (health, metrics) or handed to the
 * worker pool while the connection is suspended; the worker resumes it when the response is ready
 * and the next callback queues the response. */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "http_impl.h"
#include "kvl_gpu_load.h"

double kvl_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

kvl_http_config kvl_http_config_default(void) {
    kvl_http_config c;
    memset(&c, 0, sizeof c);
    c.gpu = -1;
    c.workers = 2;
    c.http_threads = 2;
    c.load_controller = 1;
    c.limits.max_body_bytes = 8u << 20;
    c.limits.max_tokens = 65536;
    c.limits.max_chunks = 1024;
    c.limits.max_new_tokens = 512;
    c.limits.max_concurrent = 64;
    c.limits.request_timeout_ms = 30000;
    return c;
}

/* ---------------------------------------------------------------- responses */

void kvl_req_json(kvl_req *r, int status, json_t *v) {
    free(r->resp);
    r->resp = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    if (!r->resp) { /* out of memory while rendering: a fixed body */
        status = 500;
        r->resp = strdup("{\"error\":{\"code\":\"internal\",\"message\":\"out of memory\"}}");
    }
    r->resp_len = r->resp ? strlen(r->resp) : 0;
    r->resp_type = "application/json";
    r->status = status;
}

void kvl_req_error(kvl_req *r, int status, const char *code, json_t *extra, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *e = extra ? extra : json_object();
    json_object_set_new(e, "code", json_string(code));
    /* messages may quote client bytes: json_string rejects invalid UTF-8, so fall back to a
     * sanitized copy */
    json_t *m = json_string(msg);
    if (!m) {
        for (char *p = msg; *p; p++)
            if ((unsigned char)*p >= 0x80 || (unsigned char)*p < 0x20) *p = '?';
        m = json_string(msg);
    }
    json_object_set_new(e, "message", m);
    kvl_req_json(r, status, json_pack("{s:o}", "error", e));
    if (status == 413) atomic_fetch_add(&r->srv->metrics.rejected_limit, 1);
    if (status == 401 || status == 403) atomic_fetch_add(&r->srv->metrics.rejected_auth, 1);
}

static enum MHD_Result queue_response(kvl_req *r) {
    if (!r->resp) kvl_req_error(r, 500, "internal", NULL, "no response was produced");
    struct MHD_Response *resp = MHD_create_response_from_buffer(r->resp_len, r->resp, MHD_RESPMEM_MUST_FREE);
    if (!resp) return MHD_NO;
    r->resp = NULL; /* owned by MHD now */
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->resp_type);
    if (r->retry_after[0]) MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, r->retry_after);
    if (r->status == 405) {
        const char *allow = "GET";
        switch (r->route) {
        case KVL_R_DOCS_POST: case KVL_R_GENERATE: case KVL_R_CONTEXT: case KVL_R_ADMIN_EVICT:
        case KVL_R_ADMIN_AUDIT: allow = "POST"; break;
        case KVL_R_DOCS_GET: case KVL_R_CHUNK_GET: allow = "GET, DELETE"; break;
        default: break;
        }
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    }
    enum MHD_Result ret = MHD_queue_response(r->conn, (unsigned int)r->status, resp);
    MHD_destroy_response(resp);
    r->state = 3;
    r->queued = 1;
    return ret;
}

/* ---------------------------------------------------------------- routing */

typedef struct route_match {
    kvl_route route;
    int method_ok;
    int found;
} route_match;

static int is_hex64(const char *s, size_t n) {
    if (n != 64) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return 1;
}

static route_match match_route(kvl_listener l, const char *method, const char *path) {
    route_match m = {KVL_R_OTHER, 0, 1};
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD"), post = !strcmp(method, "POST"),
        del = !strcmp(method, "DELETE");
    if (!strcmp(path, "/healthz")) {
        m.route = KVL_R_HEALTHZ;
        m.method_ok = get;
    } else if (!strcmp(path, "/readyz")) {
        m.route = KVL_R_READYZ;
        m.method_ok = get;
    } else if (l == KVL_L_ADMIN) {
        if (!strcmp(path, "/metrics")) m.route = KVL_R_METRICS, m.method_ok = get;
        else if (!strcmp(path, "/admin/stats")) m.route = KVL_R_ADMIN_STATS, m.method_ok = get;
        else if (!strcmp(path, "/admin/tenants")) m.route = KVL_R_ADMIN_TENANTS, m.method_ok = get;
        else if (!strcmp(path, "/admin/evict")) m.route = KVL_R_ADMIN_EVICT, m.method_ok = post;
        else if (!strcmp(path, "/admin/audit")) m.route = KVL_R_ADMIN_AUDIT, m.method_ok = post;
        else m.found = 0;
    } else {
        if (!strcmp(path, "/v1/documents")) m.route = KVL_R_DOCS_POST, m.method_ok = post;
        else if (!strcmp(path, "/v1/generate")) m.route = KVL_R_GENERATE, m.method_ok = post;
        else if (!strcmp(path, "/v1/context")) m.route = KVL_R_CONTEXT, m.method_ok = post;
        else if (!strncmp(path, "/v1/documents/", 14) && path[14] && !strchr(path + 14, '/')) {
            m.route = del ? KVL_R_DOCS_DELETE : KVL_R_DOCS_GET;
            m.method_ok = get || del;
        } else if (!strncmp(path, "/v1/chunks/", 11)) {
            const char *k = path + 11, *slash = strchr(k, '/');
            if (!is_hex64(k, slash ? (size_t)(slash - k) : strlen(k))) m.found = 0;
            else if (!slash) {
                m.route = del ? KVL_R_CHUNK_DELETE : KVL_R_CHUNK_GET;
                m.method_ok = get || del;
            } else if (!strcmp(slash, "/kv")) {
                m.route = KVL_R_CHUNK_KV;
                m.method_ok = get;
            } else m.found = 0;
        } else m.found = 0;
    }
    return m;
}

static const char *bearer(struct MHD_Connection *c) {
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return NULL;
    h += 7;
    while (*h == ' ') h++;
    return *h ? h : NULL;
}

/* Returns 0 if the request may go on; else sets the error response. */
static int check_auth(kvl_req *r) {
    kvl_http_server *s = r->srv;
    if (r->route == KVL_R_HEALTHZ || r->route == KVL_R_READYZ) return 0; /* probes: no credentials */
    if (!s->auth.enabled) {
        strcpy(r->tenant, KVL_DEFAULT_TENANT);
        return 0;
    }
    const char *tok = bearer(r->conn);
    if (!tok) {
        kvl_req_error(r, 401, "unauthorized", NULL, "missing 'Authorization: Bearer <token>' header");
        return -1;
    }
    if (r->listener == KVL_L_ADMIN) {
        if (kvl_auth_is_admin(&s->auth, tok)) return 0;
        if (kvl_auth_tenant(&s->auth, tok)) {
            kvl_req_error(r, 403, "forbidden", NULL, "tenant tokens are not accepted on the admin listener");
            return -1;
        }
        kvl_req_error(r, 401, "unauthorized", NULL, "unknown token");
        return -1;
    }
    const char *t = kvl_auth_tenant(&s->auth, tok);
    if (!t) {
        if (kvl_auth_is_admin(&s->auth, tok))
            kvl_req_error(r, 403, "forbidden", NULL, "the admin token is not a tenant token");
        else
            kvl_req_error(r, 401, "unauthorized", NULL, "unknown token");
        return -1;
    }
    strcpy(r->tenant, t);
    return 0;
}

static int route_has_body(kvl_route r) {
    return r == KVL_R_DOCS_POST || r == KVL_R_GENERATE || r == KVL_R_CONTEXT || r == KVL_R_ADMIN_EVICT ||
           r == KVL_R_ADMIN_AUDIT;
}

/* Header-time checks: draining, route, method, auth, content type, declared size. */
static void early_checks(kvl_req *r, const char *method, const char *url) {
    kvl_http_server *s = r->srv;
    if (strlen(url) >= sizeof r->path) {
        kvl_req_error(r, 404, "not_found", NULL, "path too long");
        return;
    }
    strcpy(r->path, url);
    snprintf(r->method, sizeof r->method, "%s", method);
    route_match m = match_route(r->listener, method, url);
    r->route = m.route;
    if (atomic_load(&s->draining) && r->route != KVL_R_HEALTHZ) {
        kvl_req_error(r, 503, "shutting_down", NULL, "the server is shutting down");
        return;
    }
    if (!m.found) {
        r->route = KVL_R_OTHER;
        kvl_req_error(r, 404, "not_found", NULL, "no endpoint %s on the %s listener", url,
                      r->listener == KVL_L_ADMIN ? "admin" : "API");
        return;
    }
    if (!m.method_ok) {
        kvl_req_error(r, 405, "method_not_allowed", NULL, "%s is not allowed on %s", method, url);
        return;
    }
    if (check_auth(r)) return;
    const char *fmt = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "format");
    if (fmt) {
        if (strlen(fmt) >= sizeof r->format) {
            kvl_req_error(r, 400, "invalid_request", json_pack("{s:s}", "field", "format"),
                          "format must be 'raw' or 'cachegen'");
            return;
        }
        strcpy(r->format, fmt);
    }
    const char *cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *te = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    unsigned long long len = cl ? strtoull(cl, NULL, 10) : 0;
    int has_body = len > 0 || te != NULL;
    if (len > s->cfg.limits.max_body_bytes) {
        kvl_req_error(r, 413, "payload_too_large",
                      json_pack("{s:s,s:I}", "limit", "body_bytes", "max", (json_int_t)s->cfg.limits.max_body_bytes),
                      "request body of %llu bytes exceeds the limit of %zu bytes", len,
                      s->cfg.limits.max_body_bytes);
        return;
    }
    if (has_body && !route_has_body(r->route)) {
        kvl_req_error(r, 400, "invalid_request", NULL, "%s %s takes no request body", method, url);
        return;
    }
    if (has_body) {
        const char *ct = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
        size_t n = 0;
        if (ct) {
            while (ct[n] && ct[n] != ';' && ct[n] != ' ') n++;
        }
        if (!ct || n != 16 || strncasecmp(ct, "application/json", 16) != 0) {
            kvl_req_error(r, 415, "unsupported_media_type", NULL,
                          "request bodies must be 'Content-Type: application/json'%s%s", ct ? ", got " : "",
                          ct ? ct : "");
            return;
        }
    }
}

/* Answers that need no worker (in-memory only). */
static int answer_inline(kvl_req *r) {
    kvl_http_server *s = r->srv;
    switch (r->route) {
    case KVL_R_HEALTHZ:
        kvl_req_json(r, 200, json_pack("{s:s}", "status", "ok"));
        return 1;
    case KVL_R_READYZ:
        if (atomic_load(&s->draining))
            kvl_req_error(r, 503, "shutting_down", NULL, "the server is draining");
        else
            kvl_req_json(r, 200, json_pack("{s:s,s:s,s:s}", "status", "ready", "model", s->fingerprint_hex,
                                           "backend", kvl_model_backend_name(s->model)));
        return 1;
    default:
        return 0;
    }
}

static void job_run(void *arg) {
    kvl_req *r = arg;
    kvl_http_server *s = r->srv;
    double waited = kvl_now_ms() - r->t_start;
    if (waited > s->cfg.limits.request_timeout_ms) {
        atomic_fetch_add(&s->metrics.timeouts, 1);
        strcpy(r->retry_after, "1");
        kvl_req_error(r, 503, "request_timeout",
                      json_pack("{s:s,s:i}", "limit", "request_timeout_ms", "max", s->cfg.limits.request_timeout_ms),
                      "the request waited %.0f ms for a worker, past the limit of %d ms", waited,
                      s->cfg.limits.request_timeout_ms);
    } else {
        kvl_clear_error();
        kvl_handle_request(r);
    }
    atomic_fetch_sub(&s->queued, 1);
    atomic_fetch_sub(&s->metrics.inflight, 1);
    r->state = 3;
    /* after this call the MHD thread may queue the response and free r: touch nothing */
    MHD_resume_connection(r->conn);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
    (void)version;
    kvl_http_server *s = ((kvl_http_server **)cls)[0];
    kvl_listener l = (kvl_http_server **)cls == &s->ctx_api ? KVL_L_API : KVL_L_ADMIN;
    kvl_req *r = *con_cls;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r) return MHD_NO;
        r->srv = s;
        r->conn = conn;
        r->listener = l;
        r->t_start = kvl_now_ms();
        r->route = KVL_R_OTHER;
        atomic_fetch_add(&s->open_requests, 1);
        *con_cls = r;
        early_checks(r, method, url);
        if (r->resp) return queue_response(r);
        return MHD_YES;
    }
    if (r->queued) { /* answered early (e.g. 413 at the headers): drop what the client still sends */
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (r->state == 3) return queue_response(r);
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (r->body_too_large) return MHD_YES; /* keep reading and dropping; answer at the end */
        if (r->body_len + n > s->cfg.limits.max_body_bytes) {
            r->body_too_large = 1;
            free(r->body);
            r->body = NULL;
            r->body_len = r->body_cap = 0;
            return MHD_YES;
        }
        if (r->body_len + n + 1 > r->body_cap) {
            size_t cap = r->body_cap ? r->body_cap : 4096;
            while (cap < r->body_len + n + 1) cap *= 2;
            char *nb = realloc(r->body, cap);
            if (!nb) return MHD_NO;
            r->body = nb;
            r->body_cap = cap;
        }
        memcpy(r->body + r->body_len, upload_data, n);
        r->body_len += n;
        r->body[r->body_len] = 0;
        r->state = 1;
        return MHD_YES;
    }
    /* the whole request is in */
    if (r->state == 2) return MHD_YES;
    if (r->body_too_large) {
        kvl_req_error(r, 413, "payload_too_large",
                      json_pack("{s:s,s:I}", "limit", "body_bytes", "max", (json_int_t)s->cfg.limits.max_body_bytes),
                      "request body exceeds the limit of %zu bytes", s->cfg.limits.max_body_bytes);
        return queue_response(r);
    }
    if (answer_inline(r)) return queue_response(r);
    if (atomic_fetch_add(&s->queued, 1) >= s->cfg.limits.max_concurrent) {
        atomic_fetch_sub(&s->queued, 1);
        atomic_fetch_add(&s->metrics.rejected_busy, 1);
        strcpy(r->retry_after, "1");
        kvl_req_error(r, 429, "too_many_requests",
                      json_pack("{s:s,s:i}", "limit", "concurrent_requests", "max", s->cfg.limits.max_concurrent),
                      "%d requests are already queued or running", s->cfg.limits.max_concurrent);
        return queue_response(r);
    }
    atomic_fetch_add(&s->metrics.inflight, 1);
    r->state = 2;
    r->job.fn = job_run;
    r->job.arg = r;
    /* suspend before the worker can possibly resume */
    MHD_suspend_connection(conn);
    kvl_workers_submit(r->listener == KVL_L_ADMIN ? &s->admin_workers : &s->workers, &r->job);
    return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)conn;
    (void)toe;
    kvl_http_server *s = ((kvl_http_server **)cls)[0];
    kvl_req *r = *con_cls;
    if (!r) return;
    kvl_metrics_request(&s->metrics, r->route, r->status, kvl_now_ms() - r->t_start);
    free(r->body);
    free(r->resp);
    free(r);
    *con_cls = NULL;
    atomic_fetch_sub(&s->open_requests, 1);
}

/* ---------------------------------------------------------------- addresses */

typedef struct addr {
    struct sockaddr_storage ss;
    int v6;
    int loopback;
} addr;

static kvl_status parse_addr(const char *spec, addr *out) {
    memset(out, 0, sizeof *out);
    char host[256];
    const char *colon = strrchr(spec, ':');
    if (!colon || colon == spec) return kvl_errorf(KVL_ERR_INVALID_ARG, "address '%s' is not HOST:PORT", spec);
    size_t hl = (size_t)(colon - spec);
    if (hl >= sizeof host) return kvl_errorf(KVL_ERR_INVALID_ARG, "address '%s': host too long", spec);
    memcpy(host, spec, hl);
    host[hl] = 0;
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || port < 0 || port > 65535)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "address '%s': port must be 0..65535", spec);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
    int e = getaddrinfo(host, colon + 1, &hints, &res);
    if (e != 0 || !res) return kvl_errorf(KVL_ERR_INVALID_ARG, "address '%s': %s", spec, gai_strerror(e));
    memcpy(&out->ss, res->ai_addr, res->ai_addrlen);
    out->v6 = res->ai_family == AF_INET6;
    freeaddrinfo(res);
    if (out->v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&out->ss;
        out->loopback = IN6_IS_ADDR_LOOPBACK(&a->sin6_addr);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&out->ss;
        out->loopback = (ntohl(a->sin_addr.s_addr) >> 24) == 127;
    }
    return KVL_OK;
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    fprintf(stderr, "kvloomd: libmicrohttpd: ");
    vfprintf(stderr, fmt, ap);
}

static kvl_status start_listener(kvl_http_server *s, const char *spec, kvl_http_server **ctx,
                                 struct MHD_Daemon **out, int *port) {
    addr a;
    KVL_TRY(parse_addr(spec, &a));
    unsigned int flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (a.v6) flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, ctx, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&a.ss,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)(s->cfg.http_threads > 0 ? s->cfg.http_threads : 2),
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, ctx, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)120,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned int)1000, MHD_OPTION_END);
    if (!d) return kvl_errorf(KVL_ERR_IO, "cannot listen on %s (address in use or not available)", spec);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    *port = info ? info->port : 0;
    *out = d;
    return KVL_OK;
}

/* ---------------------------------------------------------------- lifecycle */

static char *dupstr(const char *s) { return s ? strdup(s) : NULL; }

kvl_status kvl_http_server_create(const kvl_http_config *cfg, kvl_http_server **out) {
    *out = NULL;
    if (!cfg || !cfg->model_path || !cfg->store_dir || !cfg->listen || !cfg->admin_listen)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "model, store, listen and admin-listen are required");
    addr a, b;
    KVL_TRY(parse_addr(cfg->listen, &a));
    KVL_TRY(parse_addr(cfg->admin_listen, &b));
    if (!cfg->auth_file && (!a.loopback || !b.loopback))
        return kvl_errorf(KVL_ERR_INVALID_ARG,
                          "without --auth the server only listens on loopback addresses (127.0.0.1, ::1); "
                          "give --auth FILE to listen on %s", !a.loopback ? cfg->listen : cfg->admin_listen);
    if (cfg->load_costs) {
        if (!cfg->load_controller)
            return kvl_errorf(KVL_ERR_INVALID_ARG, "load costs given with the load controller off: they would not be used");
        kvl_load_est e;
        kvl_load_est_init(&e, 0);
        KVL_TRY(kvl_load_costs_parse(cfg->load_costs, &e));
    }
    kvl_http_server *s = calloc(1, sizeof *s);
    if (!s) return KVL_ERR_NOMEM;
    s->cfg = *cfg;
    s->ctx_api = s->ctx_admin = s;
    s->model_path = dupstr(cfg->model_path);
    s->store_dir = dupstr(cfg->store_dir);
    s->listen = dupstr(cfg->listen);
    s->admin_listen = dupstr(cfg->admin_listen);
    s->cfg.model_path = s->model_path;
    s->cfg.store_dir = s->store_dir;
    s->cfg.listen = s->listen;
    s->cfg.admin_listen = s->admin_listen;
    s->cfg.auth_file = NULL;
    kvl_metrics_init(&s->metrics);
    pthread_mutex_init(&s->catalog_mu, NULL);
    s->started_ms = kvl_now_ms();
    kvl_status st = KVL_OK;
    if (cfg->auth_file && (st = kvl_auth_load(cfg->auth_file, &s->auth)) != KVL_OK) goto fail;
    if (mkdir(s->store_dir, 0755) != 0 && errno != EEXIST) {
        st = kvl_errorf(KVL_ERR_IO, "store directory %s: %s", s->store_dir, strerror(errno));
        goto fail;
    }
    snprintf(s->docs_dir, sizeof s->docs_dir, "%s/docs", s->store_dir);
    if (mkdir(s->docs_dir, 0755) != 0 && errno != EEXIST) {
        st = kvl_errorf(KVL_ERR_IO, "%s: %s", s->docs_dir, strerror(errno));
        goto fail;
    }
    kvl_model_opts mo = kvl_model_opts_default();
    if (cfg->gpu >= 0) {
        mo.backend = KVL_BACKEND_CUDA;
        mo.gpu = cfg->gpu;
        mo.weight_dtype = KVL_WDTYPE_BF16;
    }
    if ((st = kvl_model_load(cfg->model_path, &mo, &s->model)) != KVL_OK) goto fail;
    char tpath[4096];
    if ((st = kvl_tokenizer_find(cfg->model_path, tpath, sizeof tpath)) != KVL_OK) goto fail;
    if ((st = kvl_tokenizer_load(tpath, kvl_model_get_config(s->model)->vocab_size, &s->tok)) != KVL_OK) goto fail;
    memcpy(s->fingerprint, kvl_model_fingerprint(s->model), 32);
    kvl_model_fingerprint_hex(s->model, s->fingerprint_hex);
    st = kvl_svc_backend_open(s);
    s->cfg.load_costs = NULL; /* borrowed for create: parsed by the backend */
    if (st != KVL_OK) goto fail;
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    snprintf(s->describe, sizeof s->describe,
             "model %s (%d layers, max_seq %d, %s backend, fingerprint %.16s), store %s, %s%s tenants",
             cfg->model_path, mc->n_layers, mc->max_seq, kvl_model_backend_name(s->model), s->fingerprint_hex,
             s->store_dir, kvl_svc_backend_describe(s), s->auth.enabled ? ", token auth" : ", no auth: default");
    *out = s;
    return KVL_OK;
fail:
    kvl_http_server_free(s);
    return st;
}

kvl_status kvl_http_server_start(kvl_http_server *s) {
    KVL_TRY(kvl_workers_start(&s->workers, s->cfg.workers > 0 ? s->cfg.workers : 2));
    s->workers_started = 1;
    KVL_TRY(kvl_workers_start(&s->admin_workers, 1));
    s->admin_workers_started = 1;
    KVL_TRY(start_listener(s, s->listen, &s->ctx_api, &s->d_api, &s->port_api));
    KVL_TRY(start_listener(s, s->admin_listen, &s->ctx_admin, &s->d_admin, &s->port_admin));
    return KVL_OK;
}

int kvl_http_server_port(const kvl_http_server *s, int admin) { return admin ? s->port_admin : s->port_api; }

const char *kvl_http_server_describe(const kvl_http_server *s) { return s->describe; }

int kvl_http_server_drain(kvl_http_server *s, int timeout_ms) {
    atomic_store(&s->draining, 1);
    struct MHD_Daemon *ds[2] = {s->d_api, s->d_admin};
    for (int i = 0; i < 2; i++) {
        if (!ds[i]) continue;
        MHD_socket fd = MHD_quiesce_daemon(ds[i]);
        if (fd != MHD_INVALID_SOCKET) close(fd);
    }
    double end = kvl_now_ms() + timeout_ms;
    while (atomic_load(&s->open_requests) > 0 && kvl_now_ms() < end) usleep(5000);
    return (int)atomic_load(&s->open_requests);
}

void kvl_http_server_free(kvl_http_server *s) {
    if (!s) return;
    /* workers first: they finish their jobs and resume every suspended connection, which
     * MHD_stop_daemon requires */
    if (s->workers_started) kvl_workers_stop(&s->workers);
    if (s->admin_workers_started) kvl_workers_stop(&s->admin_workers);
    if (s->d_api) MHD_stop_daemon(s->d_api);
    if (s->d_admin) MHD_stop_daemon(s->d_admin);
    kvl_svc_backend_close(s);
    kvl_tokenizer_free(s->tok);
    kvl_model_free(s->model);
    kvl_auth_free(&s->auth);
    kvl_metrics_destroy(&s->metrics);
    pthread_mutex_destroy(&s->catalog_mu);
    free(s->model_path);
    free(s->store_dir);
    free(s->listen);
    free(s->admin_listen);
    free(s);
}
