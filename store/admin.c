/* admin.c - audit, verify, ls/stat, evict, compact, export/import and the log, as JSON. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "kvl_store_admin.h"
#include "store_impl.h"

static json_t *key_json(const kvl_store_key *k) {
    char hex[65];
    return json_string(kvl_store_key_hex(k, hex));
}

static json_t *meta_json(const kvl_store_key *k, const kvl_store_meta *m) {
    char fp[65];
    kvl_store_key f;
    memcpy(f.b, m->fingerprint, 32);
    kvl_store_key_hex(&f, fp);
    return json_pack("{s:o s:s s:s s:i s:i s:s s:I s:I s:I s:I s:I s:I s:I s:I s:I s:i s:I}", "key", key_json(k),
                     "tenant", m->tenant, "fingerprint", fp, "codec_id", (int)m->codec_id, "codec_level",
                     (int)m->codec_level, "mode", m->mode == KVL_STORE_MODE_PREFIX ? "prefix" : "chunk",
                     "n_tokens", (json_int_t)m->n_tokens, "value_bytes", (json_int_t)m->value_bytes,
                     "extent_bytes", (json_int_t)m->extent_bytes, "created_ns", (json_int_t)m->created_ns,
                     "last_access_ns", (json_int_t)m->last_access_ns, "hits", (json_int_t)m->hits, "expires_ns",
                     (json_int_t)m->expires_ns, "recompute_cost", (json_int_t)m->recompute_cost, "generation",
                     (json_int_t)m->generation, "segment", (int)m->segment, "offset", (json_int_t)m->offset);
}

/* snapshot of the index (consistent: taken under every shard lock) */
static kvl_status snapshot(kvl_store *st, const kvl_store_key *keys, size_t nkeys, kvl_rec **out, size_t *n) {
    kvl_lock_all(st);
    size_t cap = 0;
    for (int i = 0; i < KVL_NSHARDS; i++) cap += st->shards[i].n;
    if (nkeys) cap = nkeys;
    kvl_rec *all = malloc((cap ? cap : 1) * sizeof *all);
    size_t k = 0;
    if (all) {
        if (nkeys) {
            for (size_t i = 0; i < nkeys; i++) {
                kvl_rec *r = kvl_shard_find(kvl_shard_of(st, &keys[i]), &keys[i]);
                if (r) all[k++] = *r;
            }
        } else {
            for (int i = 0; i < KVL_NSHARDS; i++)
                for (size_t j = 0; j < st->shards[i].cap; j++)
                    if (st->shards[i].slots[j].state) all[k++] = st->shards[i].slots[j];
        }
    }
    kvl_unlock_all(st);
    if (!all) return kvl_errorf(KVL_ERR_NOMEM, "index snapshot");
    *out = all;
    *n = k;
    return KVL_OK;
}

/* reads and verifies recs in batches (not counted as accesses); calls fn for each result */
typedef void (*read_fn)(const kvl_rec *r, kvl_store_value *v, kvl_status s, const char *err, void *ctx);

static kvl_status read_all(kvl_store *st, const kvl_rec *recs, size_t n, read_fn fn, void *ctx) {
    enum { B = 32 };
    kvl_rec cur[B];
    kvl_store_value *v[B];
    kvl_status s[B];
    for (size_t i = 0; i < n; i += B) {
        size_t m = 0;
        for (size_t j = i; j < n && j < i + B; j++) {
            kvl_shard *sh = kvl_shard_of(st, &recs[j].key);
            pthread_mutex_lock(&sh->mu);
            kvl_rec *r = kvl_shard_find(sh, &recs[j].key);
            if (r && r->generation == recs[j].generation) {
                kvl_pin_ext(st, r->seg, r->off, r->ext_len);
                cur[m++] = *r;
            }
            pthread_mutex_unlock(&sh->mu);
        }
        KVL_TRY(kvl_read_verify(st, m, cur, v, s));
        for (size_t j = 0; j < m; j++) {
            kvl_unpin_ext(st, cur[j].seg, cur[j].off);
            char err[200] = "";
            if (s[j] != KVL_OK) {
                /* kvl_read_verify keeps only the last detail message: rebuild a specific one */
                kvl_rec one = cur[j];
                kvl_store_value *v1 = NULL;
                kvl_status s1;
                kvl_pin_ext(st, one.seg, one.off, one.ext_len);
                kvl_clear_error();
                kvl_read_verify(st, 1, &one, &v1, &s1);
                kvl_unpin_ext(st, one.seg, one.off);
                snprintf(err, sizeof err, "%s", kvl_last_error());
                kvl_store_value_free(v1);
            }
            fn(&cur[j], v[j], s[j], err, ctx);
            kvl_store_value_free(v[j]);
        }
    }
    return KVL_OK;
}

