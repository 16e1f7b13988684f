//! Convolution, BatchNorm (1d and 2d) and fully connected layers.

use super::{join, Ctx};
use crate::error::Result;
use crate::ops::batchnorm::{self, BN_EPS, BN_MOMENTUM};
use crate::ops::conv::Conv2dCfg;
use crate::params::{Kind, ParamId, ParamStore};
use crate::rng::Rng;
use crate::tape::Var;
use crate::tensor::{Device, Tensor};

/// How a convolution's weights are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvInit {
    /// OSNet's init: Kaiming normal with fan_out = out channels x kernel area and the ReLU gain,
    /// bias 0.
    KaimingNormalFanOut,
    /// PyTorch's default for a new `nn.Conv2d` (the attention modules): weight and bias
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    PytorchDefault,
}

pub struct Conv2d {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub cfg: Conv2dCfg,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        cfg: Conv2dCfg,
        bias: bool,
        init: ConvInit,
        rng: &mut Rng,
    ) -> Result<Conv2d> {
        let shape = [cout, cin / cfg.groups, kernel, kernel];
        let fan_in = shape[1] * kernel * kernel;
        let (w, b) = match init {
            ConvInit::KaimingNormalFanOut => {
                let std = (2.0 / (cout * kernel * kernel) as f64).sqrt() as f32;
                (Tensor::randn(&shape, std, rng), Tensor::zeros(&[cout], Device::Cpu)?)
            }
            ConvInit::PytorchDefault => {
                let bound = (1.0 / fan_in as f64).sqrt() as f32;
                let w = Tensor::rand_uniform(&shape, -bound, bound, rng);
                (w, Tensor::rand_uniform(&[cout], -bound, bound, rng))
            }
        };
        let weight = store.add(join(name, "weight"), w, Kind::Param)?;
        let bias = if bias { Some(store.add(join(name, "bias"), b, Kind::Param)?) } else { None };
        Ok(Conv2d { weight, bias, cfg })
    }

    /// `x` must be in the activation dtype; the weight is cast to it, the bias stays f32.
    pub fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let w = ctx.conv_weight(self.weight)?;
        let b = self.bias.map(|id| ctx.param(id));
        ctx.tape.conv2d(x, &w, b.as_ref(), self.cfg)
    }
}

/// BatchNorm over axis 1 of [N, C] or [N, C, H, W] (PyTorch's BatchNorm1d / BatchNorm2d, affine,
/// with running statistics, eps 1e-5, momentum 0.1).
pub struct BatchNorm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
    pub num_batches_tracked: ParamId,
}

impl BatchNorm {
    /// gamma 1, beta 0, running mean 0, running variance 1.
    pub fn new(store: &mut ParamStore, name: &str, channels: usize) -> Result<BatchNorm> {
        let c = [channels];
        Ok(BatchNorm {
            weight: store.add(join(name, "weight"), Tensor::ones(&c, Device::Cpu)?, Kind::Param)?,
            bias: store.add(join(name, "bias"), Tensor::zeros(&c, Device::Cpu)?, Kind::Param)?,
            running_mean: store.add(join(name, "running_mean"), Tensor::zeros(&c, Device::Cpu)?, Kind::Buffer)?,
            running_var: store.add(join(name, "running_var"), Tensor::ones(&c, Device::Cpu)?, Kind::Buffer)?,
            num_batches_tracked: store.add(join(name, "num_batches_tracked"), Tensor::zeros(&[], Device::Cpu)?, Kind::Counter)?,
        })
    }

    /// Training mode normalises with the batch statistics and folds them into the running
    /// averages; eval mode uses the running averages.
    pub fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        self.forward_impl(ctx, x, false)
    }

    /// relu(forward(x)); in training one fused op (the GPU saves a pass over the output each way).
    pub fn forward_relu(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        self.forward_impl(ctx, x, true)
    }

    fn forward_impl(&self, ctx: &mut Ctx, x: &Var, relu: bool) -> Result<Var> {
        let gamma = ctx.param(self.weight);
        let beta = ctx.param(self.bias);
        if !ctx.train {
            let (mean, var) = (ctx.params.get(self.running_mean), ctx.params.get(self.running_var));
            let y = ctx.tape.batchnorm_eval(x, &gamma, &beta, mean, var, BN_EPS)?;
            return if relu { ctx.tape.relu(&y) } else { Ok(y) };
        }
        let (y, stats) = if relu {
            ctx.tape.batchnorm_relu_train(x, &gamma, &beta, BN_EPS)?
        } else {
            ctx.tape.batchnorm_train(x, &gamma, &beta, BN_EPS)?
        };
        // Taken out of the store for the update so that neither buffer is shared (no copy).
        let mut mean = take(ctx.params, self.running_mean)?;
        let mut var = take(ctx.params, self.running_var)?;
        let updated = batchnorm::batchnorm_update_running(&mut mean, &mut var, &stats, BN_MOMENTUM);
        *ctx.params.get_mut(self.running_mean) = mean;
        *ctx.params.get_mut(self.running_var) = var;
        updated?;
        let counter = ctx.params.get_mut(self.num_batches_tracked);
        *counter = Tensor::from_vec(vec![counter.item()? + 1.0], &[])?;
        Ok(y)
    }
}

fn take(store: &mut ParamStore, id: ParamId) -> Result<Tensor> {
    Ok(std::mem::replace(store.get_mut(id), Tensor::from_vec(Vec::new(), &[0])?))
}

/// y = x W^T + b, weight [out, in].
pub struct Linear {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
}

impl Linear {
    /// Weight N(0, std), bias 0 (OSNet's and PLR-OSNet's init uses std 0.01).
    pub fn new(store: &mut ParamStore, name: &str, inputs: usize, outputs: usize, bias: bool, std: f32, rng: &mut Rng) -> Result<Linear> {
        let weight = store.add(join(name, "weight"), Tensor::randn(&[outputs, inputs], std, rng), Kind::Param)?;
        let bias = if bias { Some(store.add(join(name, "bias"), Tensor::zeros(&[outputs], Device::Cpu)?, Kind::Param)?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let w = ctx.param(self.weight);
        let b = self.bias.map(|id| ctx.param(id));
        ctx.tape.linear(x, &w, b.as_ref())
    }
}
