/* store_test_util.h - helpers shared by the store tests. */
#ifndef STORE_TEST_UTIL_H
#define STORE_TEST_UTIL_H

#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvl_store.h"
#include "kvl_store_admin.h"
#include "kvl_test.h"

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *f) {
    (void)sb; (void)flag; (void)f;
    return remove(p);
}

/* removes dir recursively (if present) and returns it */
static inline const char *fresh_dir(const char *dir) {
    nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    return dir;
}

static inline uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* deterministic value bytes for item id */
static inline void fill_value(uint8_t *p, size_t n, uint64_t id) {
    uint64_t s = id * 7919 + 1;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x = splitmix(&s);
        memcpy(p + i, &x, 8);
    }
    for (; i < n; i++) p[i] = (uint8_t)splitmix(&s);
}

static inline void fill_tokens(int32_t *t, size_t n, uint64_t id) {
    uint64_t s = id * 31 + 7;
    for (size_t i = 0; i < n; i++) t[i] = (int32_t)(splitmix(&s) % 32000);
}

static inline void test_fp(uint8_t fp[32], int which) {
    for (int i = 0; i < 32; i++) fp[i] = (uint8_t)(i * 13 + which);
}

static inline void test_meta(kvl_store_meta *m, const char *tenant, int fp) {
    memset(m, 0, sizeof *m);
    test_fp(m->fingerprint, fp);
    snprintf(m->tenant, sizeof m->tenant, "%s", tenant);
    m->codec_id = 1;
    m->codec_level = 2;
}

/* key of item id: the chunk key of its tokens under (fp, tenant) */
static inline void item_key(uint64_t id, size_t ntok, const char *tenant, int fp, kvl_store_key *k) {
    uint8_t f[32];
    test_fp(f, fp);
    kvl_store_key root;
    kvl_store_root_key(f, tenant, &root);
    int32_t *t = malloc((ntok ? ntok : 1) * 4);
    fill_tokens(t, ntok, id);
    kvl_store_chunk_key(&root, t, ntok, k);
    free(t);
}

/* puts item id with ntok tokens and len bytes */
static inline kvl_status put_item(kvl_store *st, uint64_t id, size_t ntok, size_t len, const char *tenant, int fp) {
    kvl_store_key k;
    item_key(id, ntok, tenant, fp, &k);
    kvl_store_meta m;
    test_meta(&m, tenant, fp);
    int32_t *t = malloc((ntok ? ntok : 1) * 4);
    uint8_t *v = malloc(len ? len : 1);
    fill_tokens(t, ntok, id);
    fill_value(v, len, id);
    kvl_status s = kvl_store_put(st, &k, &m, t, ntok, v, len);
    free(t);
    free(v);
    return s;
}

/* 1 when the value read back is exactly item id's */
static inline int value_ok(const kvl_store_value *v, uint64_t id, size_t ntok, size_t len) {
    if (kvl_store_value_size(v) != len || kvl_store_value_n_tokens(v) != ntok) return 0;
    int32_t *t = malloc((ntok ? ntok : 1) * 4);
    uint8_t *b = malloc(len ? len : 1);
    fill_tokens(t, ntok, id);
    fill_value(b, len, id);
    int ok = memcmp(t, kvl_store_value_tokens(v), ntok * 4) == 0 && memcmp(b, kvl_store_value_data(v), len) == 0;
    free(t);
    free(b);
    return ok;
}

/* runs a full audit with data; returns 1 when ok, printing the report otherwise */
static inline int audit_ok(kvl_store *st) {
    json_t *r = NULL;
    kvl_status s = kvl_store_audit(st, 1, &r);
    if (s != KVL_OK) {
        fprintf(stderr, "audit failed: %s: %s\n", kvl_status_str(s), kvl_last_error());
        return 0;
    }
    int ok = json_is_true(json_object_get(r, "ok"));
    if (!ok) {
        char *d = json_dumps(r, JSON_COMPACT);
        fprintf(stderr, "audit report: %.4000s\n", d);
        free(d);
    }
    json_decref(r);
    return ok;
}

static inline kvl_store_options small_opts(void) {
    kvl_store_options o;
    kvl_store_options_default(&o);
    o.segment_bytes = 8u << 20;
    o.capacity_bytes = 64u << 20;
    o.cache_bytes = 4u << 20;
    o.queue_depth = 32;
    o.load_threads = 2;
    return o;
}

#endif