typedef struct verify_ctx {
    kvl_store *st;
    json_t *damaged;
    uint64_t verified;
} verify_ctx;

static void verify_cb(const kvl_rec *r, kvl_store_value *v, kvl_status s, const char *err, void *ctx) {
    verify_ctx *c = ctx;
    (void)v;
    c->verified++;
    if (s == KVL_OK) return;
    json_array_append_new(c->damaged, json_pack("{s:o s:s s:s s:s s:i s:I}", "key", key_json(&r->key), "tenant",
                                                 kvl_tenant_name(c->st, r->tenant), "status", kvl_status_str(s),
                                                 "error", err, "segment", (int)r->seg, "offset", (json_int_t)r->off));
}

typedef struct ival {
    uint64_t off, len;
    int kind; /* 0 entry, 1 free, 2 pending */
} ival;

static int ival_cmp(const void *a, const void *b) {
    const ival *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static void log_event(kvl_store *st, const char *op, const char *detail) {
    if (st->opt.read_only) return;
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    kvl_log_append(st, wb, op, NULL, NULL, 0, detail);
    kvl_db_write(st, wb, 0);
    rocksdb_writebatch_destroy(wb);
}

kvl_status kvl_store_audit(kvl_store *st, int check_data, json_t **out) {
    if (!st || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_audit: NULL argument");
    json_t *rep = json_object();
    json_t *segs = json_array(), *orph = json_array(), *tens = json_array(), *damaged = json_array();
    uint64_t overlaps = 0, orphan_bytes = 0, idx_mis = 0, free_mis = 0, entry_bytes = 0, free_bytes = 0,
             pending_bytes = 0, n_entries = 0;
    int tenants_ok = 1;
    kvl_status s = KVL_OK;
    kvl_rec *recs = NULL;
    size_t nrec = 0;

    /* 1. a consistent view: every shard lock + the allocator lock; nothing moves extents meanwhile */
    kvl_lock_all(st);
    pthread_mutex_lock(&st->amu);
    size_t cap = 0;
    for (int i = 0; i < KVL_NSHARDS; i++) cap += st->shards[i].n;
    recs = malloc((cap ? cap : 1) * sizeof *recs);
    size_t nseg = st->nsegs;
    size_t *nv = calloc(nseg ? nseg : 1, sizeof *nv), *capv = calloc(nseg ? nseg : 1, sizeof *capv);
    ival **iv = calloc(nseg ? nseg : 1, sizeof *iv);
    if (!recs || !nv || !capv || !iv) s = kvl_errorf(KVL_ERR_NOMEM, "audit");
#define ADD_IVAL(sg, o, l, k)                                                                  \
    do {                                                                                       \
        if ((sg) >= nseg) {                                                                    \
            idx_mis++;                                                                         \
            break;                                                                             \
        }                                                                                      \
        if (nv[sg] == capv[sg]) {                                                              \
            capv[sg] = capv[sg] ? capv[sg] * 2 : 256;                                          \
            ival *tmp_ = realloc(iv[sg], capv[sg] * sizeof *tmp_);                             \
            KVL_ASSERT(tmp_);                                                                  \
            iv[sg] = tmp_;                                                                     \
        }                                                                                      \
        iv[sg][nv[sg]++] = (ival){(o), (l), (k)};                                              \
    } while (0)
    if (s == KVL_OK) {
        for (int i = 0; i < KVL_NSHARDS; i++)
            for (size_t j = 0; j < st->shards[i].cap; j++) {
                kvl_rec *r = &st->shards[i].slots[j];
                if (!r->state) continue;
                recs[nrec++] = *r;
                ADD_IVAL(r->seg, r->off, r->ext_len, 0);
                entry_bytes += r->ext_len;
            }
        n_entries = nrec;
        /* the RocksDB entries must equal the in-memory index */
        rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_ENTRIES]);
        uint64_t ndb = 0;
        for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
            size_t kn, vn;
            const char *k = rocksdb_iter_key(it, &kn);
            const char *v = rocksdb_iter_value(it, &vn);
            kvl_rec r;
            char t[KVL_STORE_TENANT_MAX + 1];
            ndb++;
            kvl_store_key key;
            if (kn != 32 || kvl_rec_decode((const uint8_t *)v, vn, &r, t) != KVL_OK) {
                idx_mis++;
                continue;
            }
            memcpy(key.b, k, 32);
            kvl_rec *m = kvl_shard_find(kvl_shard_of(st, &key), &key);
            if (!m || m->generation != r.generation || m->seg != r.seg || m->off != r.off || m->ext_len != r.ext_len)
                idx_mis++;
        }
        rocksdb_iter_destroy(it);
        if (ndb != nrec) idx_mis += ndb > nrec ? ndb - nrec : nrec - ndb;
        /* free space: RocksDB records must equal the in-memory lists */
        uint64_t nfree_db = 0, nfree_mem = 0;
        it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_FREE]);
        for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
            size_t kn, vn;
            const uint8_t *k = (const uint8_t *)rocksdb_iter_key(it, &kn);
            const uint8_t *v = (const uint8_t *)rocksdb_iter_value(it, &vn);
            nfree_db++;
            if (kn != 12 || vn != 8) {
                free_mis++;
                continue;
            }
            uint32_t sg = kvl_get32be(k);
            uint64_t off = kvl_get64be(k + 4), len = kvl_get64(v);
            ADD_IVAL(sg, off, len, 1);
            free_bytes += len;
            int found = 0;
            if (sg < nseg)
                for (size_t j = 0; j < st->segs[sg].nfree && !found; j++)
                    found = st->segs[sg].free[j].off == off && st->segs[sg].free[j].len == len;
            free_mis += !found;
        }
        rocksdb_iter_destroy(it);
        for (size_t i = 0; i < nseg; i++) nfree_mem += st->segs[i].nfree;
        if (nfree_mem != nfree_db) free_mis += nfree_mem > nfree_db ? nfree_mem - nfree_db : nfree_db - nfree_mem;
        it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_PENDING]);
        for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
            size_t kn, vn;
            const uint8_t *k = (const uint8_t *)rocksdb_iter_key(it, &kn);
            const uint8_t *v = (const uint8_t *)rocksdb_iter_value(it, &vn);
            if (kn != 12 || vn != 8) {
                free_mis++;
                continue;
            }
            ADD_IVAL(kvl_get32be(k), kvl_get64be(k + 4), kvl_get64(v), 2);
            pending_bytes += kvl_get64(v);
        }
        rocksdb_iter_destroy(it);
        /* 2. every block of every segment owned exactly once */
        for (size_t sg = 0; sg < nseg; sg++) {
            if (nv[sg]) qsort(iv[sg], nv[sg], sizeof(ival), ival_cmp);
            uint64_t pos = KVL_SEG_HDR, sov = 0, sorph = 0, se = 0, sf = 0, sp = 0;
            for (size_t j = 0; j < nv[sg]; j++) {
                ival *x = &iv[sg][j];
                if (x->kind == 0) se += x->len;
                else if (x->kind == 1) sf += x->len;
                else sp += x->len;
                if (x->off < pos) sov++;
                else if (x->off > pos) {
                    sorph += x->off - pos;
                    if (json_array_size(orph) < 100)
                        json_array_append_new(orph, json_pack("{s:i s:I s:I}", "segment", (int)sg, "offset",
                                                              (json_int_t)pos, "bytes", (json_int_t)(x->off - pos)));
                }
                if (x->off + x->len > pos) pos = x->off + x->len;
            }
            if (pos > st->segs[sg].size) sov++;
            else if (pos < st->segs[sg].size) {
                sorph += st->segs[sg].size - pos;
                if (json_array_size(orph) < 100)
                    json_array_append_new(orph, json_pack("{s:i s:I s:I}", "segment", (int)sg, "offset", (json_int_t)pos,
                                                          "bytes", (json_int_t)(st->segs[sg].size - pos)));
            }
            overlaps += sov;
            orphan_bytes += sorph;
            json_array_append_new(segs, json_pack("{s:i s:I s:b s:I s:I s:I s:I s:I}", "id", (int)sg, "size",
                                                  (json_int_t)st->segs[sg].size, "fenced", st->segs[sg].fenced,
                                                  "entry_bytes", (json_int_t)se, "free_bytes", (json_int_t)sf,
                                                  "pending_bytes", (json_int_t)sp, "orphan_bytes", (json_int_t)sorph,
                                                  "overlaps", (json_int_t)sov));
        }
        /* 3. per-tenant usage recomputed */
        pthread_mutex_lock(&st->tmu);
        size_t nt = st->ntenants;
        uint64_t *tu = calloc(nt ? nt : 1, 8), *tc = calloc(nt ? nt : 1, 8);
        if (tu && tc) {
            for (size_t i = 0; i < nrec; i++)
                if (recs[i].tenant < nt) {
                    tu[recs[i].tenant] += recs[i].ext_len;
                    tc[recs[i].tenant]++;
                }
            for (size_t i = 0; i < nt; i++) {
                kvl_tenant *t = &st->tenants[i];
                int ok = t->used == tu[i] && t->count == tc[i];
                tenants_ok &= ok;
                json_array_append_new(tens, json_pack("{s:s s:I s:I s:I s:I s:I s:b s:b}", "tenant", t->name, "entries",
                                                      (json_int_t)tc[i], "bytes", (json_int_t)tu[i], "quota",
                                                      (json_int_t)t->quota, "counted_entries", (json_int_t)t->count,
                                                      "counted_bytes", (json_int_t)t->used, "consistent", ok,
                                                      "over_quota", t->quota && tu[i] > t->quota));
            }
        } else {
            s = kvl_errorf(KVL_ERR_NOMEM, "audit");
        }
        free(tu);
        free(tc);
        pthread_mutex_unlock(&st->tmu);
    }
