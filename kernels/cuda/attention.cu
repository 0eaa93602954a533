/* Attention kernels: causal-by-position GQA over an arbitrary set of queries (kvl_cuda.h).
 *
 * flash_wg_k (default for bf16, head_dim 64/128, n_q >= 16; sm_90a): Hopper tensor cores through
 *   wgmma. Each warpgroup takes 64 queries of one head; S = Q K^T with both operands in 128-byte-
 *   swizzled shared memory, online softmax in registers (fp32), O += P V with P from registers and
 *   V^T (transposed per call into the workspace) from shared memory. K/V^T tiles of 64 keys stream
 *   in by cp.async, double-buffered; PV(t) and QK(t+1) are queued back to back. Per-tile bounds of
 *   the key positions let a block skip tiles that none of its queries can see (the causal half of
 *   a full prefill) and drop the mask on tiles that every query sees in full. No n_q x n_kv matrix
 *   is ever in memory.
 * flash_k: the same algorithm on mma.sync m16n8k16 (FA2-style, any sm_80+), kept for comparison.
 * generic_k: float32 split-KV kernel for any head_dim and either KV type: one block per (query,
 *   head, split); splits are merged by combine_k. Decode (one query), float32 models and head_dims
 *   other than 64/128 (the small test models) run here.
 */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "kvl_cuda.h"

namespace {

constexpr int GEN_THREADS = 128;
constexpr int GEN_CHUNK = 256; /* keys per shared-memory pass of generic_k */
constexpr int GEN_MAX_SPLIT = 64;

__device__ __forceinline__ float ldf(const void *p, kvl_cu_dtype t, int64_t i) {
    return t == KVL_CU_BF16 ? __bfloat162float(((const __nv_bfloat16 *)p)[i]) : ((const float *)p)[i];
}

/* ---------------------------------------------------------------- generic */

/* grid: x = query * n_split + split, y = head. Each split covers keys [s*per, (s+1)*per). */
__global__ void __launch_bounds__(GEN_THREADS) generic_k(void *out, int64_t ldo, const void *q, int64_t ldq,
                                                         kvl_cu_dtype qt, const int32_t *qpos, const void *k,
                                                         const void *v, kvl_cu_dtype kvt, const int32_t *kpos,
                                                         int64_t n_kv, int nh, int nkv, int hd, int n_split,
                                                         int64_t per, float *ws_o, float *ws_ml) {
    __shared__ float sq[1024];
    __shared__ float sc[GEN_CHUNK];
    __shared__ float red[GEN_THREADS / 32];
    const int64_t qi = blockIdx.x / n_split;
    const int split = blockIdx.x % n_split, h = blockIdx.y, kh = h / (nh / nkv);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t kvld = (int64_t)nkv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const int32_t qp = qpos[qi];
    for (int d = tid; d < hd; d += GEN_THREADS) sq[d] = ldf(q, qt, qi * ldq + (int64_t)h * hd + d);
    float o[8]; /* dims tid + 128 r, hd <= 1024 */
#pragma unroll
    for (int r = 0; r < 8; r++) o[r] = 0.f;
    float m = -INFINITY, l = 0.f;
    int64_t j0 = (int64_t)split * per, j1 = j0 + per < n_kv ? j0 + per : n_kv;
    for (int64_t c0 = j0; c0 < j1; c0 += GEN_CHUNK) {
        int cnt = (int)(j1 - c0 < GEN_CHUNK ? j1 - c0 : GEN_CHUNK);
        __syncthreads(); /* sq written / previous chunk's sc consumed */
        for (int jj = warp; jj < cnt; jj += GEN_THREADS / 32) {
            int64_t j = c0 + jj;
            float s = 0.f;
            const int64_t kb = j * kvld + (int64_t)kh * hd;
            for (int d = lane; d < hd; d += 32) s += sq[d] * ldf(k, kvt, kb + d);
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (lane == 0) sc[jj] = kpos[j] > qp ? -INFINITY : s * scale;
        }
        __syncthreads();
        float cm = -INFINITY;
        for (int jj = tid; jj < cnt; jj += GEN_THREADS) cm = fmaxf(cm, sc[jj]);
        for (int off = 16; off > 0; off >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, off));
        if (lane == 0) red[warp] = cm;
        __syncthreads();
        cm = red[0];
        for (int w = 1; w < GEN_THREADS / 32; w++) cm = fmaxf(cm, red[w]);
        float mn = fmaxf(m, cm);
        if (mn == -INFINITY) continue; /* nothing visible yet */
        float alpha = expf(m - mn); /* 0 when m = -inf */
        __syncthreads();            /* red read by all before reuse */
        float ps = 0.f;
        for (int jj = tid; jj < cnt; jj += GEN_THREADS) {
            float e = sc[jj] == -INFINITY ? 0.f : expf(sc[jj] - mn);
            sc[jj] = e;
            ps += e;
        }
        for (int off = 16; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
        if (lane == 0) red[warp] = ps;
        __syncthreads();
        ps = 0.f;
        for (int w = 0; w < GEN_THREADS / 32; w++) ps += red[w];
        l = l * alpha + ps;
        m = mn;
#pragma unroll
        for (int r = 0; r < 8; r++) {
            int d = tid + r * GEN_THREADS;
            if (d < hd) {
                float acc = o[r] * alpha;
                for (int jj = 0; jj < cnt; jj++) {
                    float p = sc[jj];
                    if (p != 0.f) acc += p * ldf(v, kvt, (c0 + jj) * kvld + (int64_t)kh * hd + d);
                }
                o[r] = acc;
            }
        }
    }
    if (n_split == 1) {
        float inv = l > 0.f ? 1.0f / l : 0.f;
#pragma unroll
        for (int r = 0; r < 8; r++) {
            int d = tid + r * GEN_THREADS;
            if (d < hd) {
                int64_t oi = qi * ldo + (int64_t)h * hd + d;
                if (qt == KVL_CU_BF16)
                    ((__nv_bfloat16 *)out)[oi] = __float2bfloat16_rn(o[r] * inv);
                else
                    ((float *)out)[oi] = o[r] * inv;
            }
        }
    } else {
        int64_t part = (qi * nh + h) * n_split + split;
#pragma unroll
        for (int r = 0; r < 8; r++) {
            int d = tid + r * GEN_THREADS;
            if (d < hd) ws_o[part * hd + d] = o[r];
        }
        if (tid == 0) {
            ws_ml[2 * part] = m;
            ws_ml[2 * part + 1] = l;
        }
    }
}

/* merges the n_split partial (m, l, o) of each (query, head) */
__global__ void combine_k(void *out, int64_t ldo, kvl_cu_dtype ot, int nh, int hd, int n_split, const float *ws_o,
                          const float *ws_ml) {
    const int64_t qi = blockIdx.x;
    const int h = blockIdx.y;
    const int64_t base = (qi * nh + h) * n_split;
    float M = -INFINITY;
    for (int s = 0; s < n_split; s++) M = fmaxf(M, ws_ml[2 * (base + s)]);
    float L = 0.f;
    for (int s = 0; s < n_split; s++) {
        float ms = ws_ml[2 * (base + s)];
        if (ms != -INFINITY) L += ws_ml[2 * (base + s) + 1] * expf(ms - M);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < n_split; s++) {
            float ms = ws_ml[2 * (base + s)];
            if (ms != -INFINITY) acc += ws_o[(base + s) * hd + d] * expf(ms - M);
        }
        float r = L > 0.f ? acc / L : 0.f;
        int64_t oi = qi * ldo + (int64_t)h * hd + d;
        if (ot == KVL_CU_BF16)
            ((__nv_bfloat16 *)out)[oi] = __float2bfloat16_rn(r);
        else
            ((float *)out)[oi] = r;
    }
}

