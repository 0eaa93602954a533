/* gpu_load.c - store -> GPU decode -> CUDA KV cache, with the next group's reads in flight while
 * the current group decodes (api/kvl_gpu_load.h). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "kvl_codec_gpu.h"
#include "kvl_codec_plan.h"
#include "kvl_cuda.h"
#include "kvl_cuda_backend.h"
#include "kvl_gpu_load.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* the codec output type that matches the kv's element type */
static kvl_codec_dtype codec_dtype(const kvl_cuda_kv_view *v) {
    return v->dtype == KVL_CUDA_KV_BF16 ? KVL_CODEC_BF16 : KVL_CODEC_F32;
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
    size_t es = kvl_cuda_kv_elem_bytes(&v);
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
            if (c->raw) {
                /* codec off: the value is the chunk's bf16 KV, [L][2][T][C] */
                size_t T = (size_t)c->n_tokens, C = (size_t)v.n_channels;
                if (v.dtype != KVL_CUDA_KV_BF16 || size != (size_t)v.n_layers * 2 * T * C * 2) {
                    st = kvl_errorf(KVL_ERR_CODEC, "raw chunk at slot %d: %zu bytes for %d layers x %zu tokens x %zu channels (bf16 kv needed)",
                                    c->slot0, size, v.n_layers, T, C);
                    break;
                }
                double td = now_ms();
                for (int32_t i = 0; i < 2 * v.n_layers && st == KVL_OK; i++) {
                    uint8_t *dst = (uint8_t *)v.data + ((size_t)i * (size_t)v.capacity + (size_t)c->slot0) * C * 2;
                    cudaError_t e = cudaMemcpy(dst, data + (size_t)i * T * C * 2, T * C * 2, cudaMemcpyHostToDevice);
                    if (e != cudaSuccess) st = kvl_errorf(KVL_ERR_CUDA, "raw chunk copy: %s", cudaGetErrorString(e));
                }
                s.decode_ms += now_ms() - td;
                s.bytes_read += size;
                gc[k] = (kvl_codec_gpu_chunk){0};
                continue;
            }
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
        int32_t n_codec = 0; /* the codec chunks, packed (raw ones were copied above) */
        for (size_t k = 0; k < j->n && st == KVL_OK; k++)
            if (gc[k].buf) gc[n_codec++] = gc[k];
        if (st == KVL_OK && n_codec > 0) {
            double td = now_ms();
            st = kvl_codec_gpu_decode(r->dec, gc, n_codec, r->profile, codec_dtype(&v));
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

#define LP_GROWTH_LOG2 2 /* decode steps grow 1, 4, 16, ... layers (see lp_decoder) */

/* Three threads meet here: the reader (a streaming batched store read: chunk prefixes land
 * interleaved, the first MiB of every chunk, then the second, ...), the decoder (decodes layer
 * group g of every chunk as soon as every chunk's bytes for it have landed) and the caller (the
 * layer-step forward pass: layer i as soon as it is decoded). All shared fields under mu. */
typedef struct lp_step {
    int32_t l, nl;              /* layers [l, l + nl) */
    kvl_codec_gpu_batch *batch; /* its lossy chunks, staged (NULL: none) */
    kvl_codec_gpu_chunk *gc;    /* the batch's chunk descriptors (kept until it is finished) */
    cudaEvent_t ev[2];          /* around its decode kernel + re-rotation on the forward stream */
} lp_step;

typedef struct lp_state {
    const kvl_gpu_blend_req *r;
    const kvl_cuda_kv_view *v;
    kvl_codec_gpu_chunk *gc;
    int32_t nc, L, group;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* reader */
    const uint8_t **data; /* [nc] the value's bytes (set by the first report) */
    size_t *ready, *total; /* [nc] */
    int reads_done;
    kvl_store_value **vals;
    kvl_status *sts;
    kvl_status read_st;
    char read_msg[256];
    double read_ms, first_byte_ms;
    /* decoder */
    size_t *lend;         /* [nc][L + 1]: bytes of a chunk's value that its layers [0, l) need */
    uint8_t *lossless;    /* [nc] the chunk is a lossless (level 0) cache */
    lp_step *steps;       /* [L] the decoder's steps; [0, n_steps) announced */
    int32_t *ld;          /* [nc] the request's index of each chunk loaded (the others are recomputed) */
    /* the forward pass's side */
    int32_t next_step;    /* the next step to launch */
    double layer_wait_ms;
    pthread_t rth, dth;
    int rstarted, dstarted;
    int32_t n_steps;
    int32_t ready_layers; /* layers [0, ready_layers) are decoded and rotated; -1: failed */
    kvl_status st;
    char msg[256];
    double decode_ms, kernel_ms, wait_bytes_ms, first_layer_ms;
    double t0;
} lp_state;

static const kvl_gpu_load_chunk *lp_chunk(const lp_state *s, int32_t k) { return &s->r->load.chunks[s->ld[k]]; }

static void lp_on_bytes(void *ctx, size_t i, const uint8_t *data, size_t ready, size_t total) {
    lp_state *s = ctx;
    pthread_mutex_lock(&s->mu);
    if (i < (size_t)s->nc) {
        if (!s->first_byte_ms) s->first_byte_ms = now_ms() - s->t0;
        s->data[i] = data;
        s->ready[i] = ready;
        s->total[i] = total;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
}

static void *lp_reader(void *arg) {
    lp_state *s = arg;
    const kvl_gpu_load_req *lr = &s->r->load;
    kvl_store_key *keys = malloc((size_t)s->nc * sizeof *keys);
    kvl_status st;
    double t0 = now_ms();
    kvl_clear_error();
    if (!keys) {
        st = kvl_errorf(KVL_ERR_NOMEM, "read keys");
    } else {
        for (int32_t i = 0; i < s->nc; i++) keys[i] = lp_chunk(s, i)->key;
        st = kvl_store_get_batch_stream(lr->store, (size_t)s->nc, keys, lr->fingerprint, s->vals, s->sts, lp_on_bytes, s);
    }
    free(keys);
    pthread_mutex_lock(&s->mu);
    s->read_ms = now_ms() - t0;
    s->read_st = st;
    snprintf(s->read_msg, sizeof s->read_msg, "%s", st == KVL_OK ? "" : kvl_last_error());
    s->reads_done = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Waits (mu held) until chunk k has `need` bytes; returns its data, or NULL with *st set when the
 * read ended short (a failed read, a cache shorter than need). */
static const uint8_t *lp_wait_bytes(lp_state *s, int32_t k, size_t need, kvl_status *st) {
    while (!(s->data[k] && s->ready[k] >= need) && !s->reads_done) pthread_cond_wait(&s->cv, &s->mu);
    if (s->data[k] && s->ready[k] >= need) return s->data[k];
    if (s->read_st != KVL_OK) *st = kvl_errorf(s->read_st, "store read: %s", s->read_msg);
    else if (s->sts[k] != KVL_OK) *st = kvl_errorf(s->sts[k], "chunk at slot %d: store read failed", (*lp_chunk(s, k)).slot0);
    else *st = kvl_errorf(KVL_ERR_CODEC, "chunk at slot %d: cache of %zu bytes, its layers need %zu",
                          (*lp_chunk(s, k)).slot0, s->ready[k], need);
    return NULL;
}

/* Once chunk k's header has landed: lend[k * (L + 1) + l] = the end of layer l-1's bytes in its
 * value (the bytes layers [0, l) need), checked against the kv's shape. Called with mu held;
 * returns with mu held. */
static kvl_status lp_prepare(lp_state *s, int32_t k) {
    const kvl_gpu_load_chunk *c = &(*lp_chunk(s, k));
    size_t C = (size_t)s->v->n_channels, T = (size_t)c->n_tokens, L = (size_t)s->L, *e = s->lend + (size_t)k * (L + 1);
    kvl_status st = KVL_OK;
    if (c->raw) { /* codec off: [L][2][T][C] bf16 */
        for (size_t l = 0; l <= L; l++) e[l] = l * 2 * T * C * 2;
        return KVL_OK;
    }
    const uint8_t *b = lp_wait_bytes(s, k, 64, &st);
    if (!b) return st;
    size_t hb = (size_t)b[6] | ((size_t)b[7] << 8), total = s->total[k];
    if (!lp_wait_bytes(s, k, hb < total ? hb : total, &st)) return st;
    pthread_mutex_unlock(&s->mu);
    kvl_codec_info in;
    st = kvl_codec_info_get(b, total, &in);
    if (st == KVL_OK && (in.shape.n_layers != s->v->n_layers || (size_t)in.shape.n_kv_heads * in.shape.head_dim != C ||
                         (size_t)in.shape.n_tokens != T))
        st = kvl_errorf(KVL_ERR_CODEC, "chunk at slot %d: cache of %d layers x %d tokens x %d channels, kv wants %d x %zu x %zu",
                        c->slot0, in.shape.n_layers, in.shape.n_tokens, in.shape.n_kv_heads * in.shape.head_dim,
                        s->v->n_layers, T, C);
    if (st == KVL_OK) s->lossless[k] = (uint8_t)in.lossless;
    e[0] = 0;
    for (size_t l = 1; l <= L && st == KVL_OK; l++) {
        uint64_t off = 0, len = 0;
        st = kvl_codec_plan_range(b, total, 0, (int32_t)l, &off, &len);
        e[l] = (size_t)(off + len);
    }
    pthread_mutex_lock(&s->mu);
    return st;
}

/* codec off: layers [l, l + nl) of a raw bf16 chunk copied into its slots */
static kvl_status lp_copy_raw(lp_state *s, int32_t k, const uint8_t *b, int32_t l, int32_t nl, cudaStream_t rs) {
    const kvl_gpu_load_chunk *c = &(*lp_chunk(s, k));
    size_t C = (size_t)s->v->n_channels, T = (size_t)c->n_tokens;
    if (s->v->dtype != KVL_CUDA_KV_BF16) return kvl_errorf(KVL_ERR_INVALID_ARG, "raw bf16 chunks need a bf16 kv");
    if (s->total[k] != (size_t)s->v->n_layers * 2 * T * C * 2)
        return kvl_errorf(KVL_ERR_CODEC, "raw chunk at slot %d: %zu bytes, %d layers x %zu tokens x %zu channels of bf16 need %zu",
                          c->slot0, s->total[k], s->v->n_layers, T, C, (size_t)s->v->n_layers * 2 * T * C * 2);
    for (int32_t i = 2 * l; i < 2 * (l + nl); i++) {
        uint8_t *dst = (uint8_t *)s->v->data + (((size_t)(i / 2) * 2 + (size_t)(i % 2)) * (size_t)s->v->capacity + (size_t)c->slot0) * C * 2;
        cudaError_t e = cudaMemcpyAsync(dst, b + (size_t)i * T * C * 2, T * C * 2, cudaMemcpyHostToDevice, rs);
        if (e != cudaSuccess) return kvl_errorf(KVL_ERR_CUDA, "raw chunk copy: %s", cudaGetErrorString(e));
    }
    return KVL_OK;
}

static void *lp_decoder(void *arg) {
    lp_state *s = arg;
    const kvl_gpu_load_req *lr = &s->r->load;
    size_t es = kvl_cuda_kv_elem_bytes(s->v);
    cudaStream_t rs = NULL;
    kvl_status st = KVL_OK;
    kvl_clear_error();
    int lo = 0, hi = 0; /* high priority, as the decoder's own stream (kvl_codec_gpu_create) */
    if (cudaSetDevice(s->v->gpu) != cudaSuccess || cudaDeviceGetStreamPriorityRange(&lo, &hi) != cudaSuccess ||
        cudaStreamCreateWithPriority(&rs, cudaStreamNonBlocking, hi) != cudaSuccess)
        st = kvl_errorf(KVL_ERR_CUDA, "decoder stream");
    /* Each step takes the layers whose bytes have landed in every chunk, at least one and at most
     * s->group: from the DRAM tier that is whole groups at once; from disk the steps follow the
     * reads. Steps grow 1, 4, 16, ...: the forward pass starts early and there are few launches
     * (a decode launch costs ~1-2 ms whatever its size, each thread decoding a whole sub-stream
     * serially; at 8k tokens from DRAM growth x2 gave 55.9 ms, x4 53.2, x8 53.3). A step's lossy chunks
     * are only staged here (validated, planned, copied to the device): the forward pass queues
     * their decode kernel on its own stream right before the step's first layer. Raw and lossless
     * chunks are copied in place here, before the step is announced. */
    size_t L1 = (size_t)s->L + 1;
    pthread_mutex_lock(&s->mu);
    for (int32_t k = 0; k < s->nc && st == KVL_OK; k++) st = lp_prepare(s, k);
    pthread_mutex_unlock(&s->mu);
    for (int32_t l = 0, g = 0; l < s->L && st == KVL_OK; g++) {
        int32_t sh = g * LP_GROWTH_LOG2, cap = sh < 16 && (1 << sh) < s->group ? 1 << sh : s->group, nl = 1;
        double tw = now_ms();
        pthread_mutex_lock(&s->mu);
        for (int32_t k = 0; k < s->nc && st == KVL_OK; k++)
            if (!lp_wait_bytes(s, k, s->lend[(size_t)k * L1 + (size_t)l + 1], &st)) break;
        while (st == KVL_OK && nl < cap && l + nl < s->L) {
            int all = 1;
            for (int32_t k = 0; k < s->nc && all; k++)
                all = s->ready[k] >= s->lend[(size_t)k * L1 + (size_t)(l + nl) + 1];
            if (!all) break;
            nl++;
        }
        pthread_mutex_unlock(&s->mu);
        s->wait_bytes_ms += now_ms() - tw;
        if (st != KVL_OK) break;
        double t0 = now_ms();
        lp_step *sp = &s->steps[g];
        *sp = (lp_step){l, nl, NULL, calloc((size_t)s->nc, sizeof *sp->gc), {NULL, NULL}};
        if (!sp->gc) st = KVL_ERR_NOMEM;
        int32_t n_lossy = 0, n_lossless = 0;
        for (int32_t k = 0; k < s->nc && st == KVL_OK; k++) {
            const kvl_gpu_load_chunk *ch = lp_chunk(s, k);
            if (ch->raw) {
                st = lp_copy_raw(s, k, s->data[k], l, nl, rs);
                continue;
            }
            kvl_codec_gpu_chunk o = {s->data[k], s->total[k], l, nl,
                                     (uint8_t *)s->v->data + ((size_t)l * 2 * s->v->capacity + (size_t)ch->slot0) * s->v->n_channels * es,
                                     2 * (int64_t)s->v->capacity * s->v->n_channels, (int64_t)s->v->capacity * s->v->n_channels,
                                     s->v->n_channels};
            if (s->lossless[k]) s->gc[n_lossless++] = o; /* decoded on the CPU (zstd), copied */
            else sp->gc[n_lossy++] = o;
        }
        if (st == KVL_OK && n_lossless > 0)
            st = kvl_codec_gpu_decode(lr->dec, s->gc, n_lossless, lr->profile, codec_dtype(s->v));
        if (st == KVL_OK && n_lossy > 0)
            st = kvl_codec_gpu_stage(lr->dec, sp->gc, n_lossy, lr->profile, codec_dtype(s->v),
                                     &sp->batch);
        if (st == KVL_OK && cudaStreamSynchronize(rs) != cudaSuccess) st = kvl_errorf(KVL_ERR_CUDA, "decoder stream sync");
        s->decode_ms += now_ms() - t0;
        l += nl;
        pthread_mutex_lock(&s->mu);
        if (st == KVL_OK) {
            s->n_steps = g + 1;
            s->ready_layers = l;
            if (g == 0) s->first_layer_ms = now_ms() - s->t0;
        }
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
    if (rs) cudaStreamDestroy(rs);
    pthread_mutex_lock(&s->mu);
    s->st = st;
    snprintf(s->msg, sizeof s->msg, "%s", st == KVL_OK ? "" : kvl_last_error());
    if (st != KVL_OK) s->ready_layers = -1; /* wakes the forward pass with the error */
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* On the forward pass's thread, before layer sp->l: the step's decode kernel and the re-rotation
 * of its layers' keys, queued on the model's stream (after the layers before it). */
static kvl_status lp_launch_step(lp_state *s, lp_step *sp) {
    const kvl_gpu_load_req *lr = &s->r->load;
    const kvl_model_config *c = kvl_model_get_config(lr->model);
    size_t es = kvl_cuda_kv_elem_bytes(s->v);
    cudaStream_t cs = (cudaStream_t)s->v->stream;
    if (cudaEventCreate(&sp->ev[0]) != cudaSuccess || cudaEventCreate(&sp->ev[1]) != cudaSuccess ||
        cudaEventRecord(sp->ev[0], cs) != cudaSuccess)
        return kvl_errorf(KVL_ERR_CUDA, "step events");
    if (sp->batch) KVL_TRY(kvl_codec_gpu_launch(sp->batch, cs));
    /* the keys of the step's layers re-rotated, up to KVL_CU_REROT_MAX chunks per launch */
    void *base = (uint8_t *)s->v->data + (size_t)sp->l * 2 * s->v->capacity * s->v->n_channels * es;
    kvl_cu_rerot_regions reg;
    reg.count = 0;
    for (int32_t k = 0; k <= s->nc; k++) {
        const kvl_gpu_load_chunk *ch = k < s->nc ? lp_chunk(s, k) : NULL;
        if (ch && !lr->no_rerotate && ch->position != 0) {
            reg.off[reg.count] = (int64_t)ch->slot0 * s->v->n_channels;
            reg.n[reg.count] = ch->n_tokens;
            reg.delta[reg.count] = ch->position;
            reg.count++;
        }
        if (reg.count == KVL_CU_REROT_MAX || (!ch && reg.count > 0)) {
            cudaError_t e = kvl_cu_rerotate_multi(base, s->v->dtype == KVL_CUDA_KV_BF16 ? KVL_CU_BF16 : KVL_CU_F32, sp->nl,
                                                  2 * (int64_t)s->v->capacity * s->v->n_channels, s->v->n_channels,
                                                  c->n_kv_heads, c->head_dim, c->rope_style, c->rope_theta, &reg, cs);
            if (e != cudaSuccess) return kvl_errorf(KVL_ERR_CUDA, "rerotate: %s", cudaGetErrorString(e));
            reg.count = 0;
        }
    }
    if (cudaEventRecord(sp->ev[1], cs) != cudaSuccess) return kvl_errorf(KVL_ERR_CUDA, "step events");
    return KVL_OK;
}

/* Allocates the pipeline's state for nc loaded chunks (ld: their request indices). */
static kvl_status lp_init(lp_state *ls, const kvl_gpu_blend_req *r, const kvl_cuda_kv_view *v, int32_t *ld, int32_t nc,
                          double t0) {
    *ls = (lp_state){.r = r, .v = v, .nc = nc, .L = v->n_layers, .group = r->layer_group > 0 ? r->layer_group : v->n_layers,
                     .ready_layers = 0, .st = KVL_OK, .t0 = t0, .ld = ld};
    pthread_mutex_init(&ls->mu, NULL);
    pthread_cond_init(&ls->cv, NULL);
    ls->gc = calloc((size_t)nc, sizeof *ls->gc);
    ls->data = calloc((size_t)nc, sizeof *ls->data);
    ls->ready = calloc((size_t)nc, sizeof *ls->ready);
    ls->total = calloc((size_t)nc, sizeof *ls->total);
    ls->vals = calloc((size_t)nc, sizeof *ls->vals);
    ls->sts = calloc((size_t)nc, sizeof *ls->sts);
    ls->lend = calloc((size_t)nc * ((size_t)v->n_layers + 1), sizeof *ls->lend);
    ls->lossless = calloc((size_t)nc, 1);
    ls->steps = calloc((size_t)v->n_layers, sizeof *ls->steps);
    if (!ls->gc || !ls->data || !ls->ready || !ls->total || !ls->vals || !ls->sts || !ls->lend || !ls->lossless || !ls->steps)
        return KVL_ERR_NOMEM;
    return KVL_OK;
}

/* Starts the reader (unless the chunks' bytes are in place already: reads_done) and the decoder. */
static kvl_status lp_start(lp_state *ls) {
    if (!ls->reads_done) {
        ls->rstarted = pthread_create(&ls->rth, NULL, lp_reader, ls) == 0;
        if (!ls->rstarted) return kvl_errorf(KVL_ERR_INTERNAL, "cannot start the reader thread");
    }
    ls->dstarted = pthread_create(&ls->dth, NULL, lp_decoder, ls) == 0;
    if (!ls->dstarted) return kvl_errorf(KVL_ERR_INTERNAL, "cannot start the decoder thread");
    return KVL_OK;
}

/* Before the forward pass's layer l (a kvl_blend_layer_hook): waits until the decoder has staged
 * layer l, and at the first layer of a step queues its decode kernel and re-rotation. */
static kvl_status lp_before_layer(void *ctx, int32_t l) {
    lp_state *ls = ctx;
    double tw = now_ms();
    pthread_mutex_lock(&ls->mu);
    while (ls->ready_layers >= 0 && ls->ready_layers <= l) pthread_cond_wait(&ls->cv, &ls->mu);
    int failed = ls->ready_layers < 0;
    lp_step *sp = ls->next_step < ls->n_steps && ls->steps[ls->next_step].l == l ? &ls->steps[ls->next_step] : NULL;
    kvl_status dst = ls->st;
    pthread_mutex_unlock(&ls->mu);
    ls->layer_wait_ms += now_ms() - tw;
    if (failed) return kvl_errorf(dst != KVL_OK ? dst : KVL_ERR_INTERNAL, "%s", ls->msg);
    if (!sp) return KVL_OK;
    ls->next_step++;
    return lp_launch_step(ls, sp);
}

/* After the forward pass (st: how it went): the store's verdicts on every chunk (decoding started
 * on unverified bytes), the decoder's status, the kernels' in-stream checks; then everything is
 * joined and freed and the stats filled. Returns the first failure. */
static kvl_status lp_finish(lp_state *ls, kvl_status st, kvl_gpu_load_stats *s) {
    if (ls->rstarted) {
        pthread_join(ls->rth, NULL);
        ls->rstarted = 0;
        if (st == KVL_OK && ls->read_st != KVL_OK) st = kvl_errorf(ls->read_st, "store read: %s", ls->read_msg);
        for (int32_t i = 0; i < ls->nc && st == KVL_OK; i++)
            if (ls->sts[i] != KVL_OK) st = kvl_errorf(ls->sts[i], "chunk at slot %d: store read failed", lp_chunk(ls, i)->slot0);
    }
    if (ls->dstarted) {
        /* after a failed forward pass the decoder runs out by itself: it only waits for bytes,
         * which the reader delivers or gives up on */
        pthread_join(ls->dth, NULL);
        ls->dstarted = 0;
        if (st == KVL_OK && ls->st != KVL_OK) st = kvl_errorf(ls->st, "%s", ls->msg);
    }
    for (int32_t g = 0; g < ls->n_steps && st == KVL_OK; g++) {
        st = kvl_codec_gpu_batch_finish(ls->steps[g].batch);
        ls->steps[g].batch = NULL;
        float ms = 0;
        if (st == KVL_OK && ls->steps[g].ev[1] && cudaEventElapsedTime(&ms, ls->steps[g].ev[0], ls->steps[g].ev[1]) == cudaSuccess)
            s->kernel_ms += ms;
    }
    for (int32_t g = 0; ls->steps && g < ls->L; g++) {
        kvl_codec_gpu_batch_free(ls->steps[g].batch); /* after a failure: queued work is stream-ordered */
        free(ls->steps[g].gc);
        for (int k = 0; k < 2; k++)
            if (ls->steps[g].ev[k]) cudaEventDestroy(ls->steps[g].ev[k]);
    }
    s->read_ms = ls->read_ms;
    s->read_wait_ms = ls->wait_bytes_ms;
    s->decode_ms = ls->decode_ms;
    s->layer_wait_ms = ls->layer_wait_ms;
    s->first_byte_ms = ls->first_byte_ms;
    s->first_layer_ms = ls->first_layer_ms;
    for (int32_t i = 0; i < ls->nc && ls->total; i++) s->bytes_read += ls->total[i];
    for (int32_t i = 0; ls->vals && i < ls->nc; i++) kvl_store_value_free(ls->vals[i]);
    pthread_mutex_destroy(&ls->mu);
    pthread_cond_destroy(&ls->cv);
    free(ls->gc); free(ls->data); free(ls->ready); free(ls->total); free(ls->vals); free(ls->sts); free(ls->lend);
    free(ls->lossless); free(ls->steps);
    return st;
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
    /* chunks to recompute (the controller found loading them slower) are computed in the pass like
     * uncached tokens: every one of their slots must be in idx */
    uint8_t *in_idx = calloc((size_t)r->n > 0 ? (size_t)r->n : 1, 1);
    int32_t *ld = malloc((size_t)lr->n_chunks * sizeof *ld), nc = 0;
    if (!in_idx || !ld) {
        free(in_idx);
        free(ld);
        return KVL_ERR_NOMEM;
    }
    for (int32_t i = 0; i < r->n_idx; i++)
        if (r->idx[i] >= 0 && r->idx[i] < r->n) in_idx[r->idx[i]] = 1;
    kvl_status vst = KVL_OK;
    for (int32_t i = 0; i < lr->n_chunks && vst == KVL_OK; i++) {
        const kvl_gpu_load_chunk *c = &lr->chunks[i];
        if (c->n_tokens < 1 || c->slot0 < 0 || c->slot0 > v.capacity - c->n_tokens || c->slot0 + c->n_tokens > r->n)
            vst = kvl_errorf(KVL_ERR_INVALID_ARG, "chunk %d: slots [%d, +%d) outside the pass", i, c->slot0, c->n_tokens);
        else if (c->action == KVL_LOAD_FROM_STORE) ld[nc++] = i;
        else if (c->action != KVL_LOAD_RECOMPUTE) vst = kvl_errorf(KVL_ERR_INVALID_ARG, "chunk %d: unknown action %d", i, c->action);
        else
            for (int32_t t = 0; t < c->n_tokens && vst == KVL_OK; t++)
                if (!in_idx[c->slot0 + t])
                    vst = kvl_errorf(KVL_ERR_INVALID_ARG, "chunk %d is recomputed: its slot %d must be computed (in idx)", i,
                                     c->slot0 + t);
    }
    free(in_idx);
    if (vst != KVL_OK || nc == 0) {
        free(ld);
        return vst != KVL_OK ? vst : kvl_errorf(KVL_ERR_INVALID_ARG, "no chunk to load: use kvl_forward");
    }
    lp_state ls;
    kvl_fwd *f = NULL;
    kvl_status st = lp_init(&ls, r, &v, ld, nc, t0);
    for (int32_t i = 0; i < lr->n_chunks && st == KVL_OK; i++)
        st = kvl_kv_set_valid(lr->kv, lr->chunks[i].slot0, lr->chunks[i].n_tokens, 1);
    if (st == KVL_OK) st = kvl_fwd_begin(lr->model, lr->kv, r->n, r->tokens, r->positions, &f);
    if (st == KVL_OK) st = lp_start(&ls);
    double tc = now_ms();
    for (int32_t l = 0; l < v.n_layers && st == KVL_OK; l++) {
        st = lp_before_layer(&ls, l);
        if (st == KVL_OK) st = kvl_fwd_layer(f, l, r->idx, r->n_idx);
    }
    if (st == KVL_OK) st = kvl_fwd_logits(f, &r->logit_slot, 1, r->logits);
    st = lp_finish(&ls, st, &s);
    s.compute_ms = now_ms() - tc;
    s.n_loaded = st == KVL_OK ? nc : 0;
    s.n_recomputed = st == KVL_OK ? lr->n_chunks - nc : 0;
    kvl_fwd_free(f);
    free(ld);
    s.total_ms = now_ms() - t0;
    if (stats) *stats = s;
    return st;
}

/* ---------------------------------------------------------------- CacheBlend plans on the GPU */

kvl_status kvl_gpu_blend_load(kvl_model *m, const kvl_blend_plan *p, const kvl_blend_segment *segs, kvl_kv *kv,
                              kvl_codec_gpu *dec, const kvl_codec_profile *profile) {
    if (!m || !p || !segs || !kv || !dec) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_gpu_blend_load: NULL argument");
    if (kvl_kv_capacity(kv) < p->n_slots)
        return kvl_errorf(KVL_ERR_CONTEXT_FULL, "the kv cache has %d slots, the plan needs %d", kvl_kv_capacity(kv), p->n_slots);
    kvl_cuda_kv_view v;
    KVL_TRY(kvl_cuda_kv_view_get(kv, &v));
    size_t es = kvl_cuda_kv_elem_bytes(&v);
    uint8_t *placed = calloc((size_t)p->n_segments + 1, 1);
    kvl_codec_gpu_chunk *gc = calloc((size_t)p->n_segments + 1, sizeof *gc);
    int32_t *gseg = malloc(((size_t)p->n_segments + 1) * sizeof *gseg), n = 0;
    kvl_status st = placed && gc && gseg ? KVL_OK : KVL_ERR_NOMEM;
    for (int32_t s = 0; s < p->n_segments && st == KVL_OK; s++) {
        const kvl_chunk_cache *cc = segs[s].cache;
        if (!cc || cc->kv || !cc->enc || p->mode == KVL_BLEND_FULL) continue; /* kvl_blend_load_rest's */
        int32_t s0 = p->seg_slot0[s], len = (s + 1 < p->n_segments ? p->seg_slot0[s + 1] : p->n_slots) - s0;
        if (cc->n_tokens != len) {
            st = kvl_errorf(KVL_ERR_BLEND_PLAN, "segment %d has %d tokens, the plan placed %d", s, cc->n_tokens, len);
            break;
        }
        gc[n] = (kvl_codec_gpu_chunk){cc->enc, cc->enc_size, 0, 0, (uint8_t *)v.data + (size_t)s0 * v.n_channels * es,
                                      2 * (int64_t)v.capacity * v.n_channels, (int64_t)v.capacity * v.n_channels, v.n_channels};
        gseg[n++] = s;
    }
    if (st == KVL_OK && n > 0) st = kvl_codec_gpu_decode(dec, gc, n, profile, codec_dtype(&v));
    for (int32_t k = 0; k < n && st == KVL_OK; k++) {
        int32_t s = gseg[k], s0 = p->seg_slot0[s], len = segs[s].cache->n_tokens;
        st = kvl_kv_set_valid(kv, s0, len, 1);
        if (st == KVL_OK) st = kvl_kv_rerotate(kv, s0, len, p->rot_delta[s0]);
        placed[s] = 1;
    }
    if (st == KVL_OK) st = kvl_blend_load_rest(m, p, segs, kv, placed);
    free(placed);
    free(gc);
    free(gseg);
    return st;
}

kvl_status kvl_gpu_blend_run(kvl_model *m, kvl_blend_plan *p, const kvl_blend_segment *segs, kvl_kv *kv, kvl_codec_gpu *dec,
                             const kvl_codec_profile *profile, float *logits, kvl_gpu_load_stats *stats) {
    if (!m || !p || !segs || !kv || !dec) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_gpu_blend_run: NULL argument");
    if (kvl_kv_capacity(kv) < p->n_slots)
        return kvl_errorf(KVL_ERR_CONTEXT_FULL, "the kv cache has %d slots, the plan needs %d", kvl_kv_capacity(kv), p->n_slots);
    double t0 = now_ms();
    kvl_gpu_load_stats s = {0};
    kvl_cuda_kv_view v;
    KVL_TRY(kvl_cuda_kv_view_get(kv, &v));
    /* the encoded caches become the pipeline's chunks, their bytes all in place (no reads): slot0
     * the segment's first slot, position the plan's re-rotation delta */
    int32_t ns = p->n_segments, nc = 0;
    uint8_t *placed = calloc((size_t)ns + 1, 1);
    kvl_gpu_load_chunk *ch = calloc((size_t)ns + 1, sizeof *ch);
    int32_t *ld = malloc(((size_t)ns + 1) * sizeof *ld);
    if (!placed || !ch || !ld) {
        free(placed);
        free(ch);
        free(ld);
        return KVL_ERR_NOMEM;
    }
    kvl_status st = KVL_OK;
    for (int32_t k = 0; k < ns && st == KVL_OK; k++) {
        const kvl_chunk_cache *cc = segs[k].cache;
        if (!cc || cc->kv || !cc->enc || p->mode == KVL_BLEND_FULL) continue;
        int32_t s0 = p->seg_slot0[k], len = (k + 1 < ns ? p->seg_slot0[k + 1] : p->n_slots) - s0;
        if (cc->n_tokens != len) st = kvl_errorf(KVL_ERR_BLEND_PLAN, "segment %d has %d tokens, the plan placed %d", k, cc->n_tokens, len);
        ch[nc] = (kvl_gpu_load_chunk){{{0}}, s0, len, p->rot_delta[s0], KVL_LOAD_FROM_STORE, NULL, 0};
        ld[nc] = nc;
        placed[k] = 1;
        nc++;
    }
    if (st == KVL_OK) st = kvl_blend_load_rest(m, p, segs, kv, placed);
    if (st != KVL_OK || nc == 0) {
        /* nothing encoded: the ordinary run */
        if (st == KVL_OK) st = kvl_blend_run(m, p, kv, logits);
        free(placed);
        free(ch);
        free(ld);
        return st;
    }
    kvl_gpu_blend_req fr = {{NULL, NULL, m, kv, dec, profile, ch, nc, 0, 0}, p->n_slots, p->tokens, p->positions, NULL, 0, 0, 0,
                            logits};
    lp_state ls;
    st = lp_init(&ls, &fr, &v, ld, nc, t0);
    for (int32_t k = 0, c = 0; k < ns && st == KVL_OK; k++) {
        if (!placed[k]) continue;
        ls.data[c] = segs[k].cache->enc;
        ls.ready[c] = ls.total[c] = segs[k].cache->enc_size;
        st = kvl_kv_set_valid(kv, ch[c].slot0, ch[c].n_tokens, 1);
        c++;
    }
    ls.reads_done = 1;
    if (st == KVL_OK) st = lp_start(&ls);
    double tc = now_ms();
    if (st == KVL_OK) st = kvl_blend_run_hook(m, p, kv, logits, lp_before_layer, &ls);
    st = lp_finish(&ls, st, &s);
    s.compute_ms = now_ms() - tc;
    s.n_loaded = st == KVL_OK ? nc : 0;
    free(placed);
    free(ch);
    free(ld);
    s.total_ms = now_ms() - t0;
    if (stats) *stats = s;
    return st;
}