#undef ADD_IVAL
    pthread_mutex_unlock(&st->amu);
    kvl_unlock_all(st);
    for (size_t i = 0; i < nseg; i++) free(iv ? iv[i] : NULL);
    free(iv);
    free(nv);
    free(capv);

    /* 4. the bytes themselves */
    verify_ctx vc = {st, damaged, 0};
    if (s == KVL_OK && check_data) s = read_all(st, recs, nrec, verify_cb, &vc);
    free(recs);
    if (s != KVL_OK) {
        json_decref(rep);
        json_decref(segs);
        json_decref(orph);
        json_decref(tens);
        json_decref(damaged);
        return s;
    }
    int ok = overlaps == 0 && orphan_bytes == 0 && idx_mis == 0 && free_mis == 0 && tenants_ok &&
             json_array_size(damaged) == 0;
    json_object_set_new(rep, "ok", json_boolean(ok));
    json_object_set_new(rep, "entries", json_integer((json_int_t)n_entries));
    json_object_set_new(rep, "entry_bytes", json_integer((json_int_t)entry_bytes));
    json_object_set_new(rep, "free_bytes", json_integer((json_int_t)free_bytes));
    json_object_set_new(rep, "pending_bytes", json_integer((json_int_t)pending_bytes));
    json_object_set_new(rep, "orphan_bytes", json_integer((json_int_t)orphan_bytes));
    json_object_set_new(rep, "overlaps", json_integer((json_int_t)overlaps));
    json_object_set_new(rep, "index_mismatches", json_integer((json_int_t)idx_mis));
    json_object_set_new(rep, "free_mismatches", json_integer((json_int_t)free_mis));
    json_object_set_new(rep, "data_checked", json_boolean(check_data));
    json_object_set_new(rep, "verified", json_integer((json_int_t)vc.verified));
    json_object_set_new(rep, "damaged", damaged);
    json_object_set_new(rep, "orphans", orph);
    json_object_set_new(rep, "segments", segs);
    json_object_set_new(rep, "tenants", tens);
    char d[160];
    snprintf(d, sizeof d, "ok=%d entries=%llu damaged=%zu orphan_bytes=%llu overlaps=%llu", ok,
             (unsigned long long)n_entries, json_array_size(damaged), (unsigned long long)orphan_bytes,
             (unsigned long long)overlaps);
    log_event(st, "audit", d);
    *out = rep;
    return KVL_OK;
}

