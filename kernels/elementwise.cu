// Elementwise and shape ops: activations, broadcast add/mul/copy, strided sum reductions,
// row-wise L2 normalisation and 2-d strided copies (concat / narrow).
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* x, bf16* y, int n) {
    GRID_STRIDE(i, n) y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const bf16* x, float* y, int n) {
    GRID_STRIDE(i, n) y[i] = bf16_to_f32(x[i]);
}

// Each body below is written once over the activation storage type T; the f32 entry point keeps
// the plain name and the bf16 one adds _bf16 (the launchers pick by dtype).

template <typename T>
__device__ __forceinline__ void relu_forward_impl(const T* x, T* y, int n) {
    GRID_STRIDE(i, n) st(y, i, fmaxf(ld(x, i), 0.0f));
}
extern "C" __global__ void relu_forward(const float* x, float* y, int n) { relu_forward_impl(x, y, n); }
extern "C" __global__ void relu_forward_bf16(const bf16* x, bf16* y, int n) { relu_forward_impl(x, y, n); }

// dx = dy where the output was positive.
template <typename T>
__device__ __forceinline__ void relu_backward_impl(const T* dy, const T* y, T* dx, int n) {
    GRID_STRIDE(i, n) st(dx, i, ld(y, i) > 0.0f ? ld(dy, i) : 0.0f);
}
extern "C" __global__ void relu_backward(const float* dy, const float* y, float* dx, int n) { relu_backward_impl(dy, y, dx, n); }
extern "C" __global__ void relu_backward_bf16(const bf16* dy, const bf16* y, bf16* dx, int n) { relu_backward_impl(dy, y, dx, n); }

template <typename T>
__device__ __forceinline__ void sigmoid_forward_impl(const T* x, T* y, int n) {
    GRID_STRIDE(i, n) st(y, i, 1.0f / (1.0f + expf(-ld(x, i))));
}
extern "C" __global__ void sigmoid_forward(const float* x, float* y, int n) { sigmoid_forward_impl(x, y, n); }
extern "C" __global__ void sigmoid_forward_bf16(const bf16* x, bf16* y, int n) { sigmoid_forward_impl(x, y, n); }

template <typename T>
__device__ __forceinline__ void sigmoid_backward_impl(const T* dy, const T* y, T* dx, int n) {
    GRID_STRIDE(i, n) {
        const float yv = ld(y, i);
        st(dx, i, ld(dy, i) * yv * (1.0f - yv));
    }
}
extern "C" __global__ void sigmoid_backward(const float* dy, const float* y, float* dx, int n) { sigmoid_backward_impl(dy, y, dx, n); }
extern "C" __global__ void sigmoid_backward_bf16(const bf16* dy, const bf16* y, bf16* dx, int n) {
    sigmoid_backward_impl(dy, y, dx, n);
}

template <typename T>
__device__ __forceinline__ void scale_impl(const T* x, T* y, float alpha, int n) {
    GRID_STRIDE(i, n) st(y, i, alpha * ld(x, i));
}
extern "C" __global__ void scale(const float* x, float* y, float alpha, int n) { scale_impl(x, y, alpha, n); }
extern "C" __global__ void scale_bf16(const bf16* x, bf16* y, float alpha, int n) { scale_impl(x, y, alpha, n); }

