// Depthwise 3x3 convolution, stride 1, padding 1, NCHW, weights [C, 1, 3, 3]: PLR-OSNet's LightConv
// layers. cuDNN's grouped convolution is slow on this shape in fp32 (the per-channel work is tiny),
// so these kernels do it directly and stay memory-bound.
//
// Each thread owns a column strip of DW_ROWS rows of one plane and slides a 3x3 window of inputs
// down it in registers: 3 loads per output row instead of 9. Neighbouring threads own neighbouring
// columns, so a warp's loads are contiguous and the column overlap is served by L1.
//
// x, w, y, dy, dx and dw are all of storage type T (float or bf16); arithmetic and the filter
// gradient's partial sums are f32, and each output is rounded once. The f32 entry point keeps the
// plain name, the bf16 one adds _bf16.
#include "common.cuh"

#define DW_ROWS 4

// Strip t of a stack of H x W planes: its plane, first row and column.
__device__ __forceinline__ void dw_strip(long long t, int H, int W, long long& plane, int& r0, int& col) {
    const int strips = CEIL_DIV(H, DW_ROWS);
    col = (int)(t % W);
    const long long rest = t / W;
    r0 = (int)(rest % strips) * DW_ROWS;
    plane = rest / strips;
}

// Columns col-1, col, col+1 of row r of plane p; zero outside the plane (the padding).
template <typename T>
__device__ __forceinline__ void dw_row(const T* __restrict__ p, int r, int col, int H, int W, float v[3]) {
    const bool in = r >= 0 && r < H;
    const long long o = (long long)r * W + col;
    v[0] = in && col > 0 ? ldg(p, o - 1) : 0.f;
    v[1] = in ? ldg(p, o) : 0.f;
    v[2] = in && col + 1 < W ? ldg(p, o + 1) : 0.f;
}

// out = in (*) k per plane of NC planes (channel = plane % C). With flip the kernel is rotated by
// 180 degrees: for stride 1 and padding 1 that turns the forward into the data gradient.
template <typename T>
__device__ __forceinline__ void dw_correlate(const T* __restrict__ in, const T* __restrict__ w, T* __restrict__ out, int NC, int C,
                                             int H, int W, bool flip) {
    const long long strips = (long long)NC * CEIL_DIV(H, DW_ROWS) * W;
    GRID_STRIDE(t, strips) {
        long long plane;
        int r0, col;
        dw_strip(t, H, W, plane, r0, col);
        const T* wc = w + (long long)(plane % C) * 9;
        float k[9];
#pragma unroll
        for (int i = 0; i < 9; i++) k[i] = ldg(wc, flip ? 8 - i : i);
        const T* ip = in + plane * H * W;
        T* op = out + plane * H * W;
        float a[3], b[3], c[3];
        dw_row(ip, r0 - 1, col, H, W, a);
        dw_row(ip, r0, col, H, W, b);
#pragma unroll
        for (int i = 0; i < DW_ROWS; i++) {
            const int r = r0 + i;
            if (r >= H) break;
            dw_row(ip, r + 1, col, H, W, c);
            float s = k[0] * a[0];
            s = fmaf(k[1], a[1], s);
            s = fmaf(k[2], a[2], s);
            s = fmaf(k[3], b[0], s);
            s = fmaf(k[4], b[1], s);
            s = fmaf(k[5], b[2], s);
            s = fmaf(k[6], c[0], s);
            s = fmaf(k[7], c[1], s);
            s = fmaf(k[8], c[2], s);
            st(op, (long long)r * W + col, s);
#pragma unroll
            for (int j = 0; j < 3; j++) {
                a[j] = b[j];
                b[j] = c[j];
            }
        }
    }
}

// y = conv(x, w); NC = N * C planes.
extern "C" __global__ void dwconv3x3_forward(const float* x, const float* w, float* y, int NC, int C, int H, int W) {
    dw_correlate(x, w, y, NC, C, H, W, false);
}
extern "C" __global__ void dwconv3x3_forward_bf16(const bf16* x, const bf16* w, bf16* y, int NC, int C, int H, int W) {
    dw_correlate(x, w, y, NC, C, H, W, false);
}

