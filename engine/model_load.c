/* Model loading (llama2.c .bin and Hugging Face safetensors), synthetic weights, fingerprints. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine_impl.h"
#include "kvl_cpu.h"
#include "kvl_safetensors.h"
#include "kvl_synth.h"

#define KVL_MAX_DIM (1 << 16)
#define KVL_MAX_LAYERS 512
#define KVL_MAX_VOCAB (1 << 22)
#define KVL_MAX_SEQ (1 << 21)

kvl_model_opts kvl_model_opts_default(void) {
    kvl_model_opts o = {KVL_BACKEND_CPU, 0, 0, KVL_WDTYPE_F32};
    return o;
}

kvl_status kvl_config_validate(const kvl_model_config *c) {
#define REQ(cond, ...) if (!(cond)) return kvl_errorf(KVL_ERR_MODEL_CONFIG, __VA_ARGS__)
    REQ(c->dim > 0 && c->dim <= KVL_MAX_DIM, "config: dim %d out of range (1..%d)", c->dim, KVL_MAX_DIM);
    REQ(c->hidden_dim > 0 && c->hidden_dim <= 4 * KVL_MAX_DIM, "config: hidden_dim %d out of range", c->hidden_dim);
    REQ(c->n_layers > 0 && c->n_layers <= KVL_MAX_LAYERS, "config: n_layers %d out of range (1..%d)", c->n_layers, KVL_MAX_LAYERS);
    REQ(c->n_heads > 0 && c->n_heads <= 1024, "config: n_heads %d out of range", c->n_heads);
    REQ(c->n_kv_heads > 0 && c->n_kv_heads <= c->n_heads, "config: n_kv_heads %d must be in 1..n_heads (%d)", c->n_kv_heads, c->n_heads);
    REQ(c->n_heads % c->n_kv_heads == 0, "config: n_heads %d is not a multiple of n_kv_heads %d", c->n_heads, c->n_kv_heads);
    REQ(c->head_dim > 0 && c->head_dim % 2 == 0 && c->head_dim <= 1024, "config: head_dim %d must be even and in 2..1024", c->head_dim);
    REQ(c->vocab_size > 0 && c->vocab_size <= KVL_MAX_VOCAB, "config: vocab_size %d out of range", c->vocab_size);
    REQ(c->max_seq > 0 && c->max_seq <= KVL_MAX_SEQ, "config: max_seq %d out of range", c->max_seq);
    REQ(c->rope_theta > 0 && isfinite(c->rope_theta), "config: rope_theta must be positive");
    REQ(c->norm_eps > 0 && c->norm_eps < 1, "config: rms_norm_eps must be in (0, 1)");
    REQ(c->rope_style == KVL_ROPE_HALF || c->rope_style == KVL_ROPE_INTERLEAVED, "config: bad rope style");
#undef REQ
    return KVL_OK;
}

static size_t layer_floats(const kvl_model_config *c) {
    size_t D = (size_t)c->dim, q = (size_t)c->n_heads * c->head_dim, kv = (size_t)c->n_kv_heads * c->head_dim,
           F = (size_t)c->hidden_dim;
    return D + q * D + 2 * kv * D + D * q + D + 3 * F * D;
}

kvl_status kvl_weights_alloc(kvl_weights *w, const kvl_model_config *c) {
    memset(w, 0, sizeof *w);
    size_t D = (size_t)c->dim, V = (size_t)c->vocab_size;
    size_t n = V * D + (size_t)c->n_layers * layer_floats(c) + D + (c->tied_embeddings ? 0 : V * D);
    w->buf = malloc(n * sizeof(float));
    w->layers = calloc((size_t)c->n_layers, sizeof *w->layers);
    if (!w->buf || !w->layers) {
        kvl_weights_free(w);
        return kvl_errorf(KVL_ERR_NOMEM, "cannot allocate %.1f MiB of weights", (double)n * 4 / 1048576);
    }
    w->n_floats = n;
    float *p = w->buf;
    size_t q = (size_t)c->n_heads * c->head_dim, kv = (size_t)c->n_kv_heads * c->head_dim, F = (size_t)c->hidden_dim;
    w->tok_emb = p; p += V * D;
    for (int l = 0; l < c->n_layers; l++) {
        kvl_layer_w *L = &w->layers[l];
        L->attn_norm = p; p += D;
        L->wq = p; p += q * D;
        L->wk = p; p += kv * D;
        L->wv = p; p += kv * D;
        L->wo = p; p += D * q;
        L->ffn_norm = p; p += D;
        L->w_gate = p; p += F * D;
        L->w_up = p; p += F * D;
        L->w_down = p; p += D * F;
    }
    w->final_norm = p; p += D;
    if (c->tied_embeddings) {
        w->wcls = w->tok_emb;
    } else {
        w->wcls = p; p += V * D;
    }
    KVL_ASSERT((size_t)(p - w->buf) == n);
    return KVL_OK;
}

void kvl_weights_free(kvl_weights *w) {
    if (!w) return;
    free(w->buf);
    free(w->layers);
    memset(w, 0, sizeof *w);
}

/* ------------------------------------------------------------ fingerprint */

