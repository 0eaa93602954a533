/* test_store_basic.c - keys, put/get round trips, batches, reopen, prefix chains, fingerprints, TTL,
 * LRU / cost-aware / quota / explicit eviction, the DRAM cache, export/import, audit. */
#include <openssl/sha.h>
#include <time.h>

#include "store_impl.h"
#include "store_test_util.h"

static int no_uring = 0;

static kvl_store_options opts(void) {
    kvl_store_options o = small_opts();
    o.no_uring = no_uring;
    return o;
}

static void test_keys(void) {
    uint8_t fp[32];
    test_fp(fp, 1);
    kvl_store_key r1, r2, r3, c1, c2, p1, p2;
    kvl_store_root_key(fp, "alice", &r1);
    kvl_store_root_key(fp, "bob", &r2);
    kvl_store_root_key(fp, "alice", &r3);
    CHECK(memcmp(&r1, &r2, 32) != 0);
    CHECK(memcmp(&r1, &r3, 32) == 0);
    int32_t t[4] = {1, 2, 3, 4};
    kvl_store_chunk_key(&r1, t, 4, &c1);
    kvl_store_prefix_key(&r1, t, 4, &p1);
    CHECK(memcmp(&c1, &p1, 32) != 0); /* chunk and prefix keys never collide */
    kvl_store_chunk_key(&r2, t, 4, &c2);
    CHECK(memcmp(&c1, &c2, 32) != 0);
    /* the canonical encoding, recomputed independently: SHA-256(root | "chunk" | LE int32 ids) */
    uint8_t buf[32 + 5 + 16], md[32];
    memcpy(buf, r1.b, 32);
    memcpy(buf + 32, "chunk", 5);
    for (int i = 0; i < 4; i++) kvl_put32(buf + 37 + 4 * i, (uint32_t)t[i]);
    SHA256(buf, sizeof buf, md);
    CHECK(memcmp(md, c1.b, 32) == 0);
    uint8_t rb[9 + 32 + 5];
    memcpy(rb, "kvloom-v1", 9);
    memcpy(rb + 9, fp, 32);
    memcpy(rb + 41, "alice", 5);
    SHA256(rb, sizeof rb, md);
    CHECK(memcmp(md, r1.b, 32) == 0);
    /* prefix chain: H(H(root|b1)|b2) */
    kvl_store_prefix_key(&p1, t + 2, 2, &p2);
    CHECK(memcmp(&p2, &p1, 32) != 0);
    char hex[65];
    kvl_store_key back;
    CHECK_OK(kvl_store_key_parse(kvl_store_key_hex(&c1, hex), &back));
    CHECK(memcmp(&back, &c1, 32) == 0);
    CHECK_ST(kvl_store_key_parse("zz", &back), KVL_ERR_INVALID_ARG);
    /* a known vector so other implementations can check themselves: root of fp = 0..31 step 13+1 */
    kvl_store_key_hex(&r1, hex);
    printf("root(alice) = %s\n", hex);
}