/* ---------------------------------------------------------------- flash (bf16, mma.sync) */

constexpr int FBM = 64, FBN = 64, FTHREADS = 128;

/* per 64-key tile: min and max position of its keys */
__global__ void tile_bounds_k(int2 *tb, const int32_t *kpos, int64_t n_kv) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    int64_t n_t = (n_kv + FBN - 1) / FBN;
    if (t >= n_t) return;
    int lo = INT_MAX, hi = INT_MIN;
    for (int64_t j = t * FBN; j < (t + 1) * FBN && j < n_kv; j++) {
        lo = min(lo, kpos[j]);
        hi = max(hi, kpos[j]);
    }
    tb[t] = make_int2(lo, hi);
}

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma16816(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* two row maxima completed across the 4 threads that share a row (mma / wgmma accumulator
 * layout) and scaled by sl2; a row that saw no key (max -inf) gets 0, so its weights are 0 */
__device__ __forceinline__ void quad_max_scaled(float &mx0, float &mx1, float sl2, float &ms0, float &ms1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    ms0 = mx0 == -INFINITY ? 0.f : mx0 * sl2;
    ms1 = mx1 == -INFINITY ? 0.f : mx1 * sl2;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

template <int HD>
constexpr int flash_smem() {
    return (FBM + 4 * FBN) * (HD + 8) * 2 + 2 * FBN * 4;
}

/* the rows' final O / l (row sums completed across the 4 threads of a row) as bf16, rows q_a and
 * q_b (absolute query indices) of head h */
template <int HD>
__device__ __forceinline__ void store_rows(__nv_bfloat16 *out, int64_t ldo, const float *o, float l0, float l1,
                                           int64_t q_a, int64_t q_b, int64_t n_q, int h, int tq) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int d = 0; d < HD / 8; d++) {
        int col = h * HD + d * 8 + 2 * tq;
        if (q_a < n_q)
            *(__nv_bfloat162 *)(out + q_a * ldo + col) = __floats2bfloat162_rn(o[4 * d] * i0, o[4 * d + 1] * i0);
        if (q_b < n_q)
            *(__nv_bfloat162 *)(out + q_b * ldo + col) = __floats2bfloat162_rn(o[4 * d + 2] * i1, o[4 * d + 3] * i1);
    }
}

template <int HD>
__global__ void __launch_bounds__(FTHREADS) flash_k(__nv_bfloat16 *out, int64_t ldo, const __nv_bfloat16 *q,
                                                    int64_t ldq, const int32_t *qpos, int64_t n_q,
                                                    const __nv_bfloat16 *k, const __nv_bfloat16 *v,
                                                    const int32_t *kpos, int64_t n_kv, const int2 *tb, int nh,
                                                    int nkv, float sl2) {
    constexpr int STR = HD + 8; /* padded rows: conflict-free ldmatrix */
    constexpr int NT = FBN / 8; /* 8-key column tiles of S */
    constexpr int DT = HD / 8;  /* 8-dim column tiles of O */
    constexpr int KS = HD / 16; /* k-steps of Q K^T */
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16 *sQ = (__nv_bfloat16 *)smem_raw;
    __nv_bfloat16 *sK = sQ + FBM * STR; /* [2][FBN][STR] */
    __nv_bfloat16 *sV = sK + 2 * FBN * STR;
    int *sKp = (int *)(sV + 2 * FBN * STR); /* [2][FBN] */
    __shared__ int s_qmin[FTHREADS / 32], s_qmax[FTHREADS / 32];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t q0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * FBM; /* long rows of a causal prefill first */
    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int64_t kvld = (int64_t)nkv * HD;
    const int64_t n_tiles = (n_kv + FBN - 1) / FBN;

    for (int c = tid; c < FBM * HD / 8; c += FTHREADS) {
        int r = c / (HD / 8), col = (c % (HD / 8)) * 8;
        bool ok = q0 + r < n_q;
        cp_async16(sQ + r * STR + col, q + (ok ? (q0 + r) * ldq + (int64_t)h * HD + col : 0), ok);
    }
    cp_commit();
    /* positions of this block's queries: bounds for tile skipping, and each thread's two rows */
    {
        int p = INT_MIN, pmin = INT_MAX, pmax = INT_MIN;
        if (tid < FBM && q0 + tid < n_q) {
            p = qpos[q0 + tid];
            pmin = p;
            pmax = p;
        }
        for (int off = 16; off > 0; off >>= 1) {
            pmin = min(pmin, __shfl_xor_sync(0xffffffffu, pmin, off));
            pmax = max(pmax, __shfl_xor_sync(0xffffffffu, pmax, off));
        }
        if (lane == 0) {
            s_qmin[warp] = pmin;
            s_qmax[warp] = pmax;
        }
    }
    const int r0 = warp * 16 + lane / 4, r1 = r0 + 8, tq = lane % 4;
    const int qp0 = q0 + r0 < n_q ? qpos[q0 + r0] : INT_MIN;
    const int qp1 = q0 + r1 < n_q ? qpos[q0 + r1] : INT_MIN;
    cp_wait<0>();
    __syncthreads();
    const int qmin = min(min(s_qmin[0], s_qmin[1]), min(s_qmin[2], s_qmin[3]));
    const int qmax = max(max(s_qmax[0], s_qmax[1]), max(s_qmax[2], s_qmax[3]));

    uint32_t qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
        ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sQ + (warp * 16 + (lane % 16)) * STR + kk * 16 + (lane / 16) * 8);

    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    auto next_tile = [&](int64_t t) {
        while (t < n_tiles && tb[t].x > qmax) t++;
        return t;
    };
    auto load_tile = [&](int64_t t, int buf) {
        const int64_t j0 = t * FBN;
        for (int c = tid; c < FBN * HD / 8; c += FTHREADS) {
            int r = c / (HD / 8), col = (c % (HD / 8)) * 8;
            bool ok = j0 + r < n_kv;
            int64_t off = ok ? (j0 + r) * kvld + (int64_t)kh * HD + col : 0;
            cp_async16(sK + (buf * FBN + r) * STR + col, k + off, ok);
            cp_async16(sV + (buf * FBN + r) * STR + col, v + off, ok);
        }
        if (tid < FBN) sKp[buf * FBN + tid] = j0 + tid < n_kv ? kpos[j0 + tid] : INT_MAX;
    };

    int64_t t = qmax == INT_MIN ? n_tiles : next_tile(0);
    if (t < n_tiles) load_tile(t, 0);
    cp_commit();
    for (int buf = 0; t < n_tiles; buf ^= 1) {
        const int64_t tn = next_tile(t + 1);
        if (tn < n_tiles) load_tile(tn, buf ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        const __nv_bfloat16 *cK = sK + buf * FBN * STR, *cV = sV + buf * FBN * STR;
        const int *cKp = sKp + buf * FBN;

        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
#pragma unroll
            for (int n2 = 0; n2 < NT / 2; n2++) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, cK + (n2 * 16 + (lane / 16) * 8 + (lane % 8)) * STR + kk * 16 + ((lane / 8) % 2) * 8);
                mma16816(s[2 * n2], qf[kk], b0, b1);
                mma16816(s[2 * n2 + 1], qf[kk], b2, b3);
            }
        }
        const int2 bnd = tb[t];
        if (bnd.y > qmin) { /* some key of the tile is hidden from some query: mask */
#pragma unroll
            for (int n = 0; n < NT; n++) {
                int kp0 = cKp[n * 8 + 2 * tq], kp1 = cKp[n * 8 + 2 * tq + 1];
                if (kp0 > qp0) s[n][0] = -INFINITY;
                if (kp1 > qp0) s[n][1] = -INFINITY;
                if (kp0 > qp1) s[n][2] = -INFINITY;
                if (kp1 > qp1) s[n][3] = -INFINITY;
            }
        } else if (n_kv - t * FBN < FBN) { /* tail tile: padded keys */
#pragma unroll
            for (int n = 0; n < NT; n++) {
                if (cKp[n * 8 + 2 * tq] == INT_MAX) s[n][0] = s[n][2] = -INFINITY;
                if (cKp[n * 8 + 2 * tq + 1] == INT_MAX) s[n][1] = s[n][3] = -INFINITY;
            }
        }
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < NT; n++) {
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        float ms0, ms1;
        quad_max_scaled(mx0, mx1, sl2, ms0, ms1);
        const float a0 = exp2f(m0 * sl2 - ms0), a1 = exp2f(m1 * sl2 - ms1);
        m0 = mx0;
        m1 = mx1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int n = 0; n < NT; n++) {
            s[n][0] = exp2f(s[n][0] * sl2 - ms0);
            s[n][1] = exp2f(s[n][1] * sl2 - ms0);
            s[n][2] = exp2f(s[n][2] * sl2 - ms1);
            s[n][3] = exp2f(s[n][3] * sl2 - ms1);
            ps0 += s[n][0] + s[n][1];
            ps1 += s[n][2] + s[n][3];
        }
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
#pragma unroll
        for (int d = 0; d < DT; d++) {
            o[d][0] *= a0;
            o[d][1] *= a0;
            o[d][2] *= a1;
            o[d][3] *= a1;
        }
