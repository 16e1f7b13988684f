//! The optimizer step on the GPU (kernels/optim.cu): per tensor, or many tensors per launch; and
//! the training step's statistics accumulated on the device.

use super::{grid_for, int, launch, ptr, ptr_mut, Arg, TensorTable, BLOCK};
use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Blocks of a multi-tensor launch: enough for the largest tables, few enough that the many small
/// tensors (BatchNorm vectors) do not leave most blocks idle for long.
const MULTI_GRID: usize = 1024;

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
    let [step_size, bc2_sqrt] = adam_hyper(lr, beta1, beta2, step);
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
            Arg::F32(step_size),
            Arg::F32(bc2_sqrt),
        ],
    )
}

/// One parameter of a multi-tensor Adam launch.
pub struct AdamSlot<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
}

/// `adam_update` on many tensors with a few launches (`TABLE_TENSORS` tensors each). The step size
/// lr / (1 - b1^t) and sqrt(1 - b2^t) are read from the device tensor `hyper` [2] at run time, so a
/// captured graph replays with whatever the host wrote there last. As everywhere, a shared buffer
/// is copied before it is written (`TrainGraph::capture` checks that no parameter moved).
pub fn adam_multi(slots: &mut [AdamSlot], hyper: &Tensor, beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Result<()> {
    const OP: &str = "adam_multi";
    crate::ensure_shape!(
        hyper.shape() == [2] && hyper.device() == Device::Cuda,
        OP,
        "hyper must be a [2] GPU tensor, got {:?}",
        hyper.shape()
    );
    let mut rows = Vec::with_capacity(slots.len());
    for s in slots.iter_mut() {
        let dev = s.param.check_same(OP, &[s.grad, s.m, s.v])?;
        crate::ensure_shape!(dev == Device::Cuda, OP, "expects tensors on the GPU, got {dev}");
        for (name, t) in [("grad", s.grad), ("m", &*s.m), ("v", &*s.v)] {
            crate::ensure_shape!(t.shape() == s.param.shape(), OP, "{name} {:?} != param {:?}", t.shape(), s.param.shape());
        }
        rows.push(([ptr_mut(s.param)?, ptr(s.grad)?, ptr_mut(s.m)?, ptr_mut(s.v)?], s.param.numel()));
    }
    let ph = ptr(hyper)?;
    for table in TensorTable::build(&rows) {
        let grid = grid_for(table.total()).min(MULTI_GRID as u32);
        launch(
            "optim.cu",
            "adam_multi",
            grid,
            BLOCK,
            &[Arg::Table(Box::new(table)), Arg::Ptr(ph), Arg::F32(beta1), Arg::F32(beta2), Arg::F32(eps), Arg::F32(weight_decay)],
        )?;
    }
    Ok(())
}

/// The device values `adam_multi` reads at step `step` (1-based): [lr / (1 - b1^t), sqrt(1 - b2^t)],
/// computed in f64 from the f32 settings, as torch does from Python floats.
pub fn adam_hyper(lr: f32, beta1: f32, beta2: f32, step: u32) -> [f32; 2] {
    let t = step.min(i32::MAX as u32) as i32;
    [(lr as f64 / (1.0 - (beta1 as f64).powi(t))) as f32, (1.0 - (beta2 as f64).powi(t)).sqrt() as f32]
}

/// acc [8] += (the seven loss terms, the rows of `logits` whose first maximum is at the label),
/// on the GPU: the step's statistics are read back only when the log needs them.
pub fn accumulate_step_stats(acc: &mut Tensor, terms: [&Tensor; 7], logits: &Tensor, labels: &[usize]) -> Result<()> {
    const OP: &str = "accumulate_step_stats";
    let (n, k) = logits.dims2(OP)?;
    crate::ensure_shape!(acc.shape() == [8], OP, "the accumulator must have shape [8], got {:?}", acc.shape());
    crate::ensure_shape!(n == labels.len(), OP, "{} labels for logits {:?}", labels.len(), logits.shape());
    for t in terms {
        crate::ensure_shape!(t.numel() == 1, OP, "a loss term has shape {:?}, not [1]", t.shape());
    }
    let y = super::labels(labels)?;
    let mut args = vec![Arg::Ptr(ptr_mut(acc)?)];
    for t in terms {
        args.push(Arg::Ptr(ptr(t)?));
    }
    args.extend([Arg::Ptr(ptr(logits)?), Arg::Ptr(y.ptr()), int(n), int(k)]);
    launch("optim.cu", "step_stats_accumulate", 1, BLOCK, &args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::TABLE_TENSORS;

    #[test]
    fn tables_hold_every_tensor_once_in_order() {
        let rows: Vec<([u64; 4], usize)> =
            (0..2 * TABLE_TENSORS as u64 + 5).map(|i| ([4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], 1 + i as usize % 7)).collect();
        let tables = TensorTable::build(&rows);
        assert_eq!(tables.iter().map(|t| t.count as usize).collect::<Vec<_>>(), [TABLE_TENSORS, TABLE_TENSORS, 5]);
        let mut seen = 0;
        for t in &tables {
            for i in 0..t.count as usize {
                let (ptrs, len) = rows[seen];
                assert_eq!([t.ptrs[0][i], t.ptrs[1][i], t.ptrs[2][i], t.ptrs[3][i]], ptrs);
                assert_eq!(t.len[i] as usize, len);
                seen += 1;
            }
            // Unused rows stay zero: the kernel never reads them.
            assert!(t.len[t.count as usize..].iter().all(|&n| n == 0));
        }
        assert_eq!(seen, rows.len());
        assert_eq!(tables.iter().map(TensorTable::total).sum::<usize>(), rows.iter().map(|r| r.1).sum::<usize>());
        assert!(TensorTable::build(&[]).is_empty());
        // The by-value kernel parameter must fit CUDA's 4 KiB limit with the other arguments.
        assert!(std::mem::size_of::<TensorTable>() + 32 <= 4096);
    }

    #[test]
    fn tensor_table_layout_matches_the_kernel() {
        // SAFETY: only dlopens and closes the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            println!("SKIP: tensor_table_layout_matches_the_kernel: libnvrtc not found (source .ci/nvrtc-env.sh)");
            return;
        }
        // The kernel file with the Rust layout asserted at compile time (member sizes, in the
        // same order, and the total fix the offsets).
        let t = TensorTable { ptrs: [[0; TABLE_TENSORS]; 4], len: [0; TABLE_TENSORS], count: 0 };
        let checks = format!(
            "\nstatic_assert(TABLE_TENSORS == {}, \"rows\");\nstatic_assert(sizeof(TensorTable) == {}, \"size\");\n\
             static_assert(sizeof(((TensorTable*)0)->ptr) == {}, \"ptr\");\nstatic_assert(sizeof(((TensorTable*)0)->len) == {}, \"len\");\n",
            TABLE_TENSORS,
            std::mem::size_of::<TensorTable>(),
            std::mem::size_of_val(&t.ptrs),
            std::mem::size_of_val(&t.len)
        );
        assert_eq!(std::mem::offset_of!(TensorTable, len), std::mem::size_of_val(&t.ptrs));
        assert_eq!(std::mem::offset_of!(TensorTable, count), std::mem::size_of_val(&t.ptrs) + std::mem::size_of_val(&t.len));
        let src = crate::cuda::nvrtc::expand("optim.cu").unwrap() + &checks;
        crate::cuda::nvrtc::compile_source("optim.cu", &src, "sm_90").unwrap();
        // And the check itself bites: a wrong size fails to compile.
        let wrong = crate::cuda::nvrtc::expand("optim.cu").unwrap() + "\nstatic_assert(sizeof(TensorTable) == 8, \"size\");\n";
        assert!(crate::cuda::nvrtc::compile_source("optim.cu", &wrong, "sm_90").is_err());
    }
}
