//! The optimizer and learning-rate schedule of the PLR-OSNet recipe: torch.optim.Adam with
//! coupled L2 weight decay on every parameter, and GradualWarmupScheduler followed by MultiStepLR,
//! stepped per epoch.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::params::{ParamId, ParamStore};
use crate::tape::Grads;
use crate::tensor::{Device, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Coupled L2: added to the gradient as weight_decay * θ before the moments (not AdamW).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 5e-4 }
    }
}

/// Per-parameter Adam state, as torch keeps it.
#[derive(Clone, Debug)]
pub struct AdamState {
    pub m: Tensor,
    pub v: Tensor,
    /// Updates applied so far (torch's `state["step"]`).
    pub step: u64,
}

pub struct Adam {
    pub cfg: AdamConfig,
    state: HashMap<ParamId, AdamState>,
    /// GPU: [lr / (1 - b1^t), sqrt(1 - b2^t)] read by the multi-tensor kernel, at a fixed address.
    hyper: Option<Tensor>,
    /// CUDA graph mode: the replaying code writes `hyper` before each launch, the step does not.
    hyper_external: bool,
}

impl Adam {
    pub fn new(cfg: AdamConfig) -> Adam {
        Adam { cfg, state: HashMap::new(), hyper: None, hyper_external: false }
    }

    pub fn state(&self, id: ParamId) -> Option<&AdamState> {
        self.state.get(&id)
    }

    /// Restores the state of one parameter (checkpoint resume).
    pub fn set_state(&mut self, id: ParamId, state: AdamState) {
        self.state.insert(id, state);
    }

    /// One update of every trainable parameter that has a gradient in `grads`.
    pub fn step(&mut self, store: &mut ParamStore, grads: &Grads, lr: f64) -> Result<()> {
        self.step_with(store, grads.params(), lr)
    }

    /// As `step`, with the gradients given per parameter id. On the GPU, parameters at the same
    /// step count (all of them, in training) are updated by `cuda::optim::adam_multi`, a few
    /// launches for the whole model; otherwise one launch per tensor.
    pub fn step_with(&mut self, store: &mut ParamStore, grads: &HashMap<ParamId, Tensor>, lr: f64) -> Result<()> {
        let ids: Vec<ParamId> = store.trainable().collect();
        let mut on_gpu = Vec::new();
        for id in ids {
            let Some(grad) = grads.get(&id) else { continue };
            let name = &store.entry(id).name;
            if grad.shape() != store.get(id).shape() {
                return Err(Error::shape(
                    "adam",
                    format!("{name}: gradient shape {:?} != parameter shape {:?}", grad.shape(), store.get(id).shape()),
                ));
            }
            let device = store.get(id).check_same("adam", &[grad])?;
            let mut state = match self.state.remove(&id) {
                Some(s) => s,
                None => {
                    let shape = store.get(id).shape().to_vec();
                    AdamState { m: Tensor::zeros(&shape, device)?, v: Tensor::zeros(&shape, device)?, step: 0 }
                }
            };
            state.step += 1;
            if u32::try_from(state.step).is_err() {
                return Err(Error::msg(format!("adam: {name}: step count overflow")));
            }
            match device {
                Device::Cpu => adam_cpu(store.get_mut(id), grad, &mut state, &self.cfg, lr)?,
                Device::Cuda => on_gpu.push(id),
            }
            self.state.insert(id, state);
        }
        if on_gpu.is_empty() {
            return Ok(());
        }
        match self.common_step(&on_gpu) {
            Some(step) => self.step_multi(store, grads, &on_gpu, lr, step),
            None => self.step_each(store, grads, &on_gpu, lr),
        }
    }

    /// The step count shared by the states of `ids`, if they all have the same.
    fn common_step(&self, ids: &[ParamId]) -> Option<u64> {
        let mut steps = ids.iter().map(|id| self.state[id].step);
        let first = steps.next()?;
        steps.all(|s| s == first).then_some(first)
    }

