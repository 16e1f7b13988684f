use crate::error::Result;
use crate::ops::gemm::sgemm;
use crate::tensor::Tensor;

/// (batch, in features, out features)
type Dims = (usize, usize, usize);

pub(super) fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, (n, din, dout): Dims) -> Result<Tensor> {
    // Start from the bias rows and let the GEMM accumulate x W^T onto them.
    let mut y = match b {
        Some(b) => b.cpu_slice()?.repeat(n),
        None => vec![0.0; n * dout],
    };
    sgemm(n, dout, din, x.cpu_slice()?, false, w.cpu_slice()?, true, &mut y, b.is_some(), true);
    Tensor::from_vec(y, &[n, dout])
}

pub(super) fn linear_backward(dy: &Tensor, x: &Tensor, w: &Tensor, (n, din, dout): Dims) -> Result<(Tensor, Tensor, Tensor)> {
    let (dyv, xv, wv) = (dy.cpu_slice()?, x.cpu_slice()?, w.cpu_slice()?);
    let mut dx = vec![0.0; n * din];
    sgemm(n, din, dout, dyv, false, wv, false, &mut dx, false, true);
    let mut dw = vec![0.0; dout * din];
    sgemm(dout, din, n, dyv, true, xv, false, &mut dw, false, true);
    let mut db = vec![0.0f64; dout];
    for row in dyv.chunks_exact(dout.max(1)) {
        db.iter_mut().zip(row).for_each(|(s, &g)| *s += g as f64);
    }
    let db = db.into_iter().map(|v| v as f32).collect();
    Ok((Tensor::from_vec(dx, &[n, din])?, Tensor::from_vec(dw, &[dout, din])?, Tensor::from_vec(db, &[dout])?))
}
