// Batch normalisation over channel axis 1 of an [N, C, HW] view (BatchNorm1d: HW = 1). Per-channel
// reductions use one block per channel (grid = C) with double accumulation and a fixed reduction
// order, so results are deterministic.
//
// The activations (x, y, dy, dx) are of storage type T (float or bf16: f32 arithmetic, one rounding
// per output); gamma, beta, the statistics and dgamma/dbeta are always f32. The f32 entry point
// keeps the plain name, the bf16 one adds _bf16.
#include "common.cuh"

// Element j < N*HW of channel c.
__device__ __forceinline__ long long bn_index(int j, int c, int C, int HW) {
    const int n = j / HW;
    return ((long long)n * C + c) * HW + (j - n * HW);
}

// Training forward: batch mean, biased variance for the normalisation, unbiased variance for the
// running statistics, then y = (x - mean) * invstd * gamma + beta, and with relu max(y, 0) in the
// same pass (BatchNorm followed by ReLU without a second read and write of y).
template <typename T>
__device__ __forceinline__ void bn_forward_train_impl(const T* x, const float* gamma, const float* beta, T* y,
                                                      float* mean_out, float* invstd_out, float* var_unbiased_out, int N,
                                                      int C, int HW, float eps, bool relu) {
    __shared__ double scratch[32];
    const int c = blockIdx.x, M = N * HW;
    double s = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) s += ld(x, bn_index(j, c, C, HW));
    const double mean = block_sum_d(s, scratch) / M;
    double q = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const double d = ld(x, bn_index(j, c, C, HW)) - mean;
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
        const float v = (ld(x, i) - m) * scale + shift;
        st(y, i, relu ? fmaxf(v, 0.0f) : v);
    }
}

extern "C" __global__ void bn_forward_train(const float* x, const float* gamma, const float* beta, float* y, float* mean_out,
                                            float* invstd_out, float* var_unbiased_out, int N, int C, int HW, float eps) {
    bn_forward_train_impl(x, gamma, beta, y, mean_out, invstd_out, var_unbiased_out, N, C, HW, eps, false);
}
extern "C" __global__ void bn_forward_train_bf16(const bf16* x, const float* gamma, const float* beta, bf16* y, float* mean_out,
                                                 float* invstd_out, float* var_unbiased_out, int N, int C, int HW, float eps) {
    bn_forward_train_impl(x, gamma, beta, y, mean_out, invstd_out, var_unbiased_out, N, C, HW, eps, false);
}

// relu(batchnorm(x)).
extern "C" __global__ void bn_relu_forward_train(const float* x, const float* gamma, const float* beta, float* y,
                                                 float* mean_out, float* invstd_out, float* var_unbiased_out, int N, int C,
                                                 int HW, float eps) {
    bn_forward_train_impl(x, gamma, beta, y, mean_out, invstd_out, var_unbiased_out, N, C, HW, eps, true);
}
extern "C" __global__ void bn_relu_forward_train_bf16(const bf16* x, const float* gamma, const float* beta, bf16* y,
                                                      float* mean_out, float* invstd_out, float* var_unbiased_out, int N, int C,
                                                      int HW, float eps) {
    bn_forward_train_impl(x, gamma, beta, y, mean_out, invstd_out, var_unbiased_out, N, C, HW, eps, true);
}

// Training backward with xhat = (x - mean) * invstd, M = N*HW:
// dgamma = sum dy*xhat, dbeta = sum dy, dx = gamma*invstd*(dy - dbeta/M - xhat*dgamma/M).
// With a ReLU after the BatchNorm, y (its output) is given and dy is masked to y > 0 on load, so
// the ReLU gradient is never written out.
template <typename T>
__device__ __forceinline__ void bn_backward_train_impl(const T* dy_in, const T* y, const T* x, const float* gamma,
                                                       const float* mean, const float* invstd, T* dx, float* dgamma,
                                                       float* dbeta, int N, int C, int HW) {
    __shared__ double scratch[32];
    const int c = blockIdx.x, M = N * HW;
    const float m = mean[c], is = invstd[c];
    // dy after the ReLU mask when there is one.
    auto grad = [&](long long i) { return y == nullptr || ld(y, i) > 0.0f ? ld(dy_in, i) : 0.0f; };
    double sdy = 0.0, sdyx = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const long long i = bn_index(j, c, C, HW);
        const float g = grad(i);
        sdy += g;
        sdyx += (double)g * ((ld(x, i) - m) * is);
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
        st(dx, i, k * (grad(i) - mdy - (ld(x, i) - m) * is * mdyx));
    }
}