static void test_roundtrip(void) {
    const char *dir = fresh_dir("st_basic");
    kvl_store_options o = opts();
    kvl_store *st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    if (!st) return;
    kvl_store_stats ss;
    CHECK_OK(kvl_store_get_stats(st, &ss));
    printf("io: %s (%s)\n", ss.io_backend, ss.io_detail);
    CHECK(strcmp(ss.io_backend, no_uring ? "pread" : "io_uring") == 0);
    size_t sizes[] = {0, 1, 100, 4096 - 256, 4096, 5000, 100000, 3u << 20, 5u << 20};
    size_t ns = sizeof sizes / sizeof *sizes;
    for (size_t i = 0; i < ns; i++) CHECK_OK(put_item(st, i, i * 7 % 300, sizes[i], "alice", 1));
    for (size_t i = 0; i < ns; i++) {
        kvl_store_key k;
        item_key(i, i * 7 % 300, "alice", 1, &k);
        kvl_store_value *v = NULL;
        CHECK_OK(kvl_store_get(st, &k, NULL, &v));
        CHECK_MSG(v && value_ok(v, i, i * 7 % 300, sizes[i]), "item %zu", i);
        if (v) {
            CHECK(kvl_store_value_meta(v)->codec_id == 1 && kvl_store_value_meta(v)->codec_level == 2);
            CHECK(strcmp(kvl_store_value_meta(v)->tenant, "alice") == 0);
        }
        kvl_store_value_free(v);
    }
    /* fingerprint check */
    kvl_store_key k0;
    item_key(2, 14, "alice", 1, &k0);
    uint8_t other[32];
    test_fp(other, 2);
    kvl_store_value *v = NULL;
    CHECK_ST(kvl_store_get(st, &k0, other, &v), KVL_ERR_FINGERPRINT);
    uint8_t same[32];
    test_fp(same, 1);
    CHECK_OK(kvl_store_get(st, &k0, same, &v));
    kvl_store_value_free(v);
    /* batch get with a miss in the middle */
    kvl_store_key keys[3];
    item_key(3, 21, "alice", 1, &keys[0]);
    item_key(999, 5, "alice", 1, &keys[1]);
    item_key(6, 42, "alice", 1, &keys[2]);
    kvl_store_value *out[3];
    kvl_status sts[3];
    CHECK_OK(kvl_store_get_batch(st, 3, keys, NULL, out, sts));
    CHECK(sts[0] == KVL_OK && sts[1] == KVL_ERR_KEY_NOT_FOUND && sts[2] == KVL_OK);
    CHECK(out[0] && value_ok(out[0], 3, 21, sizes[3]));
    CHECK(out[2] && value_ok(out[2], 6, 42, sizes[6]));
    for (int i = 0; i < 3; i++) kvl_store_value_free(out[i]);
    /* replace keeps one entry, new bytes */
    CHECK_OK(put_item(st, 4, 28, 4096, "alice", 1));
    kvl_store_key k4;
    item_key(4, 28, "alice", 1, &k4);
    kvl_store_meta m;
    CHECK_OK(kvl_store_stat(st, &k4, &m));
    CHECK(m.value_bytes == 4096);
    /* put_batch rejects duplicate keys, commits all */
    kvl_store_meta bm;
    test_meta(&bm, "bob", 1);
    int32_t bt[8];
    uint8_t bv[3][20000];
    kvl_store_put_item items[3];
    for (int i = 0; i < 3; i++) {
        fill_tokens(bt, 8, 100 + (uint64_t)i);
        fill_value(bv[i], sizeof bv[i], 100 + (uint64_t)i);
        item_key(100 + (uint64_t)i, 8, "bob", 1, &items[i].key);
        items[i].meta = &bm;
        items[i].tokens = NULL;
        items[i].n_tokens = 0;
        items[i].value = bv[i];
        items[i].len = sizeof bv[i];
    }
    items[2].key = items[0].key;
    CHECK_ST(kvl_store_put_batch(st, 3, items), KVL_ERR_INVALID_ARG);
    item_key(102, 8, "bob", 1, &items[2].key);
    CHECK_OK(kvl_store_put_batch(st, 3, items));
    /* bad input */
    kvl_store_meta bad;
    test_meta(&bad, "no spaces", 1);
    CHECK_ST(kvl_store_put(st, &k4, &bad, NULL, 0, "x", 1), KVL_ERR_INVALID_ARG);
    CHECK_ST(kvl_store_put(st, &k4, &bm, NULL, 0, NULL, 5), KVL_ERR_INVALID_ARG);
    static uint8_t big[9u << 20];
    CHECK_ST(kvl_store_put(st, &k4, &bm, NULL, 0, big, sizeof big), KVL_ERR_LIMIT);
    /* delete */
    CHECK_OK(kvl_store_delete(st, &k4));
    CHECK_ST(kvl_store_get(st, &k4, NULL, &v), KVL_ERR_KEY_NOT_FOUND);
    CHECK_ST(kvl_store_delete(st, &k4), KVL_ERR_KEY_NOT_FOUND);
    CHECK(audit_ok(st));
    kvl_store_close(st);

    /* reopen: everything committed is back, bit-exact */
    st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    if (!st) return;
    for (size_t i = 0; i < ns; i++) {
        if (i == 4) continue;
        kvl_store_key k;
        item_key(i, i * 7 % 300, "alice", 1, &k);
        CHECK_OK(kvl_store_get(st, &k, NULL, &v));
        CHECK_MSG(v && value_ok(v, i, i * 7 % 300, sizes[i]), "reopened item %zu", i);
        kvl_store_value_free(v);
    }
    CHECK_ST(kvl_store_get(st, &k4, NULL, &v), KVL_ERR_KEY_NOT_FOUND);
    for (int i = 0; i < 3; i++) {
        CHECK_OK(kvl_store_get(st, &items[i].key, NULL, &v));
        CHECK(v && kvl_store_value_size(v) == 20000 && memcmp(kvl_store_value_data(v), bv[i], 20000) == 0);
        kvl_store_value_free(v);
    }
    /* hits persisted across the reopen (flushed at close) */
    kvl_store_key k3;
    item_key(3, 21, "alice", 1, &k3);
    CHECK_OK(kvl_store_stat(st, &k3, &m));
    CHECK_MSG(m.hits >= 2, "hits %llu", (unsigned long long)m.hits);
    CHECK(audit_ok(st));
    /* export / import into a second store */
    json_t *j = NULL;
    CHECK_OK(kvl_store_admin_export(st, "st_basic.export", NULL, &j));
    CHECK(j && json_integer_value(json_object_get(j, "entries")) == (json_int_t)(ns - 1 + 3));
    json_decref(j);
    kvl_store_close(st);
    kvl_store *s2 = NULL;
    CHECK_OK(kvl_store_open(fresh_dir("st_basic2"), &o, &s2));
    if (s2) {
        CHECK_OK(kvl_store_admin_import(s2, "st_basic.export", &j));
        json_decref(j);
        kvl_store_key k;
        item_key(7, 49, "alice", 1, &k);
        CHECK_OK(kvl_store_get(s2, &k, NULL, &v));
        CHECK(v && value_ok(v, 7, 49, sizes[7]));
        kvl_store_value_free(v);
        CHECK(audit_ok(s2));
        /* a damaged export is rejected */
        FILE *f = fopen("st_basic.export", "r+b");
        fseek(f, 400, SEEK_SET);
        fputc(0x42 ^ fgetc(f), f);
        fclose(f);
        kvl_store_close(s2);
        s2 = NULL;
        CHECK_OK(kvl_store_open(fresh_dir("st_basic2"), &o, &s2));
        CHECK(kvl_store_admin_import(s2, "st_basic.export", &j) != KVL_OK);
        kvl_store_close(s2);
    }
    remove("st_basic.export");
}

