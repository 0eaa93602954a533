/* Element-wise and row kernels of the CUDA backend (see kvl_cuda.h for the contracts). Each mirrors
 * its float32 reference in kernels/cpu/ops.c operation for operation where that matters for
 * exactness (RMS sums and RoPE angles in float64, the same multiplication order). */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "kvl_cuda.h"
#include "kvl_synth.h"

namespace {

__device__ __forceinline__ float ld(const void *p, kvl_cu_dtype t, int64_t i) {
    return t == KVL_CU_BF16 ? __bfloat162float(((const __nv_bfloat16 *)p)[i]) : ((const float *)p)[i];
}

__device__ __forceinline__ void st(void *p, kvl_cu_dtype t, int64_t i, float v) {
    if (t == KVL_CU_BF16)
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else
        ((float *)p)[i] = v;
}

/* grid.x blocks cover rows; more rows than blocks are strided */
inline unsigned grid_rows(int64_t n) { return (unsigned)(n < 65536 * 16 ? (n > 0 ? n : 1) : 65536 * 16); }

__global__ void synth_fill_k(void *dst, kvl_cu_dtype dt, uint64_t seed, uint32_t tensor, size_t count, int is_norm,
                             float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        st(dst, dt, (int64_t)i, kvl_synth_weight(seed, tensor, i, is_norm, scale));
}

__global__ void convert_k(void *dst, kvl_cu_dtype dt, const void *src, kvl_cu_dtype stp, size_t count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        st(dst, dt, (int64_t)i, ld(src, stp, (int64_t)i));
}

__global__ void copy_rows_k(void *dst, kvl_cu_dtype dt, int64_t ldd, const int32_t *didx, const void *src,
                            kvl_cu_dtype stp, int64_t lds, const int32_t *sidx, int64_t n, int64_t cols) {
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        int64_t dr = didx ? didx[i] : i, sr = sidx ? sidx[i] : i;
        if (dt == stp && dt == KVL_CU_BF16 && ((ldd | lds | cols) & 7) == 0) {
            /* 16-byte moves for the common bf16 -> bf16 case */
            const uint4 *s = (const uint4 *)((const __nv_bfloat16 *)src + sr * lds);
            uint4 *d = (uint4 *)((__nv_bfloat16 *)dst + dr * ldd);
            for (int64_t c = threadIdx.x; c < cols / 8; c += blockDim.x) d[c] = s[c];
        } else if (dt == stp && dt == KVL_CU_F32 && ((ldd | lds | cols) & 3) == 0) {
            const float4 *s = (const float4 *)((const float *)src + sr * lds);
            float4 *d = (float4 *)((float *)dst + dr * ldd);
            for (int64_t c = threadIdx.x; c < cols / 4; c += blockDim.x) d[c] = s[c];
        } else {
            for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) st(dst, dt, dr * ldd + c, ld(src, stp, sr * lds + c));
        }
    }
}

template <typename T>
__device__ T block_sum(T v, T *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x / 32, l = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    T s = 0;
    for (int i = 0; i < nw; i++) s += sh[i];
    return s;
}

__global__ void add_rmsnorm_k(void *y, kvl_cu_dtype yt, float *x, const int32_t *rows, const void *add,
                              kvl_cu_dtype at, const float *g, int64_t n, int64_t dim, float eps) {
    __shared__ double sh[32];
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        float *xr = x + (rows ? rows[i] : i) * dim;
        double ss = 0;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
            float v = xr[c];
            if (add) {
                v += ld(add, at, i * dim + c);
                xr[c] = v;
            }
            ss += (double)v * v;
        }
        if (!y) continue;
        ss = block_sum(ss, sh);
        float inv = (float)(1.0 / sqrt(ss / (double)dim + (double)eps));
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) st(y, yt, i * dim + c, xr[c] * inv * g[c]);
    }
}

/* the same with 4 consecutive floats a thread kept in registers between the two passes: dim a
 * multiple of 4, at most 4 * VPT * blockDim; 16-byte loads of x (and of an f32 addend), 8-byte
 * loads of a bf16 addend, 8- or 16-byte stores of y */
