/* Malformed models, bad forward arguments, fingerprints, bf16 weights: clear statuses, no crashes.
 * usage: test_bad_input SHARED_DIR */
#include <jansson.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvl_cpu.h"
#include "kvl_engine.h"
#include "kvl_safetensors.h"
#include "kvl_test.h"
#include "kvl_tokenizer.h"

static char tmp[256];
static const char *shared;

static void write_file(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    KVL_ASSERT(f);
    if (n) KVL_ASSERT(fwrite(p, n, 1, f) == 1);
    fclose(f);
}

static void copy_file(const char *src, const char *dst, size_t cut, const char *append) {
    size_t n;
    uint8_t *b = kvl_test_read(src, &n);
    KVL_ASSERT(b);
    FILE *f = fopen(dst, "wb");
    KVL_ASSERT(f);
    fwrite(b, n - cut, 1, f);
    if (append) fwrite(append, strlen(append), 1, f);
    fclose(f);
    free(b);
}

/* Writes a safetensors file from the stories260K one: dtype "F32" or "BF16"; rename: tensor whose
 * name gets an "x" appended (NULL: none). */
static void write_st(const char *dst, const char *dtype, const char *rename) {
    char src[512];
    snprintf(src, sizeof src, "%s/models/stories260K/hf/model.safetensors", shared);
    size_t n;
    uint8_t *b = kvl_test_read(src, &n);
    kvl_st_file st;
    KVL_ASSERT(kvl_st_parse(b, n, n, &st) == KVL_OK);
    int bf = strcmp(dtype, "BF16") == 0;
    json_t *h = json_object();
    uint64_t off = 0;
    for (int i = 0; i < st.n; i++) {
        uint64_t numel = (st.t[i].end - st.t[i].begin) / 4, sz = numel * (bf ? 2 : 4);
        json_t *o = json_object(), *shape = json_array();
        for (int d = 0; d < st.t[i].ndim; d++) json_array_append_new(shape, json_integer(st.t[i].shape[d]));
        json_object_set_new(o, "dtype", json_string(dtype));
        json_object_set_new(o, "shape", shape);
        json_object_set_new(o, "data_offsets", json_pack("[II]", (json_int_t)off, (json_int_t)(off + sz)));
        char name[300];
        snprintf(name, sizeof name, "%s%s", st.t[i].name, rename && !strcmp(rename, st.t[i].name) ? "x" : "");
        json_object_set_new(h, name, o);
        off += sz;
    }
    char *hs = json_dumps(h, JSON_COMPACT);
    size_t hl = strlen(hs), pad = (8 - hl % 8) % 8;
    uint8_t *out = malloc(8 + hl + pad + off);
    uint64_t L = hl + pad;
    for (int i = 0; i < 8; i++) out[i] = (uint8_t)(L >> (8 * i));
    memcpy(out + 8, hs, hl);
    memset(out + 8 + hl, ' ', pad);
    uint8_t *d = out + 8 + L;
    for (int i = 0; i < st.n; i++) {
        const float *f = (const float *)(b + st.data_offset + st.t[i].begin);
        uint64_t numel = (st.t[i].end - st.t[i].begin) / 4;
        for (uint64_t k = 0; k < numel; k++) {
            if (bf) {
                uint16_t v = kvl_f32_to_bf16(f[k]);
                memcpy(d, &v, 2);
                d += 2;
            } else {
                memcpy(d, &f[k], 4);
                d += 4;
            }
        }
    }
    write_file(dst, out, 8 + L + off);
    free(out);
    free(hs);
    json_decref(h);
    kvl_st_free(&st);
    free(b);
}

static void write_config(const char *dir, const char *edit_key, json_t *edit_val) {
    char src[512], dst[512];
    snprintf(src, sizeof src, "%s/models/stories260K/hf/config.json", shared);
    snprintf(dst, sizeof dst, "%s/config.json", dir);
    json_t *j = json_load_file(src, 0, NULL);
    KVL_ASSERT(j);
    if (edit_key) json_object_set_new(j, edit_key, edit_val);
    json_dump_file(j, dst, 0);
    json_decref(j);
}

static kvl_status load(const char *p) {
    kvl_model *m = NULL;
    kvl_status s = kvl_model_load(p, NULL, &m);
    if (s != KVL_OK) printf("  %-44s -> %s: %s\n", p + strlen(tmp), kvl_status_str(s), kvl_last_error());
    kvl_model_free(m);
    return s;
}