// out = a op b where b is broadcast over a's shape: `dims` are a's sizes (rank <= 8, adjacent dims
// merged on the host) and `bstrides` b's strides in those dims (0 where b is broadcast).
// op 0: a + b, 1: a * b, 2: b (broadcast_to; a is not read). out may alias a. The output type TO
// is T, or f32 for bf16 inputs (a bf16 product is exact in f32; mul's backward reduces it before
// rounding).
template <typename T, typename TO>
__device__ __forceinline__ void broadcast_binary_impl(int op, const T* a, const T* b, TO* out, int n, int rank, const Dims8& dims,
                                                      const Dims8& bstrides) {
    GRID_STRIDE(i, n) {
        int rem = (int)i, boff = 0;
        for (int d = rank - 1; d >= 0; --d) {
            const int c = rem % dims.v[d];
            rem /= dims.v[d];
            boff += c * bstrides.v[d];
        }
        const float bv = ld(b, boff);
        st(out, i, op == 0 ? ld(a, i) + bv : (op == 1 ? ld(a, i) * bv : bv));
    }
}
extern "C" __global__ void broadcast_binary(int op, const float* a, const float* b, float* out, int n, int rank, Dims8 dims,
                                            Dims8 bstrides) {
    broadcast_binary_impl(op, a, b, out, n, rank, dims, bstrides);
}
extern "C" __global__ void broadcast_binary_bf16(int op, const bf16* a, const bf16* b, bf16* out, int n, int rank, Dims8 dims,
                                                 Dims8 bstrides) {
    broadcast_binary_impl(op, a, b, out, n, rank, dims, bstrides);
}
extern "C" __global__ void broadcast_binary_bf16_f32(int op, const bf16* a, const bf16* b, float* out, int n, int rank, Dims8 dims,
                                                     Dims8 bstrides) {
    broadcast_binary_impl(op, a, b, out, n, rank, dims, bstrides);
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
// short reductions). Double accumulation, one rounding to the output type TO. Variants: f32 -> f32,
// bf16 -> bf16 (sum_to_shape), f32 -> bf16 (the exact f32 products of mul's bf16 backward).
template <typename TI, typename TO>
__device__ __forceinline__ void reduce_sum_thread_impl(const TI* x, TO* out, int n_out, int n_red, int krank, const Dims8& kdims,
                                                       const Dims8& kstrides, int rrank, const Dims8& rdims, const Dims8& rstrides) {
    GRID_STRIDE(o, n_out) {
        const int base = strided_offset((int)o, krank, kdims, kstrides);
        double s = 0.0;
        for (int r = 0; r < n_red; ++r) s += ld(x, base + strided_offset(r, rrank, rdims, rstrides));
        st(out, o, (float)s);
    }
}
extern "C" __global__ void reduce_sum_thread(const float* x, float* out, int n_out, int n_red, int krank, Dims8 kdims,
                                             Dims8 kstrides, int rrank, Dims8 rdims, Dims8 rstrides) {
    reduce_sum_thread_impl(x, out, n_out, n_red, krank, kdims, kstrides, rrank, rdims, rstrides);
}
extern "C" __global__ void reduce_sum_thread_bf16(const bf16* x, bf16* out, int n_out, int n_red, int krank, Dims8 kdims,
                                                  Dims8 kstrides, int rrank, Dims8 rdims, Dims8 rstrides) {
    reduce_sum_thread_impl(x, out, n_out, n_red, krank, kdims, kstrides, rrank, rdims, rstrides);
}
extern "C" __global__ void reduce_sum_thread_f32_bf16(const float* x, bf16* out, int n_out, int n_red, int krank, Dims8 kdims,
                                                      Dims8 kstrides, int rrank, Dims8 rdims, Dims8 rstrides) {
    reduce_sum_thread_impl(x, out, n_out, n_red, krank, kdims, kstrides, rrank, rdims, rstrides);
}

// As reduce_sum_thread with one block per output (grid-stride over outputs), for long reductions.
template <typename TI, typename TO>
__device__ __forceinline__ void reduce_sum_block_impl(const TI* x, TO* out, int n_out, int n_red, int krank, const Dims8& kdims,
                                                      const Dims8& kstrides, int rrank, const Dims8& rdims, const Dims8& rstrides) {
    __shared__ double scratch[32];
    for (int o = blockIdx.x; o < n_out; o += gridDim.x) {
        const int base = strided_offset(o, krank, kdims, kstrides);
        double s = 0.0;
        for (int r = threadIdx.x; r < n_red; r += blockDim.x) s += ld(x, base + strided_offset(r, rrank, rdims, rstrides));
        s = block_sum_d(s, scratch);
        if (threadIdx.x == 0) st(out, o, (float)s);
    }
}
extern "C" __global__ void reduce_sum_block(const float* x, float* out, int n_out, int n_red, int krank, Dims8 kdims,
                                            Dims8 kstrides, int rrank, Dims8 rdims, Dims8 rstrides) {
    reduce_sum_block_impl(x, out, n_out, n_red, krank, kdims, kstrides, rrank, rdims, rstrides);
}
extern "C" __global__ void reduce_sum_block_bf16(const bf16* x, bf16* out, int n_out, int n_red, int krank, Dims8 kdims,
                                                 Dims8 kstrides, int rrank, Dims8 rdims, Dims8 rstrides) {
    reduce_sum_block_impl(x, out, n_out, n_red, krank, kdims, kstrides, rrank, rdims, rstrides);
}
extern "C" __global__ void reduce_sum_block_f32_bf16(const float* x, bf16* out, int n_out, int n_red, int krank, Dims8 kdims,
                                                     Dims8 kstrides, int rrank, Dims8 rdims, Dims8 rstrides) {
    reduce_sum_block_impl(x, out, n_out, n_red, krank, kdims, kstrides, rrank, rdims, rstrides);
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

// dst[r * dst_pitch + dst_off + c] = src[r * src_pitch + src_off + c] for r < rows, c < cols. A
// copy, so the bf16 variant moves the 2-byte values unchanged.
template <typename T>
__device__ __forceinline__ void copy2d_impl(const T* src, T* dst, int rows, int cols, int src_pitch, int src_off, int dst_pitch,
                                            int dst_off) {
    GRID_STRIDE(i, (long long)rows * cols) {
        const int r = (int)(i / cols), c = (int)(i % cols);
        dst[(long long)r * dst_pitch + dst_off + c] = src[(long long)r * src_pitch + src_off + c];
    }
}
extern "C" __global__ void copy2d(const float* src, float* dst, int rows, int cols, int src_pitch, int src_off, int dst_pitch,
                                  int dst_off) {
    copy2d_impl(src, dst, rows, cols, src_pitch, src_off, dst_pitch, dst_off);
}
extern "C" __global__ void copy2d_bf16(const bf16* src, bf16* dst, int rows, int cols, int src_pitch, int src_off, int dst_pitch,
                                       int dst_off) {
    copy2d_impl(src, dst, rows, cols, src_pitch, src_off, dst_pitch, dst_off);
}