#pragma unroll
        for (int kk = 0; kk < FBN / 16; kk++) {
            uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int d2 = 0; d2 < DT / 2; d2++) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, cV + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * STR + d2 * 16 + (lane / 16) * 8);
                mma16816(o[2 * d2], pa, b0, b1);
                mma16816(o[2 * d2 + 1], pa, b2, b3);
            }
        }
        __syncthreads(); /* this buffer is refilled next iteration */
        t = tn;
    }
    cp_wait<0>();
    static_assert(DT == HD / 8, "o is [HD / 8][4], the layout store_rows reads");
    store_rows<HD>(out, ldo, &o[0][0], l0, l1, q0 + r0, q0 + r1, n_q, h, tq);
}

template <int HD>
cudaError_t launch_flash(void *out, int64_t ldo, const void *q, int64_t ldq, const int32_t *qpos, int64_t n_q,
                         const void *k, const void *v, const int32_t *kpos, int64_t n_kv, int nh, int nkv, void *ws,
                         cudaStream_t s) {
    int2 *tb = (int2 *)ws;
    int64_t n_t = (n_kv + FBN - 1) / FBN;
    tile_bounds_k<<<(unsigned)((n_t + 127) / 128), 128, 0, s>>>(tb, kpos, n_kv);
    constexpr int smem = flash_smem<HD>();
    static bool attr_set = false; /* idempotent: racing first calls set the same value */
    if (!attr_set) {
        cudaError_t e = cudaFuncSetAttribute(flash_k<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess) return e;
        attr_set = true;
    }
    dim3 grid((unsigned)((n_q + FBM - 1) / FBM), (unsigned)nh);
    float sl2 = (1.0f / sqrtf((float)HD)) * 1.4426950408889634f;
    flash_k<HD><<<grid, FTHREADS, smem, s>>>((__nv_bfloat16 *)out, ldo, (const __nv_bfloat16 *)q, ldq, qpos, n_q,
                                             (const __nv_bfloat16 *)k, (const __nv_bfloat16 *)v, kpos, n_kv, tb, nh,
                                             nkv, sl2);
    return cudaGetLastError();
}


/* ---------------------------------------------------------------- flash on Hopper (wgmma, sm_90a) */

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
#define KVL_HAVE_WGMMA 1
#include "wgmma_ops.cuh"
#endif

constexpr int WBN = 64; /* keys per tile */

/* V^T of one layer for the wgmma kernel: vt[kvh*hd + d][j] = v[j][kvh*hd + d] for j < n_kv, 0 up to
 * n_pad (the padded keys' P is 0, and 0 * garbage could be NaN) */
__global__ void transpose_v_k(__nv_bfloat16 *vt, const __nv_bfloat16 *v, int64_t n_kv, int64_t n_pad, int64_t cols) {
    __shared__ __nv_bfloat16 t[32][33];
    int64_t j0 = (int64_t)blockIdx.x * 32, c0 = (int64_t)blockIdx.y * 32;
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        int64_t j = j0 + r, c = c0 + threadIdx.x;
        t[r][threadIdx.x] = (j < n_kv && c < cols) ? v[j * cols + c] : __float2bfloat16_rn(0.f);
    }
    __syncthreads();
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        int64_t c = c0 + r, j = j0 + threadIdx.x;
        if (c < cols && j < n_pad) vt[c * n_pad + j] = t[threadIdx.x][r];
    }
}

/* byte offset of element (r, c), c a multiple of 8, of a K-major bf16 tile of R rows in the
 * 128-byte-swizzle wgmma layout: 64-column slabs of R rows x 128 B; in each 8-row x 128 B atom the
 * 16-byte chunk index is XORed with the row (conflict-free for the tensor cores and for cp.async) */
__device__ __forceinline__ uint32_t sw_off(int r, int c, int R) {
    return (uint32_t)((c >> 6) * R * 128 + r * 128 + ((((c & 63) >> 3) ^ (r & 7)) << 4));
}

/* descriptor of a 128B-swizzled K-major tile at shared address saddr (1024-byte aligned atoms):
 * 8-row groups 1024 B apart (SBO), swizzle mode 1 */
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr) {
    return (uint64_t)((saddr >> 4) & 0x3FFF) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}
/* the k16 step kk of a tile of R rows: 32 B inside a 64-column slab, then the next slab */
__device__ __forceinline__ uint32_t wg_kstep(int kk, int R) { return (uint32_t)((kk >> 2) * R * 128 + (kk & 3) * 32); }

template <int HD, int NW, int ST>
constexpr int wg_smem() {
    return (NW * 64 * HD + ST * WBN * HD + ST * HD * WBN) * 2 + ST * WBN * 4 + 1024; /* + alignment slack */
}