template <int VPT>
__global__ void add_rmsnorm_v4_k(void *y, kvl_cu_dtype yt, float *x, const int32_t *rows, const void *add,
                                 kvl_cu_dtype at, const float *g, int64_t n, int64_t dim, float eps) {
    __shared__ double sh[32];
    const int64_t d4 = dim / 4;
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        float4 *xr = (float4 *)(x + (rows ? rows[i] : i) * dim);
        float4 v[VPT];
        double ss = 0;
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            const int64_t c = threadIdx.x + (int64_t)k * blockDim.x;
            if (c >= d4) break;
            float4 a = xr[c];
            if (add) {
                if (at == KVL_CU_BF16) {
                    uint2 b = ((const uint2 *)add)[i * d4 + c];
                    float2 lo = __bfloat1622float2(*(const __nv_bfloat162 *)&b.x),
                           hi = __bfloat1622float2(*(const __nv_bfloat162 *)&b.y);
                    a.x += lo.x; a.y += lo.y; a.z += hi.x; a.w += hi.y;
                } else {
                    float4 b = ((const float4 *)add)[i * d4 + c];
                    a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
                }
                xr[c] = a;
            }
            v[k] = a;
            ss += (double)a.x * a.x + (double)a.y * a.y + (double)a.z * a.z + (double)a.w * a.w;
        }
        if (!y) continue;
        ss = block_sum(ss, sh);
        const float inv = (float)(1.0 / sqrt(ss / (double)dim + (double)eps));
        const float4 *g4 = (const float4 *)g;
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            const int64_t c = threadIdx.x + (int64_t)k * blockDim.x;
            if (c >= d4) break;
            const float4 w = g4[c];
            const float o0 = v[k].x * inv * w.x, o1 = v[k].y * inv * w.y, o2 = v[k].z * inv * w.z, o3 = v[k].w * inv * w.w;
            if (yt == KVL_CU_BF16) {
                __nv_bfloat162 p0 = __floats2bfloat162_rn(o0, o1), p1 = __floats2bfloat162_rn(o2, o3);
                uint2 u;
                u.x = *(uint32_t *)&p0;
                u.y = *(uint32_t *)&p1;
                ((uint2 *)y)[i * d4 + c] = u;
            } else {
                ((float4 *)y)[i * d4 + c] = make_float4(o0, o1, o2, o3);
            }
        }
    }
}

/* cos/sin of angle p * theta^(-2j/hd) for j < hd/2, in float64 like kvl_cpu_rope_table */
__device__ void rope_table(float *cs, float *sn, int64_t p, int hd, double theta) {
    for (int j = threadIdx.x; j < hd / 2; j += blockDim.x) {
        double inv = pow(theta, -(double)(2 * j) / (double)hd);
        double a = (double)p * inv;
        cs[j] = (float)cos(a);
        sn[j] = (float)sin(a);
    }
}

__device__ __forceinline__ void rot_pair(int j, int half, int style, int *a, int *b) {
    *a = style == 0 ? j : 2 * j;
    *b = style == 0 ? j + half : 2 * j + 1;
}

__global__ void rope_split_k(void *q, kvl_cu_dtype qt, void *k, void *v, kvl_cu_dtype kvt, const void *qkv,
                             kvl_cu_dtype qkvt, int64_t ldqkv, const int32_t *pos, int64_t n, int nh, int nkv, int hd,
                             int style, double theta) {
    __shared__ float cs[512], sn[512];
    const int half = hd / 2;
    const int64_t qd = (int64_t)nh * hd, kd = (int64_t)nkv * hd;
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        __syncthreads();
        rope_table(cs, sn, pos[i], hd, theta);
        __syncthreads();
        const int64_t r = i * ldqkv;
        for (int64_t e = threadIdx.x; e < (int64_t)(nh + nkv) * half; e += blockDim.x) {
            int h = (int)(e / half), j = (int)(e % half), a, b;
            rot_pair(j, half, style, &a, &b);
            if (h < nh) {
                float x0 = ld(qkv, qkvt, r + (int64_t)h * hd + a), x1 = ld(qkv, qkvt, r + (int64_t)h * hd + b);
                st(q, qt, i * qd + (int64_t)h * hd + a, x0 * cs[j] - x1 * sn[j]);
                st(q, qt, i * qd + (int64_t)h * hd + b, x1 * cs[j] + x0 * sn[j]);
            } else {
                int64_t o = (int64_t)(h - nh) * hd;
                float x0 = ld(qkv, qkvt, r + qd + o + a), x1 = ld(qkv, qkvt, r + qd + o + b);
                st(k, kvt, i * kd + o + a, x0 * cs[j] - x1 * sn[j]);
                st(k, kvt, i * kd + o + b, x1 * cs[j] + x0 * sn[j]);
            }
        }
        for (int64_t c = threadIdx.x; c < kd; c += blockDim.x) st(v, kvt, i * kd + c, ld(qkv, qkvt, r + qd + kd + c));
    }
}

