/* kvl_synth.h - seeded synthetic weights, defined element by element (counter-based) so that every
 * backend (CPU now, CUDA on the device) generates exactly the same values without host transfers.
 * Usable from C and CUDA. */
#ifndef KVL_SYNTH_H
#define KVL_SYNTH_H

#include <stdint.h>

#ifdef __CUDACC__
#define KVL_HD __host__ __device__
#else
#define KVL_HD
#endif

/* Tensor ids: 0 = token embedding; layer l: 1 + 9*l + {0 attn_norm, 1 wq, 2 wk, 3 wv, 4 wo,
 * 5 ffn_norm, 6 gate, 7 up, 8 down}; 1 + 9*L = final norm; 2 + 9*L = classifier (untied). */
enum { KVL_SYN_ATTN_NORM = 0, KVL_SYN_WQ, KVL_SYN_WK, KVL_SYN_WV, KVL_SYN_WO, KVL_SYN_FFN_NORM,
       KVL_SYN_GATE, KVL_SYN_UP, KVL_SYN_DOWN, KVL_SYN_PER_LAYER };

static inline KVL_HD uint64_t kvl_splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Uniform in [-1, 1) for (seed, tensor, element). */
static inline KVL_HD float kvl_synth_u(uint64_t seed, uint32_t tensor, uint64_t i) {
    uint64_t h = kvl_splitmix64(seed ^ kvl_splitmix64(((uint64_t)tensor << 48) ^ i));
    return (float)((double)(h >> 40) * (1.0 / 8388608.0) - 1.0);
}

/* Value of a weight: norms are 1 + 0.05u, matrices u * scale (scale = 1/sqrt(fan_in); 1 for the
 * embedding). */
static inline KVL_HD float kvl_synth_weight(uint64_t seed, uint32_t tensor, uint64_t i, int is_norm,
                                            float scale) {
    float u = kvl_synth_u(seed, tensor, i);
#ifdef __CUDA_ARCH__
    /* no fused multiply-add: the host computes the product and the sum with separate roundings */
    return is_norm ? __fadd_rn(1.0f, __fmul_rn(0.05f, u)) : __fmul_rn(u, scale);
#else
    return is_norm ? 1.0f + 0.05f * u : u * scale;
#endif
}

#endif