/* NW warpgroups (128 threads each) per 64*NW queries of one head, sharing each K/V tile; MB blocks
 * per SM (MB = 2 with NW = 2 holds a thread to 128 registers, so that one block's softmax can
 * overlap the other's tensor-core work). S = Q K^T and O += P V on wgmma (P from
 * registers), online softmax in registers, K and V^T tiles double-buffered with cp.async. */
/* pins accumulator registers around a wgmma sequence, so that the compiler neither moves them
 * (which would serialize the wgmma instructions, ptxas C7515) nor reorders their uses across it */
template <int N>
__device__ __forceinline__ void fence_regs(float *r) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}

/* 2^x on the special-function unit (flush-to-zero: softmax weights below 2^-126 are 0 anyway) */
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* Online softmax of one tile of N keys for a warpgroup's 64 rows, S in the wgmma accumulator
 * layout (thread: rows r0 and r0 + 8, columns 8n + 2tq, +1): new row maxima (m0, m1), sums (l0,
 * l1) and O rescaled; P = 2^(S sl2 - max sl2) packed to bf16 A fragments for the PV wgmma. Row
 * maxima and sums over 4 partial results each (short dependency chains). Rows that see no key
 * keep max -inf and contribute 0. */
template <int N, int HD>
__device__ __forceinline__ void softmax_tile(float *s, float *o, float &m0, float &m1, float &l0, float &l1, float sl2,
                                             uint32_t (*pa)[4]) {
    float pm0[4] = {m0, m0, m0, m0}, pm1[4] = {m1, m1, m1, m1};
#pragma unroll
    for (int n = 0; n < N / 8; n++) {
        pm0[n & 3] = fmaxf(pm0[n & 3], fmaxf(s[4 * n], s[4 * n + 1]));
        pm1[n & 3] = fmaxf(pm1[n & 3], fmaxf(s[4 * n + 2], s[4 * n + 3]));
    }
    float mx0 = fmaxf(fmaxf(pm0[0], pm0[1]), fmaxf(pm0[2], pm0[3]));
    float mx1 = fmaxf(fmaxf(pm1[0], pm1[1]), fmaxf(pm1[2], pm1[3]));
    float ms0, ms1;
    quad_max_scaled(mx0, mx1, sl2, ms0, ms1);
    const float a0 = ex2(m0 * sl2 - ms0), a1 = ex2(m1 * sl2 - ms1);
    m0 = mx0;
    m1 = mx1;
    float qs0[4] = {0.f, 0.f, 0.f, 0.f}, qs1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int n = 0; n < N / 8; n++) {
        s[4 * n + 0] = ex2(s[4 * n + 0] * sl2 - ms0);
        s[4 * n + 1] = ex2(s[4 * n + 1] * sl2 - ms0);
        s[4 * n + 2] = ex2(s[4 * n + 2] * sl2 - ms1);
        s[4 * n + 3] = ex2(s[4 * n + 3] * sl2 - ms1);
        qs0[n & 3] += s[4 * n] + s[4 * n + 1];
        qs1[n & 3] += s[4 * n + 2] + s[4 * n + 3];
    }
    const float ps0 = (qs0[0] + qs0[1]) + (qs0[2] + qs0[3]), ps1 = (qs1[0] + qs1[1]) + (qs1[2] + qs1[3]);
    l0 = l0 * a0 + ps0;
    l1 = l1 * a1 + ps1;
#pragma unroll
    for (int d = 0; d < HD / 8; d++) {
        o[4 * d + 0] *= a0;
        o[4 * d + 1] *= a0;
        o[4 * d + 2] *= a1;
        o[4 * d + 3] *= a1;
    }
