/* test_store_faults.c - injected faults: failed writes, ENOSPC, fsync errors, torn writes and flipped
 * bytes give the right error, lose nothing committed, and show up in the audit. */
#include "store_impl.h"
#include "store_test_util.h"

static int get_ok(kvl_store *st, uint64_t id, size_t ntok, size_t len) {
    kvl_store_key k;
    item_key(id, ntok, "f", 1, &k);
    kvl_store_value *v = NULL;
    kvl_status s = kvl_store_get(st, &k, NULL, &v);
    int ok = s == KVL_OK && value_ok(v, id, ntok, len);
    kvl_store_value_free(v);
    return ok;
}

static kvl_status get_st(kvl_store *st, uint64_t id, size_t ntok) {
    kvl_store_key k;
    item_key(id, ntok, "f", 1, &k);
    kvl_store_value *v = NULL;
    kvl_status s = kvl_store_get(st, &k, NULL, &v);
    kvl_store_value_free(v);
    return s;
}

static json_t *audit(kvl_store *st) {
    json_t *r = NULL;
    CHECK_OK(kvl_store_audit(st, 1, &r));
    return r;
}

int main(void) {
    const char *dir = fresh_dir("st_faults");
    kvl_store_options o = small_opts();
    o.cache_bytes = 0; /* every get goes to disk */
    kvl_store *st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    if (!st) KVL_TEST_END();
    const size_t LEN = 50000, NT = 16;
    for (uint64_t i = 0; i < 10; i++) CHECK_OK(put_item(st, i, NT, LEN, "f", 1));

    /* failed write: EIO, nothing visible, space back */
    kvl_store_stats s0, s1;
    kvl_store_get_stats(st, &s0);
    kvl_store_test_fault(st, KVL_STORE_FAULT_WRITE_EIO, 1);
    CHECK_ST(put_item(st, 100, NT, LEN, "f", 1), KVL_ERR_IO);
    CHECK_ST(get_st(st, 100, NT), KVL_ERR_KEY_NOT_FOUND);
    kvl_store_get_stats(st, &s1);
    CHECK(s1.used_bytes == s0.used_bytes && s1.pending_bytes == 0);
    /* ENOSPC */
    kvl_store_test_fault(st, KVL_STORE_FAULT_ENOSPC, 1);
    CHECK_ST(put_item(st, 101, NT, LEN, "f", 1), KVL_ERR_NOSPC);
    CHECK_ST(get_st(st, 101, NT), KVL_ERR_KEY_NOT_FOUND);
    /* a batch whose second write fails commits nothing */
    kvl_store_test_fault(st, KVL_STORE_FAULT_NONE, 0);
    CHECK(audit_ok(st));

    /* fsync error: KVL_ERR_FSYNC, the segment is fenced, later puts go elsewhere */
    kvl_store_test_fault(st, KVL_STORE_FAULT_FSYNC_EIO, 1);
    CHECK_ST(put_item(st, 102, NT, LEN, "f", 1), KVL_ERR_FSYNC);
    CHECK_ST(get_st(st, 102, NT), KVL_ERR_KEY_NOT_FOUND);
    kvl_store_get_stats(st, &s1);
    CHECK(s1.fenced_segments == 1);
    CHECK_OK(put_item(st, 103, NT, LEN, "f", 1));
    kvl_store_key k103;
    item_key(103, NT, "f", 1, &k103);
    kvl_store_meta m;
    CHECK_OK(kvl_store_stat(st, &k103, &m));
    CHECK(m.segment == 1);
    for (uint64_t i = 0; i < 10; i++) CHECK_MSG(get_ok(st, i, NT, LEN), "committed item %llu", (unsigned long long)i);
    json_t *r = audit(st);
    CHECK(r && json_is_true(json_object_get(r, "ok"))); /* the failed put's extent is pending, not orphaned */
    json_decref(r);

    /* torn write acknowledged by the device: the read catches it, the audit names it */
    kvl_store_test_fault(st, KVL_STORE_FAULT_TORN, 1);
    CHECK_OK(put_item(st, 104, NT, LEN, "f", 1));
    CHECK_ST(get_st(st, 104, NT), KVL_ERR_CORRUPT);
    /* flipped bytes: in the value, in the header */
    kvl_store_key k3, k5;
    item_key(3, NT, "f", 1, &k3);
    item_key(5, NT, "f", 1, &k5);
    CHECK_OK(kvl_store_test_flip(st, &k3, 30000));
    CHECK_OK(kvl_store_test_flip(st, &k5, 60));
    CHECK_ST(get_st(st, 3, NT), KVL_ERR_CORRUPT);
    CHECK_ST(get_st(st, 5, NT), KVL_ERR_CORRUPT);
    CHECK(get_ok(st, 4, NT, LEN));
    r = audit(st);
    CHECK(r && json_is_false(json_object_get(r, "ok")));
    json_t *dmg = json_object_get(r, "damaged");
    CHECK_MSG(json_array_size(dmg) == 3, "%zu damaged", json_array_size(dmg));
    char h3[65], h5[65], h104[65];
    kvl_store_key k104;
    item_key(104, NT, "f", 1, &k104);
    kvl_store_key_hex(&k3, h3);
    kvl_store_key_hex(&k5, h5);
    kvl_store_key_hex(&k104, h104);
    int seen = 0;
    size_t i;
    json_t *d;
    json_array_foreach(dmg, i, d) {
        const char *k = json_string_value(json_object_get(d, "key"));
        seen |= (!strcmp(k, h3)) | (!strcmp(k, h5)) << 1 | (!strcmp(k, h104)) << 2;
        CHECK(!strcmp(json_string_value(json_object_get(d, "status")), "KVL_ERR_CORRUPT"));
        printf("damaged: %s: %s\n", k, json_string_value(json_object_get(d, "error")));
    }
    CHECK(seen == 7);
    json_decref(r);
    CHECK_OK(kvl_store_admin_verify(st, &k3, 1, &r));
    CHECK(r && json_is_false(json_object_get(r, "ok")));
    json_decref(r);
    kvl_store_stats s2;
    kvl_store_get_stats(st, &s2);
    CHECK(s2.corrupt_reads >= 3);
    kvl_store_close(st);

    /* reopen: fence persisted, the failed put's extent reclaimed, everything else intact */
    st = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &st));
    if (!st) KVL_TEST_END();
    kvl_store_get_stats(st, &s2);
    CHECK(s2.fenced_segments == 1);
    CHECK(s2.recovered_extents == 1);
    for (uint64_t id = 0; id < 10; id++)
        if (id != 3 && id != 5) CHECK(get_ok(st, id, NT, LEN));
    CHECK(get_ok(st, 103, NT, LEN));
    CHECK_ST(get_st(st, 3, NT), KVL_ERR_CORRUPT);
    /* removing the damaged entries makes the audit clean again */
    CHECK_OK(kvl_store_delete(st, &k3));
    CHECK_OK(kvl_store_delete(st, &k5));
    CHECK_OK(kvl_store_delete(st, &k104));
    CHECK(audit_ok(st));
    /* a read-only open works and writes nothing */
    kvl_store_close(st);
    kvl_store_options ro = o;
    ro.read_only = 1;
    st = NULL;
    CHECK_OK(kvl_store_open(dir, &ro, &st));
    if (st) {
        CHECK_ST(put_item(st, 200, NT, LEN, "f", 1), KVL_ERR_PERMISSION);
        CHECK(get_ok(st, 0, NT, LEN));
        CHECK(audit_ok(st));
        /* a second writer is refused while this handle is open? read-only takes no lock: skip */
        kvl_store_close(st);
    }
    /* not a store / missing */
    kvl_store_options nc = o;
    nc.create = 0;
    CHECK_ST(kvl_store_open(fresh_dir("st_faults_none"), &nc, &st), KVL_ERR_NOT_FOUND);
    /* two writers on one store: the second is refused */
    kvl_store *a = NULL, *b = NULL;
    CHECK_OK(kvl_store_open(dir, &o, &a));
    CHECK_ST(kvl_store_open(dir, &o, &b), KVL_ERR_BUSY);
    kvl_store_close(a);
    kvl_store_close(b);
    KVL_TEST_END();
}