static void put_i32(EVP_MD_CTX *h, int32_t v) {
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    EVP_DigestUpdate(h, b, 4);
}

static void put_f32(EVP_MD_CTX *h, float f) {
    int32_t v;
    memcpy(&v, &f, 4);
    put_i32(h, v);
}

static kvl_status fingerprint(kvl_model *m, int hash_weights, uint64_t seed) {
    EVP_MD_CTX *h = EVP_MD_CTX_new();
    if (!h) return KVL_ERR_NOMEM;
    EVP_DigestInit_ex(h, EVP_sha256(), NULL);
    const char *tag = hash_weights ? "kvloom-model-v1" : "kvloom-synthetic-v1";
    EVP_DigestUpdate(h, tag, strlen(tag) + 1);
    const kvl_model_config *c = &m->cfg;
    int32_t ints[] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
                      c->vocab_size, c->max_seq, c->tied_embeddings, c->rope_style};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) put_i32(h, ints[i]);
    put_f32(h, c->rope_theta);
    put_f32(h, c->norm_eps);
    if (hash_weights) {
        /* x86-64 and every target we build for is little-endian: the buffer is already canonical */
        EVP_DigestUpdate(h, m->w.buf, m->w.n_floats * sizeof(float));
    } else {
        for (int i = 0; i < 8; i++) {
            uint8_t b = (uint8_t)(seed >> (8 * i));
            EVP_DigestUpdate(h, &b, 1);
        }
    }
    unsigned int len = 0;
    EVP_DigestFinal_ex(h, m->fingerprint, &len);
    EVP_MD_CTX_free(h);
    return len == 32 ? KVL_OK : KVL_ERR_INTERNAL;
}

kvl_status kvl_model_finish(kvl_model *m, const kvl_model_opts *opts, int hash_weights, uint64_t seed) {
    m->opts = opts ? *opts : kvl_model_opts_default();
    m->synthetic = !hash_weights;
    m->synth_seed = seed;
    pthread_mutex_init(&m->mu, NULL);
    KVL_TRY(fingerprint(m, hash_weights, seed));
    if (m->opts.backend == KVL_BACKEND_CPU) {
        m->be = &kvl_backend_cpu;
    } else if (m->opts.backend == KVL_BACKEND_CUDA) {
#ifdef KVL_HAVE_CUDA
        m->be = &kvl_backend_cuda;
#else
        return kvl_errorf(KVL_ERR_UNSUPPORTED, "this build has no CUDA backend (configure with -DKVL_CUDA=ON)");
#endif
    } else {
        return kvl_errorf(KVL_ERR_INVALID_ARG, "unknown backend %d", m->opts.backend);
    }
    return m->be->model_init(m);
}

static kvl_model *model_new(void) { return calloc(1, sizeof(kvl_model)); }