/* Key re-rotation by delta positions of several regions at once (blockIdx.y: region), each with its
 * own offset, rows and delta (one launch per decode step of the load path instead of one per chunk).
 * Every block computes its region's cos/sin table (float64, like the CPU) once and strides over the
 * rows: one block per row spent more time on the table than on the rows. */
__global__ void rerotate_multi_k(void *kp, kvl_cu_dtype t, int64_t nb, int64_t bstride, int64_t row_ld, int nkv, int hd,
                                 int style, double theta, kvl_cu_rerot_regions reg) {
    __shared__ float cs[512], sn[512];
    const int half = hd / 2;
    const int64_t off = reg.off[blockIdx.y], n = reg.n[blockIdx.y];
    rope_table(cs, sn, reg.delta[blockIdx.y], hd, theta);
    __syncthreads();
    for (int64_t r = blockIdx.x; r < nb * n; r += gridDim.x) {
        int64_t base = off + (r / n) * bstride + (r % n) * row_ld;
        for (int e = threadIdx.x; e < nkv * half; e += blockDim.x) {
            int h = e / half, j = e % half, a, b;
            rot_pair(j, half, style, &a, &b);
            int64_t o = base + (int64_t)h * hd;
            float x0 = ld(kp, t, o + a), x1 = ld(kp, t, o + b);
            st(kp, t, o + a, x0 * cs[j] - x1 * sn[j]);
            st(kp, t, o + b, x1 * cs[j] + x0 * sn[j]);
        }
    }
}

__global__ void swiglu_k(void *h, const void *gu, kvl_cu_dtype t, int64_t n, int64_t F) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * F; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = e / F, j = e % F;
        float g = ld(gu, t, i * 2 * F + j), u = ld(gu, t, i * 2 * F + F + j);
        st(h, t, e, g / (1.0f + expf(-g)) * u);
    }
}

/* bf16, F a multiple of 8: 16-byte loads and stores, one row/column split per 8 elements */
__global__ void swiglu_bf16x8_k(__nv_bfloat16 *h, const __nv_bfloat16 *gu, int64_t n, int64_t F) {
    const int64_t F8 = F / 8;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * F8; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / F8, j = (e - i * F8) * 8;
        uint4 gv = *(const uint4 *)(gu + i * 2 * F + j), uv = *(const uint4 *)(gu + i * 2 * F + F + j), hv;
        const __nv_bfloat162 *g2 = (const __nv_bfloat162 *)&gv, *u2 = (const __nv_bfloat162 *)&uv;
        __nv_bfloat162 *h2 = (__nv_bfloat162 *)&hv;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 g = __bfloat1622float2(g2[k]), u = __bfloat1622float2(u2[k]);
            h2[k] = __floats2bfloat162_rn(g.x / (1.0f + expf(-g.x)) * u.x, g.y / (1.0f + expf(-g.y)) * u.y);
        }
        *(uint4 *)(h + i * F + j) = hv;
    }
}

__global__ void deviation_k(float *dev, const void *kn, const void *vn, const void *kc, const void *vc,
                            kvl_cu_dtype t, const int32_t *slots, int64_t n, int64_t kd, int metric) {
    __shared__ double sh[32];
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        double s = 0;
        int64_t cr = (int64_t)slots[i] * kd;
        for (int64_t c = threadIdx.x; c < kd; c += blockDim.x) {
            if (metric & 1) {
                double d = (double)ld(kn, t, i * kd + c) - ld(kc, t, cr + c);
                s += d * d;
            }
            if (metric & 2) {
                double d = (double)ld(vn, t, i * kd + c) - ld(vc, t, cr + c);
                s += d * d;
            }
        }
        s = block_sum(s, sh);
        if (threadIdx.x == 0) dev[i] = (float)s;
    }
}

