//! The CUDA backend. Placeholder until the CUDA issue lands: every entry point reports that CUDA is
//! not available, so `Device::Cuda` tensors cannot be created yet.

use crate::error::{Error, Result};

/// A device buffer of f32 values.
pub struct CudaBuffer {
    len: usize,
}

pub(crate) fn unavailable<T>() -> Result<T> {
    Err(Error::Cuda("the CUDA backend is not built into this version".into()))
}

impl CudaBuffer {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn from_host(_data: &[f32]) -> Result<CudaBuffer> {
        unavailable()
    }
    pub fn to_host(&self) -> Result<Vec<f32>> {
        unavailable()
    }
    pub fn try_clone(&self) -> Result<CudaBuffer> {
        unavailable()
    }
}

/// Checks that a CUDA driver, a GPU and the libraries the engine needs can be used; the error
/// names what is missing.
pub fn probe() -> std::result::Result<(), String> {
    Err("the CUDA backend is not built into this version".into())
}
