// Pooling over NCHW planes (NC = N*C planes of H x W): max pool (pads with -inf, gradient to the
// first maximum), average pool (divisor k*k, padding counted), global average/max pools, and the
// part-level stripe average pool. Backward passes gather per input element, so they need no atomics
// and are deterministic.
#include "common.cuh"

// Flat index (within the plane) of the first maximum of output (oh, ow)'s window (the last NaN if
// there is one).
__device__ __forceinline__ int window_argmax(const float* plane, int H, int W, int oh, int ow, int k, int s, int p) {
    float best = NEG_INF;
    int best_i = -1;
    const int h0 = oh * s - p, w0 = ow * s - p;
    for (int kh = 0; kh < k; ++kh) {
        const int h = h0 + kh;
        if (h < 0 || h >= H) continue;
        for (int kw = 0; kw < k; ++kw) {
            const int w = w0 + kw;
            if (w < 0 || w >= W) continue;
            const float v = plane[h * W + w];
            // PyTorch's scan: a larger value or a NaN takes over (so NaN propagates).
            if (best_i < 0 || v > best || v != v) {
                best = v;
                best_i = h * W + w;
            }
        }
    }
    return best_i;
}

extern "C" __global__ void max_pool2d_forward(const float* x, float* y, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    GRID_STRIDE(i, (long long)NC * OH * OW) {
        const int ow = (int)(i % OW), oh = (int)((i / OW) % OH), plane = (int)(i / ((long long)OH * OW));
        const float* xp = x + (long long)plane * H * W;
        const int a = window_argmax(xp, H, W, oh, ow, k, s, p);
        y[i] = a < 0 ? NEG_INF : xp[a];
    }
}

// Range [lo, hi] of output positions along one axis whose window covers input position h.
__device__ __forceinline__ void covering(int h, int k, int s, int p, int out, int& lo, int& hi) {
    const int a = h + p - k + 1;
    lo = a <= 0 ? 0 : (a + s - 1) / s;
    hi = min(out - 1, (h + p) / s);
}

extern "C" __global__ void max_pool2d_backward(const float* dy, const float* x, float* dx, int NC, int H, int W, int OH, int OW, int k,
                                               int s, int p) {
    GRID_STRIDE(i, (long long)NC * H * W) {
        const int w = (int)(i % W), h = (int)((i / W) % H), plane = (int)(i / ((long long)H * W));
        const float* xp = x + (long long)plane * H * W;
        const float* dyp = dy + (long long)plane * OH * OW;
        int oh0, oh1, ow0, ow1;
        covering(h, k, s, p, OH, oh0, oh1);
        covering(w, k, s, p, OW, ow0, ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh)
            for (int ow = ow0; ow <= ow1; ++ow)
                if (window_argmax(xp, H, W, oh, ow, k, s, p) == h * W + w) g += dyp[oh * OW + ow];
        dx[i] = g;
    }
}

extern "C" __global__ void avg_pool2d_forward(const float* x, float* y, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    GRID_STRIDE(i, (long long)NC * OH * OW) {
        const int ow = (int)(i % OW), oh = (int)((i / OW) % OH), plane = (int)(i / ((long long)OH * OW));
        const float* xp = x + (long long)plane * H * W;
        float acc = 0.0f;
        for (int kh = 0; kh < k; ++kh) {
            const int h = oh * s - p + kh;
            if (h < 0 || h >= H) continue;
            for (int kw = 0; kw < k; ++kw) {
                const int w = ow * s - p + kw;
                if (w >= 0 && w < W) acc += xp[h * W + w];
            }
        }
        y[i] = acc / (float)(k * k);
    }
}

extern "C" __global__ void avg_pool2d_backward(const float* dy, float* dx, int NC, int H, int W, int OH, int OW, int k, int s, int p) {
    GRID_STRIDE(i, (long long)NC * H * W) {
        const int w = (int)(i % W), h = (int)((i / W) % H), plane = (int)(i / ((long long)H * W));
        const float* dyp = dy + (long long)plane * OH * OW;
        int oh0, oh1, ow0, ow1;
        covering(h, k, s, p, OH, oh0, oh1);
        covering(w, k, s, p, OW, ow0, ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh)
            for (int ow = ow0; ow <= ow1; ++ow) g += dyp[oh * OW + ow];
        dx[i] = g / (float)(k * k);
    }
}

// One warp per plane; blocks of 256 threads hold 8 planes.
#define PLANE_PER_WARP(plane, n_planes)                           \
    const int plane = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); \
    const int lane = threadIdx.x & 31;                             \
    if (plane >= n_planes) return;

extern "C" __global__ void global_avg_pool_forward(const float* x, float* y, int n_planes, int HW) {
    PLANE_PER_WARP(plane, n_planes)
    const float* xp = x + (long long)plane * HW;
    double s = 0.0;
    for (int j = lane; j < HW; j += 32) s += xp[j];
    s = warp_sum_d(s);
    if (lane == 0) y[plane] = (float)(s / HW);
}

extern "C" __global__ void global_avg_pool_backward(const float* dy, float* dx, int n, int HW) {
    GRID_STRIDE(i, n) dx[i] = dy[i / HW] / (float)HW;
}

// First maximum (value, index) of a plane, in every lane of the warp.
__device__ __forceinline__ void plane_argmax(const float* xp, int HW, int lane, float& v, int& idx) {
    v = NEG_INF;
    idx = 0x7fffffff;
    for (int j = lane; j < HW; j += 32) argmax_merge(v, idx, xp[j], j);
    warp_argmax(v, idx);
}

extern "C" __global__ void global_max_pool_forward(const float* x, float* y, int n_planes, int HW) {
    PLANE_PER_WARP(plane, n_planes)
    float v;
    int idx;
    plane_argmax(x + (long long)plane * HW, HW, lane, v, idx);
    if (lane == 0) y[plane] = v;
}

extern "C" __global__ void global_max_pool_backward(const float* dy, const float* x, float* dx, int n_planes, int HW) {
    PLANE_PER_WARP(plane, n_planes)
    float v;
    int idx;
    plane_argmax(x + (long long)plane * HW, HW, lane, v, idx);
    const float g = dy[plane];
    float* dxp = dx + (long long)plane * HW;
    for (int j = lane; j < HW; j += 32) dxp[j] = j == idx ? g : 0.0f;
}

// Stripes: y[n, p*C + c] = mean of rows [p*rows, (p+1)*rows) of plane (n, c), rows = H/parts. The
// stripe is contiguous in memory (rows*W values). One warp per output.
extern "C" __global__ void stripe_avg_pool_forward(const float* x, float* y, int N, int C, int H, int W, int parts) {
    const int n_out = N * parts * C;
    PLANE_PER_WARP(o, n_out)
    const int c = o % C, part = (o / C) % parts, n = o / (C * parts), rows = H / parts, len = rows * W;
    const float* xs = x + (((long long)n * C + c) * H + part * rows) * W;
    double s = 0.0;
    for (int j = lane; j < len; j += 32) s += xs[j];
    s = warp_sum_d(s);
    if (lane == 0) y[o] = (float)(s / len);
}

extern "C" __global__ void stripe_avg_pool_backward(const float* dy, float* dx, int N, int C, int H, int W, int parts) {
    const int rows = H / parts;
    GRID_STRIDE(i, (long long)N * C * H * W) {
        const int h = (int)((i / W) % H), c = (int)((i / ((long long)H * W)) % C), n = (int)(i / ((long long)C * H * W));
        dx[i] = dy[((long long)n * parts + h / rows) * C + c] / (float)(rows * W);
    }
}
