//! Reverse-mode autograd. A training forward records one `Op` node per op on a `Tape`, holding the
//! ids of its inputs and the tensors its backward needs; `backward` walks the nodes in reverse,
//! summing gradients where a value fans out to several ops or a parameter is used several times.
//!
//! With recording off (evaluation) nothing is stored: a `Var` is just its value, and activations
//! are freed as soon as the forward drops them.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ops::batchnorm::{self, BnBatchStats};
use crate::ops::conv::{self, Conv2dCfg};
use crate::ops::pool::{self, Pool2dCfg};
use crate::ops::{attention, elementwise as ew, linear, loss};
use crate::params::{Kind, ParamId, ParamStore};
use crate::tensor::{DType, Tensor};

pub type NodeId = usize;

/// A value flowing through a forward pass, with the tape node that produced it when its gradient
/// is wanted.
#[derive(Clone, Debug)]
pub struct Var {
    value: Tensor,
    node: Option<NodeId>,
}

impl Var {
    /// A value whose gradient is never wanted (an input image, a constant).
    pub fn constant(value: Tensor) -> Var {
        Var { value, node: None }
    }

    pub fn value(&self) -> &Tensor {
        &self.value
    }

    pub fn into_value(self) -> Tensor {
        self.value
    }

    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }

    pub fn requires_grad(&self) -> bool {
        self.node.is_some()
    }

    pub fn node(&self) -> Option<NodeId> {
        self.node
    }
}

type Src = Option<NodeId>;

enum Op {
    Leaf,
    Param(ParamId),
    Conv2d { x: Src, w: Src, b: Src, x_val: Tensor, w_val: Tensor, cfg: Conv2dCfg },
    BatchNormTrain { x: Src, gamma: Src, beta: Src, x_val: Tensor, gamma_val: Tensor, stats: BnBatchStats },
    BatchNormReluTrain { x: Src, gamma: Src, beta: Src, x_val: Tensor, gamma_val: Tensor, y: Tensor, stats: BnBatchStats },
    BatchNormEval { x: Src, gamma: Src, beta: Src, x_val: Tensor, gamma_val: Tensor, mean: Tensor, var: Tensor, eps: f32 },
    Relu { x: Src, y: Tensor },
    Sigmoid { x: Src, y: Tensor },
    Add { a: Src, b: Src, b_shape: Vec<usize> },
    Mul { a: Src, b: Src, a_val: Tensor, b_val: Tensor },
    Scale { x: Src, alpha: f32 },
    SumAll { x: Src, shape: Vec<usize> },
    L2Normalize { x: Src, x_val: Tensor },
    Concat { inputs: Vec<(Src, usize)>, axis: usize },
    Reshape { x: Src, shape: Vec<usize> },
    Cast { x: Src, from: DType },
    MaxPool2d { x: Src, x_val: Tensor, cfg: Pool2dCfg },
    AvgPool2d { x: Src, shape: Vec<usize>, cfg: Pool2dCfg },
    GlobalAvgPool { x: Src, shape: Vec<usize> },
    GlobalMaxPool { x: Src, x_val: Tensor },
    StripeAvgPool { x: Src, shape: Vec<usize>, parts: usize },
    Linear { x: Src, w: Src, b: Src, x_val: Tensor, w_val: Tensor },
    Bmm { a: Src, b: Src, a_val: Tensor, b_val: Tensor, trans_a: bool, trans_b: bool },
    Softmax { x: Src, y: Tensor },
    CrossEntropy { logits: Src, logits_val: Tensor, labels: Vec<usize>, eps: f32 },
    Triplet { x: Src, x_val: Tensor, labels: Vec<usize> },
    Center { x: Src, c: Src, x_val: Tensor, c_val: Tensor, labels: Vec<usize> },
}

/// Gradients produced by `Tape::backward`: per parameter (summed over every use) and per leaf.
#[derive(Default)]
pub struct Grads {
    params: HashMap<ParamId, Tensor>,
    leaves: HashMap<NodeId, Tensor>,
}

impl Grads {
    pub fn param(&self, id: ParamId) -> Option<&Tensor> {
        self.params.get(&id)
    }

    /// The gradient of a leaf created with `Tape::leaf`.
    pub fn of(&self, v: &Var) -> Option<&Tensor> {
        v.node.and_then(|n| self.leaves.get(&n))
    }

    pub fn params(&self) -> &HashMap<ParamId, Tensor> {
        &self.params
    }

    pub fn into_params(self) -> HashMap<ParamId, Tensor> {
        self.params
    }
}