static void test_prefix(void) {
    kvl_store_options o = opts();
    kvl_store *st = NULL;
    CHECK_OK(kvl_store_open(fresh_dir("st_prefix"), &o, &st));
    if (!st) return;
    uint8_t fp[32];
    test_fp(fp, 3);
    kvl_store_key root, k, last;
    kvl_store_root_key(fp, "t", &root);
    int32_t tok[40];
    for (int i = 0; i < 40; i++) tok[i] = i * 3;
    kvl_store_meta m;
    test_meta(&m, "t", 3);
    m.mode = KVL_STORE_MODE_PREFIX;
    /* cache blocks 0..2 of 10 tokens */
    k = root;
    for (int b = 0; b < 3; b++) {
        kvl_store_prefix_key(&k, tok + 10 * b, 10, &k);
        CHECK_OK(kvl_store_put(st, &k, &m, tok + 10 * b, 10, "kv", 2));
    }
    size_t nb = 99;
    CHECK_OK(kvl_store_longest_prefix(st, &root, tok, 40, 10, &nb, &last));
    CHECK(nb == 3 && memcmp(&last, &k, 32) == 0);
    tok[15] = 7; /* a different second block: only the first is reusable */
    CHECK_OK(kvl_store_longest_prefix(st, &root, tok, 40, 10, &nb, &last));
    CHECK(nb == 1);
    CHECK_OK(kvl_store_longest_prefix(st, &root, tok, 5, 10, &nb, &last));
    CHECK(nb == 0 && memcmp(&last, &root, 32) == 0);
    kvl_store_close(st);
}

