// Softmax over the last axis of a [rows, L] view, one warp per row (blocks of 256 threads hold 8
// rows), max-subtracted. The position attention's matrix products go through cuBLAS.
#include "common.cuh"

extern "C" __global__ void softmax_forward(const float* x, float* y, int rows, int L) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* xr = x + (long long)row * L;
    float* yr = y + (long long)row * L;
    float m = NEG_INF;
    for (int j = lane; j < L; j += 32) m = fmaxf(m, xr[j]);
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j < L; j += 32) s += expf(xr[j] - m);
    const float inv = 1.0f / warp_sum(s);
    for (int j = lane; j < L; j += 32) yr[j] = expf(xr[j] - m) * inv;
}

// dx = y * (dy - sum(dy * y)) row-wise.
extern "C" __global__ void softmax_backward(const float* dy, const float* y, float* dx, int rows, int L) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const long long base = (long long)row * L;
    float dot = 0.0f;
    for (int j = lane; j < L; j += 32) dot += dy[base + j] * y[base + j];
    dot = warp_sum(dot);
    for (int j = lane; j < L; j += 32) dx[base + j] = y[base + j] * (dy[base + j] - dot);
}