// dx = dy (*) rot180(w).
extern "C" __global__ void dwconv3x3_backward_data(const float* dy, const float* w, float* dx, int NC, int C, int H, int W) {
    dw_correlate(dy, w, dx, NC, C, H, W, true);
}
extern "C" __global__ void dwconv3x3_backward_data_bf16(const bf16* dy, const bf16* w, bf16* dx, int NC, int C, int H, int W) {
    dw_correlate(dy, w, dx, NC, C, H, W, true);
}

// Filter gradient, stage 1 of 2 (no atomics, so the result is deterministic): block b = c * S + s
// sums dw[c][a][e] = sum dy[n,c,r,j] * x[n,c,r+a-1,j+e-1] over the images n of slice s (S slices of
// N) into partial[b * 9 + a * 3 + e] (f32 for either T), in fp32 and a fixed order. blockDim.x: a
// multiple of 32.
template <typename T>
__device__ __forceinline__ void dw_filter_partial(const T* dy, const T* x, float* partial, int N, int C, int H, int W, int S) {
    __shared__ float red[9][32];
    const int c = blockIdx.x / S, s = blockIdx.x % S;
    const int n0 = (int)((long long)N * s / S), n1 = (int)((long long)N * (s + 1) / S);
    const long long strips = (long long)(n1 - n0) * CEIL_DIV(H, DW_ROWS) * W;
    float acc[9];
#pragma unroll
    for (int i = 0; i < 9; i++) acc[i] = 0.f;
    for (long long t = threadIdx.x; t < strips; t += blockDim.x) {
        long long img;
        int r0, col;
        dw_strip(t, H, W, img, r0, col);
        const long long off = ((n0 + img) * C + c) * H * W;
        const T* xp = x + off;
        const T* gp = dy + off;
        float a[3], b[3], e[3];
        dw_row(xp, r0 - 1, col, H, W, a);
        dw_row(xp, r0, col, H, W, b);
#pragma unroll
        for (int i = 0; i < DW_ROWS; i++) {
            const int r = r0 + i;
            if (r >= H) break;
            dw_row(xp, r + 1, col, H, W, e);
            const float g = ldg(gp, (long long)r * W + col);
#pragma unroll
            for (int j = 0; j < 3; j++) {
                acc[j] = fmaf(g, a[j], acc[j]);
                acc[3 + j] = fmaf(g, b[j], acc[3 + j]);
                acc[6 + j] = fmaf(g, e[j], acc[6 + j]);
                a[j] = b[j];
                b[j] = e[j];
            }
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int i = 0; i < 9; i++) {
        const float v = warp_sum(acc[i]);
        if (lane == 0) red[i][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < 9) {
        float v = 0.f;
        for (int i = 0; i < nwarps; i++) v += red[threadIdx.x][i];
        partial[(long long)blockIdx.x * 9 + threadIdx.x] = v;
    }
}
extern "C" __global__ void dwconv3x3_backward_filter_partial(const float* dy, const float* x, float* partial, int N, int C, int H,
                                                             int W, int S) {
    dw_filter_partial(dy, x, partial, N, C, H, W, S);
}
extern "C" __global__ void dwconv3x3_backward_filter_partial_bf16(const bf16* dy, const bf16* x, float* partial, int N, int C, int H,
                                                                  int W, int S) {
    dw_filter_partial(dy, x, partial, N, C, H, W, S);
}

// Filter gradient, stage 2: dw[c * 9 + k] = sum over the S slices of partial, in slice order,
// rounded once to T.
template <typename T>
__device__ __forceinline__ void dw_filter_reduce(const float* partial, T* dw, int C, int S) {
    GRID_STRIDE(i, (long long)C * 9) {
        const long long c = i / 9, k = i - c * 9;
        float v = 0.f;
        for (int s = 0; s < S; s++) v += partial[(c * S + s) * 9 + k];
        st(dw, i, v);
    }
}
extern "C" __global__ void dwconv3x3_backward_filter_reduce(const float* partial, float* dw, int C, int S) {
    dw_filter_reduce(partial, dw, C, S);
}
extern "C" __global__ void dwconv3x3_backward_filter_reduce_bf16(const float* partial, bf16* dw, int C, int S) {
    dw_filter_reduce(partial, dw, C, S);
}