static void test_eviction(void) {
    kvl_store_options o = opts();
    o.capacity_bytes = 1u << 20; /* 256 blocks */
    o.segment_bytes = 2u << 20;
    kvl_store *st = NULL;
    CHECK_OK(kvl_store_open(fresh_dir("st_evict"), &o, &st));
    if (!st) return;
    /* 200 one-block entries, then touch the first 20 */
    for (uint64_t i = 0; i < 200; i++) CHECK_OK(put_item(st, i, 4, 1000, "a", 1));
    for (uint64_t i = 0; i < 20; i++) {
        kvl_store_key k;
        kvl_store_value *v;
        item_key(i, 4, "a", 1, &k);
        CHECK_OK(kvl_store_get(st, &k, NULL, &v));
        kvl_store_value_free(v);
    }
    /* 100 more: the store must evict, least recently used first (20..) */
    for (uint64_t i = 200; i < 300; i++) CHECK_OK(put_item(st, i, 4, 1000, "a", 1));
    kvl_store_stats ss;
    kvl_store_get_stats(st, &ss);
    CHECK(ss.used_bytes <= o.capacity_bytes);
    CHECK(ss.evictions >= 44);
    int touched_alive = 0, old_alive = 0;
    for (uint64_t i = 0; i < 20; i++) {
        kvl_store_key k;
        item_key(i, 4, "a", 1, &k);
        touched_alive += kvl_store_stat(st, &k, NULL) == KVL_OK;
    }
    for (uint64_t i = 20; i < 60; i++) {
        kvl_store_key k;
        item_key(i, 4, "a", 1, &k);
        old_alive += kvl_store_stat(st, &k, NULL) == KVL_OK;
    }
    CHECK_MSG(touched_alive == 20, "recently read entries evicted: %d alive", touched_alive);
    CHECK_MSG(old_alive == 0, "%d of the oldest untouched entries survived", old_alive);
    for (uint64_t i = 280; i < 300; i++) {
        kvl_store_key k;
        item_key(i, 4, "a", 1, &k);
        CHECK(kvl_store_stat(st, &k, NULL) == KVL_OK);
    }
    CHECK(audit_ok(st));

    /* cost-aware: an expensive entry survives a cheaper, more recent one */
    kvl_store_evict_req all = {.policy = KVL_STORE_EVICT_LRU, .target_bytes = 0};
    uint64_t n = 0, b = 0;
    CHECK_OK(kvl_store_evict(st, &all, &n, &b));
    kvl_store_get_stats(st, &ss);
    CHECK(ss.entries == 0 && ss.used_bytes == 0);
    kvl_store_meta m;
    test_meta(&m, "a", 1);
    kvl_store_key ke, kc;
    item_key(1000, 1, "a", 1, &ke);
    item_key(1001, 1, "a", 1, &kc);
    m.recompute_cost = 1000000;
    CHECK_OK(kvl_store_put(st, &ke, &m, NULL, 0, "expensive", 9));
    m.recompute_cost = 1;
    CHECK_OK(kvl_store_put(st, &kc, &m, NULL, 0, "cheap", 5));
    kvl_store_evict_req one = {.policy = KVL_STORE_EVICT_COST, .target_bytes = 0, .max_entries = 1};
    CHECK_OK(kvl_store_evict(st, &one, &n, &b));
    CHECK(n == 1);
    CHECK(kvl_store_stat(st, &ke, NULL) == KVL_OK);
    CHECK(kvl_store_stat(st, &kc, NULL) == KVL_ERR_KEY_NOT_FOUND);

    /* TTL: expired entries are invisible at once and reclaimed by a ttl eviction */
    m.ttl_s = 1;
    kvl_store_key kt;
    item_key(1002, 1, "a", 1, &kt);
    CHECK_OK(kvl_store_put(st, &kt, &m, NULL, 0, "short", 5));
    CHECK(kvl_store_stat(st, &kt, NULL) == KVL_OK);
    struct timespec ts = {1, 200000000};
    nanosleep(&ts, NULL);
    kvl_store_value *v = NULL;
    CHECK_ST(kvl_store_get(st, &kt, NULL, &v), KVL_ERR_KEY_NOT_FOUND);
    kvl_store_evict_req ttl = {.expired_only = 1, .target_bytes = UINT64_MAX};
    CHECK_OK(kvl_store_evict(st, &ttl, &n, &b));
    CHECK(n == 1);
    CHECK(kvl_store_stat(st, &ke, NULL) == KVL_OK);

    /* quota: tenant q may hold 40 KiB; its own oldest entries go, others' stay */
    CHECK_OK(kvl_store_set_quota(st, "q", 40u << 10));
    for (uint64_t i = 0; i < 20; i++) CHECK_OK(put_item(st, 2000 + i, 2, 3000, "q", 1));
    kvl_store_get_stats(st, &ss);
    json_t *j = NULL;
    CHECK_OK(kvl_store_admin_stat(st, &j));
    json_t *t;
    size_t ti;
    json_array_foreach(json_object_get(j, "tenants"), ti, t) {
        if (strcmp(json_string_value(json_object_get(t, "tenant")), "q") == 0)
            CHECK(json_integer_value(json_object_get(t, "bytes")) <= 40 << 10);
    }
    json_decref(j);
    kvl_store_key kq;
    item_key(2019, 2, "q", 1, &kq);
    CHECK(kvl_store_stat(st, &kq, NULL) == KVL_OK);
    item_key(2000, 2, "q", 1, &kq);
    CHECK(kvl_store_stat(st, &kq, NULL) == KVL_ERR_KEY_NOT_FOUND);
    CHECK(kvl_store_stat(st, &ke, NULL) == KVL_OK);
    uint8_t big[50000] = {0};
    kvl_store_meta mq;
    test_meta(&mq, "q", 1);
    CHECK_ST(kvl_store_put(st, &kq, &mq, NULL, 0, big, sizeof big), KVL_ERR_QUOTA);
    CHECK(audit_ok(st));

    /* an entry being read survives its eviction for the reader: pin, evict, read */
    kvl_store_close(st);
}