extern "C" __global__ void bn_backward_train(const float* dy, const float* x, const float* gamma, const float* mean,
                                             const float* invstd, float* dx, float* dgamma, float* dbeta, int N, int C, int HW) {
    bn_backward_train_impl(dy, (const float*)nullptr, x, gamma, mean, invstd, dx, dgamma, dbeta, N, C, HW);
}
extern "C" __global__ void bn_backward_train_bf16(const bf16* dy, const bf16* x, const float* gamma, const float* mean,
                                                  const float* invstd, bf16* dx, float* dgamma, float* dbeta, int N, int C, int HW) {
    bn_backward_train_impl(dy, (const bf16*)nullptr, x, gamma, mean, invstd, dx, dgamma, dbeta, N, C, HW);
}

// Backward of relu(batchnorm(x)) given its output y.
extern "C" __global__ void bn_relu_backward_train(const float* dy, const float* y, const float* x, const float* gamma,
                                                  const float* mean, const float* invstd, float* dx, float* dgamma, float* dbeta,
                                                  int N, int C, int HW) {
    bn_backward_train_impl(dy, y, x, gamma, mean, invstd, dx, dgamma, dbeta, N, C, HW);
}
extern "C" __global__ void bn_relu_backward_train_bf16(const bf16* dy, const bf16* y, const bf16* x, const float* gamma,
                                                       const float* mean, const float* invstd, bf16* dx, float* dgamma,
                                                       float* dbeta, int N, int C, int HW) {
    bn_backward_train_impl(dy, y, x, gamma, mean, invstd, dx, dgamma, dbeta, N, C, HW);
}

// Eval forward with the running statistics, elementwise over all N*C*HW values.
template <typename T>
__device__ __forceinline__ void bn_forward_eval_impl(const T* x, const float* gamma, const float* beta, const float* rmean,
                                                     const float* rvar, T* y, int n, int C, int HW, float eps) {
    GRID_STRIDE(i, n) {
        const int c = (int)((i / HW) % C);
        st(y, i, (ld(x, i) - rmean[c]) * (gamma[c] / sqrtf(rvar[c] + eps)) + beta[c]);
    }
}
extern "C" __global__ void bn_forward_eval(const float* x, const float* gamma, const float* beta, const float* rmean,
                                           const float* rvar, float* y, int n, int C, int HW, float eps) {
    bn_forward_eval_impl(x, gamma, beta, rmean, rvar, y, n, C, HW, eps);
}
extern "C" __global__ void bn_forward_eval_bf16(const bf16* x, const float* gamma, const float* beta, const float* rmean,
                                                const float* rvar, bf16* y, int n, int C, int HW, float eps) {
    bn_forward_eval_impl(x, gamma, beta, rmean, rvar, y, n, C, HW, eps);
}

// Eval backward: dx = dy*gamma/sqrt(var+eps), dgamma = sum dy*(x-mean)/sqrt(var+eps), dbeta = sum dy.
template <typename T>
__device__ __forceinline__ void bn_backward_eval_impl(const T* dy, const T* x, const float* gamma, const float* rmean,
                                                      const float* rvar, T* dx, float* dgamma, float* dbeta, int N, int C, int HW,
                                                      float eps) {
    __shared__ double scratch[32];
    const int c = blockIdx.x, M = N * HW;
    const float m = rmean[c], is = 1.0f / sqrtf(rvar[c] + eps), k = gamma[c] * is;
    double sdy = 0.0, sdyx = 0.0;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const long long i = bn_index(j, c, C, HW);
        const float g = ld(dy, i);
        sdy += g;
        sdyx += (double)g * ((ld(x, i) - m) * is);
        st(dx, i, g * k);
    }
    const double sum_dy = block_sum_d(sdy, scratch);
    const double sum_dy_xhat = block_sum_d(sdyx, scratch);
    if (threadIdx.x == 0) {
        dgamma[c] = (float)sum_dy_xhat;
        dbeta[c] = (float)sum_dy;
    }
}
extern "C" __global__ void bn_backward_eval(const float* dy, const float* x, const float* gamma, const float* rmean,
                                            const float* rvar, float* dx, float* dgamma, float* dbeta, int N, int C, int HW,
                                            float eps) {
    bn_backward_eval_impl(dy, x, gamma, rmean, rvar, dx, dgamma, dbeta, N, C, HW, eps);
}
extern "C" __global__ void bn_backward_eval_bf16(const bf16* dy, const bf16* x, const float* gamma, const float* rmean,
                                                 const float* rvar, bf16* dx, float* dgamma, float* dbeta, int N, int C, int HW,
                                                 float eps) {
    bn_backward_eval_impl(dy, x, gamma, rmean, rvar, dx, dgamma, dbeta, N, C, HW, eps);
}

// running <- (1 - momentum) running + momentum batch, for the mean and the unbiased variance.
extern "C" __global__ void bn_update_running(float* rmean, float* rvar, const float* mean, const float* var_unbiased,
                                             float momentum, int C) {
    GRID_STRIDE(c, C) {
        rmean[c] = (1.0f - momentum) * rmean[c] + momentum * mean[c];
        rvar[c] = (1.0f - momentum) * rvar[c] + momentum * var_unbiased[c];
    }
}
