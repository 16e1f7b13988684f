// Optimizer steps, in place on flat parameter buffers, and the training step's statistics.
#include "common.cuh"

// torch.optim.Adam (coupled L2, amsgrad off), as torch computes it: g = grad + wd p;
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v) / bc2_sqrt + eps) with
// step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on the host.
__device__ __forceinline__ void adam_element(float* p, const float* grad, float* m, float* v, int i, float b1, float b2, float eps,
                                             float wd, float step_size, float bc2_sqrt) {
    const float g = grad[i] + wd * p[i];
    const float mi = b1 * m[i] + (1.0f - b1) * g;
    const float vi = b2 * v[i] + (1.0f - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
}

extern "C" __global__ void adam_update(float* p, const float* grad, float* m, float* v, int n, float b1, float b2, float eps,
                                       float wd, float step_size, float bc2_sqrt) {
    GRID_STRIDE(i, n) { adam_element(p, grad, m, v, i, b1, b2, eps, wd, step_size, bc2_sqrt); }
}

// Tensors of one multi-tensor launch, passed by value (TensorTable in src/cuda/mod.rs): row t has
// four addresses ptr[0..3][t] and len[t] elements.
#define TABLE_TENSORS 48
struct TensorTable {
    float* ptr[4][TABLE_TENSORS];
    int len[TABLE_TENSORS];
    int count;
};

// adam_update on every tensor of the table (rows: param, grad, m, v). step_size and bc2_sqrt are
// read from device memory (hyper[0], hyper[1]) so that a captured graph picks up each step's
// learning rate and bias corrections.
extern "C" __global__ void adam_multi(TensorTable t, const float* hyper, float b1, float b2, float eps, float wd) {
    const float step_size = hyper[0], bc2_sqrt = hyper[1];
    for (int r = 0; r < t.count; ++r) {
        GRID_STRIDE(i, t.len[r]) {
            adam_element(t.ptr[0][r], t.ptr[1][r], t.ptr[2][r], t.ptr[3][r], i, b1, b2, eps, wd, step_size, bc2_sqrt);
        }
    }
}

// Training-step statistics kept on the GPU: acc[0..6] += the seven loss terms (each a [1] tensor),
// acc[7] += rows of logits [N, K] whose argmax (first maximum) is the label. One block.
extern "C" __global__ void step_stats_accumulate(float* acc, const float* t0, const float* t1, const float* t2, const float* t3,
                                                 const float* t4, const float* t5, const float* t6, const float* logits,
                                                 const int* labels, int N, int K) {
    __shared__ int hits;
    if (threadIdx.x == 0) hits = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int r = warp; r < N; r += nwarps) {
        const float* z = logits + (long long)r * K;
        float best = NEG_INF;
        int arg = 0;
        for (int k = lane; k < K; k += 32)
            if (z[k] > best) {
                best = z[k];
                arg = k;
            }
        warp_argmax(best, arg);
        if (lane == 0 && arg == labels[r]) atomicAdd(&hits, 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        acc[0] += t0[0];
        acc[1] += t1[0];
        acc[2] += t2[0];
        acc[3] += t3[0];
        acc[4] += t4[0];
        acc[5] += t5[0];
        acc[6] += t6[0];
        acc[7] += (float)hits;
    }
}