static void test_pin_and_cache(void) {
    kvl_store_options o = opts();
    kvl_store *st = NULL;
    CHECK_OK(kvl_store_open(fresh_dir("st_cache"), &o, &st));
    if (!st) return;
    CHECK_OK(put_item(st, 1, 10, 100000, "c", 1));
    kvl_store_key k;
    item_key(1, 10, "c", 1, &k);
    kvl_store_value *a = NULL, *b = NULL;
    CHECK_OK(kvl_store_get(st, &k, NULL, &a));
    CHECK_OK(kvl_store_get(st, &k, NULL, &b));
    kvl_store_stats ss;
    kvl_store_get_stats(st, &ss);
    CHECK(ss.cache_hits == 1 && ss.cache_entries == 1);
    /* a reader's value outlives deletion and reuse of its extent */
    CHECK_OK(kvl_store_delete(st, &k));
    CHECK_OK(put_item(st, 2, 10, 100000, "c", 1));
    CHECK(a && value_ok(a, 1, 10, 100000));
    kvl_store_value *c = NULL;
    CHECK_ST(kvl_store_get(st, &k, NULL, &c), KVL_ERR_KEY_NOT_FOUND); /* not served from cache */
    kvl_store_value_free(a);
    kvl_store_value_free(b);
    /* pins: a pinned extent released by a delete is not reused until unpinned */
    CHECK_OK(put_item(st, 3, 1, 10000, "c", 1));
    item_key(3, 1, "c", 1, &k);
    kvl_store_meta m;
    CHECK_OK(kvl_store_stat(st, &k, &m));
    kvl_pin_ext(st, m.segment, m.offset, m.extent_bytes);
    CHECK_OK(kvl_store_delete(st, &k));
    kvl_store_get_stats(st, &ss);
    CHECK(ss.pending_bytes == m.extent_bytes);
    kvl_unpin_ext(st, m.segment, m.offset);
    kvl_store_get_stats(st, &ss);
    CHECK(ss.pending_bytes == 0);
    CHECK(audit_ok(st));
    kvl_store_close(st);
}