kvl_status kvl_store_admin_stat(kvl_store *st, json_t **out) {
    kvl_store_stats s;
    KVL_TRY(kvl_store_get_stats(st, &s));
    json_t *o = json_pack(
        "{s:I s:I s:I s:I s:I s:i s:i s:I s:I s:I s:I s:I s:I s:I s:I s:I s:I s:I s:I s:I s:I s:I s:I s:I s:s s:s s:b s:s s:b}",
        "entries", (json_int_t)s.entries, "used_bytes", (json_int_t)s.used_bytes, "capacity_bytes",
        (json_int_t)s.capacity_bytes, "free_bytes", (json_int_t)s.free_bytes, "pending_bytes", (json_int_t)s.pending_bytes,
        "segments", (int)s.segments, "fenced_segments", (int)s.fenced_segments, "segment_bytes",
        (json_int_t)s.segment_bytes, "puts", (json_int_t)s.puts, "gets", (json_int_t)s.gets, "get_hits",
        (json_int_t)s.get_hits, "get_misses", (json_int_t)s.get_misses, "deletes", (json_int_t)s.deletes, "evictions",
        (json_int_t)s.evictions, "evicted_bytes", (json_int_t)s.evicted_bytes, "cache_hits", (json_int_t)s.cache_hits,
        "cache_bytes", (json_int_t)s.cache_bytes, "cache_entries", (json_int_t)s.cache_entries, "cache_budget",
        (json_int_t)s.cache_budget, "corrupt_reads", (json_int_t)s.corrupt_reads, "recovered_extents",
        (json_int_t)s.recovered_extents, "recovered_bytes", (json_int_t)s.recovered_bytes, "open_ns",
        (json_int_t)s.open_ns, "verify_threads", (json_int_t)s.verify_threads, "io_backend", s.io_backend, "io_detail",
        s.io_detail, "registered_buffers", s.registered_buffers, "policy",
        s.policy == KVL_STORE_EVICT_COST ? "cost" : "lru", "read_only", s.read_only);
    json_object_set_new(o, "index_from_snapshot", json_boolean(s.index_from_snapshot));
    json_object_set_new(o, "worker_verified", json_integer((json_int_t)s.worker_verified));
    json_t *t = json_array();
    pthread_mutex_lock(&st->tmu);
    for (size_t i = 0; i < st->ntenants; i++)
        json_array_append_new(t, json_pack("{s:s s:I s:I s:I}", "tenant", st->tenants[i].name, "entries",
                                           (json_int_t)st->tenants[i].count, "bytes", (json_int_t)st->tenants[i].used,
                                           "quota", (json_int_t)st->tenants[i].quota));
    pthread_mutex_unlock(&st->tmu);
    json_object_set_new(o, "tenants", t);
    *out = o;
    return KVL_OK;
}

