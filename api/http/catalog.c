/* The document catalog: one JSON file per (tenant, doc_id) with the document's chunk keys and token
 * ids. It is the service's own metadata (which chunks make up a document); the chunk caches
 * themselves live in the store. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "http_impl.h"

void kvl_doc_free(kvl_doc *d) {
    if (!d) return;
    for (int32_t i = 0; i < d->n_chunks; i++) free(d->chunks[i].tokens);
    free(d->chunks);
    free(d);
}

/* File name: SHA-256(tenant | 0 | doc_id) in hex, so names never collide across tenants and never
 * carry client bytes into the file system. */
static void doc_path(const char *dir, const char *tenant, const char *doc_id, char *out, size_t cap) {
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    uint8_t h[32];
    unsigned int n = 32;
    EVP_DigestInit_ex(c, EVP_sha256(), NULL);
    EVP_DigestUpdate(c, tenant, strlen(tenant) + 1);
    EVP_DigestUpdate(c, doc_id, strlen(doc_id));
    EVP_DigestFinal_ex(c, h, &n);
    EVP_MD_CTX_free(c);
    char hex[65];
    for (int i = 0; i < 32; i++) sprintf(hex + 2 * i, "%02x", h[i]);
    snprintf(out, cap, "%s/%s.json", dir, hex);
}

static json_t *doc_to_json(const kvl_doc *d) {
    json_t *chunks = json_array();
    for (int32_t i = 0; i < d->n_chunks; i++) {
        json_t *toks = json_array();
        for (int32_t t = 0; t < d->chunks[i].n_tokens; t++) json_array_append_new(toks, json_integer(d->chunks[i].tokens[t]));
        json_array_append_new(chunks, json_pack("{s:s,s:o}", "key", d->chunks[i].key, "tokens", toks));
    }
    return json_pack("{s:i,s:s,s:s,s:i,s:I,s:o}", "version", 1, "tenant", d->tenant, "doc_id", d->doc_id,
                     "chunk_tokens", d->chunk_tokens, "created", (json_int_t)d->created_unix, "chunks", chunks);
}

kvl_status kvl_catalog_put(const char *dir, const kvl_doc *d) {
    char path[4200], tmp[4300];
    doc_path(dir, d->tenant, d->doc_id, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)pthread_self());
    json_t *j = doc_to_json(d);
    if (!j) return KVL_ERR_NOMEM;
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!text) return KVL_ERR_NOMEM;
    kvl_status s = KVL_OK;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        s = kvl_errorf(KVL_ERR_IO, "%s: %s", tmp, strerror(errno));
        goto out;
    }
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            s = kvl_errorf(errno == ENOSPC ? KVL_ERR_NOSPC : KVL_ERR_IO, "%s: %s", tmp, strerror(errno));
            break;
        }
        off += (size_t)w;
    }
    if (s == KVL_OK && fsync(fd) != 0) s = kvl_errorf(KVL_ERR_FSYNC, "%s: fsync: %s", tmp, strerror(errno));
    close(fd);
    if (s == KVL_OK && rename(tmp, path) != 0) s = kvl_errorf(KVL_ERR_IO, "rename %s: %s", tmp, strerror(errno));
    if (s != KVL_OK) unlink(tmp);
    if (s == KVL_OK) {
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            if (fsync(dfd) != 0) s = kvl_errorf(KVL_ERR_FSYNC, "%s: fsync: %s", dir, strerror(errno));
            close(dfd);
        }
    }
out:
    free(text);
    return s;
}