/* streaming get: every prefix handed out matches the value's bytes, prefixes only grow, the last
 * report is whole, DRAM hits are reported whole, and a corrupt value keeps its buffer for the
 * consumer while its status says CORRUPT */
typedef struct stream_log {
    size_t calls[4], last[4], total[4];
    int bad; /* a report that shrank, or bytes that differ */
    uint8_t *want[4];
} stream_log;

static void stream_cb(void *ctx, size_t i, const uint8_t *data, size_t ready, size_t total) {
    stream_log *l = ctx;
    if (i >= 4 || ready < l->last[i] || ready > total || (l->want[i] && memcmp(data, l->want[i], ready) != 0)) {
        l->bad = 1;
        return;
    }
    l->calls[i]++;
    l->last[i] = ready;
    l->total[i] = total;
}

static void test_stream(void) {
    kvl_store_options o = opts();
    o.cache_bytes = 64u << 20;
    kvl_store *st = NULL;
    CHECK_OK(kvl_store_open(fresh_dir("st_stream"), &o, &st));
    if (!st) return;
    /* multi-MiB values (several 1 MiB pieces each), one small one */
    static const size_t len[4] = {5u << 20, (3u << 20) + 12345, 777, 4u << 20};
    kvl_store_key k[4];
    stream_log lg = {0};
    for (int i = 0; i < 4; i++) {
        CHECK_OK(put_item(st, 100 + i, 16, len[i], "s", 1));
        item_key(100 + i, 16, "s", 1, &k[i]);
        lg.want[i] = malloc(len[i]);
        fill_value(lg.want[i], len[i], 100 + i);
    }
    kvl_store_value *v[4];
    kvl_status s[4];
    CHECK_OK(kvl_store_get_batch_stream(st, 4, k, NULL, v, s, stream_cb, &lg));
    CHECK(!lg.bad);
    for (int i = 0; i < 4; i++) {
        CHECK_OK(s[i]);
        CHECK(v[i] && value_ok(v[i], 100 + i, 16, len[i]));
        CHECK(lg.last[i] == len[i] && lg.total[i] == len[i]);
        if (!no_uring && len[i] > (2u << 20)) CHECK_MSG(lg.calls[i] >= 2, "value %d reported %zu times", i, lg.calls[i]);
        kvl_store_value_free(v[i]);
    }
    /* now all four sit in the DRAM tier: one whole report each, before any read */
    memset(lg.calls, 0, sizeof lg.calls);
    memset(lg.last, 0, sizeof lg.last);
    CHECK_OK(kvl_store_get_batch_stream(st, 4, k, NULL, v, s, stream_cb, &lg));
    for (int i = 0; i < 4; i++) {
        CHECK(s[i] == KVL_OK && lg.calls[i] == 1 && lg.last[i] == len[i]);
        kvl_store_value_free(v[i]);
    }
    /* a flipped byte in value 1's payload: its status says so, the buffer stays with the caller */
    CHECK_OK(kvl_store_test_flip(st, &k[1], 4096 + 100000));
    free(lg.want[1]);
    lg.want[1] = NULL; /* its bytes now differ */
    memset(lg.last, 0, sizeof lg.last);
    free(lg.want[0]);
    lg.want[0] = NULL;
    CHECK_OK(kvl_store_get_batch_stream(st, 2, k, NULL, v, s, stream_cb, &lg));
    CHECK(s[0] == KVL_OK && s[1] == KVL_ERR_CORRUPT && v[1] != NULL);
    kvl_store_value_free(v[0]);
    kvl_store_value_free(v[1]);
    /* the plain get agrees and keeps nothing */
    kvl_store_value *one = NULL;
    CHECK_ST(kvl_store_get(st, &k[1], NULL, &one), KVL_ERR_CORRUPT);
    CHECK(one == NULL);
    for (int i = 0; i < 4; i++) free(lg.want[i]);
    kvl_store_close(st);
}