#pragma unroll
    for (int kk = 0; kk < N / 16; kk++) {
        pa[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

/* O += P V for one tile of N keys (P: bf16 A fragments in registers, V^T tile at shared aV) */
template <int N, int HD>
__device__ __forceinline__ void pv_issue(float *o, uint32_t (*pa)[4], uint32_t aV) {
#ifdef KVL_HAVE_WGMMA
#pragma unroll
    for (int kk = 0; kk < N / 16; kk++) {
        if constexpr (HD == 128)
            wgmma_rs_n128(o, pa[kk], wg_desc(aV + wg_kstep(kk, HD)), 1);
        else
            wgmma_rs_n64(o, pa[kk], wg_desc(aV + wg_kstep(kk, HD)), 1);
    }
#endif
}

template <int HD, int NW, int MB, int HP, int ST>
__global__ void __launch_bounds__(128 * NW, MB) flash_wg_k(__nv_bfloat16 *out, int64_t ldo, const __nv_bfloat16 *q,
                                                  int64_t ldq, const int32_t *qpos, int64_t n_q,
                                                  const __nv_bfloat16 *k, const __nv_bfloat16 *vt, int64_t n_pad,
                                                  const int32_t *kpos, int64_t n_kv, const int2 *tb, int nh, int nkv,
                                                  float sl2) {
#ifdef KVL_HAVE_WGMMA
    constexpr int NS = WBN / 2; /* S accumulators per thread */
    constexpr int NO = HD / 2;  /* O accumulators per thread */
    extern __shared__ __align__(128) unsigned char smem_wg[];
    unsigned char *sQ = smem_wg + ((1024 - (smem_u32(smem_wg) & 1023)) & 1023); /* swizzle atoms: 1024 B */
    /* HP = 1: warpgroup w takes query rows 64w.. of head blockIdx.y; HP = NW: every warpgroup takes
     * the same 64 rows for its own head of one KV group (each K/V tile then serves NW heads) */
    static_assert(HP == 1 || HP == NW, "heads per block");
    constexpr int BMW = HP == 1 ? 64 * NW : 64, NT = 128 * NW;
    static_assert(ST == 2 || ST == 3, "pipeline stages");
    unsigned char *sK = sQ + NW * 64 * HD * 2;  /* [ST][WBN x HD] */
    unsigned char *sV = sK + ST * WBN * HD * 2; /* [ST][HD x WBN] (V^T) */
    int *sKp = (int *)(sV + ST * HD * WBN * 2);
    __shared__ int s_qmin[4 * NW], s_qmax[4 * NW];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t q0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * BMW;
    const int wg = tid / 128;
    const int hb = blockIdx.y * HP, kh = hb / (nh / nkv), h = HP == 1 ? hb : hb + tid / 128;
    const int64_t kvld = (int64_t)nkv * HD;
    const int64_t n_tiles = (n_kv + WBN - 1) / WBN;

    for (int c = tid; c < NW * 64 * HD / 8; c += NT) {
        int r = c / (HD / 8), col = (c % (HD / 8)) * 8; /* r: row of the NW x 64-row Q buffer */
        int64_t qr = HP == 1 ? q0 + r : q0 + r % 64;
        int qh = HP == 1 ? hb : hb + r / 64;
        bool ok = qr < n_q;
        cp_async16(sQ + (r / 64) * 64 * HD * 2 + sw_off(r % 64, col, 64), q + (ok ? qr * ldq + (int64_t)qh * HD + col : 0), ok);
    }
    cp_commit();
    {
        int pmin = INT_MAX, pmax = INT_MIN;
        if (tid < BMW && q0 + tid < n_q) pmin = pmax = qpos[q0 + tid];
        for (int off = 16; off > 0; off >>= 1) {
            pmin = min(pmin, __shfl_xor_sync(0xffffffffu, pmin, off));
            pmax = max(pmax, __shfl_xor_sync(0xffffffffu, pmax, off));
        }
        if (lane == 0) { s_qmin[warp] = pmin; s_qmax[warp] = pmax; }
    }
    const int r0 = (HP == 1 ? warp : warp % 4) * 16 + lane / 4, r1 = r0 + 8, tq = lane % 4; /* rows of the tile */
    const int qp0 = q0 + r0 < n_q ? qpos[q0 + r0] : INT_MIN;
    const int qp1 = q0 + r1 < n_q ? qpos[q0 + r1] : INT_MIN;
    __syncthreads();
    int qmin = s_qmin[0], qmax = s_qmax[0];
#pragma unroll
    for (int w = 1; w < 4 * NW; w++) {
        qmin = min(qmin, s_qmin[w]);
        qmax = max(qmax, s_qmax[w]);
    }

    auto next_tile = [&](int64_t t) {
        while (t < n_tiles && tb[t].x > qmax) t++;
        return t;
    };
    auto load_tile = [&](int64_t t, int buf) {
        const int64_t j0 = t * WBN;
        unsigned char *dK = sK + buf * WBN * HD * 2, *dV = sV + buf * HD * WBN * 2;
        for (int c = tid; c < WBN * HD / 8; c += NT) {
            int r = c / (HD / 8), col = (c % (HD / 8)) * 8;
            bool ok = j0 + r < n_kv;
            cp_async16(dK + sw_off(r, col, WBN), k + (ok ? (j0 + r) * kvld + (int64_t)kh * HD + col : 0), ok);
            int d = c / (WBN / 8), kc = (c % (WBN / 8)) * 8; /* V^T: row d, keys kc..kc+7 */
            cp_async16(dV + sw_off(d, kc, HD), vt + ((int64_t)kh * HD + d) * n_pad + j0 + kc, true);
        }
        if (tid < WBN) sKp[buf * WBN + tid] = j0 + tid < n_kv ? kpos[j0 + tid] : INT_MAX;
    };

    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; i++) o[i] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const uint32_t aQ = smem_u32(sQ + wg * 64 * HD * 2);

    /* Pipeline per tile t: wait for QK(t) (and PV(t-1), queued before it) -> barrier (buffer of
     * t-1 free) -> prefetch t+1 into it -> softmax(t) -> queue PV(t) -> once t+1 has landed, queue
     * QK(t+1) behind PV(t), so the tensor cores run the two back to back. */
    float s[NS];
#pragma unroll
    for (int i = 0; i < NS; i++) s[i] = 0.f;
    int64_t t = qmax == INT_MIN ? n_tiles : next_tile(0);
    int64_t tn = ST == 3 && t < n_tiles ? next_tile(t + 1) : n_tiles; /* ST = 3: loaded one step ahead */
    if (t < n_tiles) {
        load_tile(t, 0);
        cp_commit();
        if constexpr (ST == 3) {
            if (tn < n_tiles) load_tile(tn, 1);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); /* cp.async data -> wgmma */
        __syncthreads();
        fence_regs<NS>(s);
        fence_regs<NO>(o);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        const uint32_t aK = smem_u32(sK);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++)
            wgmma_ss_n64(s, wg_desc(aQ + wg_kstep(kk, 64)), wg_desc(aK + wg_kstep(kk, WBN)), kk > 0);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        fence_regs<NS>(s);
        fence_regs<NO>(o);
    }
    uint32_t pa[WBN / 16][4];
    for (int buf = 0; t < n_tiles; buf = buf + 1 == ST ? 0 : buf + 1) {
        const int nbuf = buf + 1 == ST ? 0 : buf + 1;
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        fence_regs<NS>(s);
        fence_regs<NO>(o);
        __syncthreads(); /* every warp's PV(t-1) is done: the buffer of t-1 may be refilled */
        int64_t tnn = n_tiles;
        if constexpr (ST == 3) { /* t+2 into the buffer of t-1 */
            tnn = tn < n_tiles ? next_tile(tn + 1) : n_tiles;
            if (tnn < n_tiles) load_tile(tnn, nbuf + 1 == ST ? 0 : nbuf + 1);
        } else { /* t+1 into the buffer of t-1 */
            tn = next_tile(t + 1);
            if (tn < n_tiles) load_tile(tn, nbuf);
        }
        cp_commit();
        const uint32_t aV = smem_u32(sV + buf * HD * WBN * 2);
        const int *cKp = sKp + buf * WBN;
        const int2 bnd = tb[t];
        if (bnd.y > qmin || n_kv - t * WBN < WBN) {
#pragma unroll
            for (int n = 0; n < WBN / 8; n++) {
                int kp0 = cKp[n * 8 + 2 * tq], kp1 = cKp[n * 8 + 2 * tq + 1];
                if (kp0 > qp0) s[4 * n + 0] = -INFINITY;
                if (kp1 > qp0) s[4 * n + 1] = -INFINITY;
                if (kp0 > qp1) s[4 * n + 2] = -INFINITY;
                if (kp1 > qp1) s[4 * n + 3] = -INFINITY;
            }
        }
        softmax_tile<WBN, HD>(s, o, m0, m1, l0, l1, sl2, pa);
        fence_regs<NS>(s);
        fence_regs<NO>(o);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        pv_issue<WBN, HD>(o, pa, aV);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        fence_regs<NS>(s);
        fence_regs<NO>(o);
        if (tn < n_tiles) {
            if constexpr (ST == 3) cp_wait<1>(); /* tile t+1 landed; t+2 may still load */
            else cp_wait<0>();
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            __syncthreads(); /* tile tn is in buffer buf^1 for every warp */
            const uint32_t aK = smem_u32(sK + nbuf * WBN * HD * 2);
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++)
                wgmma_ss_n64(s, wg_desc(aQ + wg_kstep(kk, 64)), wg_desc(aK + wg_kstep(kk, WBN)), kk > 0);
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        fence_regs<NS>(s);
        fence_regs<NO>(o);
        }
        t = tn;
        if constexpr (ST == 3) tn = tnn;
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    cp_wait<0>();
    store_rows<HD>(out, ldo, o, l0, l1, q0 + r0, q0 + r1, n_q, h, tq);
#else
    __trap(); /* built without sm_90a: the launcher never selects this kernel there */
#endif
}

/* the wgmma kernels' preparation in the workspace: per-64-key position bounds (tb) and V^T padded
 * with zeros to n_pad keys; returns V^T */
