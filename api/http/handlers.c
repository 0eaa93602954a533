/* Request handlers: run on a worker thread; parse and check the JSON body strictly, do the work,
 * fill the response. Every failure becomes {"error": {"code", "message", ...}} with a 4xx/5xx. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "http_impl.h"

/* ---------------------------------------------------------------- strict JSON helpers */

/* Parses the body as a JSON object. Returns NULL after setting the error response. */
static json_t *parse_object(kvl_req *r, int allow_empty) {
    if (!r->body || r->body_len == 0) {
        if (allow_empty) return json_object();
        kvl_req_error(r, 400, "invalid_json", NULL, "the request needs a JSON object body");
        return NULL;
    }
    json_error_t je;
    json_t *j = json_loadb(r->body, r->body_len, JSON_REJECT_DUPLICATES, &je);
    if (!j) {
        kvl_req_error(r, 400, "invalid_json", json_pack("{s:i,s:i}", "line", je.line, "column", je.column),
                      "malformed JSON: %s", je.text);
        return NULL;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        kvl_req_error(r, 400, "invalid_json", NULL, "the body must be a JSON object");
        return NULL;
    }
    return j;
}

static int check_fields(kvl_req *r, json_t *o, const char *const *allowed) {
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        int ok = 0;
        for (const char *const *a = allowed; *a; a++)
            if (!strcmp(k, *a)) ok = 1;
        if (!ok) {
            kvl_req_error(r, 400, "unknown_field", json_pack("{s:s}", "field", k), "unknown field '%s'", k);
            return -1;
        }
    }
    return 0;
}

static int bad_field(kvl_req *r, const char *field, const char *fmt, const char *detail) {
    kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", field), fmt, field, detail);
    return -1;
}

/* Optional integer in [lo, hi]. */
static int get_int(kvl_req *r, json_t *o, const char *name, int64_t lo, int64_t hi, int64_t def, int64_t *out) {
    json_t *v = json_object_get(o, name);
    *out = def;
    if (!v) return 0;
    if (!json_is_integer(v)) return bad_field(r, name, "'%s' must be an integer%s", "");
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s,s:I,s:I}", "field", name, "min", (json_int_t)lo, "max", (json_int_t)hi),
                      "'%s' must be in [%lld, %lld], got %lld", name, (long long)lo, (long long)hi, (long long)x);
        return -1;
    }
    *out = x;
    return 0;
}

static int get_num(kvl_req *r, json_t *o, const char *name, double lo, double hi, double def, double *out) {
    json_t *v = json_object_get(o, name);
    *out = def;
    if (!v) return 0;
    if (!json_is_number(v)) return bad_field(r, name, "'%s' must be a number%s", "");
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s,s:f,s:f}", "field", name, "min", lo, "max", hi),
                      "'%s' must be in [%g, %g], got %g", name, lo, hi, x);
        return -1;
    }
    *out = x;
    return 0;
}

/* Optional string; *out NULL when absent. */
static int get_str(kvl_req *r, json_t *o, const char *name, const char **out) {
    json_t *v = json_object_get(o, name);
    *out = NULL;
    if (!v) return 0;
    if (!json_is_string(v)) return bad_field(r, name, "'%s' must be a string%s", "");
    *out = json_string_value(v);
    return 0;
}

static int limit_error(kvl_req *r, const char *limit, int64_t max, const char *fmt, long long got) {
    kvl_req_error(r, 413, "payload_too_large", json_pack("{s:s,s:I}", "limit", limit, "max", (json_int_t)max), fmt,
                  got, (long long)max);
    return -1;
}

/* Token array: every element an integer id in the vocabulary; at most max_tokens. */
static int get_tokens(kvl_req *r, json_t *v, const char *name, int32_t **out, int32_t *n) {
    kvl_http_server *s = r->srv;
    *out = NULL;
    *n = 0;
    if (!json_is_array(v)) return bad_field(r, name, "'%s' must be an array of token ids%s", "");
    size_t len = json_array_size(v);
    if (len > (size_t)s->cfg.limits.max_tokens)
        return limit_error(r, "tokens", s->cfg.limits.max_tokens, "%lld tokens exceed the limit of %lld per request",
                           (long long)len);
    int32_t vocab = kvl_model_get_config(s->model)->vocab_size;
    int32_t *t = malloc((len ? len : 1) * sizeof *t);
    if (!t) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        return -1;
    }
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
        if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= vocab) {
            free(t);
            kvl_req_error(r, 400, "invalid_field", json_pack("{s:s,s:I,s:i}", "field", name, "index", (json_int_t)i, "vocab_size", vocab),
                          "'%s'[%zu] must be a token id in [0, %d)", name, i, vocab);
            return -1;
        }
        t[i] = (int32_t)json_integer_value(e);
    }
    *out = t;
    *n = (int32_t)len;
    return 0;
}

/* Tokenizes text (no BOS: prompts get one BOS in front of everything). */
static int tokenize(kvl_req *r, const char *text, const char *name, int32_t **out, int32_t *n) {
    kvl_http_server *s = r->srv;
    *out = NULL;
    *n = 0;
    size_t len = strlen(text);
    /* llama2.c encoding yields at most one token per byte (+ the leading space) */
    size_t cap = len + 3;
    int32_t *t = malloc(cap * sizeof *t);
    if (!t) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        return -1;
    }
    int32_t k = 0;
    kvl_status st = kvl_tokenizer_encode(s->tok, text, 0, t, (int32_t)cap, &k);
    if (st != KVL_OK) {
        free(t);
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", name), "'%s' cannot be tokenized: %s", name,
                      kvl_last_error());
        return -1;
    }
    if (k > s->cfg.limits.max_tokens) {
        free(t);
        return limit_error(r, "tokens", s->cfg.limits.max_tokens, "%lld tokens exceed the limit of %lld per request",
                           (long long)k);
    }
    *out = t;
    *n = k;
    return 0;
}

