/* llama2.c tokenizer.bin: [int32 max_token_length] then per token [float score][int32 len][bytes]. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvl_tokenizer.h"

typedef struct {
    const char *str;
    int32_t id;
} tok_index;

struct kvl_tokenizer {
    int32_t vocab;
    char **pieces;
    float *scores;
    tok_index *sorted;
    uint32_t max_len;
    char bytes[256][2];
};

static int cmp_idx(const void *a, const void *b) {
    return strcmp(((const tok_index *)a)->str, ((const tok_index *)b)->str);
}

void kvl_tokenizer_free(kvl_tokenizer *t) {
    if (!t) return;
    if (t->pieces)
        for (int32_t i = 0; i < t->vocab; i++) free(t->pieces[i]);
    free(t->pieces);
    free(t->scores);
    free(t->sorted);
    free(t);
}

kvl_status kvl_tokenizer_load(const char *path, int32_t vocab, kvl_tokenizer **out) {
    if (!path || !out || vocab <= 0) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_tokenizer_load: bad argument");
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) return kvl_errorf(errno == ENOENT ? KVL_ERR_NOT_FOUND : KVL_ERR_IO, "tokenizer %s: %s", path, strerror(errno));
    kvl_tokenizer *t = calloc(1, sizeof *t);
    kvl_status st = KVL_OK;
    if (!t) { fclose(fp); return KVL_ERR_NOMEM; }
    t->vocab = vocab;
    t->pieces = calloc((size_t)vocab, sizeof *t->pieces);
    t->scores = calloc((size_t)vocab, sizeof *t->scores);
    t->sorted = calloc((size_t)vocab, sizeof *t->sorted);
    if (!t->pieces || !t->scores || !t->sorted) { st = KVL_ERR_NOMEM; goto fail; }
    int32_t maxl;
    if (fread(&maxl, 4, 1, fp) != 1) { st = kvl_errorf(KVL_ERR_TRUNCATED, "tokenizer %s: missing header", path); goto fail; }
    if (maxl <= 0 || maxl > 4096) { st = kvl_errorf(KVL_ERR_TOKENIZER, "tokenizer %s: max token length %d out of range", path, maxl); goto fail; }
    t->max_len = (uint32_t)maxl;
    for (int32_t i = 0; i < vocab; i++) {
        int32_t len;
        if (fread(&t->scores[i], 4, 1, fp) != 1 || fread(&len, 4, 1, fp) != 1) {
            st = kvl_errorf(KVL_ERR_TRUNCATED, "tokenizer %s: ends at token %d of %d (wrong vocab size?)", path, i, vocab);
            goto fail;
        }
        if (len < 0 || len > maxl || !isfinite(t->scores[i])) {
            st = kvl_errorf(KVL_ERR_TOKENIZER, "tokenizer %s: token %d has length %d (max %d) or a bad score", path, i, len, maxl);
            goto fail;
        }
        t->pieces[i] = malloc((size_t)len + 1);
        if (!t->pieces[i]) { st = KVL_ERR_NOMEM; goto fail; }
        if (len && fread(t->pieces[i], (size_t)len, 1, fp) != 1) {
            st = kvl_errorf(KVL_ERR_TRUNCATED, "tokenizer %s: token %d truncated", path, i);
            goto fail;
        }
        t->pieces[i][len] = 0;
        t->sorted[i].str = t->pieces[i];
        t->sorted[i].id = i;
    }
    fclose(fp);
    fp = NULL;
    qsort(t->sorted, (size_t)vocab, sizeof *t->sorted, cmp_idx);
    for (int i = 0; i < 256; i++) {
        t->bytes[i][0] = (char)i;
        t->bytes[i][1] = 0;
    }
    *out = t;
    return KVL_OK;
fail:
    if (fp) fclose(fp);
    kvl_tokenizer_free(t);
    return st;
}

kvl_status kvl_tokenizer_find(const char *model_path, char *out, size_t out_size) {
    static const char *names[] = {"tokenizer.bin", "tok512.bin", "tok4096.bin", "tok32000.bin"};
    if (!model_path || !out || out_size == 0) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_tokenizer_find: bad argument");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", model_path);
    size_t l = strlen(dir);
    while (l > 1 && dir[l - 1] == '/') dir[--l] = 0;
    /* try the path's own directory (for an HF dir: the dir itself), then its parent */
    for (int pass = 0; pass < 3; pass++) {
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            int w = snprintf(out, out_size, "%s/%s", dir, names[i]);
            if (w > 0 && (size_t)w < out_size && access(out, R_OK) == 0) return KVL_OK;
        }
        char *slash = strrchr(dir, '/');
        if (!slash) {
            if (pass == 0) { snprintf(dir, sizeof dir, "."); continue; }
            break;
        }
        if (slash == dir) slash[1] = 0; else *slash = 0;
    }
    return kvl_errorf(KVL_ERR_NOT_FOUND, "no tokenizer.bin / tok512.bin beside %s", model_path);
}