    /// The step count shared by every parameter's state (None before the first step, or when
    /// they differ).
    pub fn uniform_step(&self) -> Option<u64> {
        let ids: Vec<ParamId> = self.state.keys().copied().collect();
        self.common_step(&ids)
    }

    fn f32_settings(&self) -> [f32; 4] {
        let c = &self.cfg;
        [c.beta1 as f32, c.beta2 as f32, c.eps as f32, c.weight_decay as f32]
    }

    /// Writes the learning rate and bias corrections of step `step` where the multi-tensor
    /// kernel reads them (stream-ordered, no wait).
    pub(crate) fn write_hyper(&mut self, lr: f64, step: u64) -> Result<()> {
        let [b1, b2, ..] = self.f32_settings();
        let step = u32::try_from(step).map_err(|_| Error::msg("adam: step count overflow"))?;
        let values = crate::cuda::optim::adam_hyper(lr as f32, b1, b2, step);
        if self.hyper.is_none() {
            self.hyper = Some(Tensor::zeros(&[2], Device::Cuda)?);
        }
        match self.hyper.as_ref().map(Tensor::storage) {
            Some(crate::tensor::Storage::Cuda(b)) => b.write(&values),
            _ => Err(Error::Cuda("adam: the step-size buffer is not on the GPU".into())),
        }
    }

    /// CUDA graph mode: `write_hyper` is called by the replaying code before each launch (the
    /// captured step must not upload anything), and `advance_steps` counts each replayed step.
    pub(crate) fn set_hyper_external(&mut self, external: bool) {
        self.hyper_external = external;
    }

    /// Sets every parameter's update count (undoing a failed graph capture's step).
    pub(crate) fn set_steps(&mut self, step: u64) {
        for s in self.state.values_mut() {
            s.step = step;
        }
    }

    /// Counts one more update for every parameter (a replayed graph did the arithmetic).
    pub(crate) fn advance_steps(&mut self) {
        for s in self.state.values_mut() {
            s.step += 1;
        }
    }

    fn step_multi(&mut self, store: &mut ParamStore, grads: &HashMap<ParamId, Tensor>, ids: &[ParamId], lr: f64, step: u64) -> Result<()> {
        if !self.hyper_external {
            self.write_hyper(lr, step)?;
        }
        let [b1, b2, eps, wd] = self.f32_settings();
        let hyper = self.hyper.clone().ok_or_else(|| Error::Cuda("adam: graph mode without a step-size buffer".into()))?;
        // Moved out of the store and the state map (same buffers, no copy) to borrow them all.
        let placeholder = || Tensor::from_vec(Vec::new(), &[0]);
        let mut params = Vec::with_capacity(ids.len());
        for &id in ids {
            params.push(std::mem::replace(store.get_mut(id), placeholder()?));
        }
        let mut states: Vec<AdamState> = ids.iter().map(|id| self.state.remove(id).expect("states were created above")).collect();
        let mut slots: Vec<crate::cuda::optim::AdamSlot> = params
            .iter_mut()
            .zip(states.iter_mut())
            .zip(ids)
            .map(|((param, st), id)| crate::cuda::optim::AdamSlot { param, grad: &grads[id], m: &mut st.m, v: &mut st.v })
            .collect();
        let result = crate::cuda::optim::adam_multi(&mut slots, &hyper, b1, b2, eps, wd);
        drop(slots);
        for ((&id, param), st) in ids.iter().zip(params).zip(states) {
            *store.get_mut(id) = param;
            self.state.insert(id, st);
        }
        result
    }

    fn step_each(&mut self, store: &mut ParamStore, grads: &HashMap<ParamId, Tensor>, ids: &[ParamId], lr: f64) -> Result<()> {
        let [b1, b2, eps, wd] = self.f32_settings();
        for &id in ids {
            let state = self.state.get_mut(&id).expect("states were created above");
            crate::cuda::optim::adam_update(
                store.get_mut(id),
                &grads[&id],
                &mut state.m,
                &mut state.v,
                lr as f32,
                b1,
                b2,
                eps,
                wd,
                state.step as u32,
            )?;
        }
        Ok(())
    }
}

