/* gpu_load.c - store -> GPU decode -> CUDA KV cache, with the next group's reads in flight while
 * the current group decodes (api/kvl_gpu_load.h). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "kvl_codec_gpu.h"
#include "kvl_cuda.h"
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

/* ---------------------------------------------------------------- layer-pipelined blend */

typedef struct lp_state {
    const kvl_gpu_blend_req *r;
    const kvl_cuda_kv_view *v;
    kvl_codec_gpu_chunk *gc;
    int32_t nc, L, group;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int32_t ready;    /* layers [0, ready) are decoded and rotated */
    kvl_status st;    /* decoder thread's error */
    char msg[256];
    double decode_ms, kernel_ms;
} lp_state;

static void *lp_decoder(void *arg) {
    lp_state *s = arg;
    const kvl_gpu_load_req *lr = &s->r->load;
    const kvl_model_config *c = kvl_model_get_config(lr->model);
    size_t es = s->v->dtype == 1 ? 2 : 4;
    cudaStream_t rs = NULL;
    kvl_status st = KVL_OK;
    kvl_clear_error();
    if (cudaSetDevice(s->v->gpu) != cudaSuccess || cudaStreamCreateWithFlags(&rs, cudaStreamNonBlocking) != cudaSuccess)
        st = kvl_errorf(KVL_ERR_CUDA, "decoder stream");
    for (int32_t l = 0; l < s->L && st == KVL_OK; l += s->group) {
        int32_t nl = s->L - l < s->group ? s->L - l : s->group;
        double t0 = now_ms();
        for (int32_t k = 0; k < s->nc; k++) {
            s->gc[k].layer0 = l;
            s->gc[k].n_layers = nl;
            s->gc[k].d_out = (uint8_t *)s->v->data +
                             ((size_t)l * 2 * s->v->capacity + (size_t)lr->chunks[k].slot0) * s->v->n_channels * es;
        }
        st = kvl_codec_gpu_decode(lr->dec, s->gc, s->nc, lr->profile, s->v->dtype == 1 ? KVL_CODEC_BF16 : KVL_CODEC_F32);
        if (st == KVL_OK) {
            kvl_codec_gpu_stats ds;
            kvl_codec_gpu_last_stats(lr->dec, &ds);
            s->kernel_ms += ds.kernel_ms;
        }
        for (int32_t k = 0; k < s->nc && st == KVL_OK; k++) {
            const kvl_gpu_load_chunk *ch = &lr->chunks[k];
            if (lr->no_rerotate || ch->position == 0) continue;
            cudaError_t e = kvl_cu_rerotate(s->gc[k].d_out, s->v->dtype == 1 ? KVL_CU_BF16 : KVL_CU_F32, nl,
                                            2 * (int64_t)s->v->capacity * s->v->n_channels, ch->n_tokens,
                                            s->v->n_channels, c->n_kv_heads, c->head_dim, c->rope_style, c->rope_theta,
                                            ch->position, rs);
            if (e != cudaSuccess) st = kvl_errorf(KVL_ERR_CUDA, "rerotate: %s", cudaGetErrorString(e));
        }
        if (st == KVL_OK && cudaStreamSynchronize(rs) != cudaSuccess) st = kvl_errorf(KVL_ERR_CUDA, "rerotate sync");
        s->decode_ms += now_ms() - t0;
        pthread_mutex_lock(&s->mu);
        if (st == KVL_OK) s->ready = l + nl;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
    if (rs) cudaStreamDestroy(rs);
    pthread_mutex_lock(&s->mu);
    s->st = st;
    snprintf(s->msg, sizeof s->msg, "%s", st == KVL_OK ? "" : kvl_last_error());
    if (st != KVL_OK) s->ready = -1; /* wakes the forward pass with the error */
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

kvl_status kvl_gpu_blend(const kvl_gpu_blend_req *r, kvl_gpu_load_stats *stats) {
    if (!r || !r->tokens || !r->positions || (!r->idx && r->n_idx > 0) || !r->logits)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "incomplete blend request");
    const kvl_gpu_load_req *lr = &r->load;
    if (!lr->store || !lr->model || !lr->kv || !lr->dec || lr->n_chunks < 1 || !lr->chunks)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "incomplete load request");
    double t0 = now_ms();
    kvl_gpu_load_stats s = {0};
    kvl_cuda_kv_view v;
    KVL_TRY(kvl_cuda_kv_view_get(lr->kv, &v));
    int32_t nc = lr->n_chunks;
    for (int32_t i = 0; i < nc; i++) {
        const kvl_gpu_load_chunk *c = &lr->chunks[i];
        if (c->action != KVL_LOAD_FROM_STORE) return kvl_errorf(KVL_ERR_INVALID_ARG, "chunk %d: blend loads every chunk", i);
        if (c->n_tokens < 1 || c->slot0 < 0 || c->slot0 > v.capacity - c->n_tokens || c->slot0 + c->n_tokens > r->n)
            return kvl_errorf(KVL_ERR_INVALID_ARG, "chunk %d: slots [%d, +%d) outside the pass", i, c->slot0, c->n_tokens);
    }
    kvl_store_key *keys = malloc((size_t)nc * sizeof *keys);
    kvl_store_value **vals = calloc((size_t)nc, sizeof *vals);
    kvl_status *sts = calloc((size_t)nc, sizeof *sts);
    kvl_codec_gpu_chunk *gc = calloc((size_t)nc, sizeof *gc);
    kvl_fwd *f = NULL;
    kvl_status st = KVL_OK;
    if (!keys || !vals || !sts || !gc) { st = KVL_ERR_NOMEM; goto out; }
    for (int32_t i = 0; i < nc; i++) keys[i] = lr->chunks[i].key;
    double tr = now_ms();
    st = kvl_store_get_batch(lr->store, (size_t)nc, keys, lr->fingerprint, vals, sts);
    s.read_ms = s.read_wait_ms = now_ms() - tr;
    for (int32_t i = 0; i < nc && st == KVL_OK; i++) {
        const kvl_gpu_load_chunk *c = &lr->chunks[i];
        if (sts[i] != KVL_OK) { st = kvl_errorf(sts[i], "chunk at slot %d: store read failed", c->slot0); break; }
        kvl_codec_info in;
        gc[i].buf = kvl_store_value_data(vals[i]);
        gc[i].size = kvl_store_value_size(vals[i]);
        st = kvl_codec_info_get(gc[i].buf, gc[i].size, &in);
        if (st == KVL_OK && (in.shape.n_layers != v.n_layers || in.shape.n_kv_heads * in.shape.head_dim != v.n_channels ||
                             in.shape.n_tokens != c->n_tokens))
            st = kvl_errorf(KVL_ERR_CODEC, "chunk at slot %d: cache of another shape", c->slot0);
        gc[i].layer_stride = 2 * (int64_t)v.capacity * v.n_channels;
        gc[i].kv_stride = (int64_t)v.capacity * v.n_channels;
        gc[i].token_stride = v.n_channels;
        s.bytes_read += gc[i].size;
        if (st == KVL_OK) st = kvl_kv_set_valid(lr->kv, c->slot0, c->n_tokens, 1);
    }
    if (st != KVL_OK) goto out;
    st = kvl_fwd_begin(lr->model, lr->kv, r->n, r->tokens, r->positions, &f);
    if (st != KVL_OK) goto out;
    lp_state ls = {.r = r, .v = &v, .gc = gc, .nc = nc, .L = v.n_layers,
                   .group = r->layer_group > 0 ? r->layer_group : 4, .ready = 0, .st = KVL_OK};
    pthread_mutex_init(&ls.mu, NULL);
    pthread_cond_init(&ls.cv, NULL);
    pthread_t th;
    if (pthread_create(&th, NULL, lp_decoder, &ls) != 0) {
        st = kvl_errorf(KVL_ERR_INTERNAL, "cannot start the decoder thread");
    } else {
        double tc = now_ms();
        for (int32_t l = 0; l < v.n_layers && st == KVL_OK; l++) {
            double tw = now_ms();
            pthread_mutex_lock(&ls.mu);
            while (ls.ready >= 0 && ls.ready <= l) pthread_cond_wait(&ls.cv, &ls.mu);
            int failed = ls.ready < 0;
            pthread_mutex_unlock(&ls.mu);
            s.layer_wait_ms += now_ms() - tw;
            if (failed) break;
            st = kvl_fwd_layer(f, l, r->idx, r->n_idx);
        }
        if (st == KVL_OK) {
            pthread_join(th, NULL);
            if (ls.st != KVL_OK) st = kvl_errorf(ls.st, "%s", ls.msg);
        } else {
            pthread_join(th, NULL);
        }
        if (st == KVL_OK && ls.st != KVL_OK) st = kvl_errorf(ls.st, "%s", ls.msg);
        if (st == KVL_OK) st = kvl_fwd_logits(f, &r->logit_slot, 1, r->logits);
        s.compute_ms = now_ms() - tc;
        s.decode_ms = ls.decode_ms;
        s.kernel_ms = ls.kernel_ms;
        s.n_loaded = nc;
    }
    pthread_mutex_destroy(&ls.mu);
    pthread_cond_destroy(&ls.cv);
out:
    kvl_fwd_free(f);
    for (int32_t i = 0; vals && i < nc; i++) kvl_store_value_free(vals[i]);
    free(keys); free(vals); free(sts); free(gc);
    s.total_ms = now_ms() - t0;
    if (stats) *stats = s;
    return st;
}
