#include <math.h>
#include <stdlib.h>

#include "engine_impl.h"

int32_t kvl_sample(const float *logits, int32_t vocab, float temperature, uint64_t *rng) {
    int32_t best = 0;
    for (int32_t i = 1; i < vocab; i++)
        if (logits[i] > logits[best]) best = i;
    if (temperature <= 0 || !rng) return best;
    /* xorshift64*: reproducible for a seed on every platform */
    uint64_t x = *rng ? *rng : 0x9E3779B97F4A7C15ull;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *rng = x;
    double u = (double)((x * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
    double mx = logits[best], sum = 0;
    for (int32_t i = 0; i < vocab; i++) sum += exp(((double)logits[i] - mx) / temperature);
    double acc = 0, target = u * sum;
    for (int32_t i = 0; i < vocab; i++) {
        acc += exp(((double)logits[i] - mx) / temperature);
        if (acc > target) return i;
    }
    return best;
}

kvl_status kvl_generate(kvl_model *m, const int32_t *prompt, int32_t n_prompt, int32_t max_new, float temperature,
                        uint64_t seed, kvl_token_cb cb, void *user, int32_t *out, int32_t *n_out) {
    if (!m || !prompt || n_prompt <= 0 || max_new < 0) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_generate: need a prompt and max_new >= 0");
    if (n_out) *n_out = 0;
    const kvl_model_config *c = &m->cfg;
    if (n_prompt > c->max_seq) return kvl_errorf(KVL_ERR_POSITION_RANGE, "prompt of %d tokens exceeds the context of %d", n_prompt, c->max_seq);
    int32_t total = n_prompt + max_new;
    if (total > c->max_seq) total = c->max_seq;
    int32_t *toks = malloc((size_t)total * sizeof *toks), *pos = malloc((size_t)total * sizeof *pos);
    uint8_t *comp = calloc((size_t)total, 1);
    float *logits = malloc((size_t)c->vocab_size * sizeof *logits);
    kvl_kv *kv = NULL;
    kvl_status s = (!toks || !pos || !comp || !logits) ? KVL_ERR_NOMEM : kvl_kv_create(m, total, &kv);
    uint64_t rng = seed ^ 0x5DEECE66Dull;
    int32_t n = n_prompt, produced = 0;
    if (s == KVL_OK) {
        for (int32_t i = 0; i < total; i++) pos[i] = i;
        for (int32_t i = 0; i < n_prompt; i++) { toks[i] = prompt[i]; comp[i] = 1; }
        int32_t last = n_prompt - 1;
        s = kvl_forward(m, kv, n, toks, pos, comp, 1, &last, logits);
        while (s == KVL_OK && produced < max_new) {
            int32_t next = kvl_sample(logits, c->vocab_size, temperature, &rng);
            if (next == c->eos_id || next == c->bos_id) break;
            if (out) out[produced] = next;
            produced++;
            if (cb && cb(next, user)) break;
            if (n >= total) break; /* no room to feed it back */
            /* decode step: only the new token is computed, everything before comes from kv */
            comp[last] = 0;
            if (last == n_prompt - 1)
                for (int32_t i = 0; i < n_prompt; i++) comp[i] = 0;
            toks[n] = next;
            comp[n] = 1;
            last = n;
            n++;
            s = kvl_forward(m, kv, n, toks, pos, comp, 1, &last, logits);
        }
    }
    if (n_out) *n_out = produced;
    kvl_kv_free(kv);
    free(toks); free(pos); free(comp); free(logits);
    return s;
}