__global__ void argmax_k(int32_t *out, const float *x, int64_t n, int64_t vocab) {
    __shared__ float sv[32];
    __shared__ int64_t si[32];
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const float *r = x + i * vocab;
        float bv = -INFINITY;
        int64_t bi = -1; /* none yet */
        for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x)
            if (bi < 0 || r[c] > bv) { bv = r[c]; bi = c; }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) { bv = ov; bi = oi; }
        }
        int w = threadIdx.x / 32, l = threadIdx.x % 32;
        __syncthreads();
        if (l == 0) { sv[w] = bv; si[w] = bi; }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int k = 1; k < (int)(blockDim.x / 32); k++)
                if (si[k] >= 0 && (bi < 0 || sv[k] > bv || (sv[k] == bv && si[k] < bi))) { bv = sv[k]; bi = si[k]; }
            out[i] = (int32_t)(bi >= 0 ? bi : 0);
        }
    }
}

} // namespace

extern "C" {

cudaError_t kvl_cu_synth_fill(void *dst, kvl_cu_dtype dt, uint64_t seed, uint32_t tensor, size_t count, int is_norm,
                              float scale, cudaStream_t s) {
    if (!count) return cudaSuccess;
    size_t blocks = (count + 255) / 256;
    synth_fill_k<<<(unsigned)(blocks < 132 * 64 ? blocks : 132 * 64), 256, 0, s>>>(dst, dt, seed, tensor, count, is_norm, scale);
    return cudaGetLastError();
}

cudaError_t kvl_cu_convert(void *dst, kvl_cu_dtype dt, const void *src, kvl_cu_dtype stp, size_t count,
                           cudaStream_t s) {
    if (!count) return cudaSuccess;
    size_t blocks = (count + 255) / 256;
    convert_k<<<(unsigned)(blocks < 132 * 64 ? blocks : 132 * 64), 256, 0, s>>>(dst, dt, src, stp, count);
    return cudaGetLastError();
}

cudaError_t kvl_cu_copy_rows(void *dst, kvl_cu_dtype dt, int64_t ldd, const int32_t *didx, const void *src,
                             kvl_cu_dtype stp, int64_t lds, const int32_t *sidx, int64_t n, int64_t cols,
                             cudaStream_t s) {
    if (n <= 0 || cols <= 0) return cudaSuccess;
    int threads = cols >= 1024 ? 256 : cols >= 256 ? 128 : 32;
    copy_rows_k<<<grid_rows(n), threads, 0, s>>>(dst, dt, ldd, didx, src, stp, lds, sidx, n, cols);
    return cudaGetLastError();
}

cudaError_t kvl_cu_add_rmsnorm(void *y, kvl_cu_dtype yt, float *x, const int32_t *rows, const void *add,
                               kvl_cu_dtype at, const float *g, int64_t n, int64_t dim, float eps, cudaStream_t s) {
    if (n <= 0) return cudaSuccess;
    const int threads = dim >= 2048 ? 512 : 128;
    if (dim % 4 == 0 && dim <= 16 * threads && ((uintptr_t)x & 15) == 0 && (!g || ((uintptr_t)g & 15) == 0) &&
        (!y || ((uintptr_t)y & 15) == 0) && (!add || ((uintptr_t)add & 15) == 0)) {
        const unsigned blocks = (unsigned)(n < 132 * 16 ? n : 132 * 16);
        if (dim <= 8 * threads)
            add_rmsnorm_v4_k<2><<<blocks, threads, 0, s>>>(y, yt, x, rows, add, at, g, n, dim, eps);
        else
            add_rmsnorm_v4_k<4><<<blocks, threads, 0, s>>>(y, yt, x, rows, add, at, g, n, dim, eps);
        return cudaGetLastError();
    }
    add_rmsnorm_k<<<grid_rows(n), threads, 0, s>>>(y, yt, x, rows, add, at, g, n, dim, eps);
    return cudaGetLastError();
}

cudaError_t kvl_cu_rope_split(void *q, kvl_cu_dtype qt, void *k, void *v, kvl_cu_dtype kvt, const void *qkv,
                              kvl_cu_dtype qkvt, int64_t ld, const int32_t *pos, int64_t n, int nh, int nkv, int hd,
                              int style, double theta, cudaStream_t s) {
    if (n <= 0) return cudaSuccess;
    if (hd > 1024 || hd % 2) return cudaErrorInvalidValue;
    rope_split_k<<<grid_rows(n), 256, 0, s>>>(q, qt, k, v, kvt, qkv, qkvt, ld, pos, n, nh, nkv, hd, style, theta);
    return cudaGetLastError();
}

cudaError_t kvl_cu_rerotate(void *k, kvl_cu_dtype t, int64_t nb, int64_t bstride, int64_t n, int64_t row_ld, int nkv,
                            int hd, int style, double theta, int64_t delta, cudaStream_t s) {
    if (n <= 0 || nb <= 0) return cudaSuccess;
    if (n > INT32_MAX || delta > INT32_MAX || delta < INT32_MIN) return cudaErrorInvalidValue;
    kvl_cu_rerot_regions reg;
    reg.off[0] = 0;
    reg.n[0] = (int32_t)n;
    reg.delta[0] = (int32_t)delta;
    reg.count = 1;
    return kvl_cu_rerotate_multi(k, t, nb, bstride, row_ld, nkv, hd, style, theta, &reg, s);
}

cudaError_t kvl_cu_rerotate_multi(void *k, kvl_cu_dtype t, int64_t nb, int64_t bstride, int64_t row_ld, int nkv, int hd,
                                  int style, double theta, const kvl_cu_rerot_regions *reg, cudaStream_t s) {
    if (nb <= 0 || reg->count <= 0) return cudaSuccess;
    if (hd > 1024 || hd % 2 || reg->count > KVL_CU_REROT_MAX) return cudaErrorInvalidValue;
    int64_t most = 0;
    for (int i = 0; i < reg->count; i++) most = reg->n[i] > most ? reg->n[i] : most;
    const int64_t rows = nb * most;
    const dim3 grid((unsigned)(rows < 256 ? (rows > 0 ? rows : 1) : 256), (unsigned)reg->count);
    rerotate_multi_k<<<grid, 128, 0, s>>>(k, t, nb, bstride, row_ld, nkv, hd, style, theta, *reg);
    return cudaGetLastError();
}

cudaError_t kvl_cu_swiglu(void *h, const void *gu, kvl_cu_dtype t, int64_t n, int64_t F, cudaStream_t s) {
    if (n <= 0) return cudaSuccess;
    if (t == KVL_CU_BF16 && F % 8 == 0 && ((uintptr_t)h & 15) == 0 && ((uintptr_t)gu & 15) == 0) {
        int64_t blocks = (n * (F / 8) + 255) / 256;
        swiglu_bf16x8_k<<<(unsigned)(blocks < 132 * 32 ? blocks : 132 * 32), 256, 0, s>>>(
            (__nv_bfloat16 *)h, (const __nv_bfloat16 *)gu, n, F);
        return cudaGetLastError();
    }
    int64_t blocks = (n * F + 255) / 256;
    swiglu_k<<<(unsigned)(blocks < 132 * 128 ? blocks : 132 * 128), 256, 0, s>>>(h, gu, t, n, F);
    return cudaGetLastError();
}

cudaError_t kvl_cu_deviation(float *dev, const void *kn, const void *vn, const void *kc, const void *vc,
                             kvl_cu_dtype t, const int32_t *slots, int64_t n, int64_t kd, int metric, cudaStream_t s) {
    if (n <= 0) return cudaSuccess;
    deviation_k<<<grid_rows(n), 128, 0, s>>>(dev, kn, vn, kc, vc, t, slots, n, kd, metric);
    return cudaGetLastError();
}

cudaError_t kvl_cu_argmax(int32_t *out, const float *logits, int64_t n, int64_t vocab, cudaStream_t s) {
    if (n <= 0) return cudaSuccess;
    argmax_k<<<grid_rows(n), 256, 0, s>>>(out, logits, n, vocab);
    return cudaGetLastError();
}

} // extern "C"