__nv_bfloat16 *prep_tiles(void *ws, const int32_t *kpos, const void *v, int64_t n_kv, int64_t n_pad, int nkv, int hd,
                          int2 **tb_out, cudaStream_t s) {
    int64_t n_t = (n_kv + WBN - 1) / WBN;
    int2 *tb = (int2 *)ws;
    __nv_bfloat16 *vt = (__nv_bfloat16 *)((char *)ws + ((n_t * sizeof(int2) + 255) & ~(size_t)255));
    tile_bounds_k<<<(unsigned)((n_t + 127) / 128), 128, 0, s>>>(tb, kpos, n_kv);
    int64_t cols = (int64_t)nkv * hd;
    transpose_v_k<<<dim3((unsigned)(n_pad / 32), (unsigned)((cols + 31) / 32)), dim3(32, 8), 0, s>>>(
        vt, (const __nv_bfloat16 *)v, n_kv, n_pad, cols);
    *tb_out = tb;
    return vt;
}

template <int HD, int NW, int MB, int HP, int ST>
cudaError_t launch_flash_wg(void *out, int64_t ldo, const void *q, int64_t ldq, const int32_t *qpos, int64_t n_q,
                            const void *k, const void *v, const int32_t *kpos, int64_t n_kv, int nh, int nkv, void *ws,
                            cudaStream_t s) {
    const int64_t n_pad = (n_kv + WBN - 1) / WBN * WBN;
    int2 *tb = NULL;
    __nv_bfloat16 *vt = prep_tiles(ws, kpos, v, n_kv, n_pad, nkv, HD, &tb, s);
    constexpr int smem = wg_smem<HD, NW, ST>();
    static bool attr_set = false; /* idempotent: racing first calls set the same value */
    if (!attr_set) {
        cudaError_t e = cudaFuncSetAttribute(flash_wg_k<HD, NW, MB, HP, ST>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess) return e;
        attr_set = true;
    }
    constexpr int rows = HP == 1 ? 64 * NW : 64;
    dim3 grid((unsigned)((n_q + rows - 1) / rows), (unsigned)(nh / HP));
    float sl2 = (1.0f / sqrtf((float)HD)) * 1.4426950408889634f;
    flash_wg_k<HD, NW, MB, HP, ST><<<grid, 128 * NW, smem, s>>>((__nv_bfloat16 *)out, ldo, (const __nv_bfloat16 *)q, ldq, qpos, n_q,
                                           (const __nv_bfloat16 *)k, vt, n_pad, kpos, n_kv, tb, nh, nkv, sl2);
    return cudaGetLastError();
}

/* ---------------------------------------------------------------- warp-specialised flash (sm_90a) */

/* mbarrier helpers (CTA scope) */
__device__ __forceinline__ void mbar_init(uint64_t *b, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
/* the arrive happens once every cp.async this thread issued before it has landed */
__device__ __forceinline__ void mbar_arrive_cp_async(uint64_t *b) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t *b, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(smem_u32(b)), "r"(parity)
                     : "memory");
    } while (!done);
}
__device__ __forceinline__ void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void named_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }

template <int HD, int NC, int BN>
constexpr int ws_smem() {
    return (NC * 64 * HD + 2 * BN * HD + 2 * HD * BN) * 2 + 1024; /* + alignment slack */
}

template <int BN>
__device__ __forceinline__ void wgmma_ss_bn(float *d, uint64_t da, uint64_t db, int scale_d) {
#ifdef KVL_HAVE_WGMMA
    if constexpr (BN == 128) wgmma_ss_n128(d, da, db, scale_d);
    else wgmma_ss_n64(d, da, db, scale_d);
#endif
}

/* One producer warpgroup and NC consumer warpgroups (64 queries each) per block of one head; the
 * producer copies K and V^T tiles of BN keys with cp.async into two stages each and signals
 * "full" mbarriers as they land; consumers compute S = Q K^T and O += P V on wgmma and release a K
 * stage once its QK is done and a V stage once its PV is done ("empty" mbarriers), so no block-wide
 * barrier holds the warpgroups in step: one warpgroup's softmax runs while the other's tensor-core
 * work does. PP = 1: the consumers take turns issuing their tensor-core work (named barriers), which
 * forces that overlap. The producer gives its registers to the consumers (setmaxnreg). tb: per-64-key
 * position bounds (tile_bounds_k). Masking by position as flash_wg_k. */
