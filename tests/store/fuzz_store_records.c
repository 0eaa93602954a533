/* libFuzzer target: the store's on-disk record parsers (index entry records, extent headers, export
 * files) must reject every malformed input with a status, never crash or read out of bounds. The
 * harness also re-seals inputs with a valid checksum so the fields behind the checksum get fuzzed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "kvl_store_admin.h"
#include "store_impl.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kvl_store *st;

static void check_record(const uint8_t *p, size_t n) {
    kvl_rec r;
    char tenant[KVL_STORE_TENANT_MAX + 1];
    if (kvl_rec_decode(p, n, &r, tenant) == KVL_OK) KVL_ASSERT(strlen(tenant) <= KVL_STORE_TENANT_MAX);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!st) {
        kvl_store_options o;
        kvl_store_options_default(&o);
        o.segment_bytes = 4u << 20;
        o.capacity_bytes = 16u << 20;
        o.cache_bytes = 0;
        char dir[64];
        snprintf(dir, sizeof dir, "fuzz-store-%d", (int)getpid());
        KVL_ASSERT(kvl_store_open(dir, &o, &st) == KVL_OK);
    }
    /* 1. an index entry record as is, and re-sealed */
    check_record(data, size);
    uint8_t rec[KVL_ENTRY_REC_BYTES];
    memset(rec, 0, sizeof rec);
    memcpy(rec, data, size < sizeof rec ? size : sizeof rec);
    kvl_put16(rec, 0x4B45);
    rec[2] = 1;
    kvl_put64(rec + 224, XXH3_64bits(rec, 224));
    check_record(rec, sizeof rec);
    /* 2. an extent header, as is and re-sealed, against a record taken from the same bytes */
    kvl_rec r;
    char tenant[KVL_STORE_TENANT_MAX + 1];
    if (kvl_rec_decode(rec, sizeof rec, &r, tenant) != KVL_OK) memset(&r, 0, sizeof r);
    uint8_t hdr[KVL_EXT_HDR];
    memset(hdr, 0, sizeof hdr);
    memcpy(hdr, data, size < sizeof hdr ? size : sizeof hdr);
    (void)kvl_ext_hdr_check(hdr, &r);
    memcpy(hdr, "KVLEXT01", 8);
    kvl_put64(hdr + 248, XXH3_64bits(hdr, 248));
    (void)kvl_ext_hdr_check(hdr, &r);
    /* 3. an export file */
    char path[64];
    snprintf(path, sizeof path, "fuzz-import-%d", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(data, 1, size, f);
        fclose(f);
        json_t *out = NULL;
        if (kvl_store_admin_import(st, path, &out) == KVL_OK) json_decref(out);
        unlink(path);
    }
    kvl_clear_error();
    return 0;
}
