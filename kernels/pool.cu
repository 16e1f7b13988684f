// Pooling over NCHW planes (NC = N*C planes of H x W): max pool (pads with -inf, gradient to the
// first maximum), average pool (divisor k*k, padding counted), global average/max pools, and the
// part-level stripe average pool. Backward passes gather per input element, so they need no atomics
// and are deterministic.
//
// Each body is a template over the activation storage type T (float or bf16: f32 arithmetic, one
// rounding per output); the f32 entry point keeps the plain name, the bf16 one adds _bf16.
#include "common.cuh"

// Flat index (within the plane) of the first maximum of output (oh, ow)'s window (the last NaN if
// there is one).
template <typename T>
__device__ __forceinline__ int window_argmax(const T* plane, int H, int W, int oh, int ow, int k, int s, int p) {
    float best = NEG_INF;
    int best_i = -1;
    const int h0 = oh * s - p, w0 = ow * s - p;
    for (int kh = 0; kh < k; ++kh) {
        const int h = h0 + kh;
        if (h < 0 || h >= H) continue;
        for (int kw = 0; kw < k; ++kw) {
            const int w = w0 + kw;
            if (w < 0 || w >= W) continue;
            const float v = ld(plane, h * W + w);
            // PyTorch's scan: a larger value or a NaN takes over (so NaN propagates).
            if (best_i < 0 || v > best || v != v) {
                best = v;
                best_i = h * W + w;
            }
        }
    }
    return best_i;
}

template <typename T>
__device__ __forceinline__ void max_pool2d_forward_impl(const T* x, T* y, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    GRID_STRIDE(i, (long long)NC * OH * OW) {
        const int ow = (int)(i % OW), oh = (int)((i / OW) % OH), plane = (int)(i / ((long long)OH * OW));
        const T* xp = x + (long long)plane * H * W;
        const int a = window_argmax(xp, H, W, oh, ow, k, s, p);
        st(y, i, a < 0 ? NEG_INF : ld(xp, a));
    }
}
extern "C" __global__ void max_pool2d_forward(const float* x, float* y, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    max_pool2d_forward_impl(x, y, NC, H, W, OH, OW, k, s, p);
}
extern "C" __global__ void max_pool2d_forward_bf16(const bf16* x, bf16* y, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    max_pool2d_forward_impl(x, y, NC, H, W, OH, OW, k, s, p);
}

// Range [lo, hi] of output positions along one axis whose window covers input position h.
__device__ __forceinline__ void covering(int h, int k, int s, int p, int out, int& lo, int& hi) {
    const int a = h + p - k + 1;
    lo = a <= 0 ? 0 : (a + s - 1) / s;
    hi = min(out - 1, (h + p) / s);
}

template <typename T>
__device__ __forceinline__ void max_pool2d_backward_impl(const T* dy, const T* x, T* dx, int NC, int H, int W, int OH, int OW, int k,
                                                         int s, int p) {
    GRID_STRIDE(i, (long long)NC * H * W) {
        const int w = (int)(i % W), h = (int)((i / W) % H), plane = (int)(i / ((long long)H * W));
        const T* xp = x + (long long)plane * H * W;
        const T* dyp = dy + (long long)plane * OH * OW;
        int oh0, oh1, ow0, ow1;
        covering(h, k, s, p, OH, oh0, oh1);
        covering(w, k, s, p, OW, ow0, ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh)
            for (int ow = ow0; ow <= ow1; ++ow)
                if (window_argmax(xp, H, W, oh, ow, k, s, p) == h * W + w) g += ld(dyp, oh * OW + ow);
        st(dx, i, g);
    }
}
extern "C" __global__ void max_pool2d_backward(const float* dy, const float* x, float* dx, int NC, int H, int W, int OH, int OW, int k,
                                               int s, int p) {
    max_pool2d_backward_impl(dy, x, dx, NC, H, W, OH, OW, k, s, p);
}
extern "C" __global__ void max_pool2d_backward_bf16(const bf16* dy, const bf16* x, bf16* dx, int NC, int H, int W, int OH, int OW,
                                                    int k, int s, int p) {
    max_pool2d_backward_impl(dy, x, dx, NC, H, W, OH, OW, k, s, p);
}

