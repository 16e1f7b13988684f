//! Row-major matrix products through cuBLAS (column-major), by computing C^T = op(B)^T op(A)^T:
//! a row-major [r, c] matrix is the column-major [c, r] matrix with leading dimension c, so the
//! operands are passed swapped and nothing is transposed in memory. Default math mode: plain FP32
//! FMA, no TF32, so results match the CPU to rounding.

use std::sync::Arc;

use cudarc::cublas::{result, sys};
use cudarc::driver::CudaStream;

use super::{backend, lock};
use crate::error::{Error, Result};

/// The engine's one cuBLAS handle (used under the backend's mutex).
pub(crate) struct Blas(sys::cublasHandle_t);

// SAFETY: the handle is only used while holding the backend's mutex.
unsafe impl Send for Blas {}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Blas> {
        let err = |what: &str, e: result::CublasError| Error::Cuda(format!("cuBLAS {what}: {e:?}"));
        stream.context().bind_to_thread().map_err(|e| super::driver_err("binding the context", e))?;
        let blas = Blas(result::create_handle().map_err(|e| err("create", e))?);
        // SAFETY: a live handle and the engine's stream.
        unsafe {
            result::set_stream(blas.0, stream.cu_stream() as _).map_err(|e| err("set_stream", e))?;
            sys::cublasSetMathMode(blas.0, sys::cublasMath_t::CUBLAS_DEFAULT_MATH).result().map_err(|e| err("set_math_mode", e))?;
        }
        Ok(blas)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

/// C[b] = alpha op(A[b]) op(B[b]) + beta C[b] for b < batch, all row-major and densely packed:
/// op(A) is [m, k] (A stored [k, m] when `trans_a`), op(B) is [k, n], C is [m, n].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

fn op(t: bool) -> sys::cublasOperation_t {
    if t {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// Runs `g` on device addresses a, b, c.
pub(crate) fn gemm(g: Gemm, a: u64, b: u64, c: u64) -> Result<()> {
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let be = backend()?;
    let (m, n, k) = (g.m as i32, g.n as i32, g.k as i32);
    // Column-major view: first operand op(B)^T [n, k], second op(A)^T [k, m], result [n, m].
    // Leading dimensions must be at least 1 even for an empty k.
    let ldb = if g.trans_b { k } else { n }.max(1);
    let lda = if g.trans_a { m } else { k }.max(1);
    let blas = lock(&be.blas);
    be.ctx.bind_to_thread().map_err(|e| super::driver_err("binding the context", e))?;
    // SAFETY: the callers pass buffers of batch*m*k, batch*k*n and batch*m*n values.
    let r = unsafe {
        if g.batch == 1 {
            result::sgemm(
                blas.0,
                op(g.trans_b),
                op(g.trans_a),
                n,
                m,
                k,
                &g.alpha,
                b as *const f32,
                ldb,
                a as *const f32,
                lda,
                &g.beta,
                c as *mut f32,
                n,
            )
        } else {
            result::sgemm_strided_batched(
                blas.0,
                op(g.trans_b),
                op(g.trans_a),
                n,
                m,
                k,
                &g.alpha,
                b as *const f32,
                ldb,
                (g.k * g.n) as i64,
                a as *const f32,
                lda,
                (g.m * g.k) as i64,
                &g.beta,
                c as *mut f32,
                n,
                (g.m * g.n) as i64,
                g.batch as i32,
            )
        }
    };
    r.map_err(|e| Error::Cuda(format!("cuBLAS sgemm {g:?}: {e:?}")))
}
