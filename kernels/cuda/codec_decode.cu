// codec_decode.cu - GPU decoding of KVLC chunks: one thread per rANS sub-stream (kvl_cuda_codec.h).
#include <stdint.h>

#include "kvl_cuda_codec.h"

namespace {

constexpr uint32_t RANS_L = 1u << 23;

// the CPU's kvl_f32_to_bf16 (round to nearest even, NaN kept quiet), bit for bit
__device__ __forceinline__ uint16_t f32_to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

__device__ __forceinline__ void fail(uint32_t *err, uint32_t i, uint32_t why) {
    atomicMin(&err[0], i);
    err[1] = why;
}

// Values are produced 8 channels at a time so that a full aligned group goes out as one 16-byte
// (bf16) or two 16-byte (f32) stores: neighbouring threads of a warp are neighbouring channel
// groups of one section, so a warp writes whole rows.
template <bool BF16>
__device__ __forceinline__ void store8(uint8_t *row, int32_t c, int n, const float (&v)[8]) {
    if (BF16) {
        uint16_t *o = reinterpret_cast<uint16_t *>(row) + c;
        if (n == 8 && (reinterpret_cast<uintptr_t>(o) & 15) == 0) {
            uint4 w;
            w.x = (uint32_t)f32_to_bf16(v[0]) | ((uint32_t)f32_to_bf16(v[1]) << 16);
            w.y = (uint32_t)f32_to_bf16(v[2]) | ((uint32_t)f32_to_bf16(v[3]) << 16);
            w.z = (uint32_t)f32_to_bf16(v[4]) | ((uint32_t)f32_to_bf16(v[5]) << 16);
            w.w = (uint32_t)f32_to_bf16(v[6]) | ((uint32_t)f32_to_bf16(v[7]) << 16);
            *reinterpret_cast<uint4 *>(o) = w;
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++)
                if (k < n) o[k] = f32_to_bf16(v[k]);
        }
    } else {
        float *o = reinterpret_cast<float *>(row) + c;
        if (n == 8 && (reinterpret_cast<uintptr_t>(o) & 15) == 0) {
            reinterpret_cast<float4 *>(o)[0] = make_float4(v[0], v[1], v[2], v[3]);
            reinterpret_cast<float4 *>(o)[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++)
                if (k < n) o[k] = v[k];
        }
    }
}

// Channels [c, c + n) of token row t of a section: to the output, or (keys rotated back by the
// encoder) float32 into the rotation scratch, which the rotation pass then stores.
template <bool BF16>
__device__ __forceinline__ void emit8(const kvl_cu_codec_args &a, const kvl_codec_plan_section &se, uint8_t *row, int32_t t,
                                      int32_t c, int n, const float (&v)[8]) {
    if (se.rot) {
        float *r = a.rot + se.rot_off + (size_t)t * se.C + c;
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (k < n) r[k] = v[k];
    } else {
        store8<BF16>(row, c, n, v);
    }
}

// Decodes one symbol with table tb (the CPU decoder's rANS step); returns the symbol index, or -1
// when the stream runs out of bytes.
__device__ __forceinline__ int32_t rans_step(const kvl_cu_codec_args &a, const kvl_codec_plan_table &tb, uint32_t &x,
                                             const uint8_t *&sp, const uint8_t *se_end) {
    const uint32_t slot = x & ((1u << tb.pb) - 1);
    int32_t s;
    uint32_t start, hi;
    if (tb.src) { // compact profile table (pb 16, every frequency >= 1)
        const uint16_t *cum = a.pcum[tb.src] + tb.cum_off;
        s = __ldg(a.plut[tb.src] + (tb.lut_off >> 2) + (slot >> (16 - KVL_CU_PLUT_BITS)));
        hi = __ldg(cum + s + 1);
        hi = hi ? hi : 65536u;
        while (hi <= slot) {
            hi = __ldg(cum + ++s + 1);
            hi = hi ? hi : 65536u;
        }
        start = __ldg(cum + s);
    } else {
        const uint32_t *cum = a.cum + tb.cum_off;
        s = __ldg(a.lut + tb.lut_off + (slot >> (tb.pb - 8)));
        hi = __ldg(cum + s + 1);
        while (hi <= slot) hi = __ldg(cum + ++s + 1);
        start = __ldg(cum + s);
    }
    x = (hi - start) * (x >> tb.pb) + slot - start;
    while (x < RANS_L) {
        if (sp >= se_end) return -1;
        x = (x << 8) | *sp++;
    }
    return s;
}