pub struct Tape {
    nodes: Vec<Op>,
    recording: bool,
}

fn src(v: &Var) -> Src {
    v.node
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(prev) => ew::add(&prev, &g)?,
        None => g,
    });
    Ok(())
}

impl Tape {
    /// A tape that records (training with gradients).
    pub fn new() -> Self {
        Tape { nodes: Vec::new(), recording: true }
    }

    /// A tape that records nothing (evaluation): no gradients, no stored activations.
    pub fn no_grad() -> Self {
        Tape { nodes: Vec::new(), recording: false }
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Wraps `value` as a Var; records `op` only if recording and some input needs a gradient.
    fn push(&mut self, value: Tensor, needs_grad: bool, op: impl FnOnce() -> Op) -> Var {
        if self.recording && needs_grad {
            self.nodes.push(op());
            Var { value, node: Some(self.nodes.len() - 1) }
        } else {
            Var { value, node: None }
        }
    }

    /// An input whose gradient `backward` reports (used by gradient checks).
    pub fn leaf(&mut self, value: Tensor) -> Var {
        self.push(value, true, || Op::Leaf)
    }

    /// A parameter of the store; its gradient is summed over every use in the forward.
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Var {
        let trainable = store.entry(id).kind == Kind::Param;
        self.push(store.get(id).clone(), trainable, || Op::Param(id))
    }

    pub fn conv2d(&mut self, x: &Var, w: &Var, b: Option<&Var>, cfg: Conv2dCfg) -> Result<Var> {
        let y = conv::conv2d_forward(&x.value, &w.value, b.map(|b| &b.value), cfg)?;
        let need = x.requires_grad() || w.requires_grad() || b.is_some_and(Var::requires_grad);
        Ok(self.push(y, need, || Op::Conv2d {
            x: src(x),
            w: src(w),
            b: b.and_then(src),
            x_val: x.value.clone(),
            w_val: w.value.clone(),
            cfg,
        }))
    }

    /// Training-mode BatchNorm; also returns the batch statistics for the running-average update.
    pub fn batchnorm_train(&mut self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<(Var, BnBatchStats)> {
        let (y, stats) = batchnorm::batchnorm_forward_train(&x.value, &gamma.value, &beta.value, eps)?;
        let need = x.requires_grad() || gamma.requires_grad() || beta.requires_grad();
        let saved = stats.clone();
        let v = self.push(y, need, || Op::BatchNormTrain {
            x: src(x),
            gamma: src(gamma),
            beta: src(beta),
            x_val: x.value.clone(),
            gamma_val: gamma.value.clone(),
            stats: saved,
        });
        Ok((v, stats))
    }

    /// relu(batchnorm_train(x)) as one op (the op keeps its output y as the ReLU mask): the GPU
    /// applies the ReLU in the normalising pass and its mask inside the BatchNorm backward.
    pub fn batchnorm_relu_train(&mut self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<(Var, BnBatchStats)> {
        let (y, stats) = batchnorm::batchnorm_relu_forward_train(&x.value, &gamma.value, &beta.value, eps)?;
        let need = x.requires_grad() || gamma.requires_grad() || beta.requires_grad();
        let (saved_y, saved_stats) = (y.clone(), stats.clone());
        let v = self.push(y, need, || Op::BatchNormReluTrain {
            x: src(x),
            gamma: src(gamma),
            beta: src(beta),
            x_val: x.value.clone(),
            gamma_val: gamma.value.clone(),
            y: saved_y,
            stats: saved_stats,
        });
        Ok((v, stats))
    }

    pub fn batchnorm_eval(
        &mut self,
        x: &Var,
        gamma: &Var,
        beta: &Var,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
    ) -> Result<Var> {
        let y = batchnorm::batchnorm_forward_eval(&x.value, &gamma.value, &beta.value, running_mean, running_var, eps)?;
        let need = x.requires_grad() || gamma.requires_grad() || beta.requires_grad();
        Ok(self.push(y, need, || Op::BatchNormEval {
            x: src(x),
            gamma: src(gamma),
            beta: src(beta),
            x_val: x.value.clone(),
            gamma_val: gamma.value.clone(),
            mean: running_mean.clone(),
            var: running_var.clone(),
            eps,
        }))
    }

    pub fn relu(&mut self, x: &Var) -> Result<Var> {
        let y = ew::relu_forward(&x.value)?;
        let saved = y.clone();
        Ok(self.push(y, x.requires_grad(), || Op::Relu { x: src(x), y: saved }))
    }

    pub fn sigmoid(&mut self, x: &Var) -> Result<Var> {
        let y = ew::sigmoid_forward(&x.value)?;
        let saved = y.clone();
        Ok(self.push(y, x.requires_grad(), || Op::Sigmoid { x: src(x), y: saved }))
    }

    /// a + b, b broadcast to a's shape.
    pub fn add(&mut self, a: &Var, b: &Var) -> Result<Var> {
        let y = ew::add(&a.value, &b.value)?;
        Ok(self.push(y, a.requires_grad() || b.requires_grad(), || Op::Add { a: src(a), b: src(b), b_shape: b.shape().to_vec() }))
    }

    /// a * b, b broadcast to a's shape (gates, learned scalars).
    pub fn mul(&mut self, a: &Var, b: &Var) -> Result<Var> {
        let y = ew::mul(&a.value, &b.value)?;
        Ok(self.push(y, a.requires_grad() || b.requires_grad(), || Op::Mul {
            a: src(a),
            b: src(b),
            a_val: a.value.clone(),
            b_val: b.value.clone(),
        }))
    }

    /// alpha * x for a constant alpha.
    pub fn scale(&mut self, x: &Var, alpha: f32) -> Result<Var> {
        let y = ew::scale(&x.value, alpha)?;
        Ok(self.push(y, x.requires_grad(), || Op::Scale { x: src(x), alpha }))
    }

    pub fn sum_all(&mut self, x: &Var) -> Result<Var> {
        let y = ew::sum_all(&x.value)?;
        Ok(self.push(y, x.requires_grad(), || Op::SumAll { x: src(x), shape: x.shape().to_vec() }))
    }

    pub fn l2_normalize(&mut self, x: &Var) -> Result<Var> {
        let y = ew::l2_normalize_forward(&x.value)?;
        Ok(self.push(y, x.requires_grad(), || Op::L2Normalize { x: src(x), x_val: x.value.clone() }))
    }

    pub fn concat(&mut self, xs: &[&Var], axis: usize) -> Result<Var> {
        let vals: Vec<&Tensor> = xs.iter().map(|v| &v.value).collect();
        let y = ew::concat(&vals, axis)?;
        let need = xs.iter().any(|v| v.requires_grad());
        Ok(self.push(y, need, || Op::Concat { inputs: xs.iter().map(|v| (src(v), v.shape()[axis])).collect(), axis }))
    }

    pub fn reshape(&mut self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = x.value.reshape(shape)?;
        Ok(self.push(y, x.requires_grad(), || Op::Reshape { x: src(x), shape: x.shape().to_vec() }))
    }

    /// x converted to `dtype` (mixed precision); the gradient is converted back to x's dtype.
    pub fn cast(&mut self, x: &Var, dtype: DType) -> Result<Var> {
        if x.value.dtype() == dtype {
            return Ok(x.clone());
        }
        let y = x.value.to_dtype(dtype)?;
        Ok(self.push(y, x.requires_grad(), || Op::Cast { x: src(x), from: x.value.dtype() }))
    }

    pub fn max_pool2d(&mut self, x: &Var, cfg: Pool2dCfg) -> Result<Var> {
        let y = pool::max_pool2d_forward(&x.value, cfg)?;
        Ok(self.push(y, x.requires_grad(), || Op::MaxPool2d { x: src(x), x_val: x.value.clone(), cfg }))
    }

    pub fn avg_pool2d(&mut self, x: &Var, cfg: Pool2dCfg) -> Result<Var> {
        let y = pool::avg_pool2d_forward(&x.value, cfg)?;
        Ok(self.push(y, x.requires_grad(), || Op::AvgPool2d { x: src(x), shape: x.shape().to_vec(), cfg }))
    }

    pub fn global_avg_pool(&mut self, x: &Var) -> Result<Var> {
        let y = pool::global_avg_pool_forward(&x.value)?;
        Ok(self.push(y, x.requires_grad(), || Op::GlobalAvgPool { x: src(x), shape: x.shape().to_vec() }))
    }

    pub fn global_max_pool(&mut self, x: &Var) -> Result<Var> {
        let y = pool::global_max_pool_forward(&x.value)?;
        Ok(self.push(y, x.requires_grad(), || Op::GlobalMaxPool { x: src(x), x_val: x.value.clone() }))
    }

    pub fn stripe_avg_pool(&mut self, x: &Var, parts: usize) -> Result<Var> {
        let y = pool::stripe_avg_pool_forward(&x.value, parts)?;
        Ok(self.push(y, x.requires_grad(), || Op::StripeAvgPool { x: src(x), shape: x.shape().to_vec(), parts }))
    }

    pub fn linear(&mut self, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
        let y = linear::linear_forward(&x.value, &w.value, b.map(|b| &b.value))?;
        let need = x.requires_grad() || w.requires_grad() || b.is_some_and(Var::requires_grad);
        Ok(self.push(y, need, || Op::Linear { x: src(x), w: src(w), b: b.and_then(src), x_val: x.value.clone(), w_val: w.value.clone() }))
    }

    pub fn bmm(&mut self, a: &Var, b: &Var, trans_a: bool, trans_b: bool) -> Result<Var> {
        let y = attention::bmm(&a.value, &b.value, trans_a, trans_b)?;
        let need = a.requires_grad() || b.requires_grad();
        Ok(self.push(y, need, || Op::Bmm { a: src(a), b: src(b), a_val: a.value.clone(), b_val: b.value.clone(), trans_a, trans_b }))
    }

    pub fn softmax_lastdim(&mut self, x: &Var) -> Result<Var> {
        let y = attention::softmax_lastdim_forward(&x.value)?;
        let saved = y.clone();
        Ok(self.push(y, x.requires_grad(), || Op::Softmax { x: src(x), y: saved }))
    }

    pub fn cross_entropy_label_smooth(&mut self, logits: &Var, labels: &[usize], eps: f32) -> Result<Var> {
        let y = loss::cross_entropy_label_smooth_forward(&logits.value, labels, eps)?;
        Ok(self.push(y, logits.requires_grad(), || Op::CrossEntropy {
            logits: src(logits),
            logits_val: logits.value.clone(),
            labels: labels.to_vec(),
            eps,
        }))
    }

    pub fn triplet_soft_margin(&mut self, x: &Var, labels: &[usize]) -> Result<Var> {
        let y = loss::triplet_soft_margin_forward(&x.value, labels)?;
        Ok(self.push(y, x.requires_grad(), || Op::Triplet { x: src(x), x_val: x.value.clone(), labels: labels.to_vec() }))
    }

    pub fn center_loss(&mut self, x: &Var, labels: &[usize], centers: &Var) -> Result<Var> {
        let y = loss::center_loss_forward(&x.value, labels, &centers.value)?;
        let need = x.requires_grad() || centers.requires_grad();
        Ok(self.push(y, need, || Op::Center {
            x: src(x),
            c: src(centers),
            x_val: x.value.clone(),
            c_val: centers.value.clone(),
            labels: labels.to_vec(),
        }))
    }

    /// Back-propagates from a scalar (a [1] loss) with seed gradient 1.
    pub fn backward(self, root: &Var) -> Result<Grads> {
        let seed = Tensor::ones(root.shape(), root.value.device())?;
        self.backward_with(root, seed)
    }

    /// Back-propagates `droot` (the gradient of some scalar with respect to `root`).
    pub fn backward_with(self, root: &Var, droot: Tensor) -> Result<Grads> {
        let Some(root_id) = root.node else {
            return Err(Error::msg("backward: the value does not depend on any parameter or leaf"));
        };
        if droot.shape() != root.shape() {
            return Err(Error::shape("backward", format!("seed {:?} != root {:?}", droot.shape(), root.shape())));
        }
        let _phase = crate::profile::backward_phase();
        let mut nodes = self.nodes;
        nodes.truncate(root_id + 1);
        let mut grads: Vec<Option<Tensor>> = (0..nodes.len()).map(|_| None).collect();
        grads[root_id] = Some(droot);
        let mut out = Grads::default();
        // Popping frees each node's saved activations as soon as its backward has run.
        while let Some(op) = nodes.pop() {
            let id = nodes.len();
            let Some(dy) = grads[id].take() else { continue };
            let mut give = |to: Src, g: Tensor| -> Result<()> {
                match to {
                    Some(n) => accumulate(&mut grads[n], g),
                    None => Ok(()),
                }
            };
            match op {
                Op::Leaf => {
                    out.leaves.insert(id, dy);
                }
                Op::Param(pid) => {
                    let mut slot = out.params.remove(&pid);
                    accumulate(&mut slot, dy)?;
                    out.params.insert(pid, slot.expect("accumulate fills the slot"));
                }
                Op::Conv2d { x, w, b, x_val, w_val, cfg } => {
                    if x.is_some() {
                        give(x, conv::conv2d_backward_data(&dy, &w_val, x_val.shape(), cfg)?)?;
                    }
                    if w.is_some() {
                        give(w, conv::conv2d_backward_filter(&dy, &x_val, w_val.shape(), cfg)?)?;
                    }
                    if b.is_some() {
                        give(b, conv::conv2d_backward_bias(&dy)?)?;
                    }
                }
                Op::BatchNormTrain { x, gamma, beta, x_val, gamma_val, stats } => {
                    let (dx, dgamma, dbeta) = batchnorm::batchnorm_backward_train(&dy, &x_val, &gamma_val, &stats)?;
                    give(x, dx)?;
                    give(gamma, dgamma)?;
                    give(beta, dbeta)?;
                }
                Op::BatchNormReluTrain { x, gamma, beta, x_val, gamma_val, y, stats } => {
                    let (dx, dgamma, dbeta) = batchnorm::batchnorm_relu_backward_train(&dy, &y, &x_val, &gamma_val, &stats)?;
                    give(x, dx)?;
                    give(gamma, dgamma)?;
                    give(beta, dbeta)?;
                }
                Op::BatchNormEval { x, gamma, beta, x_val, gamma_val, mean, var, eps } => {
                    let (dx, dgamma, dbeta) = batchnorm::batchnorm_backward_eval(&dy, &x_val, &gamma_val, &mean, &var, eps)?;
                    give(x, dx)?;
                    give(gamma, dgamma)?;
                    give(beta, dbeta)?;
                }
                Op::Relu { x, y } => give(x, ew::relu_backward(&dy, &y)?)?,
                Op::Sigmoid { x, y } => give(x, ew::sigmoid_backward(&dy, &y)?)?,
                Op::Add { a, b, b_shape } => {
                    if b.is_some() {
                        give(b, ew::sum_to_shape(&dy, &b_shape)?)?;
                    }
                    give(a, dy)?;
                }
                Op::Mul { a, b, a_val, b_val } => {
                    let (da, db) = ew::mul_backward(&dy, &a_val, &b_val)?;
                    give(a, da)?;
                    give(b, db)?;
                }
                Op::Scale { x, alpha } => give(x, ew::scale(&dy, alpha)?)?,
                Op::SumAll { x, shape } => give(x, ew::broadcast_to(&dy.reshape(&vec![1; shape.len()])?, &shape)?)?,
                Op::L2Normalize { x, x_val } => give(x, ew::l2_normalize_backward(&dy, &x_val)?)?,
                Op::Concat { inputs, axis } => {
                    let mut start = 0;
                    for (x, len) in inputs {
                        if x.is_some() {
                            give(x, ew::narrow(&dy, axis, start, len)?)?;
                        }
                        start += len;
                    }
                }
                Op::Reshape { x, shape } => give(x, dy.reshape(&shape)?)?,
                Op::Cast { x, from } => give(x, dy.to_dtype(from)?)?,
                Op::MaxPool2d { x, x_val, cfg } => give(x, pool::max_pool2d_backward(&dy, &x_val, cfg)?)?,
                Op::AvgPool2d { x, shape, cfg } => give(x, pool::avg_pool2d_backward(&dy, &shape, cfg)?)?,
                Op::GlobalAvgPool { x, shape } => give(x, pool::global_avg_pool_backward(&dy, &shape)?)?,
                Op::GlobalMaxPool { x, x_val } => give(x, pool::global_max_pool_backward(&dy, &x_val)?)?,
                Op::StripeAvgPool { x, shape, parts } => give(x, pool::stripe_avg_pool_backward(&dy, &shape, parts)?)?,
                Op::Linear { x, w, b, x_val, w_val } => {
                    let (dx, dw, db) = linear::linear_backward(&dy, &x_val, &w_val)?;
                    give(x, dx)?;
                    give(w, dw)?;
                    give(b, db)?;
                }
                Op::Bmm { a, b, a_val, b_val, trans_a, trans_b } => {
                    let (da, db) = attention::bmm_backward(&dy, &a_val, &b_val, trans_a, trans_b)?;
                    give(a, da)?;
                    give(b, db)?;
                }
                Op::Softmax { x, y } => give(x, attention::softmax_lastdim_backward(&dy, &y)?)?,
                Op::CrossEntropy { logits, logits_val, labels, eps } => {
                    give(logits, loss::cross_entropy_label_smooth_backward(&dy, &logits_val, &labels, eps)?)?
                }
                Op::Triplet { x, x_val, labels } => give(x, loss::triplet_soft_margin_backward(&dy, &x_val, &labels)?)?,
                Op::Center { x, c, x_val, c_val, labels } => {
                    let (dx, dc) = loss::center_loss_backward(&dy, &x_val, &labels, &c_val)?;
                    give(x, dx)?;
                    give(c, dc)?;
                }
            }
        }
        Ok(out)
    }
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}
