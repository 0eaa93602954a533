#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "kvl_safetensors.h"

void kvl_st_free(kvl_st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    free(f->t);
    f->t = NULL;
    f->n = 0;
}

const kvl_st_tensor *kvl_st_find(const kvl_st_file *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->t[i].name, name) == 0) return &f->t[i];
    return NULL;
}

static int dtype_of(const char *s, int *esize) {
    if (strcmp(s, "F32") == 0) { *esize = 4; return KVL_ST_F32; }
    if (strcmp(s, "BF16") == 0) { *esize = 2; return KVL_ST_BF16; }
    if (strcmp(s, "F16") == 0) { *esize = 2; return KVL_ST_F16; }
    /* other dtypes: keep the entry (sizes still checked when we know the element size) */
    static const struct { const char *n; int sz; } other[] = {
        {"F64", 8}, {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1}, {"U8", 1}, {"BOOL", 1},
        {"U16", 2}, {"U32", 4}, {"U64", 8}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
    for (size_t i = 0; i < sizeof other / sizeof other[0]; i++)
        if (strcmp(s, other[i].n) == 0) { *esize = other[i].sz; return -1; }
    *esize = 0;
    return -2;
}

kvl_status kvl_st_parse(const uint8_t *buf, size_t len, uint64_t file_size, kvl_st_file *out) {
    memset(out, 0, sizeof *out);
    if (!buf || len < 8 || file_size < 8)
        return kvl_errorf(KVL_ERR_TRUNCATED, "safetensors: file shorter than its 8-byte header length");
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | buf[i];
    if (hlen > KVL_ST_MAX_HEADER)
        return kvl_errorf(KVL_ERR_FORMAT, "safetensors: header length %llu exceeds the %u-byte limit",
                          (unsigned long long)hlen, KVL_ST_MAX_HEADER);
    if (hlen > file_size - 8 || hlen > len - 8)
        return kvl_errorf(KVL_ERR_TRUNCATED, "safetensors: header (%llu bytes) runs past the end of the file",
                          (unsigned long long)hlen);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return kvl_errorf(KVL_ERR_JSON, "safetensors: header JSON: %s (line %d)", jerr.text, jerr.line);
    kvl_status st = KVL_OK;
    if (!json_is_object(root)) {
        st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: header is not a JSON object");
        goto done;
    }
    out->data_offset = 8 + hlen;
    out->data_size = file_size - out->data_offset;
    size_t cap = json_object_size(root);
    out->t = calloc(cap ? cap : 1, sizeof *out->t);
    if (!out->t) { st = KVL_ERR_NOMEM; goto done; }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(val)) { st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: __metadata__ is not an object"); goto done; }
            continue;
        }
        if (!json_is_object(val)) { st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: tensor '%.64s' is not an object", key); goto done; }
        json_t *jd = json_object_get(val, "dtype"), *js = json_object_get(val, "shape"),
               *jo = json_object_get(val, "data_offsets");
        if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) || json_array_size(jo) != 2) {
            st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: tensor '%.64s' lacks dtype/shape/data_offsets", key);
            goto done;
        }
        kvl_st_tensor *t = &out->t[out->n];
        int esize;
        t->dtype = dtype_of(json_string_value(jd), &esize);
        if (t->dtype == -2) { st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: tensor '%.64s' has unknown dtype '%.16s'", key, json_string_value(jd)); goto done; }
        size_t nd = json_array_size(js);
        if (nd > KVL_ST_MAX_DIMS) { st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: tensor '%.64s' has %zu dims (max %d)", key, nd, KVL_ST_MAX_DIMS); goto done; }
        t->ndim = (int)nd;
        uint64_t numel = 1;
        for (size_t i = 0; i < nd; i++) {
            json_t *d = json_array_get(js, i);
            if (!json_is_integer(d) || json_integer_value(d) < 0) { st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: tensor '%.64s' has a bad dimension", key); goto done; }
            uint64_t dv = (uint64_t)json_integer_value(d);
            t->shape[i] = (int64_t)dv;
            if (dv != 0 && numel > UINT64_MAX / 16 / dv) { st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: tensor '%.64s' is impossibly large", key); goto done; }
            numel *= dv;
        }
        json_t *b = json_array_get(jo, 0), *e = json_array_get(jo, 1);
        if (!json_is_integer(b) || !json_is_integer(e) || json_integer_value(b) < 0 ||
            json_integer_value(e) < json_integer_value(b)) {
            st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: tensor '%.64s' has bad data_offsets", key);
            goto done;
        }
        t->begin = (uint64_t)json_integer_value(b);
        t->end = (uint64_t)json_integer_value(e);
        if (t->end > out->data_size) {
            st = kvl_errorf(KVL_ERR_TRUNCATED, "safetensors: tensor '%.64s' ends at byte %llu of a %llu-byte data section (file truncated?)",
                            key, (unsigned long long)t->end, (unsigned long long)out->data_size);
            goto done;
        }
        if (t->end - t->begin != numel * (uint64_t)esize) {
            st = kvl_errorf(KVL_ERR_FORMAT, "safetensors: tensor '%.64s' holds %llu bytes, its shape needs %llu",
                            key, (unsigned long long)(t->end - t->begin), (unsigned long long)(numel * (uint64_t)esize));
            goto done;
        }
        t->name = strdup(key);
        if (!t->name) { st = KVL_ERR_NOMEM; goto done; }
        out->n++;
    }
done:
    json_decref(root);
    if (st != KVL_OK) kvl_st_free(out);
    return st;
}