// A block whose streams all belong to one section with one chunk table (table_mode 1, no deltas,
// pb <= 12) decodes through a full slot -> symbol table in shared memory: one lookup and the two
// cumulative frequencies per symbol, no search loop (the loop's divergence and its dependent
// global loads were most of a symbol's latency). Same symbols as the search, bit for bit.
constexpr int SM_PB = 12;
struct smem_tab {
    uint16_t sym[1 << SM_PB];
    uint32_t cum[1 << SM_PB | 2]; // cum[s] for s <= the largest symbol + 1
    int use, max_s;
};

__device__ __forceinline__ int32_t rans_step_smem(const smem_tab &t, uint32_t pb, uint32_t &x, const uint8_t *&sp,
                                                  const uint8_t *se_end) {
    const uint32_t slot = x & ((1u << pb) - 1);
    const int32_t s = t.sym[slot];
    const uint32_t start = t.cum[s], hi = t.cum[s + 1];
    x = (hi - start) * (x >> pb) + slot - start;
    while (x < RANS_L) {
        if (sp >= se_end) return -1;
        x = (x << 8) | *sp++;
    }
    return s;
}

// Streams of at most 8 channels without deltas (chan_group <= 8): the thread's table descriptors
// and per-channel scales are loaded once into registers instead of once per symbol, so a symbol's
// dependent chain is only lookup -> cumulative frequency -> state. Same arithmetic as the general
// path below, bit for bit.
template <bool BF16>
__device__ __forceinline__ void decode_narrow(const kvl_cu_codec_args &a, uint32_t i, const kvl_codec_plan_stream &st,
                                              const kvl_codec_plan_section &se, const smem_tab *stab) {
    const uint8_t *sp = a.bytes + st.byte_off, *se_end = sp + st.len;
    uint32_t x = (uint32_t)sp[0] | ((uint32_t)sp[1] << 8) | ((uint32_t)sp[2] << 16) | ((uint32_t)sp[3] << 24);
    sp += 4;
    const kvl_codec_plan_table *tabs = a.tables + se.tab_base;
    const float *sc = a.scales + se.scale_base;
    const int32_t c0 = st.c0, n = st.c1 - st.c0, C = se.C, sm = se.sm;
    kvl_codec_plan_table tb[8];
    float scl[8], off[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        scl[k] = 0.0f;
        off[k] = 0.0f;
        tb[k] = tabs[0];
        if (k < n) {
            const int32_t c = c0 + k;
            tb[k] = tabs[se.ctx_mode == 1 ? 0 : c];
            if (tb[k].cum_off == KVL_CODEC_PLAN_EMPTY) { // every token row decodes every channel
                if (se.T > 0) {
                    fail(a.err, i, KVL_CU_DEC_EMPTY_CTX);
                    return;
                }
            }
            if (sm == 3) {
                scl[k] = sc[c];
                off[k] = (float)(int32_t)sc[C + c];
            } else if (sm == 1) {
                scl[k] = sc[c];
            } else if (sm == 2) {
                scl[k] = sc[0];
            }
        }
    }
    const size_t esz = BF16 ? 2 : 4;
    for (int32_t t = 0; t < se.T; t++) {
        uint8_t *row = reinterpret_cast<uint8_t *>(se.out) + (size_t)((int64_t)t * se.ld) * esz;
        const float tsc = sm == 0 ? sc[t] : 0.0f;
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            v[k] = 0.0f;
            if (k < n) {
                const int32_t s = stab ? rans_step_smem(*stab, (uint32_t)tb[k].pb, x, sp, se_end) : rans_step(a, tb[k], x, sp, se_end);
                if (s < 0) {
                    fail(a.err, i, KVL_CU_DEC_SHORT);
                    return;
                }
                const int32_t q = s - tb[k].amax;
                // one multiply, no FMA, as the CPU decoder; (float)(q + offset) is exact as there
                if (sm == 3) v[k] = __fmul_rn((float)q + off[k], scl[k]);
                else v[k] = __fmul_rn((float)q, sm == 0 ? tsc : scl[k]);
            }
        }
        emit8<BF16>(a, se, row, t, c0, n, v);
    }
    if (x != RANS_L || sp != se_end) fail(a.err, i, KVL_CU_DEC_STATE);
}

