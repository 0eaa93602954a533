/* format.c - key derivation and the byte layouts of index records and extent headers
 * (docs/store-format.md is the spec; change both together). */
#include <openssl/evp.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "store_impl.h"

static void sha256_parts(const void *a, size_t na, const void *b, size_t nb, const void *c, size_t nc,
                         const int32_t *tok, size_t ntok, kvl_store_key *out) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    KVL_ASSERT(ctx);
    KVL_ASSERT(EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1);
    if (na) EVP_DigestUpdate(ctx, a, na);
    if (nb) EVP_DigestUpdate(ctx, b, nb);
    if (nc) EVP_DigestUpdate(ctx, c, nc);
    /* canonical little-endian token encoding, independent of the host byte order */
    uint8_t buf[1024];
    size_t k = 0;
    for (size_t i = 0; i < ntok; i++) {
        kvl_put32(buf + k, (uint32_t)tok[i]);
        k += 4;
        if (k == sizeof buf) {
            EVP_DigestUpdate(ctx, buf, k);
            k = 0;
        }
    }
    if (k) EVP_DigestUpdate(ctx, buf, k);
    unsigned int len = 0;
    KVL_ASSERT(EVP_DigestFinal_ex(ctx, out->b, &len) == 1 && len == 32);
    EVP_MD_CTX_free(ctx);
}

void kvl_store_root_key(const uint8_t fingerprint[KVL_STORE_FP_BYTES], const char *tenant,
                        kvl_store_key *out) {
    static const char tag[] = "kvloom-v1";
    sha256_parts(tag, sizeof tag - 1, fingerprint, KVL_STORE_FP_BYTES, tenant ? tenant : "",
                 tenant ? strlen(tenant) : 0, NULL, 0, out);
}

void kvl_store_chunk_key(const kvl_store_key *root, const int32_t *tokens, size_t n_tokens,
                         kvl_store_key *out) {
    sha256_parts(root->b, KVL_STORE_KEY_BYTES, "chunk", 5, NULL, 0, tokens, n_tokens, out);
}

void kvl_store_prefix_key(const kvl_store_key *prev, const int32_t *tokens, size_t n_tokens,
                          kvl_store_key *out) {
    sha256_parts(prev->b, KVL_STORE_KEY_BYTES, NULL, 0, NULL, 0, tokens, n_tokens, out);
}

char *kvl_store_key_hex(const kvl_store_key *key, char hex[65]) {
    static const char d[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = d[key->b[i] >> 4];
        hex[2 * i + 1] = d[key->b[i] & 15];
    }
    hex[64] = 0;
    return hex;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

kvl_status kvl_store_key_parse(const char *hex, kvl_store_key *out) {
    if (!hex || !out || strlen(hex) != 64)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "a key is 64 hex characters");
    for (int i = 0; i < 32; i++) {
        int a = hexval(hex[2 * i]), b = hexval(hex[2 * i + 1]);
        if (a < 0 || b < 0) return kvl_errorf(KVL_ERR_INVALID_ARG, "key '%s' is not hex", hex);
        out->b[i] = (uint8_t)(a << 4 | b);
    }
    return KVL_OK;
}

uint64_t kvl_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t kvl_payload_sum(const int32_t *tokens, size_t n_tokens, const void *value, size_t len) {
    XXH3_state_t *s = XXH3_createState();
    KVL_ASSERT(s);
    XXH3_64bits_reset(s);
    /* tokens are stored little-endian on disk; this runs on the in-memory copy, which on the
     * little-endian hosts we support is the same bytes */
    if (n_tokens) XXH3_64bits_update(s, tokens, n_tokens * 4);
    if (len) XXH3_64bits_update(s, value, len);
    uint64_t h = XXH3_64bits_digest(s);
    XXH3_freeState(s);
    return h;
}

/* entry record v1, KVL_ENTRY_REC_BYTES bytes: see docs/store-format.md "Index records" */
void kvl_rec_encode(const kvl_rec *r, const kvl_store *st, uint8_t *p) {
    memset(p, 0, KVL_ENTRY_REC_BYTES);
    kvl_put16(p, 0x4B45);
    p[2] = 1;
    p[3] = r->mode;
    kvl_put16(p + 4, r->codec_id);
    kvl_put16(p + 6, r->codec_level);
    kvl_put32(p + 8, r->seg);
    kvl_put32(p + 12, r->n_tokens);
    const uint64_t f[10] = {r->off,        r->ext_len,    r->value_len, r->checksum,       r->generation,
                            r->created_ns, r->expires_ns, r->cost,      r->last_access_ns, r->hits};
    for (int i = 0; i < 10; i++) kvl_put64(p + 16 + 8 * i, f[i]);
    memcpy(p + 96, r->fp, 32);
    const char *t = kvl_tenant_name((kvl_store *)st, r->tenant);
    size_t tl = strlen(t);
    p[128] = (uint8_t)tl;
    memcpy(p + 129, t, tl);
    kvl_put64(p + 224, XXH3_64bits(p, 224));
}