static kvl_status doc_from_json(json_t *j, const char *path, kvl_doc **out) {
    json_t *chunks = json_object_get(j, "chunks");
    const char *tenant = json_string_value(json_object_get(j, "tenant"));
    const char *doc_id = json_string_value(json_object_get(j, "doc_id"));
    if (!json_is_array(chunks) || !tenant || !doc_id || strlen(tenant) > KVL_TENANT_MAX || strlen(doc_id) > 128)
        return kvl_errorf(KVL_ERR_FORMAT, "catalog file %s: missing or malformed fields", path);
    kvl_doc *d = calloc(1, sizeof *d);
    if (!d) return KVL_ERR_NOMEM;
    strcpy(d->tenant, tenant);
    strcpy(d->doc_id, doc_id);
    d->chunk_tokens = (int32_t)json_integer_value(json_object_get(j, "chunk_tokens"));
    d->created_unix = json_integer_value(json_object_get(j, "created"));
    d->chunks = calloc(json_array_size(chunks) + 1, sizeof *d->chunks);
    if (!d->chunks) {
        free(d);
        return KVL_ERR_NOMEM;
    }
    size_t i;
    json_t *c;
    json_array_foreach(chunks, i, c) {
        const char *key = json_string_value(json_object_get(c, "key"));
        json_t *toks = json_object_get(c, "tokens");
        if (!key || strlen(key) != 64 || !json_is_array(toks) || json_array_size(toks) == 0) {
            kvl_doc_free(d);
            return kvl_errorf(KVL_ERR_FORMAT, "catalog file %s: chunk %zu malformed", path, i);
        }
        kvl_doc_chunk *dc = &d->chunks[d->n_chunks++];
        strcpy(dc->key, key);
        dc->tokens = malloc(json_array_size(toks) * sizeof *dc->tokens);
        if (!dc->tokens) {
            kvl_doc_free(d);
            return KVL_ERR_NOMEM;
        }
        size_t t;
        json_t *tv;
        json_array_foreach(toks, t, tv) dc->tokens[dc->n_tokens++] = (int32_t)json_integer_value(tv);
    }
    *out = d;
    return KVL_OK;
}

kvl_status kvl_catalog_get(const char *dir, const char *tenant, const char *doc_id, kvl_doc **out) {
    *out = NULL;
    char path[4200];
    doc_path(dir, tenant, doc_id, path, sizeof path);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) {
        if (access(path, F_OK) != 0) return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no document '%s'", doc_id);
        return kvl_errorf(KVL_ERR_FORMAT, "catalog file %s: %s", path, je.text);
    }
    kvl_status s = doc_from_json(j, path, out);
    json_decref(j);
    /* a hash collision on the file name would be a SHA-256 collision; still, never hand out
     * another tenant's document */
    if (s == KVL_OK && (strcmp((*out)->tenant, tenant) || strcmp((*out)->doc_id, doc_id))) {
        kvl_doc_free(*out);
        *out = NULL;
        return kvl_errorf(KVL_ERR_CORRUPT, "catalog file %s does not belong to this document", path);
    }
    return s;
}

kvl_status kvl_catalog_delete(const char *dir, const char *tenant, const char *doc_id) {
    char path[4200];
    doc_path(dir, tenant, doc_id, path, sizeof path);
    if (unlink(path) != 0) {
        if (errno == ENOENT) return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no document '%s'", doc_id);
        return kvl_errorf(KVL_ERR_IO, "%s: %s", path, strerror(errno));
    }
    return KVL_OK;
}

kvl_status kvl_catalog_foreach(const char *dir, void (*fn)(const kvl_doc *d, void *ctx), void *ctx) {
    DIR *dh = opendir(dir);
    if (!dh) return kvl_errorf(KVL_ERR_IO, "%s: %s", dir, strerror(errno));
    struct dirent *e;
    kvl_status s = KVL_OK;
    while ((e = readdir(dh))) {
        size_t n = strlen(e->d_name);
        if (n != 69 || strcmp(e->d_name + 64, ".json")) continue;
        char path[4200];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        json_t *j = json_load_file(path, 0, NULL);
        if (!j) continue; /* removed while we walked */
        kvl_doc *d = NULL;
        s = doc_from_json(j, path, &d);
        json_decref(j);
        if (s != KVL_OK) break;
        fn(d, ctx);
        kvl_doc_free(d);
    }
    closedir(dh);
    return s;
}