typedef struct ls_ctx {
    json_t *arr;
    uint64_t limit;
} ls_ctx;

static int ls_cb(const kvl_store_key *k, const kvl_store_meta *m, void *ctx) {
    ls_ctx *c = ctx;
    json_array_append_new(c->arr, meta_json(k, m));
    return c->limit && json_array_size(c->arr) >= c->limit;
}

kvl_status kvl_store_admin_ls(kvl_store *st, const char *tenant, uint64_t limit, json_t **out) {
    ls_ctx c = {json_array(), limit};
    kvl_status s = kvl_store_foreach(st, tenant, ls_cb, &c);
    if (s != KVL_OK) {
        json_decref(c.arr);
        return s;
    }
    *out = c.arr;
    return KVL_OK;
}

kvl_status kvl_store_admin_evict(kvl_store *st, const kvl_store_evict_req *req, const kvl_store_key *keys, size_t nkeys,
                                 json_t **out) {
    if (!st || !out || (!req && !nkeys)) return kvl_errorf(KVL_ERR_INVALID_ARG, "admin evict: nothing to do");
    if (nkeys) {
        json_t *del = json_array(), *miss = json_array();
        for (size_t i = 0; i < nkeys; i++) {
            kvl_status s = kvl_store_delete(st, &keys[i]);
            if (s == KVL_OK) json_array_append_new(del, key_json(&keys[i]));
            else if (s == KVL_ERR_KEY_NOT_FOUND) json_array_append_new(miss, key_json(&keys[i]));
            else {
                json_decref(del);
                json_decref(miss);
                return s;
            }
        }
        *out = json_pack("{s:o s:o}", "deleted", del, "not_found", miss);
        return KVL_OK;
    }
    uint64_t n = 0, b = 0;
    KVL_TRY(kvl_store_evict(st, req, &n, &b));
    *out = json_pack("{s:I s:I}", "evicted", (json_int_t)n, "evicted_bytes", (json_int_t)b);
    return KVL_OK;
}

