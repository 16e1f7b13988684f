// Elementwise and shape ops: activations, broadcast add/mul/copy, strided sum reductions,
// row-wise L2 normalisation and 2-d strided copies (concat / narrow).
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* x, bf16* y, int n) {
    GRID_STRIDE(i, n) y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const bf16* x, float* y, int n) {
    GRID_STRIDE(i, n) y[i] = bf16_to_f32(x[i]);
}

extern "C" __global__ void relu_forward(const float* x, float* y, int n) {
    GRID_STRIDE(i, n) y[i] = fmaxf(x[i], 0.0f);
}

// dx = dy where the output was positive.
extern "C" __global__ void relu_backward(const float* dy, const float* y, float* dx, int n) {
    GRID_STRIDE(i, n) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

extern "C" __global__ void sigmoid_forward(const float* x, float* y, int n) {
    GRID_STRIDE(i, n) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

extern "C" __global__ void sigmoid_backward(const float* dy, const float* y, float* dx, int n) {
    GRID_STRIDE(i, n) dx[i] = dy[i] * y[i] * (1.0f - y[i]);
}

extern "C" __global__ void scale(const float* x, float* y, float alpha, int n) {
    GRID_STRIDE(i, n) y[i] = alpha * x[i];
}

// out = a op b where b is broadcast over a's shape: `dims` are a's sizes (rank <= 8, adjacent dims
// merged on the host) and `bstrides` b's strides in those dims (0 where b is broadcast).
// op 0: a + b, 1: a * b, 2: b (broadcast_to; a is not read). out may alias a.
extern "C" __global__ void broadcast_binary(int op, const float* a, const float* b, float* out, int n, int rank, Dims8 dims,
                                            Dims8 bstrides) {
    GRID_STRIDE(i, n) {
        int rem = (int)i, boff = 0;
        for (int d = rank - 1; d >= 0; --d) {
            const int c = rem % dims.v[d];
            rem /= dims.v[d];
            boff += c * bstrides.v[d];
        }
        const float bv = b[boff];
        out[i] = op == 0 ? a[i] + bv : (op == 1 ? a[i] * bv : bv);
    }
}

// Offset of element `idx` of a (dims, strides) index space of the given rank.
__device__ __forceinline__ int strided_offset(int idx, int rank, const Dims8& dims, const Dims8& strides) {
    int off = 0;
    for (int d = rank - 1; d >= 0; --d) {
        off += (idx % dims.v[d]) * strides.v[d];
        idx /= dims.v[d];
    }
    return off;
}

// out[o] = sum over r < n_red of x[kept_offset(o) + red_offset(r)], one thread per output (for
// short reductions). Double accumulation.
extern "C" __global__ void reduce_sum_thread(const float* x, float* out, int n_out, int n_red, int krank, Dims8 kdims,
                                             Dims8 kstrides, int rrank, Dims8 rdims, Dims8 rstrides) {
    GRID_STRIDE(o, n_out) {
        const int base = strided_offset((int)o, krank, kdims, kstrides);
        double s = 0.0;
        for (int r = 0; r < n_red; ++r) s += x[base + strided_offset(r, rrank, rdims, rstrides)];
        out[o] = (float)s;
    }
}

// As reduce_sum_thread with one block per output (grid-stride over outputs), for long reductions.
extern "C" __global__ void reduce_sum_block(const float* x, float* out, int n_out, int n_red, int krank, Dims8 kdims,
                                            Dims8 kstrides, int rrank, Dims8 rdims, Dims8 rstrides) {
    __shared__ double scratch[32];
    for (int o = blockIdx.x; o < n_out; o += gridDim.x) {
        const int base = strided_offset(o, krank, kdims, kstrides);
        double s = 0.0;
        for (int r = threadIdx.x; r < n_red; r += blockDim.x) s += x[base + strided_offset(r, rrank, rdims, rstrides)];
        s = block_sum_d(s, scratch);
        if (threadIdx.x == 0) out[o] = (float)s;
    }
}

// Row-wise y = x / max(||x||, 1e-12) of a [rows, d] matrix, one block per row.
extern "C" __global__ void l2_normalize_forward(const float* x, float* y, int d) {
    __shared__ double scratch[32];
    const float* xr = x + (long long)blockIdx.x * d;
    float* yr = y + (long long)blockIdx.x * d;
    double ss = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += (double)xr[j] * xr[j];
    const float denom = fmaxf((float)sqrt(block_sum_d(ss, scratch)), 1e-12f);
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] / denom;
}

// dx of l2_normalize_forward: (dy - y (y.dy)) / ||x|| when ||x|| > 1e-12, else dy / 1e-12.
extern "C" __global__ void l2_normalize_backward(const float* dy, const float* x, float* dx, int d) {
    __shared__ double scratch[32];
    const long long row = (long long)blockIdx.x * d;
    double ss = 0.0, sd = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        ss += (double)x[row + j] * x[row + j];
        sd += (double)x[row + j] * dy[row + j];
    }
    const double sumsq = block_sum_d(ss, scratch);
    const double xdy = block_sum_d(sd, scratch);
    const double norm = sqrt(sumsq);
    if (norm > 1e-12) {
        const float inv = (float)(1.0 / norm), k = (float)(xdy / (norm * norm * norm));
        for (int j = threadIdx.x; j < d; j += blockDim.x) dx[row + j] = dy[row + j] * inv - x[row + j] * k;
    } else {
        for (int j = threadIdx.x; j < d; j += blockDim.x) dx[row + j] = dy[row + j] / 1e-12f;
    }
}

// dst[r * dst_pitch + dst_off + c] = src[r * src_pitch + src_off + c] for r < rows, c < cols.
extern "C" __global__ void copy2d(const float* src, float* dst, int rows, int cols, int src_pitch, int src_off, int dst_pitch,
                                  int dst_off) {
    GRID_STRIDE(i, (long long)rows * cols) {
        const int r = (int)(i / cols), c = (int)(i % cols);
        dst[(long long)r * dst_pitch + dst_off + c] = src[(long long)r * src_pitch + src_off + c];
    }
}