static int past_deadline(kvl_req *r) {
    return kvl_now_ms() - r->t_start > r->srv->cfg.limits.request_timeout_ms;
}

static void timeout_error(kvl_req *r, const char *what) {
    atomic_fetch_add(&r->srv->metrics.timeouts, 1);
    kvl_req_error(r, 504, "request_timeout",
                  json_pack("{s:s,s:i}", "limit", "request_timeout_ms", "max", r->srv->cfg.limits.request_timeout_ms),
                  "%s ran past the request time limit of %d ms", what, r->srv->cfg.limits.request_timeout_ms);
}

/* Maps an internal failure to an HTTP error. */
static void status_error(kvl_req *r, kvl_status st) {
    const char *d = kvl_last_error();
    switch (st) {
    case KVL_ERR_KEY_NOT_FOUND: kvl_req_error(r, 404, "not_found", NULL, "%s", d); break;
    case KVL_ERR_CONTEXT_FULL:
    case KVL_ERR_POSITION_RANGE:
        kvl_req_error(r, 413, "payload_too_large",
                      json_pack("{s:s,s:i}", "limit", "context", "max", kvl_model_get_config(r->srv->model)->max_seq), "%s", d);
        break;
    case KVL_ERR_UNSUPPORTED: kvl_req_error(r, 501, "not_implemented", NULL, "%s", d); break;
    case KVL_ERR_TIMEOUT: timeout_error(r, "the request"); break;
    case KVL_ERR_STORE_FULL:
    case KVL_ERR_QUOTA:
    case KVL_ERR_NOSPC: kvl_req_error(r, 507, "insufficient_storage", NULL, "%s: %s", kvl_status_str(st), d); break;
    case KVL_ERR_TOKEN_RANGE:
    case KVL_ERR_INVALID_ARG:
    case KVL_ERR_BLEND_PLAN: kvl_req_error(r, 400, "invalid_request", NULL, "%s: %s", kvl_status_str(st), d); break;
    default: kvl_req_error(r, 500, "internal", NULL, "%s: %s", kvl_status_str(st), d); break;
    }
}

/* The document id of a /v1/documents/{id} path, validated. */
static const char *path_doc_id(kvl_req *r) {
    const char *id = r->path + strlen("/v1/documents/");
    if (!kvl_name_ok(id, 128)) {
        kvl_req_error(r, 404, "not_found", NULL, "no document '%.140s' (ids are 1-128 characters of [A-Za-z0-9._-])", id);
        return NULL;
    }
    return id;
}

static json_t *timing_json(const kvl_svc_timing *t, double ttft, double total) {
    json_t *j = json_pack("{s:f,s:f,s:f,s:f,s:f}", "lookup_ms", t->lookup_ms, "read_ms", t->read_ms, "decode_ms",
                          t->decode_ms, "recompute_ms", t->recompute_ms, "total_ms", total);
    if (ttft >= 0) json_object_set_new(j, "ttft_ms", json_real(ttft));
    return j;
}

static json_t *stats_json(const kvl_svc_stats *st) {
    return json_pack("{s:i,s:i,s:i,s:i,s:i,s:i,s:I}", "prompt_tokens", st->prompt_tokens, "cached_tokens",
                     st->cached_tokens, "recomputed_tokens", st->recomputed_tokens, "chunks_hit", st->chunks_hit,
                     "chunks_missed", st->chunks_missed, "chunks_recomputed", st->chunks_recomputed, "bytes_read",
                     (json_int_t)st->bytes_read);
}

/* ---------------------------------------------------------------- POST /v1/documents */