static void test_hf(void) {
    char dir[512], p[600];
    snprintf(dir, sizeof dir, "%s/hf", tmp);
    mkdir(dir, 0755);
    CHECK_ST(load(dir), KVL_ERR_NOT_FOUND); /* no config.json */
    write_config(dir, NULL, NULL);
    CHECK_ST(load(dir), KVL_ERR_NOT_FOUND); /* no weights */
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    write_st(p, "F32", NULL);
    CHECK_OK(load(dir));
    write_config(dir, "num_key_value_heads", json_integer(3));
    CHECK_ST(load(dir), KVL_ERR_MODEL_CONFIG);
    write_config(dir, "hidden_size", json_string("64"));
    CHECK_ST(load(dir), KVL_ERR_MODEL_CONFIG);
    write_config(dir, "num_hidden_layers", json_integer(-1));
    CHECK_ST(load(dir), KVL_ERR_MODEL_CONFIG);
    write_config(dir, "intermediate_size", json_integer(100)); /* tensors no longer match */
    CHECK_ST(load(dir), KVL_ERR_MODEL_WEIGHTS);
    write_config(dir, "model_type", json_string("gpt2"));
    CHECK_ST(load(dir), KVL_ERR_MODEL_CONFIG);
    write_config(dir, "rope_scaling", json_pack("{s:s}", "rope_type", "llama3"));
    CHECK_ST(load(dir), KVL_ERR_MODEL_CONFIG);
    snprintf(p, sizeof p, "%s/config.json", dir);
    write_file(p, "{\"hidden_size\": 64,", 19);
    CHECK_ST(load(dir), KVL_ERR_JSON);
    write_config(dir, NULL, NULL);
    /* top-level rope_theta is accepted as well as rope_parameters */
    write_config(dir, "rope_theta", json_real(10000.0));
    CHECK_OK(load(dir));
    write_config(dir, NULL, NULL);

    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    write_st(p, "F32", "model.layers.2.mlp.up_proj.weight");
    CHECK_ST(load(dir), KVL_ERR_MODEL_WEIGHTS);
    char src[600];
    snprintf(src, sizeof src, "%s/models/stories260K/hf/model.safetensors", shared);
    copy_file(src, p, 1000, NULL);
    CHECK_ST(load(dir), KVL_ERR_TRUNCATED);
    copy_file(src, p, 0, NULL);
    FILE *f = fopen(p, "r+b");
    uint64_t huge = 1ull << 40;
    fwrite(&huge, 8, 1, f);
    fclose(f);
    CHECK_ST(load(dir), KVL_ERR_FORMAT);
    write_file(p, "abc", 3);
    CHECK_ST(load(dir), KVL_ERR_TRUNCATED);

    /* bf16 weights: load, run, compare with the f32 model */
    write_st(p, "BF16", NULL);
    kvl_model *mb = NULL, *mf = NULL;
    snprintf(src, sizeof src, "%s/models/stories260K/hf", shared);
    CHECK_OK(kvl_model_load(dir, NULL, &mb));
    CHECK_OK(kvl_model_load(src, NULL, &mf));
    if (mb && mf) {
        CHECK(memcmp(kvl_model_fingerprint(mb), kvl_model_fingerprint(mf), 32) != 0);
        int32_t tok[16], pos[16];
        for (int i = 0; i < 16; i++) { tok[i] = (i * 37 + 1) % 512; pos[i] = i; }
        float *a = malloc(16 * 512 * 4), *b = malloc(16 * 512 * 4);
        kvl_kv *k1 = NULL, *k2 = NULL;
        CHECK_OK(kvl_kv_create(mb, 16, &k1));
        CHECK_OK(kvl_kv_create(mf, 16, &k2));
        CHECK_OK(kvl_forward(mb, k1, 16, tok, pos, NULL, 16, pos, a));
        CHECK_OK(kvl_forward(mf, k2, 16, tok, pos, NULL, 16, pos, b));
        double e = kvl_rel_err(a, b, 16 * 512);
        printf("  bf16 weights vs f32: rel err %.3e\n", e);
        CHECK(e > 0 && e < 5e-2);
        kvl_kv_free(k1);
        kvl_kv_free(k2);
        free(a);
        free(b);
    }
    kvl_model_free(mb);
    kvl_model_free(mf);
}

