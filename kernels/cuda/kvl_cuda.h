/* kvl_cuda.h - the CUDA kernels of the engine, behind plain C launch functions.
 *
 * Every function enqueues work on `stream` and returns the launch status (cudaGetLastError); none
 * synchronises. Pointers are device pointers unless named h_*. Element types are given by
 * kvl_cu_dtype (float32 or bfloat16); all arithmetic is float32 (float64 where the CPU reference
 * uses it: RMS sums, RoPE angles, deviations). Each kernel has a CPU reference in kernels/cpu
 * (kvl_cpu.h) and a test in tests/cuda/test_cuda_kernels.c.
 * Thread-safety: the functions themselves keep no state; the caller orders work through streams.
 */
#ifndef KVL_CUDA_H
#define KVL_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kvl_cu_dtype { KVL_CU_F32 = 0, KVL_CU_BF16 = 1 } kvl_cu_dtype;

static inline size_t kvl_cu_dtype_size(kvl_cu_dtype t) { return t == KVL_CU_BF16 ? 2 : 4; }

/* dst[i] = kvl_synth_weight(seed, tensor, i, is_norm, scale) for i < count, stored as dt. */
cudaError_t kvl_cu_synth_fill(void *dst, kvl_cu_dtype dt, uint64_t seed, uint32_t tensor, size_t count,
                              int is_norm, float scale, cudaStream_t stream);

/* dst[i] = src[i] for i < count, converting between the types. */
cudaError_t kvl_cu_convert(void *dst, kvl_cu_dtype dst_t, const void *src, kvl_cu_dtype src_t, size_t count,
                           cudaStream_t stream);

/* Row copy with index maps and type conversion:
 *   dst[(dst_idx ? dst_idx[i] : i) * ld_dst + c] = src[(src_idx ? src_idx[i] : i) * ld_src + c]
 * for i < n_rows, c < cols. Covers KV scatter (commit), gather (queries, K/V read-out), the
 * embedding lookup (src_idx = token ids) and host-layout conversions. */
cudaError_t kvl_cu_copy_rows(void *dst, kvl_cu_dtype dst_t, int64_t ld_dst, const int32_t *dst_idx,
                             const void *src, kvl_cu_dtype src_t, int64_t ld_src, const int32_t *src_idx,
                             int64_t n_rows, int64_t cols, cudaStream_t stream);

/* Optional residual add, then RMSNorm (reference kvl_cpu_add + kvl_cpu_rmsnorm):
 *   r = rows ? rows[i] : i;  if (add) x[r] += add[i] (type add_t, row stride dim);
 *   y[i] = x[r] / sqrt(mean(x[r]^2) + eps) * g   (sum of squares in float64), y stored as y_t.
 * y may be NULL (add only); g is float32 [dim]. */
cudaError_t kvl_cu_add_rmsnorm(void *y, kvl_cu_dtype y_t, float *x, const int32_t *rows, const void *add,
                               kvl_cu_dtype add_t, const float *g, int64_t n, int64_t dim, float eps,
                               cudaStream_t stream);

/* Splits a fused projection row [q | k | v] (n rows, stride ld_qkv, type qkv_t) into q (type q_t,
 * [n][n_heads*hd]), k and v (type kv_t, [n][n_kv_heads*hd]), applying RoPE at pos[i] to q and k
 * (reference kvl_cpu_rope with kvl_cpu_rope_table: angle pos * theta^(-2j/hd) in float64). */
cudaError_t kvl_cu_rope_split(void *q, kvl_cu_dtype q_t, void *k, void *v, kvl_cu_dtype kv_t,
                              const void *qkv, kvl_cu_dtype qkv_t, int64_t ld_qkv, const int32_t *pos,
                              int64_t n, int n_heads, int n_kv_heads, int hd, int style, double theta,
                              cudaStream_t stream);

/* Rotates keys in place by delta positions: for each of n_blocks blocks (stride block_stride
 * elements) the rows [0, n) of stride row_ld hold n_kv_heads heads of hd (kvl_cpu_rope with
 * kvl_cpu_rope_table_delta). */
cudaError_t kvl_cu_rerotate(void *k, kvl_cu_dtype t, int64_t n_blocks, int64_t block_stride, int64_t n,
                            int64_t row_ld, int n_kv_heads, int hd, int style, double theta, int64_t delta,
                            cudaStream_t stream);

/* kvl_cu_rerotate over up to KVL_CU_REROT_MAX regions in one launch: region i starts off[i]
 * elements into k, has n[i] rows and its own delta; n_blocks, block_stride, row_ld as there. */
