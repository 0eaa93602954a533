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
 * NULL where no table refers to it). */
typedef struct kvl_cu_codec_args {
    const uint8_t *bytes;                   /* the chunks, concatenated as the plan says */
    const kvl_codec_plan_stream *streams;
    const kvl_codec_plan_section *sections;
    const kvl_codec_plan_table *tables;
    const uint32_t *cum;
    const uint16_t *lut;
    const uint32_t *pcum[5];
    const uint16_t *plut[5];
    const float *scales;
    int16_t *anchor;                        /* plan n_anchor int16 of scratch */
    uint32_t n_streams;
    uint32_t *err;                          /* [2]; set to {0xffffffff, 0} before the launch */
} kvl_cu_codec_args;

/* Decodes every stream of the plan into the sections' output addresses as out_t. Errors found in
 * the streams (see KVL_CU_DEC_*) are reported through a->err: err[0] is the smallest failing stream
 * index (0xffffffff if none), err[1] the reason of some failing stream; the outputs of failing
 * streams are then partial. Returns the launch status. */
cudaError_t kvl_cu_codec_decode(const kvl_cu_codec_args *a, kvl_cu_dtype out_t, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
