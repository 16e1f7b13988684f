//! The optimizer step on the GPU (kernels/optim.cu).

use super::{grid_for, int, launch, ptr, ptr_mut, Arg, BLOCK};
use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// One torch.optim.Adam step (coupled L2, amsgrad off) in place on device tensors, `step` being the
/// 1-based step count: g = grad + wd p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
#[allow(clippy::too_many_arguments)]
pub fn adam_update(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: u32,
) -> Result<()> {
    const OP: &str = "adam_update";
    let dev = param.check_same(OP, &[grad, m, v])?;
    crate::ensure_shape!(dev == Device::Cuda, OP, "expects tensors on the GPU, got {dev}");
    crate::ensure_shape!(step >= 1, OP, "the step count starts at 1");
    for (name, t) in [("grad", grad), ("m", &*m), ("v", &*v)] {
        crate::ensure_shape!(t.shape() == param.shape(), OP, "{name} {:?} != param {:?}", t.shape(), param.shape());
    }
    let bc1 = 1.0 - (beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (beta2 as f64).powi(step as i32);
    let n = param.numel();
    let (pg, pp, pm, pv) = (ptr(grad)?, ptr_mut(param)?, ptr_mut(m)?, ptr_mut(v)?);
    launch(
        "optim.cu",
        "adam_update",
        grid_for(n),
        BLOCK,
        &[
            Arg::Ptr(pp),
            Arg::Ptr(pg),
            Arg::Ptr(pm),
            Arg::Ptr(pv),
            int(n),
            Arg::F32(beta1),
            Arg::F32(beta2),
            Arg::F32(eps),
            Arg::F32(weight_decay),
            Arg::F32((lr as f64 / bc1) as f32),
            Arg::F32(bc2.sqrt() as f32),
        ],
    )
}
