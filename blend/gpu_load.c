/* gpu_load.c - store -> GPU decode -> CUDA KV cache, with the next group's reads in flight while
 * the current group decodes (api/kvl_gpu_load.h). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvl_codec_gpu.h"
#include "kvl_cuda_backend.h"
#include "kvl_gpu_load.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* one group's batched read, run on the reader thread */
typedef struct rd_job {
    kvl_store *store;
    const uint8_t *fp;
    size_t n;
    kvl_store_key *keys;
    kvl_store_value **vals;
    kvl_status *st;
    kvl_status batch_st;
    char msg[256];
    double ms;
} rd_job;

static void *rd_run(void *arg) {
    rd_job *j = arg;
    double t0 = now_ms();
    kvl_clear_error();
    j->batch_st = j->n ? kvl_store_get_batch(j->store, j->n, j->keys, j->fp, j->vals, j->st) : KVL_OK;
    snprintf(j->msg, sizeof j->msg, "%s", j->batch_st == KVL_OK ? "" : kvl_last_error());
    j->ms = now_ms() - t0;
    return NULL;
}

static void rd_release(rd_job *j) {
    for (size_t i = 0; i < j->n; i++) {
        kvl_store_value_free(j->vals[i]);
        j->vals[i] = NULL;
    }
}

/* the chunk's standalone KV (positions 0..n-1) prefilled into its slots */
static kvl_status recompute_chunk(const kvl_gpu_load_req *r, const kvl_gpu_load_chunk *c) {
    if (!c->tokens) return kvl_errorf(KVL_ERR_INVALID_ARG, "a chunk to recompute needs its tokens");
    kvl_kv *tmp = NULL;
    int32_t *pos = malloc((size_t)c->n_tokens * sizeof *pos);
    if (!pos) return KVL_ERR_NOMEM;
    for (int32_t i = 0; i < c->n_tokens; i++) pos[i] = i;
    kvl_status st = kvl_kv_create(r->model, c->n_tokens, &tmp);
    if (st == KVL_OK) st = kvl_forward(r->model, tmp, c->n_tokens, c->tokens, pos, NULL, 0, NULL, NULL);
    if (st == KVL_OK) st = kvl_kv_copy(r->kv, c->slot0, tmp, 0, c->n_tokens);
    kvl_kv_free(tmp);
    free(pos);
    return st;
}