template <int HD, int NC, int BN, int PP>
__global__ void __launch_bounds__(128 * (NC + 1), 1) flash_ws_k(__nv_bfloat16 *out, int64_t ldo, const __nv_bfloat16 *q,
                                                          int64_t ldq, const int32_t *qpos, int64_t n_q,
                                                          const __nv_bfloat16 *k, const __nv_bfloat16 *vt, int64_t n_pad,
                                                          const int32_t *kpos, int64_t n_kv, const int2 *tb, int nh,
                                                          int nkv, float sl2) {
#ifdef KVL_HAVE_WGMMA
    static_assert((NC == 2 && BN == 128) || (NC == 3 && BN == 64), "shapes with a register split below");
    static_assert(!PP || NC == 2, "ping-pong between two consumers");
    /* registers a thread: producer + NC consumers within the SM's 64K (2 x 224 needs the producer
     * at 56: at 24 it spills) */
    constexpr int PREG = 56, CREG = NC == 2 ? 224 : 152, TR = BN / 64;
    static_assert(PREG + NC * CREG <= 512, "register budget");
    constexpr int NS = BN / 2, NO = HD / 2, BM = 64 * NC;
    extern __shared__ __align__(128) unsigned char smem_ws[];
    unsigned char *sQ = smem_ws + ((1024 - (smem_u32(smem_ws) & 1023)) & 1023);
    unsigned char *sK = sQ + NC * 64 * HD * 2;   /* [2][BN x HD] */
    unsigned char *sV = sK + 2 * BN * HD * 2;   /* [2][HD x BN] (V^T) */
    __shared__ __align__(8) uint64_t fullK[2], fullV[2], emptyK[2], emptyV[2];
    __shared__ int s_min[4 * (NC + 1)], s_max[4 * (NC + 1)];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = tid / 128;
    const int64_t q0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * BM;
    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int64_t kvld = (int64_t)nkv * HD;
    const int64_t n_tiles = (n_kv + BN - 1) / BN, n_t64 = (n_kv + 63) / 64;

    if (tid == 0) {
        for (int i = 0; i < 2; i++) {
            mbar_init(&fullK[i], 128);
            mbar_init(&fullV[i], 128);
            mbar_init(&emptyK[i], 4 * NC);
            mbar_init(&emptyV[i], 4 * NC);
        }
    }
    {
        int pmin = INT_MAX, pmax = INT_MIN;
        /* consumer warpgroup c covers rows 64c..64c+63, two threads a row */
        const int64_t qr = q0 + 64 * (wg - 1) + (tid % 128) / 2;
        if (wg > 0 && qr < n_q) pmin = pmax = qpos[qr];
        for (int off = 16; off > 0; off >>= 1) {
            pmin = min(pmin, __shfl_xor_sync(0xffffffffu, pmin, off));
            pmax = max(pmax, __shfl_xor_sync(0xffffffffu, pmax, off));
        }
        if (lane == 0) { s_min[warp] = pmin; s_max[warp] = pmax; }
    }
    __syncthreads();
    int qmax = INT_MIN;
#pragma unroll
    for (int w = 4; w < 4 * (NC + 1); w++) qmax = max(qmax, s_max[w]);
    auto tile_lo = [&](int64_t t) { /* smallest key position of tile t (tb: per 64 keys) */
        int lo = tb[TR * t].x;
#pragma unroll
        for (int u = 1; u < TR; u++)
            if (TR * t + u < n_t64) lo = min(lo, tb[TR * t + u].x);
        return lo;
    };
    auto next_tile = [&](int64_t t) {
        while (t < n_tiles && tile_lo(t) > qmax) t++;
        return t;
    };

    if (wg == 0) { /* ------------------------------------------------ producer */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PREG) : "memory");
        /* K (is_v 0) or V^T (1) tile t into stage idx & 1, once the consumers released the tile
         * that stage held (idx - 2); the full barrier flips when every copy has landed */
        auto load = [&](int idx, int64_t t, int is_v) {
            const int st = idx & 1;
            uint64_t *empty = is_v ? emptyV : emptyK, *full = is_v ? fullV : fullK;
            if (idx >= 2) mbar_wait(&empty[st], ((idx >> 1) - 1) & 1);
            const int64_t j0 = t * BN;
            unsigned char *d = (is_v ? sV : sK) + st * BN * HD * 2;
#pragma unroll 4
            for (int c = tid; c < BN * HD / 8; c += 128) {
                if (is_v) {
                    int dd = c / (BN / 8), kc = (c % (BN / 8)) * 8;
                    cp_async16(d + sw_off(dd, kc, HD), vt + ((int64_t)kh * HD + dd) * n_pad + j0 + kc, true);
                } else {
                    int r = c / (HD / 8), col = (c % (HD / 8)) * 8;
                    bool ok = j0 + r < n_kv;
                    cp_async16(d + sw_off(r, col, BN), k + (ok ? (j0 + r) * kvld + (int64_t)kh * HD + col : 0), ok);
                }
            }
            mbar_arrive_cp_async(&full[st]);
        };
        /* order of the consumers' releases: K(i) and V(i-1) free at once, so V(i+1) and K(i+2)
         * follow K0, V0, K1 */
        int64_t tk = qmax == INT_MIN ? n_tiles : next_tile(0), tv = tk;
        int ik = 0, iv = 0;
        if (tk < n_tiles) { load(ik++, tk, 0); tk = next_tile(tk + 1); }
        if (tv < n_tiles) { load(iv++, tv, 1); tv = next_tile(tv + 1); }
        if (tk < n_tiles) { load(ik++, tk, 0); tk = next_tile(tk + 1); }
        while (tv < n_tiles || tk < n_tiles) {
            if (tv < n_tiles) { load(iv++, tv, 1); tv = next_tile(tv + 1); }
            if (tk < n_tiles) { load(ik++, tk, 0); tk = next_tile(tk + 1); }
        }
        cp_wait<0>(); /* nothing in flight when the warp exits */
        return;
    }
    /* ------------------------------------------------------------------- consumers */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CREG) : "memory");
    const int cw = wg - 1, ct = tid - 128 * wg, cwarp = ct / 32;
    unsigned char *myQ = sQ + cw * 64 * HD * 2;
    for (int c = ct; c < 64 * HD / 8; c += 128) {
        int r = c / (HD / 8), col = (c % (HD / 8)) * 8;
        int64_t qr = q0 + cw * 64 + r;
        bool ok = qr < n_q;
        cp_async16(myQ + sw_off(r, col, 64), q + (ok ? qr * ldq + (int64_t)h * HD + col : 0), ok);
    }
    cp_commit();
    int wqmin = INT_MAX;
#pragma unroll
    for (int w = 0; w < 4; w++) wqmin = min(wqmin, s_min[4 + 4 * cw + w]);
    const int r0 = cw * 64 + cwarp * 16 + lane / 4, r1 = r0 + 8, tq = lane % 4;
    const int qp0 = q0 + r0 < n_q ? qpos[q0 + r0] : INT_MIN;
    const int qp1 = q0 + r1 < n_q ? qpos[q0 + r1] : INT_MIN;
    cp_wait<0>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    named_sync(1 + cw, 128);
    const uint32_t aQ = smem_u32(myQ);

    float o[NO], s[NS];
#pragma unroll
    for (int i = 0; i < NO; i++) o[i] = 0.f;
#pragma unroll
    for (int i = 0; i < NS; i++) s[i] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    int64_t t = qmax == INT_MIN ? n_tiles : next_tile(0);
    if (PP && cw == 1) named_arrive(NC + 1, 256); /* consumer 0 issues first */
    if (t < n_tiles) {
        mbar_wait(&fullK[0], 0);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        fence_regs<NS>(s);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        const uint32_t aK = smem_u32(sK);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++)
            wgmma_ss_bn<BN>(s, wg_desc(aQ + wg_kstep(kk, 64)), wg_desc(aK + wg_kstep(kk, BN)), kk > 0);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        fence_regs<NS>(s);
    }
    uint32_t pa[BN / 16][4];
    for (int i = 0; t < n_tiles; i++) {
        const int st = i & 1;
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        fence_regs<NS>(s);
        fence_regs<NO>(o);
        if (lane == 0) { /* QK(i) and PV(i-1) are done: their stages may be refilled */
            mbar_arrive(&emptyK[st]);
            if (i > 0) mbar_arrive(&emptyV[st ^ 1]);
        }
        const int64_t tn = next_tile(t + 1);
        const int64_t j0 = t * BN;
        int thi = tb[TR * t].y;
#pragma unroll
        for (int u = 1; u < TR; u++)
            if (TR * t + u < n_t64) thi = max(thi, tb[TR * t + u].y);
        if (thi > wqmin || n_kv - j0 < BN) {
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
                const int64_t j = j0 + n * 8 + 2 * tq;
                const int kp0 = j < n_kv ? kpos[j] : INT_MAX, kp1 = j + 1 < n_kv ? kpos[j + 1] : INT_MAX;
                if (kp0 > qp0) s[4 * n + 0] = -INFINITY;
                if (kp1 > qp0) s[4 * n + 1] = -INFINITY;
                if (kp0 > qp1) s[4 * n + 2] = -INFINITY;
                if (kp1 > qp1) s[4 * n + 3] = -INFINITY;
            }
        }
        softmax_tile<BN, HD>(s, o, m0, m1, l0, l1, sl2, pa);
        mbar_wait(&fullV[st], (i >> 1) & 1);
        if (tn < n_tiles) mbar_wait(&fullK[st ^ 1], ((i + 1) >> 1) & 1);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        if (PP) named_sync(NC + 1 + cw, 256); /* my turn on the tensor cores */
        fence_regs<NS>(s);
        fence_regs<NO>(o);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        const uint32_t aV = smem_u32(sV + st * HD * BN * 2);
        pv_issue<BN, HD>(o, pa, aV);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        if (tn < n_tiles) {
            const uint32_t aK = smem_u32(sK + (st ^ 1) * BN * HD * 2);
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++)
                wgmma_ss_bn<BN>(s, wg_desc(aQ + wg_kstep(kk, 64)), wg_desc(aK + wg_kstep(kk, BN)), kk > 0);
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        }
        if (PP) named_arrive(NC + 1 + (cw ^ 1), 256); /* the other consumer's turn */
        fence_regs<NS>(s);
        fence_regs<NO>(o);
        t = tn;
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fence_regs<NO>(o);
    store_rows<HD>(out, ldo, o, l0, l1, q0 + r0, q0 + r1, n_q, h, tq);
