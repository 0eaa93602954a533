/* kvl_half.h - float32 <-> bfloat16 / float16 conversions shared by every module (the engine's
 * kernels, the codec, the CUDA backend's host code). Round to nearest even; NaN stays a (quiet) NaN;
 * float16 overflow becomes infinity, underflow keeps subnormals. Pure functions, thread-safe. */
#ifndef KVL_HALF_H
#define KVL_HALF_H

#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

static inline float kvl_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t kvl_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float kvl_f16_to_f32(uint16_t h);
uint16_t kvl_f32_to_f16(float f);

#ifdef __cplusplus
}
#endif
#endif