static void test_llama2c(void) {
    char src[512], p[512];
    snprintf(src, sizeof src, "%s/models/stories260K/stories260K.bin", shared);
    snprintf(p, sizeof p, "%s/m.bin", tmp);
    copy_file(src, p, 4096, NULL);
    CHECK_ST(load(p), KVL_ERR_TRUNCATED);
    copy_file(src, p, 0, "trailing");
    CHECK_ST(load(p), KVL_ERR_FORMAT);
    write_file(p, "\x40\0\0\0", 4);
    CHECK_ST(load(p), KVL_ERR_TRUNCATED);
    int32_t hdr[7] = {64, 172, 5, 0, 4, 512, 512};
    write_file(p, hdr, sizeof hdr);
    CHECK_ST(load(p), KVL_ERR_MODEL_CONFIG);
    int32_t hdr2[7] = {64, 172, 5, 8, 3, 512, 512};
    write_file(p, hdr2, sizeof hdr2);
    CHECK_ST(load(p), KVL_ERR_MODEL_CONFIG);
    int32_t hdr3[7] = {64, 172, 5, 8, 4, -512, 512}; /* untied classifier: needs more bytes */
    write_file(p, hdr3, sizeof hdr3);
    CHECK_ST(load(p), KVL_ERR_TRUNCATED);
    /* untied classifier (negative vocab): the same model with a copied classifier gives the same
     * logits as the tied original */
    {
        size_t n;
        uint8_t *b = kvl_test_read(src, &n);
        int32_t h[7];
        memcpy(h, b, 28);
        size_t emb = (size_t)h[5] * (size_t)h[0] * 4;
        uint8_t *u = malloc(n + emb);
        memcpy(u, b, n);
        memcpy(u + n, b + 28, emb);
        int32_t neg = -h[5];
        memcpy(u + 20, &neg, 4);
        write_file(p, u, n + emb);
        kvl_model *mt = NULL, *mu = NULL;
        CHECK_OK(kvl_model_load(src, NULL, &mt));
        CHECK_OK(kvl_model_load(p, NULL, &mu));
        if (mt && mu) {
            CHECK(kvl_model_get_config(mu)->tied_embeddings == 0);
            int32_t tok[6] = {1, 403, 407, 261, 378, 432}, pos[6] = {0, 1, 2, 3, 4, 5};
            float la[6 * 512], lb[6 * 512];
            kvl_kv *k1 = NULL, *k2 = NULL;
            CHECK_OK(kvl_kv_create(mt, 6, &k1));
            CHECK_OK(kvl_kv_create(mu, 6, &k2));
            CHECK_OK(kvl_forward(mt, k1, 6, tok, pos, NULL, 6, pos, la));
            CHECK_OK(kvl_forward(mu, k2, 6, tok, pos, NULL, 6, pos, lb));
            CHECK(memcmp(la, lb, sizeof la) == 0);
            kvl_kv_free(k1);
            kvl_kv_free(k2);
        }
        kvl_model_free(mt);
        kvl_model_free(mu);
        free(u);
        free(b);
    }
    snprintf(p, sizeof p, "%s/does-not-exist.bin", tmp);
    CHECK_ST(load(p), KVL_ERR_NOT_FOUND);
}