#else
    __trap();
#endif
}

template <int HD, int NC, int BN, int PP>
cudaError_t launch_flash_ws(void *out, int64_t ldo, const void *q, int64_t ldq, const int32_t *qpos, int64_t n_q,
                            const void *k, const void *v, const int32_t *kpos, int64_t n_kv, int nh, int nkv, void *ws,
                            cudaStream_t s) {
    const int64_t n_pad = (n_kv + BN - 1) / BN * BN;
    int2 *tb = NULL;
    __nv_bfloat16 *vt = prep_tiles(ws, kpos, v, n_kv, n_pad, nkv, HD, &tb, s);
    constexpr int smem = ws_smem<HD, NC, BN>();
    static bool attr_set = false;
    if (!attr_set) {
        cudaError_t e = cudaFuncSetAttribute(flash_ws_k<HD, NC, BN, PP>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess) return e;
        attr_set = true;
    }
    dim3 grid((unsigned)((n_q + 64 * NC - 1) / (64 * NC)), (unsigned)nh);
    float sl2 = (1.0f / sqrtf((float)HD)) * 1.4426950408889634f;
    flash_ws_k<HD, NC, BN, PP><<<grid, 128 * (NC + 1), smem, s>>>((__nv_bfloat16 *)out, ldo, (const __nv_bfloat16 *)q, ldq,
                                                              qpos, n_q, (const __nv_bfloat16 *)k, vt, n_pad, kpos, n_kv,
                                                              tb, nh, nkv, sl2);
    return cudaGetLastError();
}

int gen_splits(int64_t n_q, int64_t n_kv, int nh) {
    /* enough blocks to fill the GPU (~4 waves of 132 SMs x 8 blocks), at least GEN_CHUNK keys each */
    int64_t want = (132 * 8 * 4 + n_q * nh - 1) / (n_q * nh);
    int64_t maxs = (n_kv + GEN_CHUNK - 1) / GEN_CHUNK;
    if (want > maxs) want = maxs;
    if (want > GEN_MAX_SPLIT) want = GEN_MAX_SPLIT;
    return want < 1 ? 1 : (int)want;
}

} // namespace

extern "C" {

size_t kvl_cu_attention_ws(int64_t n_q, int64_t n_kv, int nh, int nkv, int hd) {
    /* a bound for every n_q' <= n_q: gen_splits keeps n_q' * nh * splits below both terms */
    size_t parts = (size_t)n_q * nh + 132 * 8 * 4, cap = (size_t)n_q * nh * GEN_MAX_SPLIT;
    if (parts > cap) parts = cap;
    size_t gen = parts * ((size_t)hd + 2) * sizeof(float);
    size_t n_t = (size_t)((n_kv + FBN - 1) / FBN), n_t2 = (n_t + 1) & ~(size_t)1; /* V^T: whole 128-key tiles */
    size_t fl = ((n_t * sizeof(int2) + 255) & ~(size_t)255) + n_t2 * FBN * (size_t)hd * 2 * (size_t)nkv; /* + V^T */
    return (gen > fl ? gen : fl) + 256;
}

cudaError_t kvl_cu_attention(void *out, int64_t ldo, const void *q, int64_t ldq, kvl_cu_dtype qo_t,
                             const int32_t *qpos, int64_t n_q, const void *k, const void *v, kvl_cu_dtype kv_t,
                             const int32_t *kpos, int64_t n_kv, int nh, int nkv, int hd, void *ws, int mode,
                             cudaStream_t s) {
    if (n_q <= 0) return cudaSuccess;
    if (hd > 1024 || nh % nkv || n_kv <= 0) return cudaErrorInvalidValue;
    if (mode != KVL_CU_ATT_GENERIC && qo_t == KVL_CU_BF16 && kv_t == KVL_CU_BF16 && n_q >= 16 && (ldq % 8) == 0 &&
        (ldo % 2) == 0 && (hd == 64 || hd == 128)) {
        if (mode == KVL_CU_ATT_MMA) {
            if (hd == 128) return launch_flash<128>(out, ldo, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, ws, s);
            return launch_flash<64>(out, ldo, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, ws, s);
        }
#define KVL_WG(NW, MB, HP, ST)                                                                              \
    return hd == 128 ? launch_flash_wg<128, NW, MB, HP, ST>(out, ldo, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, ws, s) \
                     : launch_flash_wg<64, NW, MB, HP, ST>(out, ldo, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, ws, s)
        if (mode == KVL_CU_ATT_WG1) KVL_WG(1, 2, 1, 2);
        if (mode == KVL_CU_ATT_WG2R) KVL_WG(2, 1, 1, 2);
        if (mode == KVL_CU_ATT_WG2H && (nh / nkv) % 2 == 0) KVL_WG(2, 2, 2, 2);
        if (mode == KVL_CU_ATT_WG3) KVL_WG(3, 1, 1, 2);
        if (mode == KVL_CU_ATT_WG4) KVL_WG(4, 1, 1, 2);
        if (mode == KVL_CU_ATT_WG4S3) KVL_WG(4, 1, 1, 3);
        if (mode == KVL_CU_ATT_WG2) KVL_WG(2, 2, 1, 2);
        if (mode == KVL_CU_ATT_WS && hd == 128) return launch_flash_ws<128, 2, 128, 0>(out, ldo, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, ws, s);
        if (mode == KVL_CU_ATT_WSPP && hd == 128) return launch_flash_ws<128, 2, 128, 1>(out, ldo, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, ws, s);
        if (mode == KVL_CU_ATT_WS3 && hd == 128) return launch_flash_ws<128, 3, 64, 0>(out, ldo, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, ws, s);
        /* default: 256 queries a block where that still gives two waves of blocks (long prefills),
         * else (short query sets: selective recompute) the warp-specialised kernel for head_dim 128
         * (10% faster there), 128 queries a block and two blocks an SM for head_dim 64 */
        if ((n_q + 255) / 256 * nh >= 2 * 132) KVL_WG(4, 1, 1, 2);
        if (hd == 128) return launch_flash_ws<128, 2, 128, 0>(out, ldo, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, ws, s);
        KVL_WG(2, 2, 1, 2);
#undef KVL_WG
    }
    int sp = gen_splits(n_q, n_kv, nh);
    int64_t per = (n_kv + sp - 1) / sp;
    float *wo = (float *)ws, *wml = wo + (size_t)n_q * nh * sp * hd;
    dim3 grid((unsigned)(n_q * sp), (unsigned)nh);
    generic_k<<<grid, GEN_THREADS, 0, s>>>(out, ldo, q, ldq, qo_t, qpos, k, v, kv_t, kpos, n_kv, nh, nkv, hd, sp, per,
                                           wo, wml);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || sp == 1) return e;
    combine_k<<<dim3((unsigned)n_q, (unsigned)nh), hd < 128 ? 32 : 128, 0, s>>>(out, ldo, qo_t, nh, hd, sp, wo, wml);
    return cudaGetLastError();
}

} // extern "C"
