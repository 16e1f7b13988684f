// Batch normalisation over channel axis 1 of an [N, C, HW] view (BatchNorm1d: HW = 1). Per-channel
// reductions use one block per channel (grid = C) with double accumulation and a fixed reduction
// order, so results are deterministic.
#include "common.cuh"

// Element j < N*HW of channel c.
__device__ __forceinline__ long long bn_index(int j, int c, int C, int HW) {
    const int n = j / HW;
    return ((long long)n * C + c) * HW + (j - n * HW);
}

// Training forward: batch mean, biased variance for the normalisation, unbiased variance for the
// running statistics, then y = (x - mean) * invstd * gamma + beta.
extern "C" __global__ void bn_forward_train(const float* x, const float* gamma, const float* beta, float* y, float* mean_out,
                                            float* invstd_out, float* var_unbiased_out, int N, int C, int HW, float eps) {
    __shared__ double scratch[32];
    const int c = blockIdx.x, M = N * HW;
    double s = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) s += x[bn_index(j, c, C, HW)];
    const double mean = block_sum_d(s, scratch) / M;
    double q = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const double d = x[bn_index(j, c, C, HW)] - mean;
        q += d * d;
    }
    const double sq = block_sum_d(q, scratch);
    const double invstd = 1.0 / sqrt(sq / M + (double)eps);
    if (threadIdx.x == 0) {
        mean_out[c] = (float)mean;
        invstd_out[c] = (float)invstd;
        var_unbiased_out[c] = (float)(sq / (M - 1));
    }
    const float m = (float)mean, scale = (float)invstd * gamma[c], shift = beta[c];
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const long long i = bn_index(j, c, C, HW);
        y[i] = (x[i] - m) * scale + shift;
    }
}

// Training backward with xhat = (x - mean) * invstd, M = N*HW:
// dgamma = sum dy*xhat, dbeta = sum dy, dx = gamma*invstd*(dy - dbeta/M - xhat*dgamma/M).
extern "C" __global__ void bn_backward_train(const float* dy, const float* x, const float* gamma, const float* mean,
                                             const float* invstd, float* dx, float* dgamma, float* dbeta, int N, int C, int HW) {
    __shared__ double scratch[32];
    const int c = blockIdx.x, M = N * HW;
    const float m = mean[c], is = invstd[c];
    double sdy = 0.0, sdyx = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const long long i = bn_index(j, c, C, HW);
        sdy += dy[i];
        sdyx += (double)dy[i] * ((x[i] - m) * is);
    }
    const double sum_dy = block_sum_d(sdy, scratch);
    const double sum_dy_xhat = block_sum_d(sdyx, scratch);
    if (threadIdx.x == 0) {
        dgamma[c] = (float)sum_dy_xhat;
        dbeta[c] = (float)sum_dy;
    }
    const float k = gamma[c] * is, mdy = (float)(sum_dy / M), mdyx = (float)(sum_dy_xhat / M);
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const long long i = bn_index(j, c, C, HW);
        dx[i] = k * (dy[i] - mdy - (x[i] - m) * is * mdyx);
    }
}

// Eval forward with the running statistics, elementwise over all N*C*HW values.
extern "C" __global__ void bn_forward_eval(const float* x, const float* gamma, const float* beta, const float* rmean,
                                           const float* rvar, float* y, int n, int C, int HW, float eps) {
    GRID_STRIDE(i, n) {
        const int c = (int)((i / HW) % C);
        y[i] = (x[i] - rmean[c]) * (gamma[c] / sqrtf(rvar[c] + eps)) + beta[c];
    }
}

// Eval backward: dx = dy*gamma/sqrt(var+eps), dgamma = sum dy*(x-mean)/sqrt(var+eps), dbeta = sum dy.
extern "C" __global__ void bn_backward_eval(const float* dy, const float* x, const float* gamma, const float* rmean,
                                            const float* rvar, float* dx, float* dgamma, float* dbeta, int N, int C, int HW,
                                            float eps) {
    __shared__ double scratch[32];
    const int c = blockIdx.x, M = N * HW;
    const float m = rmean[c], is = 1.0f / sqrtf(rvar[c] + eps), k = gamma[c] * is;
    double sdy = 0.0, sdyx = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const long long i = bn_index(j, c, C, HW);
        sdy += dy[i];
        sdyx += (double)dy[i] * ((x[i] - m) * is);
        dx[i] = dy[i] * k;
    }
    const double sum_dy = block_sum_d(sdy, scratch);
    const double sum_dy_xhat = block_sum_d(sdyx, scratch);
    if (threadIdx.x == 0) {
        dgamma[c] = (float)sum_dy_xhat;
        dbeta[c] = (float)sum_dy;
    }
}

// running <- (1 - momentum) running + momentum batch, for the mean and the unbiased variance.
extern "C" __global__ void bn_update_running(float* rmean, float* rvar, const float* mean, const float* var_unbiased,
                                             float momentum, int C) {
    GRID_STRIDE(c, C) {
        rmean[c] = (1.0f - momentum) * rmean[c] + momentum * mean[c];
        rvar[c] = (1.0f - momentum) * rvar[c] + momentum * var_unbiased[c];
    }
}