static void docs_post(kvl_req *r) {
    static const char *const fields[] = {"text", "tokens", "chunk_tokens", "doc_id", NULL};
    kvl_http_server *s = r->srv;
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    json_t *o = parse_object(r, 0);
    if (!o) return;
    int32_t *toks = NULL, n = 0;
    kvl_doc *d = NULL;
    json_t *chunks_out = NULL;
    kvl_svc_seg *segs = NULL;
    int *stored = NULL;
    const char *text = NULL, *doc_id = NULL;
    int64_t ct;
    if (check_fields(r, o, fields) || get_str(r, o, "text", &text) || get_str(r, o, "doc_id", &doc_id)) goto done;
    int32_t max_chunk = mc->max_seq - 2; /* BOS in front, one query token after */
    if (get_int(r, o, "chunk_tokens", 1, max_chunk, max_chunk < 256 ? max_chunk : 256, &ct)) goto done;
    json_t *jt = json_object_get(o, "tokens");
    if ((text != NULL) == (jt != NULL)) {
        kvl_req_error(r, 400, "invalid_request", NULL, "give exactly one of 'text' and 'tokens'");
        goto done;
    }
    if (doc_id && !kvl_name_ok(doc_id, 128)) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", "doc_id"),
                      "'doc_id' must be 1-128 characters of [A-Za-z0-9._-]");
        goto done;
    }
    if (text ? tokenize(r, text, "text", &toks, &n) : get_tokens(r, jt, "tokens", &toks, &n)) goto done;
    if (n == 0) {
        kvl_req_error(r, 400, "invalid_request", NULL, "the document has no tokens");
        goto done;
    }
    int64_t n_chunks = (n + ct - 1) / ct;
    if (n_chunks > s->cfg.limits.max_chunks) {
        limit_error(r, "chunks", s->cfg.limits.max_chunks, "%lld chunks exceed the limit of %lld per request",
                    (long long)n_chunks);
        goto done;
    }
    uint8_t root[32];
    kvl_svc_root(s, r->tenant, root);
    d = calloc(1, sizeof *d);
    if (!d || !(d->chunks = calloc((size_t)n_chunks, sizeof *d->chunks))) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        goto done;
    }
    strcpy(d->tenant, r->tenant);
    if (doc_id) {
        strcpy(d->doc_id, doc_id);
    } else { /* content-derived id: the same text ingested twice is the same document */
        char hex[65];
        kvl_svc_chunk_key(root, toks, n, hex);
        snprintf(d->doc_id, sizeof d->doc_id, "doc-%.16s", hex);
    }
    d->chunk_tokens = (int32_t)ct;
    d->created_unix = (int64_t)time(NULL);
    kvl_svc_timing tm = {0};
    segs = calloc((size_t)n_chunks, sizeof *segs);
    stored = calloc((size_t)n_chunks, sizeof *stored);
    if (!segs || !stored) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        goto done;
    }
    for (int64_t c = 0; c < n_chunks; c++) {
        int32_t off = (int32_t)(c * ct), len = (int32_t)(n - off < ct ? n - off : ct);
        kvl_doc_chunk *dc = &d->chunks[d->n_chunks++];
        dc->n_tokens = len;
        dc->tokens = malloc((size_t)len * sizeof *dc->tokens);
        if (!dc->tokens) {
            kvl_req_error(r, 500, "internal", NULL, "out of memory");
            goto done;
        }
        memcpy(dc->tokens, toks + off, (size_t)len * sizeof *dc->tokens);
        kvl_svc_chunk_key(root, dc->tokens, len, dc->key);
        strcpy(segs[c].key, dc->key);
        segs[c].tokens = dc->tokens;
        segs[c].n = len;
    }
    kvl_status ist = kvl_svc_ingest(s, r->tenant, segs, (int32_t)n_chunks, stored,
                                    r->t_start + s->cfg.limits.request_timeout_ms, &tm);
    if (ist == KVL_ERR_TIMEOUT) {
        timeout_error(r, "the ingest");
        goto done;
    }
    if (ist != KVL_OK) {
        status_error(r, ist);
        goto done;
    }
    chunks_out = json_array();
    for (int64_t c = 0; c < n_chunks; c++)
        json_array_append_new(chunks_out, json_pack("{s:s,s:i,s:b}", "key", segs[c].key, "tokens", segs[c].n, "cached",
                                                    stored[c]));
    kvl_status st = kvl_catalog_put(s->docs_dir, d);
    if (st != KVL_OK) {
        status_error(r, st);
        goto done;
    }
    atomic_fetch_add(&s->metrics.ingested_docs, 1);
    atomic_fetch_add(&s->metrics.ingested_chunks, (uint64_t)n_chunks);
    atomic_fetch_add(&s->metrics.ingested_tokens, (uint64_t)n);
    kvl_req_json(r, 201,
                 json_pack("{s:s,s:i,s:i,s:O,s:{s:f,s:f,s:f,s:f}}", "doc_id", d->doc_id, "tokens", n, "chunk_tokens",
                           (int)ct, "chunks", chunks_out, "timing", "prefill_ms", tm.recompute_ms, "encode_ms",
                           tm.encode_ms, "write_ms", tm.write_ms, "total_ms", kvl_now_ms() - r->t_start));
done:
    free(segs);
    free(stored);
    json_decref(chunks_out);
    kvl_doc_free(d);
    free(toks);
    json_decref(o);
}

/* ---------------------------------------------------------------- GET / DELETE /v1/documents/{id} */

static void docs_get(kvl_req *r) {
    const char *id = path_doc_id(r);
    if (!id) return;
    kvl_doc *d = NULL;
    kvl_status st = kvl_catalog_get(r->srv->docs_dir, r->tenant, id, &d);
    if (st != KVL_OK) {
        status_error(r, st);
        return;
    }
    json_t *chunks = json_array();
    int32_t total = 0;
    for (int32_t i = 0; i < d->n_chunks; i++) {
        json_array_append_new(chunks, json_pack("{s:s,s:i,s:b}", "key", d->chunks[i].key, "tokens", d->chunks[i].n_tokens,
                                                "cached", kvl_svc_chunk_cached(r->srv, r->tenant, d->chunks[i].key)));
        total += d->chunks[i].n_tokens;
    }
    kvl_req_json(r, 200, json_pack("{s:s,s:i,s:i,s:I,s:o}", "doc_id", d->doc_id, "tokens", total, "chunk_tokens",
                                   d->chunk_tokens, "created", (json_int_t)d->created_unix, "chunks", chunks));
    kvl_doc_free(d);
}

static void docs_delete(kvl_req *r) {
    const char *id = path_doc_id(r);
    if (!id) return;
    kvl_doc *d = NULL;
    kvl_status st = kvl_catalog_get(r->srv->docs_dir, r->tenant, id, &d);
    if (st == KVL_OK) st = kvl_catalog_delete(r->srv->docs_dir, r->tenant, id);
    if (st != KVL_OK) {
        kvl_doc_free(d);
        status_error(r, st);
        return;
    }
    /* the chunk caches go too (another document with the same chunk recomputes it on its next use) */
    int deleted = 0;
    for (int32_t i = 0; i < d->n_chunks; i++) {
        kvl_status c = kvl_svc_chunk_delete(r->srv, r->tenant, d->chunks[i].key);
        if (c == KVL_OK) deleted++;
        else if (c != KVL_ERR_KEY_NOT_FOUND)
            fprintf(stderr, "kvloomd: document %s: chunk %s not deleted: %s: %s\n", id, d->chunks[i].key,
                    kvl_status_str(c), kvl_last_error());
    }
    kvl_doc_free(d);
    kvl_req_json(r, 200, json_pack("{s:s,s:b,s:i}", "doc_id", id, "deleted", 1, "chunks_deleted", deleted));
}

/* ---------------------------------------------------------------- generate / context */

typedef struct prompt_req {
    kvl_svc_seg *segs;
    int32_t n_segs;
    kvl_doc **docs;
    int32_t n_docs;
    int32_t **owned;      /* token arrays of chunks given by key */
    int32_t *query;
    int32_t n_query;
    const char *mode;
    double ratio;
} prompt_req;