void kvl_model_free(kvl_model *m) {
    if (!m) return;
    if (m->be && m->be->model_fini) m->be->model_fini(m);
    kvl_weights_free(&m->w);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

const kvl_model_config *kvl_model_get_config(const kvl_model *m) { return &m->cfg; }
const uint8_t *kvl_model_fingerprint(const kvl_model *m) { return m->fingerprint; }
void kvl_model_fingerprint_hex(const kvl_model *m, char out[65]) {
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", m->fingerprint[i]);
}
int kvl_model_backend(const kvl_model *m) { return m->opts.backend; }
const char *kvl_model_backend_name(const kvl_model *m) { return m->be ? m->be->name : "none"; }
size_t kvl_model_kv_elems_per_layer(const kvl_model *m, int32_t n) {
    return (size_t)n * (size_t)m->cfg.n_kv_heads * (size_t)m->cfg.head_dim;
}

/* ------------------------------------------------------------ file helpers */

typedef struct {
    int fd;
    uint8_t *p;
    size_t size;
} mapped;

static kvl_status map_file(const char *path, mapped *mf) {
    memset(mf, 0, sizeof *mf);
    mf->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (mf->fd < 0)
        return kvl_errorf(errno == ENOENT ? KVL_ERR_NOT_FOUND : errno == EACCES ? KVL_ERR_PERMISSION : KVL_ERR_IO,
                          "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(mf->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(mf->fd);
        return kvl_errorf(KVL_ERR_IO, "%s: not a regular file", path);
    }
    mf->size = (size_t)st.st_size;
    if (mf->size == 0) {
        close(mf->fd);
        return kvl_errorf(KVL_ERR_TRUNCATED, "%s: empty file", path);
    }
    void *p = mmap(NULL, mf->size, PROT_READ, MAP_PRIVATE, mf->fd, 0);
    if (p == MAP_FAILED) {
        close(mf->fd);
        return kvl_errorf(KVL_ERR_IO, "%s: mmap: %s", path, strerror(errno));
    }
    mf->p = p;
    return KVL_OK;
}

static void unmap_file(mapped *mf) {
    if (mf->p) munmap(mf->p, mf->size);
    if (mf->fd > 0) close(mf->fd);
    memset(mf, 0, sizeof *mf);
}

/* ------------------------------------------------------------ llama2.c */

kvl_status kvl_load_llama2c(const char *path, kvl_model_config *c, kvl_weights *w) {
    mapped mf;
    KVL_TRY(map_file(path, &mf));
    kvl_status st = KVL_OK;
    if (mf.size < 28) {
        st = kvl_errorf(KVL_ERR_TRUNCATED, "%s: %zu bytes, shorter than the 28-byte llama2.c header", path, mf.size);
        goto out;
    }
    int32_t h[7];
    memcpy(h, mf.p, sizeof h);
    memset(c, 0, sizeof *c);
    c->dim = h[0];
    c->hidden_dim = h[1];
    c->n_layers = h[2];
    c->n_heads = h[3];
    c->n_kv_heads = h[4];
    c->tied_embeddings = h[5] > 0;
    c->vocab_size = h[5] < 0 ? (h[5] == INT32_MIN ? 0 : -h[5]) : h[5];
    c->max_seq = h[6];
    c->head_dim = c->n_heads > 0 ? c->dim / c->n_heads : 0;
    c->rope_theta = 10000.0f;
    c->norm_eps = 1e-5f;
    c->rope_style = KVL_ROPE_INTERLEAVED;
    c->bos_id = 1;
    c->eos_id = 2;
    if ((st = kvl_config_validate(c)) != KVL_OK) goto out;
    if (c->dim % c->n_heads != 0) {
        st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: dim %d not divisible by n_heads %d", path, c->dim, c->n_heads);
        goto out;
    }
    size_t D = (size_t)c->dim, V = (size_t)c->vocab_size, L = (size_t)c->n_layers, F = (size_t)c->hidden_dim;
    size_t kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t freq = (size_t)c->max_seq * (size_t)c->head_dim / 2 * 2;
    size_t need = V * D + L * D + L * D * D + 2 * L * kvd * D + L * D * D + L * D + 3 * L * F * D + D + freq +
                  (c->tied_embeddings ? 0 : V * D);
    if (mf.size - 28 < need * 4) {
        st = kvl_errorf(KVL_ERR_TRUNCATED, "%s: %zu bytes of weights, the header needs %zu (file truncated?)", path,
                        mf.size - 28, need * 4);
        goto out;
    }
    if (mf.size - 28 > need * 4) {
        st = kvl_errorf(KVL_ERR_FORMAT, "%s: %zu trailing bytes after the weights the header describes (not a legacy llama2.c checkpoint?)",
                        path, mf.size - 28 - need * 4);
        goto out;
    }
    if ((st = kvl_weights_alloc(w, c)) != KVL_OK) goto out;
    const float *src = (const float *)(mf.p + 28); /* mmap is page aligned, 28 keeps 4-byte alignment */
#define TAKE(dst, count) do { memcpy((dst), src, (count) * sizeof(float)); src += (count); } while (0)
    TAKE(w->tok_emb, V * D);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].attn_norm, D);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].wq, D * D);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].wk, kvd * D);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].wv, kvd * D);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].wo, D * D);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].ffn_norm, D);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].w_gate, F * D);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].w_down, D * F);
    for (size_t l = 0; l < L; l++) TAKE(w->layers[l].w_up, F * D);
    TAKE(w->final_norm, D);
    src += freq; /* freq_cis_real / imag: recomputed from rope_theta */
    if (!c->tied_embeddings) TAKE(w->wcls, V * D);
