/* Bearer-token authentication: token -> tenant, compared in constant time. */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <string.h>

#include "http_impl.h"

/* Tokens shorter than this are guessable; refuse them rather than serve with them. */
#define KVL_MIN_TOKEN 16

static void sha256(const char *s, uint8_t out[32]) {
    unsigned int n = 32;
    EVP_Digest(s, strlen(s), out, &n, EVP_sha256(), NULL);
}

int kvl_name_ok(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n == 0 || n > max || !strcmp(s, ".") || !strcmp(s, "..")) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
              c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

static kvl_status token_ok(const char *tok, const char *what) {
    if (strlen(tok) < KVL_MIN_TOKEN)
        return kvl_errorf(KVL_ERR_FORMAT, "auth file: %s is shorter than %d characters", what, KVL_MIN_TOKEN);
    for (const char *p = tok; *p; p++)
        if (*p <= ' ' || *p == 0x7f)
            return kvl_errorf(KVL_ERR_FORMAT, "auth file: %s contains whitespace or control characters", what);
    return KVL_OK;
}

kvl_status kvl_auth_load(const char *path, kvl_auth *out) {
    memset(out, 0, sizeof *out);
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) return kvl_errorf(KVL_ERR_JSON, "auth file %s: line %d: %s", path, je.line, je.text);
    kvl_status s = KVL_OK;
    const char *k;
    json_t *v;
    if (!json_is_object(root)) {
        s = kvl_errorf(KVL_ERR_FORMAT, "auth file %s: top level must be an object", path);
        goto done;
    }
    json_object_foreach(root, k, v) {
        if (strcmp(k, "tenants") && strcmp(k, "admin_token")) {
            s = kvl_errorf(KVL_ERR_FORMAT, "auth file %s: unknown field '%s'", path, k);
            goto done;
        }
    }
    json_t *tenants = json_object_get(root, "tenants"), *admin = json_object_get(root, "admin_token");
    if (!json_is_object(tenants) || json_object_size(tenants) == 0) {
        s = kvl_errorf(KVL_ERR_FORMAT, "auth file %s: \"tenants\" must be a non-empty object {token: tenant}", path);
        goto done;
    }
    if (admin && !json_is_string(admin)) {
        s = kvl_errorf(KVL_ERR_FORMAT, "auth file %s: \"admin_token\" must be a string", path);
        goto done;
    }
    out->entries = calloc(json_object_size(tenants), sizeof *out->entries);
    if (!out->entries) {
        s = KVL_ERR_NOMEM;
        goto done;
    }
    json_object_foreach(tenants, k, v) {
        if ((s = token_ok(k, "a tenant token")) != KVL_OK) goto done;
        if (!json_is_string(v) || !kvl_name_ok(json_string_value(v), KVL_TENANT_MAX)) {
            s = kvl_errorf(KVL_ERR_FORMAT, "auth file %s: tenant names are 1-%d characters of [A-Za-z0-9._-]",
                           path, KVL_TENANT_MAX);
            goto done;
        }
        kvl_auth_entry *e = &out->entries[out->n_entries++];
        sha256(k, e->digest);
        strcpy(e->tenant, json_string_value(v));
    }
    if (admin) {
        if ((s = token_ok(json_string_value(admin), "admin_token")) != KVL_OK) goto done;
        if (json_object_get(tenants, json_string_value(admin))) {
            s = kvl_errorf(KVL_ERR_FORMAT, "auth file %s: the admin token is also a tenant token", path);
            goto done;
        }
        sha256(json_string_value(admin), out->admin_digest);
        out->has_admin = 1;
    }
    out->enabled = 1;
done:
    json_decref(root);
    if (s != KVL_OK) kvl_auth_free(out);
    return s;
}

void kvl_auth_free(kvl_auth *a) {
    if (!a) return;
    free(a->entries);
    memset(a, 0, sizeof *a);
}

const char *kvl_auth_tenant(const kvl_auth *a, const char *token) {
    if (!token) return NULL;
    uint8_t d[32];
    sha256(token, d);
    const char *found = NULL;
    /* no early exit: every entry is compared whatever matches */
    for (int i = 0; i < a->n_entries; i++) {
        int eq = CRYPTO_memcmp(d, a->entries[i].digest, 32) == 0;
        if (eq) found = a->entries[i].tenant;
    }
    return found;
}

int kvl_auth_is_admin(const kvl_auth *a, const char *token) {
    if (!token || !a->has_admin) return 0;
    uint8_t d[32];
    sha256(token, d);
    return CRYPTO_memcmp(d, a->admin_digest, 32) == 0;
}
