// Optimizer steps, in place on flat parameter buffers.
#include "common.cuh"

// torch.optim.Adam (coupled L2, amsgrad off), as torch computes it: g = grad + wd p;
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v) / bc2_sqrt + eps) with
// step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on the host.
extern "C" __global__ void adam_update(float* p, const float* grad, float* m, float* v, int n, float b1, float b2, float eps,
                                       float wd, float step_size, float bc2_sqrt) {
    GRID_STRIDE(i, n) {
        const float g = grad[i] + wd * p[i];
        const float mi = b1 * m[i] + (1.0f - b1) * g;
        const float vi = b2 * v[i] + (1.0f - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