kvl_status kvl_store_admin_verify(kvl_store *st, const kvl_store_key *keys, size_t nkeys, json_t **out) {
    kvl_rec *recs = NULL;
    size_t n = 0;
    KVL_TRY(snapshot(st, keys, nkeys, &recs, &n));
    verify_ctx vc = {st, json_array(), 0};
    kvl_status s = read_all(st, recs, n, verify_cb, &vc);
    free(recs);
    if (s != KVL_OK) {
        json_decref(vc.damaged);
        return s;
    }
    *out = json_pack("{s:b s:I s:I s:o}", "ok", json_array_size(vc.damaged) == 0 && n == (nkeys ? nkeys : n),
                     "verified", (json_int_t)vc.verified, "missing", (json_int_t)(nkeys ? nkeys - n : 0), "damaged",
                     vc.damaged);
    return KVL_OK;
}

kvl_status kvl_store_admin_compact(kvl_store *st, uint64_t keep_log, json_t **out) {
    if (st->opt.read_only) return kvl_errorf(KVL_ERR_PERMISSION, "store opened read-only");
    KVL_TRY(kvl_store_flush(st));
    uint64_t trimmed = kvl_store_trim_log(st, keep_log);
    for (int i = 0; i < CF_COUNT; i++) rocksdb_compact_range_cf(st->db, st->cf[i], NULL, 0, NULL, 0);
    char d[64];
    snprintf(d, sizeof d, "log trimmed below %llu", (unsigned long long)trimmed);
    log_event(st, "compact", d);
    *out = json_pack("{s:b s:I}", "compacted", 1, "log_records_trimmed", (json_int_t)trimmed);
    return KVL_OK;
}

/* ---- export / import: see docs/store-format.md "Export files" */

static const char exp_magic[8] = {'K', 'V', 'L', 'E', 'X', 'P', '0', '1'};

typedef struct exp_ctx {
    kvl_store *st;
    FILE *f;
    uint64_t n, bytes;
    kvl_status err;
    char msg[200];
} exp_ctx;

static void exp_cb(const kvl_rec *r, kvl_store_value *v, kvl_status s, const char *err, void *ctx) {
    exp_ctx *c = ctx;
    if (c->err != KVL_OK) return;
    if (s != KVL_OK) {
        c->err = s;
        snprintf(c->msg, sizeof c->msg, "export: entry in segment %u at %llu: %s", r->seg, (unsigned long long)r->off, err);
        return;
    }
    XXH3_state_t *h = XXH3_createState();
    XXH3_64bits_reset(h);
    uint8_t hd[8 + 32 + KVL_ENTRY_REC_BYTES + 12];
    memcpy(hd, "REC1", 4);
    kvl_put32(hd + 4, KVL_ENTRY_REC_BYTES);
    memcpy(hd + 8, r->key.b, 32);
    kvl_rec_encode(r, c->st, hd + 40);
    kvl_put32(hd + 40 + KVL_ENTRY_REC_BYTES, r->n_tokens);
    kvl_put64(hd + 44 + KVL_ENTRY_REC_BYTES, r->value_len);
    XXH3_64bits_update(h, hd, sizeof hd);
    XXH3_64bits_update(h, v->tokens, 4ull * r->n_tokens);
    XXH3_64bits_update(h, v->data, r->value_len);
    uint8_t tail[8];
    kvl_put64(tail, XXH3_64bits_digest(h));
    XXH3_freeState(h);
    if (fwrite(hd, sizeof hd, 1, c->f) != 1 || (r->n_tokens && fwrite(v->tokens, 4ull * r->n_tokens, 1, c->f) != 1) ||
        (r->value_len && fwrite(v->data, r->value_len, 1, c->f) != 1) || fwrite(tail, 8, 1, c->f) != 1) {
        c->err = KVL_ERR_IO;
        snprintf(c->msg, sizeof c->msg, "export: write failed: %s", strerror(errno));
        return;
    }
    c->n++;
    c->bytes += r->value_len;
}