template <bool BF16>
__global__ void __launch_bounds__(128) decode_kernel(const kvl_cu_codec_args a) {
    __shared__ smem_tab stab;
    uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    const uint32_t i0 = blockIdx.x * blockDim.x, i1 = min(i0 + blockDim.x, a.n_streams) - 1;
    const uint32_t sec0 = a.streams[i0].sec;
    const kvl_codec_plan_section s0 = a.sections[sec0];
    const kvl_codec_plan_table t0 = a.tables[s0.tab_base];
    // block-uniform: every thread reads the same values
    const bool use = a.streams[i1].sec == sec0 && s0.ctx_mode == 1 && s0.delta_group <= 1 &&
                     t0.src == 0 && t0.cum_off != KVL_CODEC_PLAN_EMPTY && t0.pb <= SM_PB &&
                     a.streams[i0].c1 - a.streams[i0].c0 <= 8;
    if (use) {
        if (threadIdx.x == 0) stab.max_s = 0;
        __syncthreads();
        const uint32_t *cum = a.cum + t0.cum_off;
        int my_max = 0;
        for (uint32_t slot = threadIdx.x; slot < (1u << t0.pb); slot += blockDim.x) {
            int32_t sy = __ldg(a.lut + t0.lut_off + (slot >> (t0.pb - 8)));
            while (__ldg(cum + sy + 1) <= slot) sy++;
            stab.sym[slot] = (uint16_t)sy;
            my_max = max(my_max, sy);
        }
        atomicMax(&stab.max_s, my_max);
        __syncthreads();
        for (int32_t k = threadIdx.x; k <= stab.max_s + 1 && k < (1 << SM_PB | 2); k += blockDim.x) stab.cum[k] = __ldg(cum + k);
        __syncthreads();
    }
    if (i >= a.n_streams) return;
    const kvl_codec_plan_stream st = a.streams[i];
    const kvl_codec_plan_section se = a.sections[st.sec];
    if (se.delta_group <= 1 && st.c1 - st.c0 <= 8) {
        decode_narrow<BF16>(a, i, st, se, use ? &stab : nullptr);
        return;
    }
    const uint8_t *sp = a.bytes + st.byte_off, *se_end = sp + st.len; // len >= 4: checked on the host
    uint32_t x = (uint32_t)sp[0] | ((uint32_t)sp[1] << 8) | ((uint32_t)sp[2] << 16) | ((uint32_t)sp[3] << 24);
    sp += 4;
    const int hasd = se.delta_group > 1;
    const kvl_codec_plan_table *tabs = a.tables + se.tab_base;
    const float *sc = a.scales + se.scale_base;
    int16_t *anc = a.anchor + st.anchor_off;
    const int32_t c0 = st.c0, c1 = st.c1, C = se.C, Q = se.Q, sm = se.sm;
    const size_t esz = BF16 ? 2 : 4;
    for (int32_t t = 0; t < se.T; t++) {
        const int isd = hasd && (t % se.delta_group) != 0;
        uint8_t *row = reinterpret_cast<uint8_t *>(se.out) + (size_t)((int64_t)t * se.ld) * esz;
        const float tsc = sm == 0 ? sc[t] : sm == 2 ? sc[0] : 0.0f;
        for (int32_t cb = c0; cb < c1; cb += 8) {
            const int n = c1 - cb < 8 ? c1 - cb : 8;
            float v[8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                v[k] = 0.0f;
                if (k < n) {
                    const int32_t c = cb + k;
                    const kvl_codec_plan_table tb = tabs[se.ctx_mode == 1 ? isd : c * (1 + hasd) + isd];
                    if (tb.cum_off == KVL_CODEC_PLAN_EMPTY) {
                        fail(a.err, i, KVL_CU_DEC_EMPTY_CTX);
                        return;
                    }
                    const int32_t s = rans_step(a, tb, x, sp, se_end);
                    if (s < 0) {
                        fail(a.err, i, KVL_CU_DEC_SHORT);
                        return;
                    }
                    int32_t q = s - tb.amax;
                    if (isd) {
                        q += anc[c - c0];
                        if (q < -Q || q > Q) {
                            fail(a.err, i, KVL_CU_DEC_DELTA);
                            return;
                        }
                    } else if (hasd) {
                        anc[c - c0] = (int16_t)q;
                    }
                    // one multiply, no FMA, as the CPU decoder
                    if (sm == 3) v[k] = __fmul_rn((float)(q + (int32_t)sc[C + c]), sc[c]);
                    else v[k] = __fmul_rn((float)q, sm == 1 ? sc[c] : tsc);
                }
            }
            emit8<BF16>(a, se, row, t, cb, n, v);
        }
    }
    if (x != RANS_L || sp != se_end) fail(a.err, i, KVL_CU_DEC_STATE);
}