static void test_forward(void) {
    char src[512];
    snprintf(src, sizeof src, "%s/models/stories260K/stories260K.bin", shared);
    kvl_model *m = NULL, *m2 = NULL;
    CHECK_OK(kvl_model_load(src, NULL, &m));
    CHECK_OK(kvl_model_load(src, NULL, &m2));
    if (!m || !m2) return;
    CHECK(memcmp(kvl_model_fingerprint(m), kvl_model_fingerprint(m2), 32) == 0);
    kvl_model *mh = NULL;
    snprintf(src, sizeof src, "%s/models/stories260K/hf", shared);
    CHECK_OK(kvl_model_load(src, NULL, &mh));
    /* the same weights in the other RoPE layout are a different cache domain */
    if (mh) CHECK(memcmp(kvl_model_fingerprint(m), kvl_model_fingerprint(mh), 32) != 0);
    kvl_model_free(mh);
    kvl_kv *kv = NULL, *kvo = NULL;
    CHECK_OK(kvl_kv_create(m, 8, &kv));
    CHECK_OK(kvl_kv_create(m2, 8, &kvo));
    int32_t tok[8] = {1, 403, 407, 261, 378, 432, 383, 286}, pos[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    float lg[512];
    int32_t last = 7;
    CHECK_ST(kvl_forward(m, kvo, 8, tok, pos, NULL, 1, &last, lg), KVL_ERR_SHAPE);
    tok[3] = 512;
    CHECK_ST(kvl_forward(m, kv, 8, tok, pos, NULL, 1, &last, lg), KVL_ERR_TOKEN_RANGE);
    tok[3] = -1;
    CHECK_ST(kvl_forward(m, kv, 8, tok, pos, NULL, 1, &last, lg), KVL_ERR_TOKEN_RANGE);
    tok[3] = 261;
    pos[7] = 512;
    CHECK_ST(kvl_forward(m, kv, 8, tok, pos, NULL, 1, &last, lg), KVL_ERR_POSITION_RANGE);
    pos[7] = -3;
    CHECK_ST(kvl_forward(m, kv, 8, tok, pos, NULL, 1, &last, lg), KVL_ERR_POSITION_RANGE);
    pos[7] = 7;
    uint8_t comp[8] = {0, 1, 1, 1, 1, 1, 1, 1}; /* slot 0 neither computed nor cached */
    CHECK_ST(kvl_forward(m, kv, 8, tok, pos, comp, 1, &last, lg), KVL_ERR_KV_MISSING);
    int32_t z = 0;
    comp[0] = 1;
    comp[7] = 0;
    CHECK_ST(kvl_forward(m, kv, 7, tok, pos, NULL, 0, NULL, NULL), KVL_OK);
    CHECK_ST(kvl_forward(m, kv, 8, tok, pos, comp, 1, &last, lg), KVL_ERR_BLEND_PLAN); /* logits of a cached slot */
    CHECK_ST(kvl_forward(m, kv, 9, tok, pos, NULL, 1, &z, lg), KVL_ERR_CONTEXT_FULL);
    kvl_kv *kvz = NULL;
    CHECK_ST(kvl_kv_create(m, 0, &kvz), KVL_ERR_RANGE);
    CHECK(kvz == NULL);
    kvl_fwd *f = NULL;
    CHECK_OK(kvl_fwd_begin(m, kv, 8, tok, pos, &f));
    CHECK_ST(kvl_fwd_qkv(f, 1, pos, 8, NULL, NULL), KVL_ERR_BLEND_PLAN); /* layer 0 first */
    CHECK_OK(kvl_fwd_qkv(f, 0, pos, 4, NULL, NULL));
    CHECK_ST(kvl_fwd_commit(f, pos + 4, 1), KVL_ERR_BLEND_PLAN); /* slot 4 was not computed */
    CHECK_OK(kvl_fwd_commit(f, pos, 4));
    CHECK_OK(kvl_fwd_attn_ffn(f, pos, 2));
    CHECK_ST(kvl_fwd_qkv(f, 1, pos, 3, NULL, NULL), KVL_ERR_BLEND_PLAN); /* slot 2 stopped at layer 0 */
    kvl_fwd_free(f);
    CHECK_ST(kvl_kv_rerotate(kv, 4, 8, 3), KVL_ERR_RANGE);
    kvl_kv_free(kv);
    kvl_kv_free(kvo);
    kvl_model_free(m);
    kvl_model_free(m2);

    /* synthetic weights: same seed, same fingerprint; another seed, another one */
    kvl_model_config c = {64, 128, 2, 4, 2, 16, 300, 64, 10000.0f, 1e-5f, 1, 0, 1, 2};
    kvl_model *s1 = NULL, *s2 = NULL, *s3 = NULL;
    CHECK_OK(kvl_model_synthetic(&c, 7, NULL, &s1));
    CHECK_OK(kvl_model_synthetic(&c, 7, NULL, &s2));
    CHECK_OK(kvl_model_synthetic(&c, 8, NULL, &s3));
    if (s1 && s2 && s3) {
        CHECK(memcmp(kvl_model_fingerprint(s1), kvl_model_fingerprint(s2), 32) == 0);
        CHECK(memcmp(kvl_model_fingerprint(s1), kvl_model_fingerprint(s3), 32) != 0);
    }
    kvl_model_free(s1);
    kvl_model_free(s2);
    kvl_model_free(s3);
    c.n_kv_heads = 3;
    CHECK_ST(kvl_model_synthetic(&c, 7, NULL, &s1), KVL_ERR_MODEL_CONFIG);
    c.n_kv_heads = 2;
    c.head_dim = 7;
    CHECK_ST(kvl_model_synthetic(&c, 7, NULL, &s1), KVL_ERR_MODEL_CONFIG);
}

static void test_tokenizer_files(void) {
    char src[512], p[512];
    kvl_tokenizer *t = NULL;
    snprintf(p, sizeof p, "%s/nope.bin", tmp);
    CHECK_ST(kvl_tokenizer_load(p, 512, &t), KVL_ERR_NOT_FOUND);
    snprintf(src, sizeof src, "%s/models/stories260K/tok512.bin", shared);
    snprintf(p, sizeof p, "%s/tok.bin", tmp);
    copy_file(src, p, 100, NULL);
    CHECK_ST(kvl_tokenizer_load(p, 512, &t), KVL_ERR_TRUNCATED);
    CHECK_ST(kvl_tokenizer_load(src, 100000, &t), KVL_ERR_TRUNCATED); /* wrong vocab size */
    int32_t bad[2] = {-5, 0};
    write_file(p, bad, 8);
    CHECK_ST(kvl_tokenizer_load(p, 512, &t), KVL_ERR_TOKENIZER);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    shared = argv[1];
    snprintf(tmp, sizeof tmp, "/tmp/kvl-bad-XXXXXX");
    KVL_ASSERT(mkdtemp(tmp));
    test_hf();
    test_llama2c();
    test_forward();
    test_tokenizer_files();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
    KVL_TEST_END();
}
