/* test_store_concurrency.c - many threads put / get / batch-get / delete / evict the same small key
 * space of a small store (so capacity eviction runs concurrently with readers). Values are
 * self-describing (key id + version + derived bytes) so every successful read is checked bit-exact.
 * Ends with a clean audit, then a reopen and another audit. Run under ASan in CI; under TSan by
 * hand (see docs/store-format.md). */
#include <pthread.h>

#include "store_impl.h"
#include "store_test_util.h"

#define NKEYS 48
#define NTHREADS 8
static int OPS = 300;
static kvl_store *st;
static kvl_store_key keys[NKEYS];
static atomic_int failures;
static atomic_uint_fast64_t version_ctr;

static size_t vlen(uint64_t version) { return 16 + (size_t)(version * 7919 % 150000); }

static void make_value(uint8_t *p, uint64_t kid, uint64_t version) {
    size_t n = vlen(version);
    memcpy(p, &kid, 8);
    memcpy(p + 8, &version, 8);
    fill_value(p + 16, n - 16, kid * 1000003 + version);
}

static int check_value(const kvl_store_value *v, uint64_t kid) {
    size_t n = kvl_store_value_size(v);
    if (n < 16) return 0;
    const uint8_t *p = kvl_store_value_data(v);
    uint64_t k, ver;
    memcpy(&k, p, 8);
    memcpy(&ver, p + 8, 8);
    if (k != kid || n != vlen(ver)) return 0;
    uint8_t *want = malloc(n);
    make_value(want, kid, ver);
    int ok = memcmp(want, p, n) == 0;
    int32_t t[8];
    fill_tokens(t, 8, kid);
    ok &= kvl_store_value_n_tokens(v) == 8 && memcmp(t, kvl_store_value_tokens(v), 32) == 0;
    free(want);
    return ok;
}

static void *worker(void *arg) {
    uint64_t s = (uint64_t)(uintptr_t)arg * 977 + 1;
    uint8_t *buf = malloc(200000);
    kvl_store_meta m;
    test_meta(&m, (uintptr_t)arg % 2 ? "odd" : "even", 1);
    for (int op = 0; op < OPS; op++) {
        unsigned r = (unsigned)(splitmix(&s) % 100);
        uint64_t kid = splitmix(&s) % NKEYS;
        if (r < 35) {
            uint64_t ver = atomic_fetch_add(&version_ctr, 1);
            make_value(buf, kid, ver);
            int32_t t[8];
            fill_tokens(t, 8, kid);
            kvl_status ps = kvl_store_put(st, &keys[kid], &m, t, 8, buf, vlen(ver));
            if (ps != KVL_OK) {
                fprintf(stderr, "FAIL put: %s: %s\n", kvl_status_str(ps), kvl_last_error());
                atomic_fetch_add(&failures, 1);
            }
        } else if (r < 70) {
            kvl_store_value *v = NULL;
            kvl_status gs = kvl_store_get(st, &keys[kid], NULL, &v);
            if (gs == KVL_OK && !check_value(v, kid)) {
                fprintf(stderr, "FAIL get: key %llu wrong bytes\n", (unsigned long long)kid);
                atomic_fetch_add(&failures, 1);
            } else if (gs != KVL_OK && gs != KVL_ERR_KEY_NOT_FOUND) {
                fprintf(stderr, "FAIL get: %s: %s\n", kvl_status_str(gs), kvl_last_error());
                atomic_fetch_add(&failures, 1);
            }
            /* hold the value across other threads' evictions before checking it once more */
            if (v && !check_value(v, kid)) atomic_fetch_add(&failures, 1);
            kvl_store_value_free(v);
        } else if (r < 85) {
            kvl_store_key ks[6];
            uint64_t ids[6];
            for (int i = 0; i < 6; i++) {
                ids[i] = splitmix(&s) % NKEYS;
                ks[i] = keys[ids[i]];
            }
            kvl_store_value *out[6];
            kvl_status sts[6];
            kvl_store_get_batch(st, 6, ks, NULL, out, sts);
            for (int i = 0; i < 6; i++) {
                if (sts[i] == KVL_OK && !check_value(out[i], ids[i])) {
                    fprintf(stderr, "FAIL batch get: wrong bytes\n");
                    atomic_fetch_add(&failures, 1);
                } else if (sts[i] != KVL_OK && sts[i] != KVL_ERR_KEY_NOT_FOUND) {
                    fprintf(stderr, "FAIL batch get: %s\n", kvl_status_str(sts[i]));
                    atomic_fetch_add(&failures, 1);
                }
                kvl_store_value_free(out[i]);
            }
        } else if (r < 93) {
            kvl_status ds = kvl_store_delete(st, &keys[kid]);
            if (ds != KVL_OK && ds != KVL_ERR_KEY_NOT_FOUND) atomic_fetch_add(&failures, 1);
        } else if (r < 97) {
            kvl_store_evict_req q = {.policy = r & 1 ? KVL_STORE_EVICT_COST : KVL_STORE_EVICT_LRU, .max_entries = 2,
                                     .tenant = r & 2 ? "odd" : NULL};
            if (kvl_store_evict(st, &q, NULL, NULL) != KVL_OK) atomic_fetch_add(&failures, 1);
        } else if (r < 99) {
            kvl_store_meta mm;
            kvl_store_stat(st, &keys[kid], &mm);
            kvl_store_stats ss;
            kvl_store_get_stats(st, &ss);
        } else {
            if (kvl_store_flush(st) != KVL_OK) atomic_fetch_add(&failures, 1);
        }
    }
    free(buf);
    return NULL;
}