static void prompt_free(prompt_req *p) {
    for (int32_t i = 0; i < p->n_docs; i++) kvl_doc_free(p->docs[i]);
    for (int32_t i = 0; i < p->n_segs; i++) free(p->owned ? p->owned[i] : NULL);
    free(p->owned);
    free(p->docs);
    free(p->segs);
    free(p->query);
}

/* Reads chunks / documents / query / mode / recompute_ratio into p (the fields common to generate
 * and context). */
static int parse_prompt(kvl_req *r, json_t *o, prompt_req *p) {
    kvl_http_server *s = r->srv;
    memset(p, 0, sizeof *p);
    json_t *jc = json_object_get(o, "chunks"), *jd = json_object_get(o, "documents");
    if (jc && !json_is_array(jc)) return bad_field(r, "chunks", "'%s' must be an array of chunk keys%s", "");
    if (jd && !json_is_array(jd)) return bad_field(r, "documents", "'%s' must be an array of document ids%s", "");
    if (get_str(r, o, "mode", &p->mode)) return -1;
    if (!p->mode) p->mode = "blend";
    if (strcmp(p->mode, "blend") && strcmp(p->mode, "full") && strcmp(p->mode, "naive") && strcmp(p->mode, "prefix")) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", "mode"),
                      "'mode' must be one of blend, prefix, naive, full");
        return -1;
    }
    if (get_num(r, o, "recompute_ratio", 0, 1, 0.15, &p->ratio)) return -1;
    size_t nd = jd ? json_array_size(jd) : 0, nc = jc ? json_array_size(jc) : 0;
    if (nd + nc > (size_t)s->cfg.limits.max_chunks)
        return limit_error(r, "chunks", s->cfg.limits.max_chunks, "%lld chunks/documents exceed the limit of %lld",
                           (long long)(nd + nc));
    p->docs = calloc(nd + 1, sizeof *p->docs);
    if (!p->docs) return kvl_req_error(r, 500, "internal", NULL, "out of memory"), -1;
    int64_t total_chunks = (int64_t)nc;
    for (size_t i = 0; i < nd; i++) {
        json_t *e = json_array_get(jd, i);
        if (!json_is_string(e)) return bad_field(r, "documents", "'%s' must be an array of document ids%s", "");
        const char *id = json_string_value(e);
        if (!kvl_name_ok(id, 128)) {
            kvl_req_error(r, 404, "not_found", json_pack("{s:s}", "field", "documents"), "no document '%.140s'", id);
            return -1;
        }
        kvl_status st = kvl_catalog_get(s->docs_dir, r->tenant, id, &p->docs[p->n_docs]);
        if (st != KVL_OK) {
            status_error(r, st);
            return -1;
        }
        total_chunks += p->docs[p->n_docs++]->n_chunks;
    }
    if (total_chunks > s->cfg.limits.max_chunks)
        return limit_error(r, "chunks", s->cfg.limits.max_chunks, "%lld chunks exceed the limit of %lld per request",
                           (long long)total_chunks);
    p->segs = calloc((size_t)total_chunks + 1, sizeof *p->segs);
    p->owned = calloc((size_t)total_chunks + 1, sizeof *p->owned);
    if (!p->segs || !p->owned) return kvl_req_error(r, 500, "internal", NULL, "out of memory"), -1;
    /* documents first (each in its chunk order), then the explicit chunks */
    for (int32_t i = 0; i < p->n_docs; i++)
        for (int32_t c = 0; c < p->docs[i]->n_chunks; c++) {
            kvl_svc_seg *sg = &p->segs[p->n_segs++];
            strcpy(sg->key, p->docs[i]->chunks[c].key);
            sg->tokens = p->docs[i]->chunks[c].tokens;
            sg->n = p->docs[i]->chunks[c].n_tokens;
        }
    for (size_t i = 0; i < nc; i++) {
        json_t *e = json_array_get(jc, i);
        const char *k = json_is_string(e) ? json_string_value(e) : NULL;
        if (!k) return bad_field(r, "chunks", "'%s' must be an array of chunk keys%s", "");
        int hex = strlen(k) == 64;
        for (const char *q = k; hex && *q; q++) hex = (*q >= '0' && *q <= '9') || (*q >= 'a' && *q <= 'f');
        if (!hex) {
            kvl_req_error(r, 400, "invalid_field", json_pack("{s:s,s:i}", "field", "chunks", "index", (int)i),
                          "chunk keys are 64 lowercase hex characters");
            return -1;
        }
        kvl_svc_seg *sg = &p->segs[p->n_segs];
        strcpy(sg->key, k);
        int32_t *t = NULL, n = 0;
        kvl_status st = kvl_svc_chunk_tokens(s, r->tenant, k, &t, &n);
        if (st != KVL_OK) {
            status_error(r, st);
            return -1;
        }
        p->owned[p->n_segs] = t;
        sg->tokens = t;
        sg->n = n;
        p->n_segs++;
    }
    const char *q = NULL;
    if (get_str(r, o, "query", &q)) return -1;
    json_t *jq = json_object_get(o, "query_tokens");
    if ((q != NULL) == (jq != NULL)) {
        kvl_req_error(r, 400, "invalid_request", NULL, "give exactly one of 'query' and 'query_tokens'");
        return -1;
    }
    if (q ? tokenize(r, q, "query", &p->query, &p->n_query) : get_tokens(r, jq, "query_tokens", &p->query, &p->n_query))
        return -1;
    if (p->n_query == 0) {
        kvl_req_error(r, 400, "invalid_request", NULL, "the query has no tokens");
        return -1;
    }
    int64_t total = p->n_query;
    for (int32_t i = 0; i < p->n_segs; i++) total += p->segs[i].n;
    if (total > s->cfg.limits.max_tokens)
        return limit_error(r, "tokens", s->cfg.limits.max_tokens, "a prompt of %lld tokens exceeds the limit of %lld",
                           (long long)total);
    return 0;
}