/// torch.optim.Adam's single-tensor update (amsgrad off), in f32 with f64 scalars as in Python.
fn adam_cpu(param: &mut Tensor, grad: &Tensor, st: &mut AdamState, cfg: &AdamConfig, lr: f64) -> Result<()> {
    let t = st.step as i32;
    let step_size = (lr / (1.0 - cfg.beta1.powi(t))) as f32;
    let bc2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt() as f32;
    let (b1, b2, eps, wd) = (cfg.beta1 as f32, cfg.beta2 as f32, cfg.eps as f32, cfg.weight_decay as f32);
    let g = grad.cpu_slice()?;
    let p = param.cpu_slice_mut()?;
    let m = st.m.cpu_slice_mut()?;
    let v = st.v.cpu_slice_mut()?;
    for i in 0..p.len() {
        let gi = g[i] + wd * p[i];
        // exp_avg.lerp_(grad, 1 - beta1)
        m[i] += (1.0 - b1) * (gi - m[i]);
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        p[i] -= step_size * m[i] / denom;
    }
    Ok(())
}

/// GradualWarmupScheduler(multiplier, total_epoch) then MultiStepLR(milestones, gamma), both
/// stepped once per epoch after it; `lr_at` gives the rate used during a 1-based epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub multiplier: f64,
    pub total_epoch: usize,
    /// Relative to the end of warmup, as MultiStepLR counts them.
    pub milestones: Vec<usize>,
    pub gamma: f64,
}

impl LrSchedule {
    /// Market-1501 / DukeMTMC-reID: 3.5e-5 warming to 3.5e-4 over epochs 1-20, decayed at 61 and 91.
    pub fn market() -> LrSchedule {
        LrSchedule { base_lr: 3.5e-5, multiplier: 10.0, total_epoch: 19, milestones: vec![40, 70], gamma: 0.1 }
    }

    /// CUHK03: warmup over epochs 1-40, decayed at 101 and 131.
    pub fn cuhk03() -> LrSchedule {
        LrSchedule { base_lr: 3.5e-5, multiplier: 10.0, total_epoch: 39, milestones: vec![60, 90], gamma: 0.1 }
    }