#define KVL_CU_REROT_MAX 64
typedef struct kvl_cu_rerot_regions {
    int64_t off[KVL_CU_REROT_MAX];
    int32_t n[KVL_CU_REROT_MAX];
    int32_t delta[KVL_CU_REROT_MAX];
    int32_t count;
} kvl_cu_rerot_regions;
cudaError_t kvl_cu_rerotate_multi(void *k, kvl_cu_dtype t, int64_t n_blocks, int64_t block_stride, int64_t row_ld,
                                  int n_kv_heads, int hd, int style, double theta, const kvl_cu_rerot_regions *reg,
                                  cudaStream_t stream);

/* h[i][j] = silu(gu[i][j]) * gu[i][F + j] (rows of gu: [gate | up], stride 2F). */
cudaError_t kvl_cu_swiglu(void *h, const void *gu, kvl_cu_dtype t, int64_t n, int64_t F, cudaStream_t stream);

/* dev[i] = sum over K (metric & 1) and V (metric & 2) of (fresh - cached)^2 in float64, where fresh
 * rows are i and cached rows slots[i] (row length kd). */
cudaError_t kvl_cu_deviation(float *dev, const void *k_new, const void *v_new, const void *k_cache,
                             const void *v_cache, kvl_cu_dtype t, const int32_t *slots, int64_t n, int64_t kd,
                             int metric, cudaStream_t stream);

/* out[i] = argmax of logits row i (first maximum), rows of vocab floats. */
cudaError_t kvl_cu_argmax(int32_t *out, const float *logits, int64_t n, int64_t vocab, cudaStream_t stream);

/* Attention, GQA, causal by position (reference kvl_cpu_attention):
 *   q [n_q][n_heads*hd] (row stride ldq, type qo_t), qpos [n_q];
 *   k, v [n_kv][n_kv_heads*hd] (type kv_t, dense rows), kpos [n_kv];
 *   out [n_q][n_heads*hd] (row stride ldo, type qo_t).
 * Query i sees key j iff kpos[j] <= qpos[i]; a query that sees no key gets zeros.
 * ws: workspace of kvl_cu_attention_ws(n, n_kv, ...) bytes for any n_q <= n (split-KV partials,
 * per-tile position bounds, V^T for the wgmma kernel).
 * mode KVL_CU_ATT_AUTO: bf16 with hd 64 or 128 and n_q >= 16 takes the Hopper wgmma flash kernel,
 * everything else the generic float32 split-KV kernel (any hd up to 1024); KVL_CU_ATT_GENERIC
 * forces the latter, KVL_CU_ATT_MMA takes the mma.sync flash kernel where the wgmma one would run
 * The wgmma kernel runs four warpgroups per block on 256 queries of one head (one block per SM)
 * when that still makes two waves of blocks, else (short query sets) the warp-specialised kernel
 * (KVL_CU_ATT_WS) for hd 128 and two warpgroups on 128 queries, two blocks per SM (KVL_CU_ATT_WG2)
 * for hd 64. For tests and comparisons: KVL_CU_ATT_WG1 one warpgroup per block;
 * KVL_CU_ATT_WG2R two warpgroups, one block per SM; KVL_CU_ATT_WG2H 64 queries of two heads of one
 * KV group (GQA groups of even size); KVL_CU_ATT_WG3 / WG4 three / four warpgroups always;
 * KVL_CU_ATT_WG4S3 four with a three-stage K/V pipeline; KVL_CU_ATT_WS (hd 128) one producer
 * warpgroup feeding two consumer warpgroups through mbarriers, 128-key tiles; KVL_CU_ATT_WSPP the
 * same with the consumers taking turns on the tensor cores; KVL_CU_ATT_WS3 three consumer
 * warpgroups on 64-key tiles. */
enum { KVL_CU_ATT_AUTO = 0, KVL_CU_ATT_GENERIC = 1, KVL_CU_ATT_MMA = 2, KVL_CU_ATT_WG1 = 3, KVL_CU_ATT_WG2R = 4,
       KVL_CU_ATT_WG2H = 5, KVL_CU_ATT_WG3 = 6, KVL_CU_ATT_WG4 = 7,
       KVL_CU_ATT_WG4S3 = 8, KVL_CU_ATT_WG2 = 9, KVL_CU_ATT_WS = 10, KVL_CU_ATT_WSPP = 11,
       KVL_CU_ATT_WS3 = 12 };
size_t kvl_cu_attention_ws(int64_t n_q, int64_t n_kv, int n_heads, int n_kv_heads, int hd);
cudaError_t kvl_cu_attention(void *out, int64_t ldo, const void *q, int64_t ldq, kvl_cu_dtype qo_t,
                             const int32_t *qpos, int64_t n_q, const void *k, const void *v, kvl_cu_dtype kv_t,
                             const int32_t *kpos, int64_t n_kv, int n_heads, int n_kv_heads, int hd, void *ws,
                             int mode, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