template <typename T>
__device__ __forceinline__ void avg_pool2d_forward_impl(const T* x, T* y, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    GRID_STRIDE(i, (long long)NC * OH * OW) {
        const int ow = (int)(i % OW), oh = (int)((i / OW) % OH), plane = (int)(i / ((long long)OH * OW));
        const T* xp = x + (long long)plane * H * W;
        float acc = 0.0f;
        for (int kh = 0; kh < k; ++kh) {
            const int h = oh * s - p + kh;
            if (h < 0 || h >= H) continue;
            for (int kw = 0; kw < k; ++kw) {
                const int w = ow * s - p + kw;
                if (w >= 0 && w < W) acc += ld(xp, h * W + w);
            }
        }
        st(y, i, acc / (float)(k * k));
    }
}
extern "C" __global__ void avg_pool2d_forward(const float* x, float* y, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    avg_pool2d_forward_impl(x, y, NC, H, W, OH, OW, k, s, p);
}
extern "C" __global__ void avg_pool2d_forward_bf16(const bf16* x, bf16* y, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    avg_pool2d_forward_impl(x, y, NC, H, W, OH, OW, k, s, p);
}

template <typename T>
__device__ __forceinline__ void avg_pool2d_backward_impl(const T* dy, T* dx, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    GRID_STRIDE(i, (long long)NC * H * W) {
        const int w = (int)(i % W), h = (int)((i / W) % H), plane = (int)(i / ((long long)H * W));
        const T* dyp = dy + (long long)plane * OH * OW;
        int oh0, oh1, ow0, ow1;
        covering(h, k, s, p, OH, oh0, oh1);
        covering(w, k, s, p, OW, ow0, ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh)
            for (int ow = ow0; ow <= ow1; ++ow) g += ld(dyp, oh * OW + ow);
        st(dx, i, g / (float)(k * k));
    }
}
extern "C" __global__ void avg_pool2d_backward(const float* dy, float* dx, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    avg_pool2d_backward_impl(dy, dx, NC, H, W, OH, OW, k, s, p);
}
extern "C" __global__ void avg_pool2d_backward_bf16(const bf16* dy, bf16* dx, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    avg_pool2d_backward_impl(dy, dx, NC, H, W, OH, OW, k, s, p);
}

// One warp per plane; blocks of 256 threads hold 8 planes.
#define PLANE_PER_WARP(plane, n_planes)                           \
    const int plane = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); \
    const int lane = threadIdx.x & 31;                             \
    if (plane >= n_planes) return;

template <typename T>
__device__ __forceinline__ void global_avg_pool_forward_impl(const T* x, T* y, int n_planes, int HW) {
    PLANE_PER_WARP(plane, n_planes)
    const T* xp = x + (long long)plane * HW;
    double s = 0.0;
    for (int j = lane; j < HW; j += 32) s += ld(xp, j);
    s = warp_sum_d(s);
    if (lane == 0) st(y, plane, (float)(s / HW));
}
extern "C" __global__ void global_avg_pool_forward(const float* x, float* y, int n_planes, int HW) {
    global_avg_pool_forward_impl(x, y, n_planes, HW);
}
extern "C" __global__ void global_avg_pool_forward_bf16(const bf16* x, bf16* y, int n_planes, int HW) {
    global_avg_pool_forward_impl(x, y, n_planes, HW);
}

template <typename T>
__device__ __forceinline__ void global_avg_pool_backward_impl(const T* dy, T* dx, int n, int HW) {
    GRID_STRIDE(i, n) st(dx, i, ld(dy, i / HW) / (float)HW);
}
extern "C" __global__ void global_avg_pool_backward(const float* dy, float* dx, int n, int HW) { global_avg_pool_backward_impl(dy, dx, n, HW); }
extern "C" __global__ void global_avg_pool_backward_bf16(const bf16* dy, bf16* dx, int n, int HW) {
    global_avg_pool_backward_impl(dy, dx, n, HW);
}

