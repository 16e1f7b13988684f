// Shared helpers for every kernel family. The Rust side pastes this header into each .cu file
// before NVRTC compiles it (NVRTC cannot open it by path). No CUDA headers are needed.
#pragma once

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

// Grid-stride loop over [0, n); 64-bit so the stride never overflows.
#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); i += (long long)blockDim.x * gridDim.x)

#define NEG_INF __int_as_float(0xff800000)

// bfloat16 as its bit pattern, with the conversions written out so that no CUDA header is needed.
// f32_to_bf16 rounds to nearest even and keeps NaN a (quiet) NaN, exactly as half::bf16::from_f32
// does on the CPU side, so the CPU reference and the kernels round alike.
typedef unsigned short bf16;

__device__ __forceinline__ float bf16_to_f32(bf16 v) { return __uint_as_float(((unsigned int)v) << 16); }

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Storage-type helpers: kernel bodies are templates over the activation storage type T (float or
// bf16) and load/store through these, so every value is computed on in f32 and a bf16 output is
// rounded once, when it is stored.
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, long long i, float v) { p[i] = f32_to_bf16(v); }
// ld through the read-only data cache.
__device__ __forceinline__ float ldg(const float* p, long long i) { return __ldg(p + i); }
__device__ __forceinline__ float ldg(const bf16* p, long long i) { return bf16_to_f32(__ldg(p + i)); }

// Per-dimension sizes or strides, passed by value (Rust: [i32; 8]).
struct Dims8 {
    int v[8];
};

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of 32 (at most
// 1024) and every thread must call it. `scratch` is 32 doubles of shared memory; the leading
// barrier makes back-to-back calls with the same scratch safe. Fixed order: deterministic.
__device__ double block_sum_d(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double t = lane < nwarps ? scratch[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

// Keeps the larger value; on equal values the smaller index (the first maximum). A NaN beats every
// number and the later NaN wins, as in PyTorch's max-pool scan. A total order on (value, index), so
// the result does not depend on the merge order.
__device__ __forceinline__ void argmax_merge(float& v, int& i, float ov, int oi) {
    const bool nan = v != v, onan = ov != ov;
    if (onan ? (!nan || oi > i) : (!nan && (ov > v || (ov == v && oi < i)))) {
        v = ov;
        i = oi;
    }
}

// Warp-wide first maximum: every lane ends with the warp's (value, index).
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        argmax_merge(v, i, ov, oi);
    }
}
