/* kvl_codec_gpu.h - decoding KVLC chunks on a CUDA GPU (built with KVL_CUDA only).
 *
 * Each call validates every chunk on the host with the CPU decoder's own code (kvl_codec_plan_add:
 * header, directory, checksums, tables, scales, stream sizes, profile), copies the encoded bytes
 * and the plan to the device, and decodes all sub-streams of all chunks in one kernel launch
 * (kernels/cuda/codec_decode.cu) straight into caller-placed device memory: the codec layout, or
 * the engine's KV layout [layer][k|v][slot][C] at a slot offset. The output is bit-identical to
 * kvl_codec_decode. Faults found inside a stream are re-diagnosed by kvl_codec_decode on the CPU,
 * so a malformed chunk returns the same status as the CPU decoder.
 * Lossless chunks (level 0: zstd over raw bits) are decompressed on the CPU and copied.
 *
 * Thread-safety: a kvl_codec_gpu is used by one thread at a time.
 */
#ifndef KVL_CODEC_GPU_H
#define KVL_CODEC_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_codec.h"
#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvl_codec_gpu kvl_codec_gpu; /* opaque: device/pinned buffers, profile cache */

/* Creates a decoder working on the CUDA stream cuda_stream (a cudaStream_t; NULL: one of its
 * own, non-blocking: work the caller queued on the legacy default stream, e.g. a cudaMemset of
 * the output, is not ordered before the decoder's writes; synchronise first). Errors: KVL_ERR_NO_GPU, KVL_ERR_CUDA, KVL_ERR_NOMEM. */
kvl_status kvl_codec_gpu_create(void *cuda_stream, kvl_codec_gpu **out);
void kvl_codec_gpu_free(kvl_codec_gpu *g);

/* One chunk to decode: layers [layer0, layer0 + n_layers) (n_layers <= 0: all from layer0) of the
 * host bytes buf[0..size) (borrowed during the call) to the device address d_out, element (l_rel,
 * kv, t, c) at d_out + l_rel * layer_stride + kv * kv_stride + t * token_stride + c (elements). */
typedef struct kvl_codec_gpu_chunk {
    const uint8_t *buf;
    size_t size;
    int32_t layer0, n_layers;
    void *d_out;
    int64_t layer_stride, kv_stride, token_stride;
} kvl_codec_gpu_chunk;

/* Decodes n chunks (all lossy ones in one launch) as out_dtype (F32 or BF16); profile: the one
 * profile the chunks that need one were encoded with (may be NULL otherwise). Returns when the
 * output is complete. Errors: those of kvl_codec_decode for malformed chunks, KVL_ERR_INVALID_ARG,
 * KVL_ERR_CUDA / KVL_ERR_GPU_OOM. */
kvl_status kvl_codec_gpu_decode(kvl_codec_gpu *g, const kvl_codec_gpu_chunk *chunks, int32_t n,
                                const kvl_codec_profile *profile, kvl_codec_dtype out_dtype);

/* Two-phase decoding, for pipelines that run the decode kernel on another stream (the forward
 * pass's, right before the layers that need it, so that decoding and the forward pass do not
 * compete for the GPU). kvl_codec_gpu_stage does the host half of kvl_codec_gpu_decode (validation,
 * planning, staging) and queues the copies of bytes and plan to device memory owned by the batch
 * on the decoder's stream; it returns once the host work is done. kvl_codec_gpu_launch makes
 * `stream` (a cudaStream_t) wait for those copies and queues the kernel on it.
 * kvl_codec_gpu_batch_finish waits for the kernel, turns a fault found inside a stream into the CPU
 * decoder's status for it (as kvl_codec_gpu_decode does) and frees the batch; the chunks' host
 * bytes must stay valid until then. Lossless chunks are refused (KVL_ERR_CODEC_LEVEL: use
 * kvl_codec_gpu_decode). Errors: those of kvl_codec_gpu_decode. A batch is used by one thread at a
 * time; a decoder may have several batches staged (each stage call waits for the previous copies). */
typedef struct kvl_codec_gpu_batch kvl_codec_gpu_batch;
kvl_status kvl_codec_gpu_stage(kvl_codec_gpu *g, const kvl_codec_gpu_chunk *chunks, int32_t n,
                               const kvl_codec_profile *profile, kvl_codec_dtype out_dtype, kvl_codec_gpu_batch **out);
kvl_status kvl_codec_gpu_launch(kvl_codec_gpu_batch *b, void *stream);
kvl_status kvl_codec_gpu_batch_finish(kvl_codec_gpu_batch *b); /* accepts NULL */
/* Frees a batch without checking it (error paths); waits for nothing. Accepts NULL. */
void kvl_codec_gpu_batch_free(kvl_codec_gpu_batch *b);

/* Timings of the last successful kvl_codec_gpu_decode, milliseconds. */
typedef struct kvl_codec_gpu_stats {
    double plan_ms;     /* host validation + plan (includes staging into pinned memory) */
    double h2d_ms;      /* bytes + plan copied to the device (events) */
    double kernel_ms;   /* the decode kernel (events) */
    double lossless_ms; /* CPU decompression + copies of lossless chunks */
    double total_ms;    /* wall time of the call */
    uint64_t in_bytes, out_elems, n_streams;
} kvl_codec_gpu_stats;
void kvl_codec_gpu_last_stats(const kvl_codec_gpu *g, kvl_codec_gpu_stats *s);

#ifdef __cplusplus
}
#endif
#endif