// First maximum (value, index) of a plane, in every lane of the warp.
template <typename T>
__device__ __forceinline__ void plane_argmax(const T* xp, int HW, int lane, float& v, int& idx) {
    v = NEG_INF;
    idx = 0x7fffffff;
    for (int j = lane; j < HW; j += 32) argmax_merge(v, idx, ld(xp, j), j);
    warp_argmax(v, idx);
}

template <typename T>
__device__ __forceinline__ void global_max_pool_forward_impl(const T* x, T* y, int n_planes, int HW) {
    PLANE_PER_WARP(plane, n_planes)
    float v;
    int idx;
    plane_argmax(x + (long long)plane * HW, HW, lane, v, idx);
    if (lane == 0) st(y, plane, v);
}
extern "C" __global__ void global_max_pool_forward(const float* x, float* y, int n_planes, int HW) {
    global_max_pool_forward_impl(x, y, n_planes, HW);
}
extern "C" __global__ void global_max_pool_forward_bf16(const bf16* x, bf16* y, int n_planes, int HW) {
    global_max_pool_forward_impl(x, y, n_planes, HW);
}

template <typename T>
__device__ __forceinline__ void global_max_pool_backward_impl(const T* dy, const T* x, T* dx, int n_planes, int HW) {
    PLANE_PER_WARP(plane, n_planes)
    float v;
    int idx;
    plane_argmax(x + (long long)plane * HW, HW, lane, v, idx);
    const float g = ld(dy, plane);
    T* dxp = dx + (long long)plane * HW;
    for (int j = lane; j < HW; j += 32) st(dxp, j, j == idx ? g : 0.0f);
}
extern "C" __global__ void global_max_pool_backward(const float* dy, const float* x, float* dx, int n_planes, int HW) {
    global_max_pool_backward_impl(dy, x, dx, n_planes, HW);
}
extern "C" __global__ void global_max_pool_backward_bf16(const bf16* dy, const bf16* x, bf16* dx, int n_planes, int HW) {
    global_max_pool_backward_impl(dy, x, dx, n_planes, HW);
}

// Stripes: y[n, p*C + c] = mean of rows [p*rows, (p+1)*rows) of plane (n, c), rows = H/parts. The
// stripe is contiguous in memory (rows*W values). One warp per output.
template <typename T>
__device__ __forceinline__ void stripe_avg_pool_forward_impl(const T* x, T* y, int N, int C, int H, int W, int parts) {
    const int n_out = N * parts * C;
    PLANE_PER_WARP(o, n_out)
    const int c = o % C, part = (o / C) % parts, n = o / (C * parts), rows = H / parts, len = rows * W;
    const T* xs = x + (((long long)n * C + c) * H + part * rows) * W;
    double s = 0.0;
    for (int j = lane; j < len; j += 32) s += ld(xs, j);
    s = warp_sum_d(s);
    if (lane == 0) st(y, o, (float)(s / len));
}
extern "C" __global__ void stripe_avg_pool_forward(const float* x, float* y, int N, int C, int H, int W, int parts) {
    stripe_avg_pool_forward_impl(x, y, N, C, H, W, parts);
}
extern "C" __global__ void stripe_avg_pool_forward_bf16(const bf16* x, bf16* y, int N, int C, int H, int W, int parts) {
    stripe_avg_pool_forward_impl(x, y, N, C, H, W, parts);
}

template <typename T>
__device__ __forceinline__ void stripe_avg_pool_backward_impl(const T* dy, T* dx, int N, int C, int H, int W, int parts) {
    const int rows = H / parts;
    GRID_STRIDE(i, (long long)N * C * H * W) {
        const int h = (int)((i / W) % H), c = (int)((i / ((long long)H * W)) % C), n = (int)(i / ((long long)C * H * W));
        st(dx, i, ld(dy, ((long long)n * parts + h / rows) * C + c) / (float)(rows * W));
    }
}
extern "C" __global__ void stripe_avg_pool_backward(const float* dy, float* dx, int N, int C, int H, int W, int parts) {
    stripe_avg_pool_backward_impl(dy, dx, N, C, H, W, parts);
}
extern "C" __global__ void stripe_avg_pool_backward_bf16(const bf16* dy, bf16* dx, int N, int C, int H, int W, int parts) {
    stripe_avg_pool_backward_impl(dy, dx, N, C, H, W, parts);
}