kvl_status kvl_gpu_load(const kvl_gpu_load_req *r, kvl_gpu_load_stats *stats) {
    if (!r || !r->store || !r->model || !r->kv || !r->dec || (!r->chunks && r->n_chunks > 0) || r->n_chunks < 0)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "incomplete load request");
    double t0 = now_ms();
    kvl_gpu_load_stats s = {0};
    kvl_cuda_kv_view v;
    KVL_TRY(kvl_cuda_kv_view_get(r->kv, &v));
    size_t es = v.dtype == 1 ? 2 : 4;
    for (int32_t i = 0; i < r->n_chunks; i++) {
        const kvl_gpu_load_chunk *c = &r->chunks[i];
        if (c->n_tokens < 1 || c->slot0 < 0 || c->slot0 > v.capacity - c->n_tokens)
            return kvl_errorf(KVL_ERR_INVALID_ARG, "chunk %d: slots [%d, +%d) outside the kv's %d", i, c->slot0,
                              c->n_tokens, v.capacity);
        if (c->action != KVL_LOAD_FROM_STORE && c->action != KVL_LOAD_RECOMPUTE)
            return kvl_errorf(KVL_ERR_INVALID_ARG, "chunk %d: unknown action %d", i, c->action);
    }
    int32_t group = r->group > 0 ? r->group : 8;
    /* the chunks to load, in order */
    int32_t *idx = malloc((size_t)(r->n_chunks ? r->n_chunks : 1) * sizeof *idx), n_load = 0;
    kvl_store_key *keys = malloc((size_t)2 * group * sizeof *keys);
    kvl_store_value **vals = calloc((size_t)2 * group, sizeof *vals);
    kvl_status *sts = calloc((size_t)2 * group, sizeof *sts);
    kvl_codec_gpu_chunk *gc = malloc((size_t)group * sizeof *gc);
    kvl_status st = KVL_OK;
    if (!idx || !keys || !vals || !sts || !gc) { st = KVL_ERR_NOMEM; goto out; }
    for (int32_t i = 0; i < r->n_chunks; i++)
        if (r->chunks[i].action == KVL_LOAD_FROM_STORE) idx[n_load++] = i;
    int32_t n_groups = (n_load + group - 1) / group;
    rd_job jobs[2];
    pthread_t th;
    int running = 0;
    for (int b = 0; b < 2; b++)
        jobs[b] = (rd_job){r->store, r->fingerprint, 0, keys + (size_t)b * group, vals + (size_t)b * group,
                           sts + (size_t)b * group, KVL_OK, "", 0};
    /* group g is read into buffer g % 2; the read of g+1 starts before g is decoded */
    for (int32_t g = 0; g <= n_groups && st == KVL_OK; g++) {
        if (g < n_groups) {
            rd_job *j = &jobs[g % 2];
            j->n = 0;
            for (int32_t k = g * group; k < n_load && k < (g + 1) * group; k++) j->keys[j->n++] = r->chunks[idx[k]].key;
            if (pthread_create(&th, NULL, rd_run, j) != 0) rd_run(j);
            else running = 1;
        }
        if (g == 0) {
            /* nothing to decode yet: wait for the first read */
            double w = now_ms();
            if (running) pthread_join(th, NULL);
            running = 0;
            s.read_wait_ms += now_ms() - w;
            continue;
        }
        /* decode group g-1 (its read finished) while group g is being read */
        rd_job *j = &jobs[(g - 1) % 2];
        s.read_ms += j->ms;
        if (j->batch_st != KVL_OK) { st = kvl_errorf(j->batch_st, "store read: %s", j->msg); break; }
        for (size_t k = 0; k < j->n && st == KVL_OK; k++) {
            const kvl_gpu_load_chunk *c = &r->chunks[idx[(g - 1) * group + (int32_t)k]];
            if (j->st[k] != KVL_OK) { st = kvl_errorf(j->st[k], "chunk at slot %d: store read failed", c->slot0); break; }
            const uint8_t *data = kvl_store_value_data(j->vals[k]);
            size_t size = kvl_store_value_size(j->vals[k]);
            kvl_codec_info in;
            st = kvl_codec_info_get(data, size, &in);
            if (st != KVL_OK) break;
            if (in.shape.n_layers != v.n_layers || in.shape.n_kv_heads * in.shape.head_dim != v.n_channels ||
                in.shape.n_tokens != c->n_tokens) {
                st = kvl_errorf(KVL_ERR_CODEC, "chunk at slot %d: cache of %d layers x %d tokens x %d channels, kv wants %d x %d x %d",
                                c->slot0, in.shape.n_layers, in.shape.n_tokens, in.shape.n_kv_heads * in.shape.head_dim,
                                v.n_layers, c->n_tokens, v.n_channels);
                break;
            }
            gc[k] = (kvl_codec_gpu_chunk){data, size, 0, 0, (uint8_t *)v.data + (size_t)c->slot0 * v.n_channels * es,
                                          2 * (int64_t)v.capacity * v.n_channels, (int64_t)v.capacity * v.n_channels,
                                          v.n_channels};
            s.bytes_read += size;
        }
        if (st == KVL_OK) {
            double td = now_ms();
            st = kvl_codec_gpu_decode(r->dec, gc, (int32_t)j->n, r->profile, v.dtype == 1 ? KVL_CODEC_BF16 : KVL_CODEC_F32);
            s.decode_ms += now_ms() - td;
            kvl_codec_gpu_stats ds;
            kvl_codec_gpu_last_stats(r->dec, &ds);
            if (st == KVL_OK) s.kernel_ms += ds.kernel_ms;
        }
        rd_release(j);
        if (st != KVL_OK) break;
        s.n_loaded += (int32_t)j->n;
        /* the decoded slots are complete: mark them, then put the keys at their positions */
        double tr = now_ms();
        for (size_t k = 0; k < j->n && st == KVL_OK; k++) {
            const kvl_gpu_load_chunk *c = &r->chunks[idx[(g - 1) * group + (int32_t)k]];
            st = kvl_kv_set_valid(r->kv, c->slot0, c->n_tokens, 1);
            if (st == KVL_OK && !r->no_rerotate && c->position != 0)
                st = kvl_kv_rerotate(r->kv, c->slot0, c->n_tokens, c->position);
        }
        s.rerotate_ms += now_ms() - tr;
        if (g < n_groups) {
            double w = now_ms();
            if (running) pthread_join(th, NULL);
            running = 0;
            s.read_wait_ms += now_ms() - w;
        }
    }
    if (running) pthread_join(th, NULL);
    rd_release(&jobs[0]);
    rd_release(&jobs[1]);
    for (int32_t i = 0; i < r->n_chunks && st == KVL_OK; i++) {
        const kvl_gpu_load_chunk *c = &r->chunks[i];
        if (c->action != KVL_LOAD_RECOMPUTE) continue;
        double tc = now_ms();
        st = recompute_chunk(r, c);
        s.recompute_ms += now_ms() - tc;
        double tr = now_ms();
        if (st == KVL_OK && !r->no_rerotate && c->position != 0) st = kvl_kv_rerotate(r->kv, c->slot0, c->n_tokens, c->position);
        s.rerotate_ms += now_ms() - tr;
        s.n_recomputed++;
    }
out:
    free(idx); free(keys); free(vals); free(sts); free(gc);
    s.total_ms = now_ms() - t0;
    if (stats) *stats = s;
    return st;
}