static uint64_t rng_seed(int64_t seed) {
    /* xorshift needs a nonzero state; splitmix the seed so nearby seeds diverge at once */
    uint64_t z = (uint64_t)seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z ? z : 1;
}

static void generate(kvl_req *r) {
    static const char *const fields[] = {"chunks", "documents", "query", "query_tokens", "mode", "recompute_ratio",
                                         "max_tokens", "temperature", "seed", NULL};
    kvl_http_server *s = r->srv;
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    json_t *o = parse_object(r, 0);
    if (!o) return;
    prompt_req p;
    memset(&p, 0, sizeof p);
    int64_t max_new, seed;
    double temp;
    kvl_kv *kv = NULL;
    int32_t *prompt = NULL, n_prompt = 0, *out = NULL, *pos = NULL;
    float *logits = NULL;
    if (check_fields(r, o, fields) || get_int(r, o, "max_tokens", 0, INT32_MAX, 32, &max_new) ||
        get_num(r, o, "temperature", 0, 100, 0, &temp) || get_int(r, o, "seed", 0, INT64_MAX, 0, &seed))
        goto done;
    if (max_new > s->cfg.limits.max_new_tokens) {
        limit_error(r, "max_tokens", s->cfg.limits.max_new_tokens, "max_tokens %lld exceeds the limit of %lld",
                    (long long)max_new);
        goto done;
    }
    if (parse_prompt(r, o, &p)) goto done;
    logits = malloc((size_t)mc->vocab_size * sizeof *logits);
    out = malloc((size_t)(max_new + 1) * sizeof *out);
    pos = malloc((size_t)mc->max_seq * sizeof *pos);
    if (!logits || !out || !pos) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        goto done;
    }
    kvl_svc_stats st = {0};
    kvl_svc_timing tm = {0};
    kvl_status e = kvl_svc_prefill(s, r->tenant, p.segs, p.n_segs, p.query, p.n_query, p.mode, p.ratio,
                                   (int32_t)max_new, &kv, &prompt, &n_prompt, logits, &st, &tm);
    if (e != KVL_OK) {
        status_error(r, e);
        goto done;
    }
    uint64_t rng = rng_seed(seed);
    int32_t n_out = 0;
    double ttft = -1;
    int timed_out = 0;
    /* decode: one new slot per step, every earlier slot taken from the fused cache */
    int32_t *toks = malloc((size_t)(n_prompt + max_new + 1) * sizeof *toks);
    uint8_t *compute = calloc((size_t)(n_prompt + max_new + 1), 1);
    if (!toks || !compute) {
        free(toks);
        free(compute);
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        goto done;
    }
    memcpy(toks, prompt, (size_t)n_prompt * sizeof *toks);
    for (int32_t i = 0; i < n_prompt + max_new; i++) pos[i] = i;
    while (n_out < max_new) {
        int32_t t = kvl_sample(logits, mc->vocab_size, (float)temp, &rng);
        if (ttft < 0) ttft = kvl_now_ms() - r->t_start;
        if (t == mc->eos_id || t == mc->bos_id) break;
        out[n_out++] = t;
        if (n_out == max_new) break;
        if (past_deadline(r)) {
            timed_out = 1;
            break;
        }
        int32_t n = n_prompt + n_out;
        toks[n - 1] = t;
        compute[n - 1] = 1;
        int32_t li = n - 1;
        e = kvl_forward(s->model, kv, n, toks, pos, compute, 1, &li, logits);
        compute[n - 1] = 0;
        if (e != KVL_OK) break;
    }
    free(toks);
    free(compute);
    if (timed_out) {
        timeout_error(r, "generation");
        goto done;
    }
    if (e != KVL_OK) {
        status_error(r, e);
        goto done;
    }
    if (ttft >= 0) kvl_metrics_ttft(&s->metrics, ttft);
    atomic_fetch_add(&s->metrics.generated_tokens, (uint64_t)n_out);
    atomic_fetch_add(&s->metrics.chunks_hit, (uint64_t)st.chunks_hit);
    atomic_fetch_add(&s->metrics.chunks_missed, (uint64_t)st.chunks_missed);
    atomic_fetch_add(&s->metrics.chunks_recomputed, (uint64_t)st.chunks_recomputed);
    atomic_fetch_add(&s->metrics.cached_tokens, (uint64_t)st.cached_tokens);
    atomic_fetch_add(&s->metrics.recomputed_tokens, (uint64_t)st.recomputed_tokens);
    atomic_fetch_add(&s->metrics.bytes_read, st.bytes_read);
    size_t cap = (size_t)n_out * 64 + 16;
    char *text = malloc(cap);
    json_t *jt = json_array();
    for (int32_t i = 0; i < n_out; i++) json_array_append_new(jt, json_integer(out[i]));
    if (text) kvl_tokenizer_decode(s->tok, out, n_out, prompt[n_prompt - 1], text, cap);
    json_t *js = json_string(text ? text : "");
    if (!js) { /* byte tokens may leave a UTF-8 sequence unfinished: replace non-ASCII bytes */
        for (char *q = text; *q; q++)
            if ((unsigned char)*q >= 0x80) *q = '?';
        js = json_string(text);
    }
    free(text);
    kvl_req_json(r, 200, json_pack("{s:s,s:o,s:o,s:i,s:o,s:o}", "mode", p.mode, "text", js, "tokens", jt,
                                   "prompt_tokens", n_prompt, "timing", timing_json(&tm, ttft, kvl_now_ms() - r->t_start),
                                   "stats", stats_json(&st)));
done:
    free(logits);
    free(out);
    free(pos);
    free(prompt);
    kvl_kv_free(kv);
    prompt_free(&p);
    json_decref(o);
}