int main(void) {
    if (getenv("KVL_LONG")) OPS = 3000;
    const char *dir = fresh_dir("st_conc");
    kvl_store_options o = small_opts();
    o.capacity_bytes = 3u << 20; /* ~40 average values: eviction runs all the time */
    o.segment_bytes = 2u << 20;
    o.cache_bytes = 1u << 20;
    o.verify_threads = 3; /* batched gets hand checksums to workers */
    CHECK_OK(kvl_store_open(dir, &o, &st));
    if (!st) KVL_TEST_END();
    uint8_t fp[32];
    test_fp(fp, 1);
    for (int i = 0; i < NKEYS; i++) {
        kvl_store_key root;
        kvl_store_root_key(fp, i % 2 ? "odd" : "even", &root);
        int32_t t[8];
        fill_tokens(t, 8, (uint64_t)i);
        kvl_store_chunk_key(&root, t, 8, &keys[i]);
    }
    pthread_t th[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) pthread_create(&th[i], NULL, worker, (void *)(uintptr_t)i);
    json_t *mid = NULL; /* an audit while the workers run must not crash or deadlock */
    CHECK_OK(kvl_store_audit(st, 1, &mid));
    json_decref(mid);
    for (int i = 0; i < NTHREADS; i++) pthread_join(th[i], NULL);
    CHECK_MSG(atomic_load(&failures) == 0, "%d failures", atomic_load(&failures));
    kvl_store_stats ss;
    kvl_store_get_stats(st, &ss);
    printf("%d threads x %d ops: %llu puts, %llu gets (%llu cache hits), %llu deletes, %llu evictions, %llu entries\n",
           NTHREADS, OPS, (unsigned long long)ss.puts, (unsigned long long)ss.gets, (unsigned long long)ss.cache_hits,
           (unsigned long long)ss.deletes, (unsigned long long)ss.evictions, (unsigned long long)ss.entries);
    CHECK(ss.used_bytes <= o.capacity_bytes);
    CHECK(ss.pending_bytes == 0);
    CHECK(ss.evictions > 0);
    printf("checksums verified by %d worker threads: %llu\n", ss.verify_threads, (unsigned long long)ss.worker_verified);
    CHECK(ss.worker_verified > 0);
    CHECK(audit_ok(st));
    kvl_store_close(st);
    st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    if (st) {
        for (int i = 0; i < NKEYS; i++) {
            kvl_store_value *v = NULL;
            if (kvl_store_get(st, &keys[i], NULL, &v) == KVL_OK) CHECK(check_value(v, (uint64_t)i));
            kvl_store_value_free(v);
        }
        CHECK(audit_ok(st));
        kvl_store_close(st);
    }
    KVL_TEST_END();
}