kvl_status kvl_rec_decode(const uint8_t *p, size_t n, kvl_rec *r, char tenant[KVL_STORE_TENANT_MAX + 1]) {
    if (n != KVL_ENTRY_REC_BYTES || kvl_get16(p) != 0x4B45)
        return kvl_errorf(KVL_ERR_FORMAT, "index entry record of %zu bytes has a bad magic", n);
    if (p[2] != 1) return kvl_errorf(KVL_ERR_VERSION, "index entry record version %u", p[2]);
    if (kvl_get64(p + 224) != XXH3_64bits(p, 224))
        return kvl_errorf(KVL_ERR_CHECKSUM, "index entry record checksum mismatch");
    if (p[128] > KVL_STORE_TENANT_MAX) return kvl_errorf(KVL_ERR_FORMAT, "tenant name too long");
    memset(r, 0, sizeof *r);
    r->mode = p[3];
    r->codec_id = kvl_get16(p + 4);
    r->codec_level = kvl_get16(p + 6);
    r->seg = kvl_get32(p + 8);
    r->n_tokens = kvl_get32(p + 12);
    uint64_t *f[10] = {&r->off,        &r->ext_len,    &r->value_len, &r->checksum,       &r->generation,
                       &r->created_ns, &r->expires_ns, &r->cost,      &r->last_access_ns, &r->hits};
    for (int i = 0; i < 10; i++) *f[i] = kvl_get64(p + 16 + 8 * i);
    memcpy(r->fp, p + 96, 32);
    memcpy(tenant, p + 129, p[128]);
    tenant[p[128]] = 0;
    r->state = 1;
    return KVL_OK;
}

static const uint8_t ext_magic[8] = {'K', 'V', 'L', 'E', 'X', 'T', '0', '1'};

/* extent header, KVL_EXT_HDR bytes: see docs/store-format.md "Extents" */
void kvl_ext_hdr_encode(uint8_t *h, const kvl_rec *r, const char *tenant) {
    memset(h, 0, KVL_EXT_HDR);
    memcpy(h, ext_magic, 8);
    kvl_put16(h + 8, KVL_STORE_FORMAT_VERSION);
    kvl_put16(h + 10, KVL_EXT_HDR);
    h[12] = r->mode;
    size_t tl = strlen(tenant);
    h[13] = (uint8_t)tl;
    kvl_put16(h + 14, r->codec_id);
    kvl_put16(h + 16, r->codec_level);
    kvl_put32(h + 20, r->n_tokens);
    kvl_put64(h + 24, r->value_len);
    kvl_put64(h + 32, r->generation);
    kvl_put64(h + 40, r->checksum);
    kvl_put64(h + 48, r->created_ns);
    memcpy(h + 56, r->key.b, 32);
    memcpy(h + 88, r->fp, 32);
    memcpy(h + 120, tenant, tl);
    kvl_put64(h + 248, XXH3_64bits(h, 248));
}

kvl_status kvl_ext_hdr_check(const uint8_t *h, const kvl_rec *r) {
    if (memcmp(h, ext_magic, 8) != 0) return kvl_errorf(KVL_ERR_CORRUPT, "extent header magic is wrong");
    if (kvl_get64(h + 248) != XXH3_64bits(h, 248))
        return kvl_errorf(KVL_ERR_CORRUPT, "extent header checksum mismatch");
    if (kvl_get16(h + 8) != KVL_STORE_FORMAT_VERSION || kvl_get16(h + 10) != KVL_EXT_HDR)
        return kvl_errorf(KVL_ERR_CORRUPT, "extent header version %u unsupported", kvl_get16(h + 8));
    if (memcmp(h + 56, r->key.b, 32) != 0)
        return kvl_errorf(KVL_ERR_CORRUPT, "extent holds another key's bytes");
    if (memcmp(h + 88, r->fp, 32) != 0)
        return kvl_errorf(KVL_ERR_CORRUPT, "extent fingerprint differs from the index");
    if (kvl_get64(h + 32) != r->generation || kvl_get64(h + 24) != r->value_len ||
        kvl_get32(h + 20) != r->n_tokens || kvl_get64(h + 40) != r->checksum)
        return kvl_errorf(KVL_ERR_CORRUPT, "extent header disagrees with the index entry");
    return KVL_OK;
}

void kvl_rec_to_meta(const kvl_store *st, const kvl_rec *r, kvl_store_meta *m) {
    memset(m, 0, sizeof *m);
    memcpy(m->fingerprint, r->fp, 32);
    snprintf(m->tenant, sizeof m->tenant, "%s", kvl_tenant_name((kvl_store *)st, r->tenant));
    m->codec_id = r->codec_id;
    m->codec_level = r->codec_level;
    m->mode = r->mode;
    m->recompute_cost = r->cost;
    m->n_tokens = r->n_tokens;
    m->value_bytes = r->value_len;
    m->extent_bytes = r->ext_len;
    m->created_ns = r->created_ns;
    m->last_access_ns = r->last_access_ns;
    m->hits = r->hits;
    m->expires_ns = r->expires_ns;
    m->ttl_s = r->expires_ns ? (r->expires_ns - r->created_ns) / 1000000000ull : 0;
    m->generation = r->generation;
    m->segment = r->seg;
    m->offset = r->off;
    m->checksum = r->checksum;
}