/* POST /v1/context: the fused KV of the prompt (BOS + chunks + query) for another engine.
 * Body: 4-byte little-endian length of a JSON header, the header, then the tensor bytes. */
static void context(kvl_req *r) {
    static const char *const fields[] = {"chunks", "documents", "query", "query_tokens", "mode", "recompute_ratio",
                                         "format", "dtype", NULL};
    kvl_http_server *s = r->srv;
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    json_t *o = parse_object(r, 0);
    if (!o) return;
    prompt_req p;
    memset(&p, 0, sizeof p);
    kvl_kv *kv = NULL;
    int32_t *prompt = NULL, n_prompt = 0;
    float *logits = NULL, *kvf = NULL;
    const char *format = NULL, *dtype = NULL;
    if (check_fields(r, o, fields) || get_str(r, o, "format", &format) || get_str(r, o, "dtype", &dtype)) goto done;
    if (!format) format = "raw";
    if (!dtype) dtype = "f32";
    int cachegen = !strcmp(format, "cachegen");
    if (!cachegen && strcmp(format, "raw") != 0) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", "format"), "'format' must be 'raw' or 'cachegen'");
        goto done;
    }
    int bf16 = !strcmp(dtype, "bf16");
    if (!bf16 && strcmp(dtype, "f32")) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", "dtype"), "'dtype' must be 'f32' or 'bf16'");
        goto done;
    }
    if (parse_prompt(r, o, &p)) goto done;
    logits = malloc((size_t)mc->vocab_size * sizeof *logits);
    if (!logits) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        goto done;
    }
    kvl_svc_stats st = {0};
    kvl_svc_timing tm = {0};
    kvl_status e = kvl_svc_prefill(s, r->tenant, p.segs, p.n_segs, p.query, p.n_query, p.mode, p.ratio, 0, &kv,
                                   &prompt, &n_prompt, logits, &st, &tm);
    if (e != KVL_OK) {
        status_error(r, e);
        goto done;
    }
    size_t elems = (size_t)mc->n_layers * 2 * kvl_model_kv_elems_per_layer(s->model, n_prompt);
    kvf = malloc(elems * sizeof *kvf);
    if (!kvf) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        goto done;
    }
    if ((e = kvl_kv_read(kv, 0, mc->n_layers, 0, n_prompt, kvf)) != KVL_OK) {
        status_error(r, e);
        goto done;
    }
    uint8_t *enc = NULL;
    size_t enc_len = 0;
    if (cachegen) {
        double t0 = kvl_now_ms();
        if ((e = kvl_svc_encode_kv(s, kvf, n_prompt, &enc, &enc_len)) != KVL_OK) {
            status_error(r, e);
            goto done;
        }
        tm.encode_ms += kvl_now_ms() - t0;
    }
    json_t *jt = json_array();
    for (int32_t i = 0; i < n_prompt; i++) json_array_append_new(jt, json_integer(prompt[i]));
    json_t *hdr = json_pack("{s:s,s:s,s:s,s:[i,i,i,i,i],s:o,s:s,s:o,s:o}", "format", format, "dtype", bf16 ? "bf16" : "f32",
                            "layout", "[layer][k|v][token][kv_head][head_dim]", "shape", mc->n_layers, 2, n_prompt,
                            mc->n_kv_heads, mc->head_dim, "tokens", jt, "model", s->fingerprint_hex, "timing",
                            timing_json(&tm, -1, kvl_now_ms() - r->t_start), "stats", stats_json(&st));
    char *h = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    size_t hl = h ? strlen(h) : 0, eb = bf16 ? 2 : 4, payload = cachegen ? enc_len : elems * eb;
    char *body = h ? malloc(4 + hl + payload) : NULL;
    if (!body) {
        free(h);
        free(enc);
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        goto done;
    }
    for (int i = 0; i < 4; i++) body[i] = (char)((hl >> (8 * i)) & 0xff);
    memcpy(body + 4, h, hl);
    free(h);
    if (cachegen) {
        memcpy(body + 4 + hl, enc, enc_len);
        free(enc);
    } else if (bf16) {
        uint16_t *dst = (uint16_t *)(body + 4 + hl);
        for (size_t i = 0; i < elems; i++) {
            uint32_t u;
            memcpy(&u, &kvf[i], 4);
            u += 0x7fff + ((u >> 16) & 1); /* round to nearest even */
            uint16_t v = (uint16_t)(u >> 16);
            memcpy(dst + i, &v, 2);
        }
    } else {
        memcpy(body + 4 + hl, kvf, elems * 4);
    }
    free(r->resp);
    r->resp = body;
    r->resp_len = 4 + hl + payload;
    r->resp_type = "application/octet-stream";
    r->status = 200;
done:
    free(kvf);
    free(logits);
    free(prompt);
    kvl_kv_free(kv);
    prompt_free(&p);
    json_decref(o);
}

/* ---------------------------------------------------------------- chunks */

/* The key of a /v1/chunks/{key}[/kv] path (the router checked 64 lowercase hex characters). */
static void path_key(kvl_req *r, char key[65]) { snprintf(key, 65, "%.64s", r->path + strlen("/v1/chunks/")); }

static void chunk_get(kvl_req *r) {
    char key[65];
    path_key(r, key);
    json_t *j = NULL;
    kvl_status st = kvl_svc_chunk_meta(r->srv, r->tenant, key, &j);
    if (st != KVL_OK) status_error(r, st);
    else kvl_req_json(r, 200, j);
}

static void chunk_kv(kvl_req *r) {
    char key[65];
    path_key(r, key);
    const char *f = r->format[0] ? r->format : "raw";
    int raw = !strcmp(f, "raw");
    if (!raw && strcmp(f, "cachegen")) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", "format"), "format must be 'raw' or 'cachegen'");
        return;
    }
    char *body = NULL;
    size_t len = 0;
    kvl_status st = kvl_svc_chunk_kv(r->srv, r->tenant, key, raw, &body, &len);
    if (st != KVL_OK) {
        status_error(r, st);
        return;
    }
    free(r->resp);
    r->resp = body;
    r->resp_len = len;
    r->resp_type = "application/octet-stream";
    r->status = 200;
}