static int32_t lookup(const kvl_tokenizer *t, const char *s) {
    tok_index key = {s, 0};
    const tok_index *r = bsearch(&key, t->sorted, (size_t)t->vocab, sizeof *t->sorted, cmp_idx);
    return r ? r->id : -1;
}

int32_t kvl_tokenizer_vocab(const kvl_tokenizer *t) { return t->vocab; }

kvl_status kvl_tokenizer_encode(const kvl_tokenizer *t, const char *text, int bos, int32_t *out, int32_t max_out,
                                int32_t *n_out) {
    if (!t || !text || !out || !n_out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_tokenizer_encode: NULL argument");
    *n_out = 0;
    size_t tl = strlen(text);
    /* worst case: BOS + prefix + one token per byte */
    int32_t *ids = malloc((tl + 3) * sizeof *ids);
    char *buf = malloc((size_t)t->max_len * 2 + 3);
    if (!ids || !buf) { free(ids); free(buf); return KVL_ERR_NOMEM; }
    int32_t n = 0;
    kvl_status st = KVL_OK;
    if (bos) ids[n++] = 1;
    if (text[0]) {
        int32_t sp = lookup(t, " ");
        if (sp < 0) { st = kvl_errorf(KVL_ERR_TOKENIZER, "tokenizer has no ' ' token"); goto out; }
        ids[n++] = sp;
    }
    size_t len = 0;
    for (const char *c = text; *c; c++) {
        /* a new codepoint starts at a byte that is not a continuation byte (10xxxxxx) */
        if ((*c & 0xC0) != 0x80) len = 0;
        buf[len++] = *c;
        buf[len] = 0;
        if ((c[1] & 0xC0) == 0x80 && len < 4) continue;
        int32_t id = lookup(t, buf);
        if (id >= 0) {
            ids[n++] = id;
        } else {
            for (size_t i = 0; i < len; i++) {
                int32_t b = (int32_t)(unsigned char)buf[i] + 3;
                if (b >= t->vocab) { st = kvl_errorf(KVL_ERR_TOKENIZER, "byte 0x%02x has no fallback token", (unsigned char)buf[i]); goto out; }
                ids[n++] = b;
            }
        }
        len = 0;
    }
    /* merge the best-scoring adjacent pair until none merges */
    for (;;) {
        float best = -1e30f;
        int32_t best_id = -1, best_i = -1;
        for (int32_t i = 0; i + 1 < n; i++) {
            const char *a = t->pieces[ids[i]], *b = t->pieces[ids[i + 1]];
            size_t la = strlen(a), lb = strlen(b);
            if (la + lb > (size_t)t->max_len * 2) continue;
            memcpy(buf, a, la);
            memcpy(buf + la, b, lb + 1);
            int32_t id = lookup(t, buf);
            if (id >= 0 && t->scores[id] > best) {
                best = t->scores[id];
                best_id = id;
                best_i = i;
            }
        }
        if (best_i < 0) break;
        ids[best_i] = best_id;
        memmove(ids + best_i + 1, ids + best_i + 2, (size_t)(n - best_i - 2) * sizeof *ids);
        n--;
    }
    if (n > max_out) { st = kvl_errorf(KVL_ERR_LIMIT, "text encodes to %d tokens, room for %d", n, max_out); goto out; }
    memcpy(out, ids, (size_t)n * sizeof *ids);
    *n_out = n;
out:
    free(ids);
    free(buf);
    return st;
}

const char *kvl_tokenizer_piece(const kvl_tokenizer *t, int32_t prev, int32_t token, char buf[8]) {
    if (token < 0 || token >= t->vocab) return "";
    const char *p = t->pieces[token];
    if (prev == 1 && p[0] == ' ') p++;
    unsigned int byte;
    char tail;
    if (strlen(p) == 6 && sscanf(p, "<0x%02X>%c", &byte, &tail) == 1) {
        buf[0] = (char)byte;
        buf[1] = 0;
        return buf;
    }
    return p;
}

size_t kvl_tokenizer_decode(const kvl_tokenizer *t, const int32_t *ids, int32_t n, int32_t prev, char *out,
                            size_t out_size) {
    size_t w = 0;
    char b[8];
    if (out_size == 0) return 0;
    for (int32_t i = 0; i < n; i++) {
        const char *p = kvl_tokenizer_piece(t, prev, ids[i], b);
        size_t l = strlen(p);
        if (w + l >= out_size) l = out_size - 1 - w;
        memcpy(out + w, p, l);
        w += l;
        prev = ids[i];
        if (w + 1 >= out_size) break;
    }
    out[w] = 0;
    return w;
}
