// The three PLR-OSNet losses. Forward kernels run as one block that reduces the per-sample terms in
// a fixed order (deterministic); backward kernels read the loss gradient from device memory.
// Labels are int32.
#include "common.cuh"

// Sum over samples of per-warp partial sums (held by lane 0 of each warp), in block order.
__device__ __forceinline__ double block_total(double warp_part, double* scratch) {
    return block_sum_d((threadIdx.x & 31) == 0 ? warp_part : 0.0, scratch);
}

// Label-smoothed cross-entropy, mean over rows: lse - (1-eps) z_y - (eps/K) sum_k z_k per row.
// One block; each warp takes rows warp, warp + nwarps, ...
extern "C" __global__ void ce_ls_forward(const float* logits, const int* labels, float* loss, int N, int K, float eps) {
    __shared__ double scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    double part = 0.0;
    for (int r = warp; r < N; r += nwarps) {
        const float* z = logits + (long long)r * K;
        float m = NEG_INF;
        for (int k = lane; k < K; k += 32) m = fmaxf(m, z[k]);
        m = warp_max(m);
        float se = 0.0f, sz = 0.0f;
        for (int k = lane; k < K; k += 32) {
            se += expf(z[k] - m);
            sz += z[k];
        }
        se = warp_sum(se);
        sz = warp_sum(sz);
        const float lse = m + logf(se);
        part += (double)lse - (1.0 - eps) * z[labels[r]] - (double)eps / K * sz;
    }
    const double total = block_total(part, scratch);
    if (threadIdx.x == 0) loss[0] = (float)(total / N);
}

// dz = dloss/N * (softmax(z) - q), q_k = eps/K + (1-eps)[k = y]. One warp per row.
extern "C" __global__ void ce_ls_backward(const float* dloss, const float* logits, const int* labels, float* dlogits, int N, int K,
                                          float eps) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= N) return;
    const float* z = logits + (long long)r * K;
    float* dz = dlogits + (long long)r * K;
    float m = NEG_INF;
    for (int k = lane; k < K; k += 32) m = fmaxf(m, z[k]);
    m = warp_max(m);
    float se = 0.0f;
    for (int k = lane; k < K; k += 32) se += expf(z[k] - m);
    const float inv = 1.0f / warp_sum(se), g = dloss[0] / N, q0 = eps / K;
    const int y = labels[r];
    for (int k = lane; k < K; k += 32) dz[k] = g * (expf(z[k] - m) * inv - (q0 + (k == y ? 1.0f - eps : 0.0f)));
}

// d(i, j) = sqrt(max(G_ii + G_jj - 2 G_ij, 1e-12)) from the Gram matrix G = x x^T; with the norms
// read off its diagonal d(i, i) clamps exactly, as on the CPU.
__device__ __forceinline__ float pair_d2(const float* gram, int N, int i, int j) {
    return gram[(long long)i * N + i] + gram[(long long)j * N + j] - 2.0f * gram[(long long)i * N + j];
}

// Batch-hard mining for anchor i in one warp: hardest positive (farthest, label equal, i itself
// included) and hardest negative (nearest), first index on ties. Every lane gets the result.
__device__ void mine(const float* gram, const int* labels, int N, int i, int lane, float& dap, int& p, float& dan, int& q) {
    dap = NEG_INF;
    p = 0x7fffffff;
    float neg_dan = NEG_INF;  // max of -d = min of d, so argmax_merge gives the first minimum
    q = 0x7fffffff;
    for (int j = lane; j < N; j += 32) {
        const float d = sqrtf(fmaxf(pair_d2(gram, N, i, j), 1e-12f));
        if (labels[j] == labels[i])
            argmax_merge(dap, p, d, j);
        else
            argmax_merge(neg_dan, q, -d, j);
    }
    warp_argmax(dap, p);
    warp_argmax(neg_dan, q);
    dan = -neg_dan;
}

// softplus(t) = log(1 + exp(t)), stable for large |t|.
__device__ __forceinline__ float softplus(float t) {
    return fmaxf(t, 0.0f) + log1pf(expf(-fabsf(t)));
}

// Soft-margin batch-hard triplet loss: mean_i softplus(d_ap(i) - d_an(i)). One block.
extern "C" __global__ void triplet_forward(const float* gram, const int* labels, float* loss, int N) {
    __shared__ double scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    double part = 0.0;
    for (int i = warp; i < N; i += nwarps) {
        float dap, dan;
        int p, q;
        mine(gram, labels, N, i, lane, dap, p, dan, q);
        part += softplus(dap - dan);
    }
    const double total = block_total(part, scratch);
    if (threadIdx.x == 0) loss[0] = (float)(total / N);
}