kvl_status kvl_store_admin_export(kvl_store *st, const char *path, const char *tenant, json_t **out) {
    if (!st || !path || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "admin export: NULL argument");
    kvl_rec *recs = NULL;
    size_t n = 0;
    KVL_TRY(snapshot(st, NULL, 0, &recs, &n));
    if (tenant) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (strcmp(kvl_tenant_name(st, recs[i].tenant), tenant) == 0) recs[k++] = recs[i];
        n = k;
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(recs);
        return kvl_errorf(KVL_ERR_IO, "export: %s: %s", path, strerror(errno));
    }
    uint8_t h[16] = {0};
    memcpy(h, exp_magic, 8);
    kvl_put32(h + 8, 1);
    fwrite(h, 16, 1, f);
    exp_ctx c = {st, f, 0, 0, KVL_OK, ""};
    kvl_status s = read_all(st, recs, n, exp_cb, &c);
    free(recs);
    if (s == KVL_OK && c.err == KVL_OK) {
        uint8_t e[12];
        memcpy(e, "END1", 4);
        kvl_put64(e + 4, c.n);
        if (fwrite(e, 12, 1, f) != 1) c.err = KVL_ERR_IO;
    }
    if (fclose(f) != 0 && c.err == KVL_OK) c.err = KVL_ERR_IO;
    KVL_TRY(s);
    if (c.err != KVL_OK) return kvl_errorf(c.err, "%s", c.msg[0] ? c.msg : "export: write failed");
    *out = json_pack("{s:s s:I s:I}", "path", path, "entries", (json_int_t)c.n, "value_bytes", (json_int_t)c.bytes);
    return KVL_OK;
}