/* the clean-close index snapshot is used when valid and ignored when stale */
static void test_snapshot(void) {
    const char *dir = fresh_dir("st_snap");
    kvl_store_options o = opts();
    o.segment_bytes = 32u << 20;
    o.capacity_bytes = 128u << 20;
    kvl_store *st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    if (!st) return;
    enum { N = 12000, B = 1000 };
    kvl_store_meta m;
    test_meta(&m, "snap", 1);
    kvl_store_key root;
    kvl_store_root_key(m.fingerprint, "snap", &root);
    kvl_store_put_item it[B];
    uint64_t vals[B];
    for (uint64_t i = 0; i < N; i += B) {
        for (size_t j = 0; j < B; j++) {
            vals[j] = i + j;
            int32_t tok = (int32_t)(i + j);
            kvl_store_chunk_key(&root, &tok, 1, &it[j].key);
            it[j].meta = &m;
            it[j].tokens = NULL;
            it[j].n_tokens = 0;
            it[j].value = &vals[j];
            it[j].len = 8;
        }
        CHECK_OK(kvl_store_put_batch(st, B, it));
    }
    kvl_store_key last = it[B - 1].key;
    kvl_store_close(st);
    st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    if (!st) return;
    kvl_store_stats ss;
    kvl_store_get_stats(st, &ss);
    CHECK(ss.index_from_snapshot == 1 && ss.entries == N);
    kvl_store_value *v = NULL;
    CHECK_OK(kvl_store_get(st, &last, NULL, &v));
    CHECK(v && kvl_store_value_size(v) == 8 && *(const uint64_t *)kvl_store_value_data(v) == N - 1);
    kvl_store_value_free(v);
    CHECK(audit_ok(st));
    kvl_store_close(st); /* writes a new snapshot */
    /* keep this snapshot, change the store, put the old snapshot back: it must be ignored */
    CHECK(rename("st_snap/index.snap", "st_snap.old") == 0);
    st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    kvl_store_get_stats(st, &ss);
    CHECK(ss.index_from_snapshot == 0);
    CHECK_OK(kvl_store_delete(st, &last));
    kvl_store_close(st);
    CHECK(rename("st_snap.old", "st_snap/index.snap") == 0);
    st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    kvl_store_get_stats(st, &ss);
    CHECK(ss.index_from_snapshot == 0 && ss.entries == N - 1);
    CHECK_ST(kvl_store_stat(st, &last, NULL), KVL_ERR_KEY_NOT_FOUND);
    CHECK(audit_ok(st));
    kvl_store_close(st);
    fresh_dir(dir);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--no-uring")) no_uring = 1;
    test_keys();
    test_roundtrip();
    test_prefix();
    test_eviction();
    test_pin_and_cache();
    test_snapshot();
    test_stream();
    KVL_TEST_END();
}