    pub fn lr_at(&self, epoch: usize) -> f64 {
        let e = epoch.max(1);
        let peak = self.base_lr * self.multiplier;
        if e <= self.total_epoch + 1 {
            if self.total_epoch == 0 {
                return peak;
            }
            return self.base_lr * (1.0 + (self.multiplier - 1.0) * (e - 1) as f64 / self.total_epoch as f64);
        }
        // MultiStepLR's counter starts once warmup is over: epoch total_epoch + 1 + k runs with k
        // of its steps taken, and decays once that count passes a milestone.
        let after = e - (self.total_epoch + 1);
        let decays = self.milestones.iter().filter(|&&m| after > m).count();
        peak * self.gamma.powi(decays as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Kind;
    use crate::rng::Rng;

    /// Adam written out in f64, independently of the f32 code above: torch.optim.Adam's coupled
    /// L2 (`decoupled` false) or AdamW's decoupled decay (`decoupled` true).
    fn adam_f64(theta: &mut [f64], grads: &[Vec<f64>], lr: f64, wd: f64, decoupled: bool) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let mut m = vec![0.0; theta.len()];
        let mut v = vec![0.0; theta.len()];
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..theta.len() {
                let gi = if decoupled { g[i] } else { g[i] + wd * theta[i] };
                if decoupled {
                    theta[i] *= 1.0 - lr * wd;
                }
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let mhat = m[i] / (1.0 - b1.powi(t));
                let vhat = v[i] / (1.0 - b2.powi(t));
                theta[i] -= lr * mhat / (vhat.sqrt() + eps);
            }
        }
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn adam_matches_f64_formula_with_coupled_weight_decay() {
        let mut rng = Rng::new(11);
        let n = 37;
        // Weights and gradients of similar size, so the decay term wd·θ moves the result visibly.
        let init: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let grads: Vec<Vec<f32>> = (0..6).map(|_| (0..n).map(|_| rng.normal() as f32 * 5e-4).collect()).collect();
        let (lr, wd) = (3.5e-4, 5e-4);

        let mut store = ParamStore::new();
        let w = store.add("w", Tensor::from_vec(init.clone(), &[n]).unwrap(), Kind::Param).unwrap();
        let buf = store.add("bn.running_mean", Tensor::from_vec(vec![1.0; 3], &[3]).unwrap(), Kind::Buffer).unwrap();
        let mut adam = Adam::new(AdamConfig::default());
        for g in &grads {
            let map = HashMap::from([(w, Tensor::from_vec(g.clone(), &[n]).unwrap())]);
            adam.step_with(&mut store, &map, lr).unwrap();
        }
        assert_eq!(adam.state(w).unwrap().step, 6);
        assert!(adam.state(buf).is_none(), "buffers are not optimised");
        assert_eq!(store.get(buf).to_vec().unwrap(), vec![1.0; 3]);

        let init64: Vec<f64> = init.iter().map(|&x| x as f64).collect();
        let grads64: Vec<Vec<f64>> = grads.iter().map(|g| g.iter().map(|&x| x as f64).collect()).collect();
        let mut coupled = init64.clone();
        adam_f64(&mut coupled, &grads64, lr, wd, false);
        let mut adamw = init64.clone();
        adam_f64(&mut adamw, &grads64, lr, wd, true);
        let got: Vec<f64> = store.get(w).to_vec().unwrap().iter().map(|&x| x as f64).collect();

        // The update moves each weight by about 6·lr; f32 rounding of θ (|θ| ≲ 3) is ~2e-7.
        let moved = max_abs_diff(&coupled, &init64);
        let err = max_abs_diff(&got, &coupled);
        assert!(moved > 1e-3, "the test problem should move the weights ({moved})");
        assert!(err < 1e-6, "f32 Adam vs f64 formula: max error {err}");
        assert!(max_abs_diff(&got, &adamw) > 20.0 * err.max(1e-7), "coupled decay must differ from AdamW");
    }

    #[test]
    fn lr_table_matches_spec() {
        let market = LrSchedule::market();
        let warm = |e: f64, t: f64| 3.5e-5 * (1.0 + 9.0 * (e - 1.0) / t);
        let exact = [
            (1, 3.5e-5),
            (2, warm(2.0, 19.0)),
            (10, warm(10.0, 19.0)),
            (20, 3.5e-4),
            (21, 3.5e-4),
            (60, 3.5e-4),
            (61, 3.5e-5),
            (90, 3.5e-5),
            (91, 3.5e-6),
            (120, 3.5e-6),
        ];
        for (e, want) in exact {
            let got = market.lr_at(e);
            assert!((got - want).abs() <= 1e-9 * want, "market epoch {e}: {got} vs {want}");
        }
        let cuhk = LrSchedule::cuhk03();
        let exact = [
            (1, 3.5e-5),
            (2, warm(2.0, 39.0)),
            (40, 3.5e-4),
            (41, 3.5e-4),
            (100, 3.5e-4),
            (101, 3.5e-5),
            (130, 3.5e-5),
            (131, 3.5e-6),
            (150, 3.5e-6),
        ];
        for (e, want) in exact {
            let got = cuhk.lr_at(e);
            assert!((got - want).abs() <= 1e-9 * want, "cuhk03 epoch {e}: {got} vs {want}");
        }
        // The spec's printed (6-digit) values.
        for (s, e, printed) in [(&market, 2, 5.15789e-5), (&market, 10, 1.84211e-4), (&cuhk, 2, 4.30769e-5)] {
            assert!((s.lr_at(e) - printed).abs() <= 1e-5 * printed, "epoch {e}: {} vs {printed}", s.lr_at(e));
        }
    }
}