static void chunk_delete(kvl_req *r) {
    char key[65];
    path_key(r, key);
    kvl_status st = kvl_svc_chunk_delete(r->srv, r->tenant, key);
    if (st != KVL_OK) status_error(r, st);
    else kvl_req_json(r, 200, json_pack("{s:s,s:b}", "key", key, "deleted", 1));
}

/* ---------------------------------------------------------------- admin */

typedef struct tenant_usage {
    json_t *obj; /* tenant -> {documents, chunks, tokens} */
} tenant_usage;

static void count_doc(const kvl_doc *d, void *ctx) {
    tenant_usage *u = ctx;
    json_t *t = json_object_get(u->obj, d->tenant);
    if (!t) {
        t = json_pack("{s:i,s:i,s:i}", "documents", 0, "chunks", 0, "tokens", 0);
        json_object_set_new(u->obj, d->tenant, t);
    }
    int64_t tokens = 0;
    for (int32_t i = 0; i < d->n_chunks; i++) tokens += d->chunks[i].n_tokens;
    json_object_set_new(t, "documents", json_integer(json_integer_value(json_object_get(t, "documents")) + 1));
    json_object_set_new(t, "chunks", json_integer(json_integer_value(json_object_get(t, "chunks")) + d->n_chunks));
    json_object_set_new(t, "tokens", json_integer(json_integer_value(json_object_get(t, "tokens")) + tokens));
}

static void admin_tenants(kvl_req *r) {
    kvl_http_server *s = r->srv;
    tenant_usage u = {json_object()};
    kvl_status st = kvl_catalog_foreach(s->docs_dir, count_doc, &u);
    if (st != KVL_OK) {
        json_decref(u.obj);
        status_error(r, st);
        return;
    }
    json_t *list = json_array();
    if (!s->auth.enabled && !json_object_get(u.obj, KVL_DEFAULT_TENANT))
        json_object_set_new(u.obj, KVL_DEFAULT_TENANT, json_pack("{s:i,s:i,s:i}", "documents", 0, "chunks", 0, "tokens", 0));
    for (int i = 0; i < s->auth.n_entries; i++)
        if (!json_object_get(u.obj, s->auth.entries[i].tenant))
            json_object_set_new(u.obj, s->auth.entries[i].tenant,
                                json_pack("{s:i,s:i,s:i}", "documents", 0, "chunks", 0, "tokens", 0));
    const char *k;
    json_t *v, *usage = NULL;
    if (kvl_svc_tenant_usage(s, &usage) == KVL_OK) {
        json_object_foreach(usage, k, v) {
            json_t *t = json_object_get(u.obj, k);
            if (!t) {
                t = json_pack("{s:i,s:i,s:i}", "documents", 0, "chunks", 0, "tokens", 0);
                json_object_set_new(u.obj, k, t);
            }
            json_object_update(t, v);
        }
        json_decref(usage);
    }
    json_object_foreach(u.obj, k, v) {
        json_t *e = json_deep_copy(v);
        json_object_set_new(e, "tenant", json_string(k));
        json_array_append_new(list, e);
    }
    json_decref(u.obj);
    kvl_req_json(r, 200, json_pack("{s:o}", "tenants", list));
}

static void admin_stats(kvl_req *r) {
    kvl_http_server *s = r->srv;
    json_t *store = NULL;
    if (kvl_svc_store_stats(s, &store) != KVL_OK) store = json_null();
    const kvl_model_config *mc = kvl_model_get_config(s->model);
    kvl_req_json(r, 200,
                 json_pack("{s:f,s:{s:s,s:s,s:s,s:i,s:i,s:i},s:s,s:o,s:o,s:{s:I,s:I,s:i},s:{s:I,s:i,s:i,s:i,s:i,s:i}}",
                           "uptime_s", (kvl_now_ms() - s->started_ms) / 1e3, "model", "path", s->model_path,
                           "fingerprint", s->fingerprint_hex, "backend", kvl_model_backend_name(s->model), "n_layers",
                           mc->n_layers, "max_seq", mc->max_seq, "vocab_size", mc->vocab_size, "wired",
                           kvl_svc_backend_describe(s), "modes", kvl_svc_modes(s), "store", store, "requests", "inflight",
                           (json_int_t)atomic_load(&s->queued), "open", (json_int_t)atomic_load(&s->open_requests),
                           "workers", s->cfg.workers, "limits", "max_body_bytes",
                           (json_int_t)s->cfg.limits.max_body_bytes, "max_tokens", s->cfg.limits.max_tokens,
                           "max_chunks", s->cfg.limits.max_chunks, "max_new_tokens", s->cfg.limits.max_new_tokens,
                           "max_concurrent", s->cfg.limits.max_concurrent, "request_timeout_ms",
                           s->cfg.limits.request_timeout_ms));
}