#undef TAKE
    for (size_t i = 0; i < w->n_floats; i++)
        if (!isfinite(w->buf[i])) {
            st = kvl_errorf(KVL_ERR_MODEL_WEIGHTS, "%s: weight %zu is not finite", path, i);
            kvl_weights_free(w);
            goto out;
        }
out:
    unmap_file(&mf);
    return st;
}

/* ------------------------------------------------------------ Hugging Face */

static int json_int(json_t *o, const char *k, int def, const char **bad) {
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v)) return def;
    if (!json_is_integer(v) || json_integer_value(v) < INT32_MIN || json_integer_value(v) > INT32_MAX) {
        if (!*bad) *bad = k;
        return def;
    }
    return (int)json_integer_value(v);
}

static double json_num(json_t *o, const char *k, double def, const char **bad) {
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v)) return def;
    if (!json_is_number(v)) {
        if (!*bad) *bad = k;
        return def;
    }
    return json_number_value(v);
}

static kvl_status hf_config(const char *dir, kvl_model_config *c) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (access(path, F_OK) != 0) return kvl_errorf(KVL_ERR_NOT_FOUND, "%s: not found (is %s a Hugging Face model directory?)", path, dir);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) return kvl_errorf(KVL_ERR_JSON, "%s: %s (line %d)", path, je.text, je.line);
    kvl_status st = KVL_OK;
    const char *bad = NULL;
    if (!json_is_object(j)) { st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: not a JSON object", path); goto out; }
    json_t *mt = json_object_get(j, "model_type");
    if (mt && (!json_is_string(mt) || (strcmp(json_string_value(mt), "llama") != 0 && strcmp(json_string_value(mt), "mistral") != 0))) {
        st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: model_type '%s' is not supported (llama only)", path, json_is_string(mt) ? json_string_value(mt) : "?");
        goto out;
    }
    json_t *act = json_object_get(j, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu") != 0)) {
        st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: hidden_act must be silu", path);
        goto out;
    }
    json_t *ab = json_object_get(j, "attention_bias"), *mb = json_object_get(j, "mlp_bias");
    if (json_is_true(ab) || json_is_true(mb)) {
        st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: attention/mlp biases are not supported", path);
        goto out;
    }
    memset(c, 0, sizeof *c);
    c->dim = json_int(j, "hidden_size", 0, &bad);
    c->hidden_dim = json_int(j, "intermediate_size", 0, &bad);
    c->n_layers = json_int(j, "num_hidden_layers", 0, &bad);
    c->n_heads = json_int(j, "num_attention_heads", 0, &bad);
    c->n_kv_heads = json_int(j, "num_key_value_heads", c->n_heads, &bad);
    c->head_dim = json_int(j, "head_dim", c->n_heads > 0 ? c->dim / c->n_heads : 0, &bad);
    c->vocab_size = json_int(j, "vocab_size", 0, &bad);
    c->max_seq = json_int(j, "max_position_embeddings", 0, &bad);
    c->norm_eps = (float)json_num(j, "rms_norm_eps", 1e-6, &bad);
    double theta = json_num(j, "rope_theta", 0, &bad);
    json_t *rp = json_object_get(j, "rope_parameters");
    if (json_is_object(rp)) {
        if (theta == 0) theta = json_num(rp, "rope_theta", 0, &bad);
        json_t *rt = json_object_get(rp, "rope_type");
        if (rt && (!json_is_string(rt) || strcmp(json_string_value(rt), "default") != 0)) {
            st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: rope_type '%s' is not supported (default only)", path, json_is_string(rt) ? json_string_value(rt) : "?");
            goto out;
        }
    }
    json_t *rs = json_object_get(j, "rope_scaling");
    if (rs && !json_is_null(rs)) {
        st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: rope_scaling is not supported", path);
        goto out;
    }
    c->rope_theta = (float)(theta == 0 ? 10000.0 : theta);
    json_t *tie = json_object_get(j, "tie_word_embeddings");
    c->tied_embeddings = tie ? json_is_true(tie) : 0;
    c->bos_id = json_int(j, "bos_token_id", 1, &bad);
    c->eos_id = json_int(j, "eos_token_id", 2, &bad);
    c->rope_style = KVL_ROPE_HALF;
    if (bad) { st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: field '%s' has the wrong JSON type or range", path, bad); goto out; }
    if (!c->dim || !c->hidden_dim || !c->n_layers || !c->n_heads || !c->vocab_size || !c->max_seq) {
        st = kvl_errorf(KVL_ERR_MODEL_CONFIG, "%s: missing one of hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size, max_position_embeddings", path);
        goto out;
    }
    st = kvl_config_validate(c);
out:
    json_decref(j);
    return st;
}

#define HF_MAX_SHARDS 256

typedef struct {
    mapped mf[HF_MAX_SHARDS];
    kvl_st_file st[HF_MAX_SHARDS];
    char *name[HF_MAX_SHARDS];
    int n;
} hf_files;

static void hf_close(hf_files *f) {
    for (int i = 0; i < f->n; i++) {
        kvl_st_free(&f->st[i]);
        unmap_file(&f->mf[i]);
        free(f->name[i]);
    }
    f->n = 0;
}

static kvl_status hf_open_shard(hf_files *f, const char *dir, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->name[i], name) == 0) return KVL_OK;
    if (f->n >= HF_MAX_SHARDS) return kvl_errorf(KVL_ERR_LIMIT, "more than %d safetensors shards", HF_MAX_SHARDS);
    if (strchr(name, '/') || strcmp(name, "..") == 0 || name[0] == '.' || !name[0])
        return kvl_errorf(KVL_ERR_FORMAT, "shard name '%.64s' must be a plain file name in the model directory", name);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int i = f->n;
    KVL_TRY(map_file(path, &f->mf[i]));
    kvl_status st = kvl_st_parse(f->mf[i].p, f->mf[i].size, f->mf[i].size, &f->st[i]);
    if (st != KVL_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", kvl_last_error());
        unmap_file(&f->mf[i]);
        return kvl_errorf(st, "%s: %s", path, msg);
    }
    f->name[i] = strdup(name);
    f->n++;
    return KVL_OK;
}

