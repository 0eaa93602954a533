/* codec_synth.h - deterministic synthetic KV for the codec tests and fuzz harnesses: per-channel
 * means and spreads (a few outlier channels, as real keys have) plus uniform-sum noise. */
#ifndef KVL_CODEC_SYNTH_H
#define KVL_CODEC_SYNTH_H

#include <stdint.h>
#include <stdlib.h>

#include "kvl_codec.h"

static inline uint64_t kvl_synth_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}
static inline float kvl_synth_unit(uint64_t *s) { /* roughly N(0, 1): sum of 4 uniforms */
    float a = 0;
    for (int i = 0; i < 4; i++) a += (float)(kvl_synth_next(s) >> 40) / (float)(1ull << 24) - 0.5f;
    return a * 1.732f;
}

/* malloc'ed [L][2][T][H][D] float32 KV for shape, from seed */
static inline float *kvl_synth_kv(const kvl_codec_shape *sh, uint64_t seed) {
    int32_t C = sh->n_kv_heads * sh->head_dim;
    size_t n = (size_t)sh->n_layers * 2 * sh->n_tokens * C;
    float *x = malloc(n * sizeof *x);
    if (!x) return NULL;
    uint64_t s = seed * 2654435761u + 88172645463325252ull;
    for (int32_t l = 0; l < sh->n_layers; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int32_t c = 0; c < C; c++) {
                float mean = kv == 0 ? kvl_synth_unit(&s) * 2 : 0, sd = 0.3f + (float)(kvl_synth_next(&s) % 100) / 100;
                if (kvl_synth_next(&s) % 16 == 0) sd *= 8; /* outlier channel */
                for (int32_t t = 0; t < sh->n_tokens; t++)
                    x[(((size_t)l * 2 + kv) * sh->n_tokens + t) * C + c] = mean + sd * kvl_synth_unit(&s);
            }
    return x;
}

/* the fixed profile the decode fuzzer and its corpus generator share: 2 layers, 2 heads of 8,
 * keys rotated (interleaved RoPE pairs, base 10000) so that the fuzzer reaches the rotation too */
static inline kvl_status kvl_synth_profile(kvl_codec_profile **out) {
    static const uint8_t fp[32] = {1, 2, 3};
    kvl_codec_shape sh = {2, 64, 2, 8};
    kvl_codec_profile_builder *b = NULL;
    kvl_status st = kvl_codec_profile_builder_create(&sh, fp, &b);
    if (st == KVL_OK) st = kvl_codec_profile_builder_set_key_rotation(b, KVL_CODEC_KEYROT_INTERLEAVED, 10000.0f);
    for (uint64_t k = 0; st == KVL_OK && k < 4; k++) {
        float *x = kvl_synth_kv(&sh, 100 + k);
        st = x ? kvl_codec_profile_builder_add(b, x, sh.n_tokens) : KVL_ERR_NOMEM;
        free(x);
    }
    if (st == KVL_OK) st = kvl_codec_profile_builder_finish(b, out);
    kvl_codec_profile_builder_free(b);
    return st;
}

#endif
