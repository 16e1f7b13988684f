//! One error type for the whole engine. Every failure that user input can cause ends up here with a
//! message naming the op, tensor, file or flag involved; nothing reachable from user input panics.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op was given tensors whose shapes do not fit together.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// An op was given a tensor of an element type it does not support.
    #[error("{op}: unsupported dtype {dtype}")]
    DType { op: &'static str, dtype: crate::tensor::DType },
    /// Inputs of one op have different element types (the model casts where it mixes them).
    #[error("{op}: tensors of different dtypes ({a} and {b})")]
    DTypeMismatch { op: &'static str, a: crate::tensor::DType, b: crate::tensor::DType },
    /// Inputs of one op live on different devices.
    #[error("{op}: tensors on different devices ({a:?} and {b:?})")]
    DeviceMismatch { op: &'static str, a: crate::tensor::Device, b: crate::tensor::Device },
    /// CUDA was asked for and is unavailable, or a CUDA call failed.
    #[error("cuda: {0}")]
    Cuda(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A weights file or checkpoint does not match what the model expects.
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

/// Returns a shape error from the enclosing function when `cond` is false.
#[macro_export]
macro_rules! ensure_shape {
    ($cond:expr, $op:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::shape($op, format!($($fmt)+)));
        }
    };
}