kvl_status kvl_store_admin_import(kvl_store *st, const char *path, json_t **out) {
    if (!st || !path || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "admin import: NULL argument");
    FILE *f = fopen(path, "rb");
    if (!f) return kvl_errorf(KVL_ERR_NOT_FOUND, "import: %s: %s", path, strerror(errno));
    uint8_t h[16];
    kvl_status s = KVL_OK;
    if (fread(h, 16, 1, f) != 1 || memcmp(h, exp_magic, 8) != 0) s = kvl_errorf(KVL_ERR_MAGIC, "%s: not a kvloom export", path);
    else if (kvl_get32(h + 8) != 1) s = kvl_errorf(KVL_ERR_VERSION, "%s: export version %u", path, kvl_get32(h + 8));
    uint64_t n = 0, bytes = 0;
    int ended = 0;
    int32_t *tok = NULL;
    uint8_t *val = NULL;
    while (s == KVL_OK) {
        uint8_t hd[8 + 32 + KVL_ENTRY_REC_BYTES + 12];
        if (fread(hd, 4, 1, f) != 1) {
            s = kvl_errorf(KVL_ERR_TRUNCATED, "%s: ends without an END1 record", path);
            break;
        }
        if (!memcmp(hd, "END1", 4)) {
            uint8_t c[8];
            if (fread(c, 8, 1, f) != 1 || kvl_get64(c) != n)
                s = kvl_errorf(KVL_ERR_FORMAT, "%s: END1 count disagrees with %llu records", path, (unsigned long long)n);
            ended = 1;
            break;
        }
        if (memcmp(hd, "REC1", 4) != 0 || fread(hd + 4, sizeof hd - 4, 1, f) != 1 ||
            kvl_get32(hd + 4) != KVL_ENTRY_REC_BYTES) {
            s = kvl_errorf(KVL_ERR_FORMAT, "%s: record %llu malformed", path, (unsigned long long)n);
            break;
        }
        kvl_rec r;
        char tenant[KVL_STORE_TENANT_MAX + 1];
        s = kvl_rec_decode(hd + 40, KVL_ENTRY_REC_BYTES, &r, tenant);
        if (s != KVL_OK) break;
        uint32_t nt = kvl_get32(hd + 40 + KVL_ENTRY_REC_BYTES);
        uint64_t vl = kvl_get64(hd + 44 + KVL_ENTRY_REC_BYTES);
        if (nt != r.n_tokens || vl != r.value_len || vl > st->seg_bytes || nt > (1u << 28)) {
            s = kvl_errorf(KVL_ERR_FORMAT, "%s: record %llu sizes disagree", path, (unsigned long long)n);
            break;
        }
        free(tok);
        free(val);
        tok = malloc(4ull * nt + 1);
        val = malloc(vl + 1);
        uint8_t tail[8];
        if (!tok || !val) {
            s = kvl_errorf(KVL_ERR_NOMEM, "import");
            break;
        }
        if ((nt && fread(tok, 4ull * nt, 1, f) != 1) || (vl && fread(val, vl, 1, f) != 1) || fread(tail, 8, 1, f) != 1) {
            s = kvl_errorf(KVL_ERR_TRUNCATED, "%s: record %llu truncated", path, (unsigned long long)n);
            break;
        }
        XXH3_state_t *x = XXH3_createState();
        XXH3_64bits_reset(x);
        XXH3_64bits_update(x, hd, sizeof hd);
        XXH3_64bits_update(x, tok, 4ull * nt);
        XXH3_64bits_update(x, val, vl);
        uint64_t sum = XXH3_64bits_digest(x);
        XXH3_freeState(x);
        if (sum != kvl_get64(tail) || kvl_payload_sum(tok, nt, val, vl) != r.checksum) {
            s = kvl_errorf(KVL_ERR_CHECKSUM, "%s: record %llu checksum mismatch", path, (unsigned long long)n);
            break;
        }
        kvl_store_key key;
        memcpy(key.b, hd + 8, 32);
        kvl_store_meta m;
        memset(&m, 0, sizeof m);
        memcpy(m.fingerprint, r.fp, 32);
        snprintf(m.tenant, sizeof m.tenant, "%s", tenant);
        m.codec_id = r.codec_id;
        m.codec_level = r.codec_level;
        m.mode = r.mode;
        m.recompute_cost = r.cost;
        uint64_t now = kvl_now_ns();
        if (r.expires_ns) {
            if (r.expires_ns <= now) {
                n++;
                continue; /* expired since the export: import nothing */
            }
            m.ttl_s = (r.expires_ns - now + 999999999ull) / 1000000000ull;
        }
        s = kvl_store_put(st, &key, &m, tok, nt, val, vl);
        if (s != KVL_OK) break;
        n++;
        bytes += vl;
    }
    free(tok);
    free(val);
    fclose(f);
    KVL_TRY(s);
    (void)ended;
    *out = json_pack("{s:s s:I s:I}", "path", path, "entries", (json_int_t)n, "value_bytes", (json_int_t)bytes);
    return KVL_OK;
}

kvl_status kvl_store_admin_log(kvl_store *st, uint64_t n, json_t **out) {
    if (!st || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "admin log: NULL argument");
    json_t *arr = json_array();
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_LOG]);
    uint64_t k = 0;
    for (rocksdb_iter_seek_to_last(it); rocksdb_iter_valid(it) && (n == 0 || k < n); rocksdb_iter_prev(it), k++) {
        size_t vn, kn;
        const char *v = rocksdb_iter_value(it, &vn);
        const uint8_t *key = (const uint8_t *)rocksdb_iter_key(it, &kn);
        json_error_t e;
        json_t *o = json_loadb(v, vn, 0, &e);
        if (!o) o = json_pack("{s:s}", "malformed", "log record is not JSON");
        if (kn == 8) json_object_set_new(o, "seq", json_integer((json_int_t)kvl_get64be(key)));
        json_array_insert_new(arr, 0, o);
    }
    rocksdb_iter_destroy(it);
    *out = arr;
    return KVL_OK;
}
