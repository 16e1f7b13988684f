//! Layers with named parameters. A layer registers its tensors in a `ParamStore` under PyTorch's
//! state-dict keys when it is built and keeps only their ids; a forward pass borrows the store and
//! a tape through a `Ctx`.

mod layers;

pub use layers::{BatchNorm, Conv2d, ConvInit, Linear};

use crate::error::{Error, Result};
use crate::params::{ParamId, ParamStore};
use crate::tape::{Tape, Var};
use crate::tensor::DType;

/// The arithmetic of a forward pass. `Bf16` is mixed precision (docs/DECISIONS.md): the image, the
/// convolution weights and the backbone's activations are bf16; the master weights, BatchNorm
/// parameters and statistics, the position attention's matrix products and softmax, and
/// everything from the pooled features on (BN neck, classifiers, losses, eval features) stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    #[default]
    F32,
    /// bf16 mixed precision.
    Bf16,
}

impl Precision {
    /// The names the configuration and the `--precision` flag use.
    pub const NAMES: &'static str = "f32 or bf16";

    /// Parses "f32" or "bf16"; `key` (a flag or configuration key) names the error.
    pub fn parse(s: &str, key: &str) -> Result<Precision> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::msg(format!("{key}: {s:?} is not {}", Self::NAMES))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The dtype of the backbone's activations and convolution weights.
    pub fn activation_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// What a forward pass needs: the tape that records it, the parameters (BatchNorm updates its
/// running statistics in training mode), the mode and the precision.
pub struct Ctx<'a> {
    pub tape: &'a mut Tape,
    pub params: &'a mut ParamStore,
    pub train: bool,
    pub precision: Precision,
}

impl<'a> Ctx<'a> {
    /// An f32 forward pass.
    pub fn new(tape: &'a mut Tape, params: &'a mut ParamStore, train: bool) -> Self {
        Ctx { tape, params, train, precision: Precision::F32 }
    }

    pub fn with_precision(self, precision: Precision) -> Self {
        Ctx { precision, ..self }
    }

    /// The parameter as a tape variable (its gradient is collected when the tape records).
    pub fn param(&mut self, id: ParamId) -> Var {
        self.tape.param(self.params, id)
    }

    /// A convolution weight in the activation dtype: under bf16 a cast of the f32 master weight,
    /// made afresh every forward (never cached across optimiser steps); its backward returns the
    /// gradient to the master weight as f32.
    pub fn conv_weight(&mut self, id: ParamId) -> Result<Var> {
        let w = self.param(id);
        self.tape.cast(&w, self.precision.activation_dtype())
    }

    /// `x` in the activation dtype (the input image, and the way back from f32 sections).
    pub fn to_activation(&mut self, x: &Var) -> Result<Var> {
        self.tape.cast(x, self.precision.activation_dtype())
    }

    /// `x` as f32 (into the f32 sections: attention products, the neck, losses).
    pub fn to_f32(&mut self, x: &Var) -> Result<Var> {
        self.tape.cast(x, DType::F32)
    }
}

/// `prefix.name`, or `name` alone for an empty prefix.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}