static void admin_evict(kvl_req *r) {
    static const char *const fields[] = {"target_bytes", "older_than_s", "tenant", "keys", "expired_only", "policy",
                                         "max_entries", NULL};
    kvl_http_server *s = r->srv;
    json_t *o = parse_object(r, 0);
    if (!o) return;
    kvl_svc_evict_req q;
    memset(&q, 0, sizeof q);
    const char **keys = NULL;
    int64_t target, age, maxe;
    const char *policy = NULL;
    json_t *jk = json_object_get(o, "keys"), *je = json_object_get(o, "expired_only");
    if (check_fields(r, o, fields) || get_int(r, o, "target_bytes", 0, INT64_MAX, -1, &target) ||
        get_int(r, o, "older_than_s", 0, INT64_MAX / 1000000000, -1, &age) || get_str(r, o, "tenant", &q.tenant) ||
        get_str(r, o, "policy", &policy) || get_int(r, o, "max_entries", 0, INT64_MAX, 0, &maxe))
        goto done;
    if (policy && strcmp(policy, "lru") && strcmp(policy, "cost")) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", "policy"), "'policy' must be 'lru' or 'cost'");
        goto done;
    }
    q.cost_policy = policy && !strcmp(policy, "cost");
    q.max_entries = (uint64_t)maxe;
    if (je && !json_is_boolean(je)) {
        bad_field(r, "expired_only", "'%s' must be a boolean%s", "");
        goto done;
    }
    if (jk && !json_is_array(jk)) {
        bad_field(r, "keys", "'%s' must be an array of chunk keys%s", "");
        goto done;
    }
    q.has_target = target >= 0;
    q.target_bytes = (uint64_t)target;
    q.has_age = age >= 0;
    q.older_than_s = (uint64_t)age;
    q.expired_only = je && json_is_true(je);
    q.n_keys = jk ? json_array_size(jk) : 0;
    if (q.n_keys > (size_t)s->cfg.limits.max_chunks) {
        limit_error(r, "chunks", s->cfg.limits.max_chunks, "%lld keys exceed the limit of %lld per request", (long long)q.n_keys);
        goto done;
    }
    if (q.tenant && !kvl_name_ok(q.tenant, KVL_TENANT_MAX)) {
        kvl_req_error(r, 400, "invalid_field", json_pack("{s:s}", "field", "tenant"), "'tenant' is not a tenant name");
        goto done;
    }
    if ((q.n_keys > 0) + q.has_age + (q.has_target || q.expired_only) > 1 || (!q.n_keys && !q.has_age && !q.has_target &&
                                                                           !q.expired_only && !q.tenant)) {
        kvl_req_error(r, 400, "invalid_request", NULL,
                      "give one of: 'keys', 'older_than_s', or 'target_bytes' / 'expired_only' (each optionally with "
                      "'tenant'), or 'tenant' alone to evict all of a tenant's entries");
        goto done;
    }
    keys = calloc(q.n_keys + 1, sizeof *keys);
    if (!keys) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < q.n_keys; i++) {
        const char *k = json_string_value(json_array_get(jk, i));
        int ok = k && strlen(k) == 64;
        for (const char *p = k; ok && *p; p++) ok = (*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f');
        if (!ok) {
            kvl_req_error(r, 400, "invalid_field", json_pack("{s:s,s:i}", "field", "keys", "index", (int)i),
                          "chunk keys are 64 lowercase hex characters");
            goto done;
        }
        keys[i] = k;
    }
    q.keys = keys;
    json_t *out = NULL;
    kvl_status st = kvl_svc_evict(s, &q, &out);
    if (st != KVL_OK) {
        status_error(r, st);
        goto done;
    }
    atomic_fetch_add(&s->metrics.evictions, (uint64_t)json_integer_value(json_object_get(out, "evicted")));
    atomic_fetch_add(&s->metrics.evicted_bytes, (uint64_t)json_integer_value(json_object_get(out, "bytes")));
    kvl_req_json(r, 200, out);
done:
    free(keys);
    json_decref(o);
}

static void admin_audit(kvl_req *r) {
    static const char *const fields[] = {"check_data", NULL};
    json_t *o = parse_object(r, 1);
    if (!o) return;
    json_t *cd = json_object_get(o, "check_data");
    if (check_fields(r, o, fields)) goto done;
    if (cd && !json_is_boolean(cd)) {
        bad_field(r, "check_data", "'%s' must be a boolean%s", "");
        goto done;
    }
    json_t *out = NULL;
    kvl_status st = kvl_svc_audit(r->srv, cd ? json_is_true(cd) : 1, &out);
    if (st != KVL_OK) status_error(r, st);
    else kvl_req_json(r, 200, out);
done:
    json_decref(o);
}

static void metrics(kvl_req *r) {
    kvl_metrics_gauges g = {-1, -1, -1, 0, 0, 0, 0};
    if (kvl_svc_store_gauges(r->srv, &g.store_entries, &g.store_bytes, &g.store_capacity) != KVL_OK)
        g.store_entries = g.store_bytes = g.store_capacity = -1;
    g.load_controller = kvl_svc_load_costs(r->srv, &g.read_gbps, &g.decode_gbps, &g.prefill_tok_s);
    char *text = kvl_metrics_render(&r->srv->metrics, &g);
    if (!text) {
        kvl_req_error(r, 500, "internal", NULL, "out of memory");
        return;
    }
    free(r->resp);
    r->resp = text;
    r->resp_len = strlen(text);
    r->resp_type = "text/plain; version=0.0.4; charset=utf-8";
    r->status = 200;
}

void kvl_handle_request(kvl_req *r) {
    switch (r->route) {
    case KVL_R_DOCS_POST: docs_post(r); break;
    case KVL_R_DOCS_GET: docs_get(r); break;
    case KVL_R_DOCS_DELETE: docs_delete(r); break;
    case KVL_R_GENERATE: generate(r); break;
    case KVL_R_CONTEXT: context(r); break;
    case KVL_R_CHUNK_GET: chunk_get(r); break;
    case KVL_R_CHUNK_KV: chunk_kv(r); break;
    case KVL_R_CHUNK_DELETE: chunk_delete(r); break;
    case KVL_R_ADMIN_STATS: admin_stats(r); break;
    case KVL_R_ADMIN_TENANTS: admin_tenants(r); break;
    case KVL_R_ADMIN_EVICT: admin_evict(r); break;
    case KVL_R_ADMIN_AUDIT: admin_audit(r); break;
    case KVL_R_METRICS: metrics(r); break;
    default: kvl_req_error(r, 404, "not_found", NULL, "no such endpoint"); break;
    }
}