// Per anchor: the mined pair indices and the coefficients c with dx_i += c (x_i - x_j) (and
// dx_j -= c (x_i - x_j)): c = dL/dd / d, zero where the distance was clamped. One warp per anchor.
extern "C" __global__ void triplet_select(const float* gram, const int* labels, const float* dloss, int* pos, int* neg, float* cpos,
                                          float* cneg, int N) {
    const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (i >= N) return;
    float dap, dan;
    int p, q;
    mine(gram, labels, N, i, lane, dap, p, dan, q);
    if (lane == 0) {
        const float t = dap - dan, g = dloss[0] / N / (1.0f + expf(-t));  // d softplus(t)/dt = sigmoid(t)
        pos[i] = p;
        neg[i] = q;
        cpos[i] = pair_d2(gram, N, i, p) >= 1e-12f ? g / dap : 0.0f;
        cneg[i] = pair_d2(gram, N, i, q) >= 1e-12f ? -g / dan : 0.0f;
    }
}

// dx_a = sum over anchors i of the pair terms that touch row a. One block per row a, threads over
// the feature dimension; deterministic (no atomics).
extern "C" __global__ void triplet_backward(const float* x, const int* pos, const int* neg, const float* cpos, const float* cneg,
                                            float* dx, int N, int D) {
    const int a = blockIdx.x;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float xa = x[(long long)a * D + d];
        float g = 0.0f;
        for (int i = 0; i < N; ++i) {
            const int p = pos[i], q = neg[i];
            if (i == a) g += cpos[i] * (xa - x[(long long)p * D + d]) + cneg[i] * (xa - x[(long long)q * D + d]);
            if (p == a) g += cpos[i] * (xa - x[(long long)i * D + d]);
            if (q == a) g += cneg[i] * (xa - x[(long long)i * D + d]);
        }
        dx[(long long)a * D + d] = g;
    }
}

// Squared distance of sample i to its center, summed as (x - c)^2 (accurate also when x is near c);
// computed by one warp, every lane gets it.
__device__ float center_dist(const float* x, const float* centers, int D, int i, int y, int lane) {
    const float* xr = x + (long long)i * D;
    const float* cr = centers + (long long)y * D;
    float s = 0.0f;
    for (int j = lane; j < D; j += 32) {
        const float d = xr[j] - cr[j];
        s += d * d;
    }
    return warp_sum(s);
}

// Samples with a center (label < K), counted on the device so that a CUDA graph replayed on other
// labels stays right.
__device__ int with_center(const int* labels, int N, int K) {
    int c = 0;
    for (int i = 0; i < N; ++i) c += labels[i] < K;
    return c;
}

// Center loss: mean over the samples with label < K of clamp(dist, 1e-12, 1e12). One block.
extern "C" __global__ void center_forward(const float* x, const float* centers, const int* labels, float* loss, int N, int D, int K) {
    __shared__ double scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    double part = 0.0;
    for (int i = warp; i < N; i += nwarps) {
        const int y = labels[i];
        if (y >= K) continue;
        part += fminf(fmaxf(center_dist(x, centers, D, i, y, lane), 1e-12f), 1e12f);
    }
    const double total = block_total(part, scratch);
    if (threadIdx.x == 0) {
        const int count = with_center(labels, N, K);
        loss[0] = count > 0 ? (float)(total / count) : 0.0f;
    }
}

// Per sample: coef_i = 2 dloss/count where the distance was not clamped, else 0 (and for samples
// without a center); count = samples with a center. One warp per sample.
extern "C" __global__ void center_coef(const float* x, const float* centers, const int* labels, const float* dloss, float* coef, int N,
                                       int D, int K) {
    const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (i >= N) return;
    const int y = labels[i];
    if (y >= K) {
        if (lane == 0) coef[i] = 0.0f;
        return;
    }
    const float d = center_dist(x, centers, D, i, y, lane);
    if (lane == 0) coef[i] = (d >= 1e-12f && d <= 1e12f) ? 2.0f * dloss[0] / with_center(labels, N, K) : 0.0f;
}

// dx_i = coef_i (x_i - c_{y_i}); elementwise over N*D.
extern "C" __global__ void center_backward_x(const float* x, const float* centers, const int* labels, const float* coef, float* dx,
                                             int N, int D, int K) {
    GRID_STRIDE(e, (long long)N * D) {
        const int i = (int)(e / D), j = (int)(e % D), y = labels[i];
        dx[e] = y < K ? coef[i] * (x[e] - centers[(long long)y * D + j]) : 0.0f;
    }
}

// dcenters_k = -sum over samples i with label k of coef_i (x_i - c_k); elementwise over K*D.
extern "C" __global__ void center_backward_c(const float* x, const float* centers, const int* labels, const float* coef,
                                             float* dcenters, int N, int D, int K) {
    GRID_STRIDE(e, (long long)K * D) {
        const int k = (int)(e / D), j = (int)(e % D);
        float g = 0.0f;
        for (int i = 0; i < N; ++i)
            if (labels[i] == k) g -= coef[i] * (x[(long long)i * D + j] - centers[e]);
        dcenters[e] = g;
    }
}