// Forward RoPE rotation of a decoded key section (docs/codec-format.md, "Key rotation"): every
// product and the sum/difference rounded on their own (no FMA), as the CPU decoder does.
// blockIdx.x: section; blockIdx.y and the threads stride over its (token, head, pair) triples.
template <bool BF16>
__global__ void __launch_bounds__(128) rotate_kernel(const kvl_cu_codec_args a) {
    const kvl_codec_plan_section se = a.sections[blockIdx.x];
    if (!se.rot) return;
    const int32_t D = se.D, half = D / 2, H = se.C / D, T = se.T;
    const int64_t total = (int64_t)T * H * half;
    const float *y = a.rot + se.rot_off, *cs = a.rope + se.rope_off, *sn = cs + (size_t)T * half;
    const size_t esz = BF16 ? 2 : 4;
    for (int64_t k = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.y * blockDim.x) {
        const int32_t i = (int32_t)(k % half), h = (int32_t)((k / half) % H), t = (int32_t)(k / ((int64_t)half * H));
        const int32_t ca = h * D + (se.rot == 2 ? 2 * i : i), cb = h * D + (se.rot == 2 ? 2 * i + 1 : i + half);
        const float ya = y[(size_t)t * se.C + ca], yb = y[(size_t)t * se.C + cb];
        const float c = __ldg(cs + (size_t)t * half + i), s = __ldg(sn + (size_t)t * half + i);
        const float oa = __fsub_rn(__fmul_rn(ya, c), __fmul_rn(yb, s));
        const float ob = __fadd_rn(__fmul_rn(ya, s), __fmul_rn(yb, c));
        uint8_t *row = reinterpret_cast<uint8_t *>(se.out) + (size_t)((int64_t)t * se.ld) * esz;
        if (BF16) {
            reinterpret_cast<uint16_t *>(row)[ca] = f32_to_bf16(oa);
            reinterpret_cast<uint16_t *>(row)[cb] = f32_to_bf16(ob);
        } else {
            reinterpret_cast<float *>(row)[ca] = oa;
            reinterpret_cast<float *>(row)[cb] = ob;
        }
    }
}

} // namespace

extern "C" cudaError_t kvl_cu_codec_decode(const kvl_cu_codec_args *a, kvl_cu_dtype out_t, cudaStream_t stream) {
    if (a->n_streams == 0) return cudaSuccess;
    const unsigned block = 128, grid = (a->n_streams + block - 1) / block;
    if (out_t == KVL_CU_BF16) decode_kernel<true><<<grid, block, 0, stream>>>(*a);
    else decode_kernel<false><<<grid, block, 0, stream>>>(*a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || !a->rot || a->n_sections == 0) return e;
    const dim3 rgrid(a->n_sections, 16);
    if (out_t == KVL_CU_BF16) rotate_kernel<true><<<rgrid, block, 0, stream>>>(*a);
    else rotate_kernel<false><<<rgrid, block, 0, stream>>>(*a);
    return cudaGetLastError();
}

extern "C" void kvl_cu_codec_compact_profile(const uint32_t *cum, size_t n_cum, const uint16_t *lut, size_t n_lut,
                                             uint16_t *cum16, uint16_t *lut64) {
    for (size_t i = 0; i < n_cum; i++) cum16[i] = (uint16_t)cum[i];
    for (size_t k = 0; k < n_lut / 256; k++)
        for (size_t j = 0; j < 64; j++) lut64[k * 64 + j] = lut[k * 256 + j * 4];
}
