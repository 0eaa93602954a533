/* kvl_cuda_codec.h - the CacheGen (KVLC) decoder kernel: every rANS sub-stream of a validated
 * decode plan (api/kvl_codec_plan.h) decoded by its own GPU thread, straight to its output
 * placement. Bit-exact with the CPU decoder (codec/codec.c): integer-only symbol decoding, then
 * one float multiply (__fmul_rn) per element; bf16 output rounds to nearest even like the CPU.
 *
 * Thread-safety: no state; the caller orders work through the stream.
 */
#ifndef KVL_CUDA_CODEC_H
#define KVL_CUDA_CODEC_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kvl_codec_plan.h"
#include "kvl_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Reasons stored in err[1] (err[0] holds the lowest failing stream index). */
enum { KVL_CU_DEC_OK = 0, KVL_CU_DEC_EMPTY_CTX = 1, KVL_CU_DEC_SHORT = 2, KVL_CU_DEC_DELTA = 3, KVL_CU_DEC_STATE = 4 };

/* Device copies of a plan's arrays and of the referenced profile stores (index = level 1..4;
 * NULL where no table refers to it). Profile tables travel in a compact device form (see
 * kvl_cu_codec_compact_profile): every symbol of a profile table has a frequency >= 1 and pb is 16,
 * so cum fits in u16 with 2^16 stored as 0, and the lookup keeps 64 buckets instead of 256 (any
 * bucket start is an exact starting point of the search). A whole profile level then stays in L2. */
typedef struct kvl_cu_codec_args {
    const uint8_t *bytes;                   /* the chunks, concatenated as the plan says */
    const kvl_codec_plan_stream *streams;
    const kvl_codec_plan_section *sections;
    const kvl_codec_plan_table *tables;
    const uint32_t *cum;
    const uint16_t *lut;
    const uint16_t *pcum[5];                /* compact profile cum, same indices as the profile's */
    const uint16_t *plut[5];                /* 64 entries per table: table k at k * 64 */
    const float *scales;
    int16_t *anchor;                        /* plan n_anchor int16 of scratch */
    float *rot;                             /* plan n_rot float32 of scratch (rotated key sections) */
    const float *rope;                      /* the plan's cos/sin tables */
    uint32_t n_streams;
    uint32_t n_sections;
    uint32_t *err;                          /* [2]; set to {0xffffffff, 0} before the launch */
} kvl_cu_codec_args;

#define KVL_CU_PLUT_BITS 6

/* Compact device form of a profile level's stores (host side, no CUDA calls): cum16[i] = cum[i]
 * mod 2^16 for n_cum entries, lut64[k * 64 + j] = lut[k * 256 + j * 4] for n_lut / 256 tables. */
void kvl_cu_codec_compact_profile(const uint32_t *cum, size_t n_cum, const uint16_t *lut, size_t n_lut, uint16_t *cum16,
                                  uint16_t *lut64);

/* Decodes every stream of the plan into the sections' output addresses as out_t (sections with a key
 * rotation go through a->rot and a second kernel that rotates them forward, as the CPU does). Errors found in
 * the streams (see KVL_CU_DEC_*) are reported through a->err: err[0] is the smallest failing stream
 * index (0xffffffff if none), err[1] the reason of some failing stream; the outputs of failing
 * streams are then partial. Returns the launch status. */
cudaError_t kvl_cu_codec_decode(const kvl_cu_codec_args *a, kvl_cu_dtype out_t, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