static kvl_status hf_tensor(hf_files *f, const char *name, float *dst, int64_t rows, int64_t cols) {
    for (int i = 0; i < f->n; i++) {
        const kvl_st_tensor *t = kvl_st_find(&f->st[i], name);
        if (!t) continue;
        int shape_ok = cols == 0 ? (t->ndim == 1 && t->shape[0] == rows)
                                 : (t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols);
        if (!shape_ok)
            return kvl_errorf(KVL_ERR_MODEL_WEIGHTS, "tensor %s has shape [%lld%s%lld], config implies [%lld, %lld]", name,
                              (long long)(t->ndim > 0 ? t->shape[0] : -1), t->ndim > 1 ? ", " : " ndim ",
                              (long long)(t->ndim > 1 ? t->shape[1] : t->ndim), (long long)rows, (long long)cols);
        size_t n = (size_t)rows * (size_t)(cols ? cols : 1);
        const uint8_t *p = f->mf[i].p + f->st[i].data_offset + t->begin;
        switch (t->dtype) {
        case KVL_ST_F32: memcpy(dst, p, n * 4); break;
        case KVL_ST_BF16:
            for (size_t k = 0; k < n; k++) { uint16_t h; memcpy(&h, p + 2 * k, 2); dst[k] = kvl_bf16_to_f32(h); }
            break;
        case KVL_ST_F16:
            for (size_t k = 0; k < n; k++) { uint16_t h; memcpy(&h, p + 2 * k, 2); dst[k] = kvl_f16_to_f32(h); }
            break;
        default: return kvl_errorf(KVL_ERR_MODEL_WEIGHTS, "tensor %s: dtype not supported (F32, BF16, F16 are)", name);
        }
        for (size_t k = 0; k < n; k++)
            if (!isfinite(dst[k])) return kvl_errorf(KVL_ERR_MODEL_WEIGHTS, "tensor %s: element %zu is not finite", name, k);
        return KVL_OK;
    }
    return kvl_errorf(KVL_ERR_MODEL_WEIGHTS, "tensor %s is missing from the safetensors files", name);
}

