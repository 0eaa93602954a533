/* kvl_cpu.h - plain C reference kernels and the CPU thread pool.
 *
 * Every op here is the reference its CUDA counterpart is tested against. Results do not depend on
 * how work is split over threads or how many tokens are processed together: each output element is
 * computed by the same sequence of float operations (so prefill, chunked prefill and decode agree).
 */
#ifndef KVL_CPU_H
#define KVL_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_half.h" /* bf16/f16 conversions */
#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------ thread pool */
typedef struct kvl_pool kvl_pool; /* opaque */

/* Creates a pool of n_threads workers (the caller counts as one: n_threads-1 threads are started).
 * n_threads <= 0: $KVL_THREADS, else the number of online CPUs. */
kvl_status kvl_pool_create(int n_threads, kvl_pool **out);
void kvl_pool_free(kvl_pool *p);
int kvl_pool_threads(const kvl_pool *p);

/* Runs fn(ctx, i) for i in [0, n) over the pool's threads and returns when all are done. One
 * parallel_for at a time per pool (callers serialise; the engine holds a lock per model). p may be
 * NULL: runs serially. */
typedef void (*kvl_pool_fn)(void *ctx, int64_t i);
void kvl_pool_for(kvl_pool *p, int64_t n, kvl_pool_fn fn, void *ctx);

/* ------------------------------------------------------------ ops (float32) */

/* out[t][m] = sum_k x[t][k] * w[m][k]  for t < n, m < M (w row-major [M][K], like HF Linear).
 * ldo: row stride of out (>= M), so several projections can write into one buffer. */
void kvl_cpu_matmul(kvl_pool *p, float *out, int64_t ldo, const float *x, const float *w,
                    int64_t n, int64_t M, int64_t K);


/* y[t] = x[t] / rms(x[t]) * g, rms over dim elements (sum of squares in double). */
void kvl_cpu_rmsnorm(float *y, const float *x, const float *g, int64_t n, int64_t dim, float eps);

/* RoPE: rotates n_heads heads of head_dim in x [n][n_heads*head_dim] (row stride ld) in place by
 * the angles pos*inv_freq_i; style 0 = rotate-half pairs (i, i+hd/2), 1 = interleaved (2i, 2i+1).
 * cos/sin tables are [n][head_dim/2] (computed by kvl_cpu_rope_table). */
void kvl_cpu_rope(float *x, int64_t ld, int64_t n, int n_heads, int head_dim, int style,
                  const float *cos_t, const float *sin_t);

/* Fills cos/sin [n][head_dim/2] for the given positions (angles computed in double). */
void kvl_cpu_rope_table(float *cos_t, float *sin_t, const int32_t *pos, int64_t n, int head_dim,
                        double theta);

/* Same table for one position delta (rotation by delta), [head_dim/2]. */
void kvl_cpu_rope_table_delta(float *cos_t, float *sin_t, int64_t delta, int head_dim,
                              double theta);

/* h[t][i] = silu(g[t][i]) * u[t][i] */
void kvl_cpu_swiglu(float *h, const float *g, const float *u, int64_t n, int64_t dim);

/* y += x (n elements) */
void kvl_cpu_add(float *y, const float *x, int64_t n);

/* Attention for n_q queries over n_kv cached tokens, GQA, causal by position:
 *   q   [n_q][n_heads][hd] (row stride ldq), qpos [n_q]
 *   k,v [n_kv][n_kv_heads][hd] (dense), kpos [n_kv]
 *   out [n_q][n_heads][hd] (row stride ldo)
 * Query i attends to key j iff kpos[j] <= qpos[i]. A query that sees no key gets zeros. */
void kvl_cpu_attention(kvl_pool *p, float *out, int64_t ldo, const float *q, int64_t ldq,
                       const int32_t *qpos, int64_t n_q, const float *k, const float *v,
                       const int32_t *kpos, int64_t n_kv, int n_heads, int n_kv_heads, int hd);

/* Attention probabilities summed over heads and queries: mass[j] = sum_i sum_h softmax_j(q_i,h . k_j
 * / sqrt(hd)) over the keys with kpos[j] <= qpos[i] and use[j] != 0 (use may be NULL: all keys).
 * Same layouts as kvl_cpu_attention; mass [n_kv] is overwritten. Serial (small n_q). */
void kvl_cpu_attention_mass(float *mass, const float *q, int64_t ldq, const int32_t *qpos, int64_t n_q,
                            const float *k, const int32_t *kpos, const uint8_t *use, int64_t n_kv,
                            int n_heads, int n_kv_heads, int hd);


#ifdef __cplusplus
}
#endif
#endif