kvl_status kvl_load_hf(const char *dir, kvl_model_config *c, kvl_weights *w) {
    KVL_TRY(hf_config(dir, c));
    hf_files *f = calloc(1, sizeof *f);
    if (!f) return KVL_ERR_NOMEM;
    kvl_status st = KVL_OK;
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (access(path, F_OK) == 0) {
        json_error_t je;
        json_t *j = json_load_file(path, 0, &je);
        if (!j) { st = kvl_errorf(KVL_ERR_JSON, "%s: %s (line %d)", path, je.text, je.line); goto out; }
        json_t *wm = json_object_get(j, "weight_map");
        if (!json_is_object(wm)) {
            json_decref(j);
            st = kvl_errorf(KVL_ERR_FORMAT, "%s: no weight_map object", path);
            goto out;
        }
        const char *k;
        json_t *v;
        json_object_foreach(wm, k, v) {
            if (!json_is_string(v)) { st = kvl_errorf(KVL_ERR_FORMAT, "%s: weight_map[%.64s] is not a string", path, k); break; }
            if ((st = hf_open_shard(f, dir, json_string_value(v))) != KVL_OK) break;
        }
        json_decref(j);
        if (st != KVL_OK) goto out;
    } else {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (access(path, F_OK) != 0) { st = kvl_errorf(KVL_ERR_NOT_FOUND, "%s: neither model.safetensors nor model.safetensors.index.json", dir); goto out; }
        if ((st = hf_open_shard(f, dir, "model.safetensors")) != KVL_OK) goto out;
    }
    if ((st = kvl_weights_alloc(w, c)) != KVL_OK) goto out;
    int64_t D = c->dim, q = (int64_t)c->n_heads * c->head_dim, kv = (int64_t)c->n_kv_heads * c->head_dim, F = c->hidden_dim;
    char name[256];
#define T(nm, dst, r, cc) do { if ((st = hf_tensor(f, nm, dst, r, cc)) != KVL_OK) goto fail; } while (0)
    T("model.embed_tokens.weight", w->tok_emb, c->vocab_size, D);
    for (int l = 0; l < c->n_layers; l++) {
        kvl_layer_w *L = &w->layers[l];
#define LT(suffix, dst, r, cc) do { snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix); T(name, dst, r, cc); } while (0)
        LT("input_layernorm.weight", L->attn_norm, D, 0);
        LT("self_attn.q_proj.weight", L->wq, q, D);
        LT("self_attn.k_proj.weight", L->wk, kv, D);
        LT("self_attn.v_proj.weight", L->wv, kv, D);
        LT("self_attn.o_proj.weight", L->wo, D, q);
        LT("post_attention_layernorm.weight", L->ffn_norm, D, 0);
        LT("mlp.gate_proj.weight", L->w_gate, F, D);
        LT("mlp.up_proj.weight", L->w_up, F, D);
        LT("mlp.down_proj.weight", L->w_down, D, F);
#undef LT
    }
    T("model.norm.weight", w->final_norm, D, 0);
    if (!c->tied_embeddings) T("lm_head.weight", w->wcls, c->vocab_size, D);
#undef T
    goto out;
fail:
    kvl_weights_free(w);
out:
    hf_close(f);
    free(f);
    return st;
}

/* ------------------------------------------------------------ entry points */

kvl_status kvl_model_load(const char *path, const kvl_model_opts *opts, kvl_model **out) {
    if (!path || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_model_load: NULL argument");
    *out = NULL;
    kvl_clear_error();
    struct stat st;
    if (stat(path, &st) != 0) return kvl_errorf(KVL_ERR_NOT_FOUND, "model %s: %s", path, strerror(errno));
    kvl_model *m = model_new();
    if (!m) return KVL_ERR_NOMEM;
    kvl_status s = S_ISDIR(st.st_mode) ? kvl_load_hf(path, &m->cfg, &m->w) : kvl_load_llama2c(path, &m->cfg, &m->w);
    if (s == KVL_OK) s = kvl_model_finish(m, opts, 1, 0);
    if (s != KVL_OK) {
        kvl_model_free(m);
        return s;
    }
    *out = m;
    return KVL_OK;
}

kvl_status kvl_model_synthetic(const kvl_model_config *cfg, uint64_t seed, const kvl_model_opts *opts, kvl_model **out) {
    if (!cfg || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_model_synthetic: NULL argument");
    *out = NULL;
    KVL_TRY(kvl_config_validate(cfg));
    kvl_model *m = model_new();
    if (!m) return KVL_ERR_NOMEM;
    m->cfg = *cfg;
    kvl_model_opts o = opts ? *opts : kvl_model_opts_default();
    kvl_status s = KVL_OK;
    /* A GPU backend generates the weights on the device from the same formula; the CPU needs them
     * in host memory. */
    if (o.backend == KVL_BACKEND_CPU) {
        if ((s = kvl_weights_alloc(&m->w, cfg)) != KVL_OK) { kvl_model_free(m); return s; }
        const kvl_model_config *c = cfg;
        int64_t D = c->dim, q = (int64_t)c->n_heads * c->head_dim, kv = (int64_t)c->n_kv_heads * c->head_dim, F = c->hidden_dim;
#define FILL(ptr, tid, count, norm, scale) \
        for (int64_t i_ = 0; i_ < (int64_t)(count); i_++) (ptr)[i_] = kvl_synth_weight(seed, (uint32_t)(tid), (uint64_t)i_, norm, (float)(scale))
        FILL(m->w.tok_emb, 0, (int64_t)c->vocab_size * D, 0, 1.0);
        for (int l = 0; l < c->n_layers; l++) {
            kvl_layer_w *L = &m->w.layers[l];
            uint32_t b = 1 + KVL_SYN_PER_LAYER * (uint32_t)l;
            FILL(L->attn_norm, b + KVL_SYN_ATTN_NORM, D, 1, 1);
            FILL(L->wq, b + KVL_SYN_WQ, q * D, 0, 1 / sqrt((double)D));
            FILL(L->wk, b + KVL_SYN_WK, kv * D, 0, 1 / sqrt((double)D));
            FILL(L->wv, b + KVL_SYN_WV, kv * D, 0, 1 / sqrt((double)D));
            FILL(L->wo, b + KVL_SYN_WO, D * q, 0, 1 / sqrt((double)q));
            FILL(L->ffn_norm, b + KVL_SYN_FFN_NORM, D, 1, 1);
            FILL(L->w_gate, b + KVL_SYN_GATE, F * D, 0, 1 / sqrt((double)D));
            FILL(L->w_up, b + KVL_SYN_UP, F * D, 0, 1 / sqrt((double)D));
            FILL(L->w_down, b + KVL_SYN_DOWN, D * F, 0, 1 / sqrt((double)F));
        }
        FILL(m->w.final_norm, 1 + KVL_SYN_PER_LAYER * c->n_layers, D, 1, 1);
        if (!c->tied_embeddings) FILL(m->w.wcls, 2 + KVL_SYN_PER_LAYER * c->n_layers, (int64_t)c->vocab_size * D, 0, 1 / sqrt((double)D));
#undef FILL
    }
    if ((s = kvl_model_finish(m, &o, 0, seed)) != KVL_OK) {
        kvl_model_free(m);
        return s;
    }
    *out = m;
    return KVL_OK;
}
