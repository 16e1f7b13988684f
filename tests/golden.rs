//! Golden tests against the PyTorch reference (tools/make_fixtures.py, computed in float64 and
//! stored as f32). Every output, loss and buffer is compared by its norm-wise relative error
//! ||ours - golden|| / max(||ours||, ||golden||) < 1e-4. Gradients: the whole gradient (every
//! parameter's, concatenated) < 1e-4, and each parameter's < 1e-3, the level PyTorch's own f32
//! kernels reach on this fixture (its metadata `pytorch_f32_norm_rel_err`): the tiny gate layers of
//! the x0.25 model sum many cancelling terms. Where the fixture's metadata flags a gradient as
//! analytically zero it is compared absolutely, against the size of a neighbouring gradient; as
//! ill-conditioned in f32 (PAM's gamma behind a training-mode BatchNorm), at 2e-2.
//! The fixtures are committed; a missing one fails (regenerate with `python3 tools/make_fixtures.py`).
use plr_engine::io::weights::{apply_state_dict, detect_model, ModelKind, TensorFile};
use plr_engine::models::*;
use plr_engine::nn::{Ctx, Precision};
use plr_engine::params::Kind;
use plr_engine::rng::Rng;
use plr_engine::tape::Grads;
use plr_engine::tensor::DType;
use plr_engine::testing::norm_rel_err;
use plr_engine::testing::{cuda_or_skip, fixture};
use plr_engine::{Device, ParamStore, Tape, Tensor, Var};

const TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;
const ILL_CONDITIONED_TOL: f64 = 2e-2;

fn meta<T: std::str::FromStr>(f: &TensorFile, key: &str) -> T {
    f.meta(key).unwrap().parse().unwrap_or_else(|_| panic!("metadata {key} = {:?}", f.meta(key)))
}

/// Comma-separated metadata list (absent = empty).
fn meta_list(f: &TensorFile, key: &str) -> Vec<String> {
    f.metadata().get(key).map(|s| s.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect()).unwrap_or_default()
}

/// Asserts ours ~ golden tensor `name`; returns the error.
fn check(f: &TensorFile, name: &str, ours: &Tensor, tol: f64) -> f64 {
    let golden = f.require(name).unwrap();
    assert_eq!(ours.shape(), golden.shape.as_slice(), "{name}: shape");
    let err = norm_rel_err(&ours.to_vec().unwrap(), &golden.to_f32());
    assert!(err < tol, "{name}: norm-wise relative error {err:.2e} >= {tol:.0e}");
    err
}

fn input(f: &TensorFile, device: Device) -> Var {
    Var::constant(f.tensor("input").unwrap().to_device(device).unwrap())
}

#[test]
fn plr_small_matches_pytorch_forward_loss_gradients_and_buffers() {
    plr_small_golden(Device::Cpu);
}

#[test]
fn plr_small_golden_on_cuda() {
    if cuda_or_skip("plr_small_golden_on_cuda") {
        plr_small_golden(Device::Cuda);
    }
}

/// The x0.25 fixture loaded into a model and loss on `device`, with its batch's labels.
struct PlrSmall {
    f: TensorFile,
    store: ParamStore,
    model: PlrOsnet,
    lossfn: PlrLoss,
    labels: Vec<usize>,
    input: Var,
}

/// Outputs of one eval forward and one training step of the fixture.
struct PlrSmallRun {
    feature: Tensor,
    step: Step,
}

/// One forward of the training outputs, the loss and the backward.
struct Step {
    out: PlrTrainOutput,
    terms: PlrLossTerms,
    grads: Grads,
}

impl PlrSmall {
    /// plr_small or a fixture derived from it (same metadata keys).
    fn load(name: &str, device: Device) -> PlrSmall {
        let f = fixture(name);
        let channels = channels_for_width(meta(&f, "width")).unwrap();
        let config = PlrConfig { channels, num_classes: meta(&f, "num_classes"), parts: meta(&f, "parts") };
        assert_eq!(f.tensor("input").unwrap().shape(), [meta::<usize>(&f, "batch"), 3, meta(&f, "height"), meta(&f, "width_px")]);
        let mut store = ParamStore::new();
        let model = PlrOsnet::new(&mut store, config, &mut Rng::new(0)).unwrap();
        apply_state_dict(&mut store, &f, "weights.").unwrap();
        assert_eq!(detect_model(&f, "weights.").unwrap(), ModelKind::PlrOsnet(config));
        let loss_cfg = PlrLossConfig::new(meta(&f, "center_classes"));
        let lossfn = PlrLoss::new(&mut store, loss_cfg, config.local_dim(), config.global_dim(), &mut Rng::new(0)).unwrap();
        store.set(lossfn.centers1, f.tensor("centers1").unwrap()).unwrap();
        store.set(lossfn.centers2, f.tensor("centers2").unwrap()).unwrap();
        store.to_device(device).unwrap();
        let labels = f.require("labels").unwrap().as_i64().expect("labels are I64").iter().map(|&l| l as usize).collect();
        let input = input(&f, device);
        PlrSmall { f, store, model, lossfn, labels, input }
    }

    /// The eval feature, then one training forward and backward (which updates the BatchNorm
    /// buffers), in `precision`.
    fn run(&mut self, precision: Precision) -> PlrSmallRun {
        let mut tape = Tape::no_grad();
        let mut ctx = Ctx::new(&mut tape, &mut self.store, false).with_precision(precision);
        let feature = self.model.forward_eval(&mut ctx, &self.input).unwrap().into_value();
        PlrSmallRun { feature, step: self.step(precision, true) }
    }

    /// forward_train, loss and backward, with BatchNorm in training mode (`train`) or eval mode.
    fn step(&mut self, precision: Precision, train: bool) -> Step {
        let mut tape = Tape::new();
        let mut ctx = Ctx::new(&mut tape, &mut self.store, train).with_precision(precision);
        let out = self.model.forward_train(&mut ctx, &self.input).unwrap();
        let terms = self.lossfn.forward(&mut ctx, &out, &self.labels).unwrap();
        let grads = tape.backward(&terms.total).unwrap();
        Step { out, terms, grads }
    }

    /// The input rounded to bf16, the rest unchanged: the control for bf16 tolerances.
    fn round_input_to_bf16(&mut self) {
        self.input = Var::constant(self.input.value().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap());
    }
}

impl Step {
    fn outputs(&self) -> [(&'static str, &Tensor); 4] {
        [
            ("out.logits1", self.out.logits1.value()),
            ("out.logits2", self.out.logits2.value()),
            ("out.v1", self.out.v1.value()),
            ("out.v2", self.out.v2.value()),
        ]
    }

    fn losses(&self) -> [(&'static str, &Tensor); 7] {
        let t = &self.terms;
        [
            ("loss.ce1", t.ce1.value()),
            ("loss.ce2", t.ce2.value()),
            ("loss.tri1", t.tri1.value()),
            ("loss.tri2", t.tri2.value()),
            ("loss.cen1", t.cen1.value()),
            ("loss.cen2", t.cen2.value()),
            ("loss.total", t.total.value()),
        ]
    }
}

fn plr_small_golden(device: Device) {
    let mut m = PlrSmall::load("plr_small.safetensors", device);
    let run = m.run(Precision::F32);
    let (f, store) = (&m.f, &m.store);
    check(f, "out.eval_feature", &run.feature, TOL);
    check_step(f, store, &run.step);

    for e in store.entries().iter().filter(|e| matches!(e.kind, Kind::Buffer | Kind::Counter) && !e.name.starts_with("loss.")) {
        let name = format!("after.{}", e.name);
        if e.kind == Kind::Counter {
            assert_eq!(e.value.to_vec().unwrap(), f.require(&name).unwrap().to_f32(), "{name}");
        } else {
            check(f, &name, &e.value, TOL);
        }
    }
}

/// Outputs and losses within TOL; every parameter's gradient within GRAD_TOL (or as the metadata
/// flags it) and the whole gradient within TOL.
fn check_step(f: &TensorFile, store: &ParamStore, step: &Step) {
    for (name, v) in step.outputs().into_iter().chain(step.losses()) {
        check(f, name, v, TOL);
    }
    let grads = &step.grads;
    let zero = meta_list(f, "analytic_zero_grads");
    let ill = meta_list(f, "ill_conditioned_grads");
    let mut worst = (0.0, String::new());
    let mut checked = 0;
    let (mut all_ours, mut all_golden) = (Vec::new(), Vec::new());
    for id in store.trainable() {
        let name = format!("grad.{}", store.entry(id).name);
        let ours = grads.param(id).unwrap_or_else(|| panic!("{name}: no gradient"));
        if zero.contains(&name) {
            // Exactly zero in exact arithmetic: round-off only, small next to the weight's gradient.
            let weight = store.id(&store.entry(id).name.replace("bias", "weight")).unwrap();
            let scale = grads.param(weight).unwrap().to_vec().unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
            let ours_max = ours.to_vec().unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(ours_max <= 1e-4 * scale, "{name}: {ours_max:.2e} not negligible next to {scale:.2e}");
        } else {
            let err = check(f, &name, ours, if ill.contains(&name) { ILL_CONDITIONED_TOL } else { GRAD_TOL });
            if !ill.contains(&name) {
                all_ours.extend(ours.to_vec().unwrap());
                all_golden.extend(f.require(&name).unwrap().to_f32());
                if err > worst.0 {
                    worst = (err, name);
                }
            }
        }
        checked += 1;
    }
    let golden_grads = f.names().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(checked, golden_grads, "every trainable parameter and only those have a golden gradient");
    let whole = norm_rel_err(&all_ours, &all_golden);
    println!("whole gradient error: {whole:.2e}; largest per parameter: {:.2e} ({})", worst.0, worst.1);
    assert!(whole < TOL, "whole gradient: norm-wise relative error {whole:.2e} >= {TOL:.0e}");
}

#[test]
fn plr_small_bf16_matches_pytorch_within_bf16_tolerance() {
    plr_small_bf16_golden(Device::Cpu);
}

#[test]
fn plr_small_bf16_golden_on_cuda() {
    if cuda_or_skip("plr_small_bf16_golden_on_cuda") {
        plr_small_bf16_golden(Device::Cuda);
    }
}

/// The bf16 run (mixed precision, `Precision::Bf16`) against PyTorch's golden values.
///
/// This fixture (random weights, noise input, batch 8 at 64x32, training-mode BatchNorm) is
/// extremely sensitive: the f32 engine run on the input rounded once to bf16 (a relative change
/// of at most 2^-9 per pixel, nothing else) is already off the golden values by 6.7e-2 in v1 and
/// 5.9e-1 in the whole gradient, dominated by the stem and layer1 weights, whose gradients feed
/// training-mode BatchNorm and are small residuals of cancelling terms. The bf16 run rounds at
/// every op, so its whole gradient cannot come within 1e-2 here (measured 1.3: such an assertion
/// would not discriminate); the bf16 backward ops are checked bit for bit in the op tests and the
/// training comparison (tests/train.rs) checks the outcome. BatchNorm in eval mode does not fix
/// this: `plr_small_eval_bn_bf16_golden` asserts the whole gradient on the best-conditioned
/// variant found, and says why it stays near 2e-1. What is asserted, with the values
/// measured on the CPU (2026-11-24, `cargo test --release --test golden bf16`):
/// - the loss terms (measured: ce 9.9e-3 / 9.0e-3, triplet 2.8e-2 / 2.2e-2, center 3.3e-3 / 3.7e-3,
///   total 4.5e-3);
/// - the gradients of the head's biases (classifiers, BN neck, fc2), the well-conditioned part
///   (measured at most 1.4e-2), every gradient f32 and finite;
/// - eval feature, logits, v1 and v2 within 6x the error of the rounded-input f32 control
///   (measured 3.0x to 3.9x);
/// - the bf16 gradient is not bit-equal to the f32 one (bf16 did run).
fn plr_small_bf16_golden(device: Device) {
    const LOSS_TOL: f64 = 5e-2;
    const TOTAL_LOSS_TOL: f64 = 1e-2;
    const HEAD_BIAS_TOL: f64 = 3e-2;
    const CONTROL_FACTOR: f64 = 6.0;
    let f32_run = PlrSmall::load("plr_small.safetensors", device).run(Precision::F32);
    let mut control = PlrSmall::load("plr_small.safetensors", device);
    control.round_input_to_bf16();
    let control_run = control.run(Precision::F32);
    let mut m = PlrSmall::load("plr_small.safetensors", device);
    let run = m.run(Precision::Bf16);
    let (f, store) = (&m.f, &m.store);

    let golden_err = |name: &str, t: &Tensor| norm_rel_err(&t.to_vec().unwrap(), &f.require(name).unwrap().to_f32());
    let mut outputs: Vec<(&str, &Tensor, &Tensor)> = vec![("out.eval_feature", &run.feature, &control_run.feature)];
    outputs.extend(run.step.outputs().into_iter().zip(control_run.step.outputs()).map(|((name, ours), (_, c))| (name, ours, c)));
    for (name, ours, control) in outputs {
        assert_eq!(ours.dtype(), DType::F32, "{name}");
        let (err, control_err) = (golden_err(name, ours), golden_err(name, control));
        println!("{name}: {err:.2e} (rounded-input control {control_err:.2e})");
        assert!(err <= CONTROL_FACTOR * control_err, "{name}: {err:.2e} > {CONTROL_FACTOR} x the control's {control_err:.2e}");
    }
    for (name, v) in run.step.losses() {
        let err = golden_err(name, v);
        println!("{name}: {err:.2e}");
        let tol = if name == "loss.total" { TOTAL_LOSS_TOL } else { LOSS_TOL };
        assert!(err < tol, "{name}: norm-wise relative error {err:.2e} >= {tol:.0e}");
    }

    let zero = meta_list(f, "analytic_zero_grads");
    let ill = meta_list(f, "ill_conditioned_grads");
    let (mut all_ours, mut all_golden, mut all_f32, mut all_control) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for id in store.trainable() {
        let param = &store.entry(id).name;
        let name = format!("grad.{param}");
        let ours = run.step.grads.param(id).unwrap_or_else(|| panic!("{name}: no gradient"));
        // The master weights' gradients come back as f32 through the casts.
        assert_eq!(ours.dtype(), DType::F32, "{name}");
        let values = ours.to_vec().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{name}: not finite");
        let head_bias = ["classifier1", "classifier2", "bn1", "bn2", "fc2"].iter().any(|h| *param == format!("{h}.bias"));
        if head_bias {
            let err = golden_err(&name, ours);
            println!("{name}: {err:.2e}");
            assert!(err < HEAD_BIAS_TOL, "{name}: norm-wise relative error {err:.2e} >= {HEAD_BIAS_TOL:.0e}");
        }
        if !zero.contains(&name) && !ill.contains(&name) {
            all_golden.extend(f.require(&name).unwrap().to_f32());
            all_f32.extend(f32_run.step.grads.param(id).unwrap().to_vec().unwrap());
            all_control.extend(control_run.step.grads.param(id).unwrap().to_vec().unwrap());
            all_ours.extend(values);
        }
    }
    println!(
        "whole gradient: {:.2e} (rounded-input control {:.2e})",
        norm_rel_err(&all_ours, &all_golden),
        norm_rel_err(&all_control, &all_golden)
    );
    assert!(all_ours != all_f32, "the bf16 gradient is bit-equal to the f32 one: bf16 did not run");
}

const EVAL_BN: &str = "plr_small_eval_bn.safetensors";

#[test]
fn plr_small_eval_bn_matches_pytorch_loss_and_gradients() {
    plr_small_eval_bn_golden(Device::Cpu);
}

#[test]
fn plr_small_eval_bn_golden_on_cuda() {
    if cuda_or_skip("plr_small_eval_bn_golden_on_cuda") {
        plr_small_eval_bn_golden(Device::Cuda);
    }
}

/// The training forward, loss and backward with BatchNorm in eval mode (the BatchNorm backward
/// through running statistics), on plr_small's model with shifted BatchNorm betas
/// (tools/make_fixtures.py `make_plr_small_eval_bn` says why).
fn plr_small_eval_bn_golden(device: Device) {
    let mut m = PlrSmall::load(EVAL_BN, device);
    assert_eq!(meta::<String>(&m.f, "batchnorm"), "eval");
    let before: Vec<Vec<f32>> = m.store.entries().iter().map(|e| e.value.to_vec().unwrap()).collect();
    let step = m.step(Precision::F32, false);
    check_step(&m.f, &m.store, &step);
    let after: Vec<Vec<f32>> = m.store.entries().iter().map(|e| e.value.to_vec().unwrap()).collect();
    assert!(before == after, "an eval-mode BatchNorm changed the store");
}

#[test]
fn plr_small_eval_bn_bf16_matches_pytorch_within_bf16_tolerance() {
    plr_small_eval_bn_bf16_golden(Device::Cpu);
}

#[test]
fn plr_small_eval_bn_bf16_golden_on_cuda() {
    if cuda_or_skip("plr_small_eval_bn_bf16_golden_on_cuda") {
        plr_small_eval_bn_bf16_golden(Device::Cuda);
    }
}

/// The bf16 run (`Precision::Bf16`) of the eval-BN golden against PyTorch's f64 values. The
/// fixture's input and convolution weights are bf16 values, so every difference comes from the
/// bf16 activations and activation gradients. This is the best-conditioned golden found, not a
/// well-conditioned one: a random x0.25 network amplifies bf16 storage errors over its ~25 BN +
/// ReLU layers (tools/make_fixtures.py `make_plr_small_eval_bn`), so the whole gradient cannot be
/// held to ~1e-2. Measured on the CPU (2026-11-24, `cargo test --release --test golden
/// eval_bn_bf16 -- --nocapture`): v1 / v2 2.7e-2 / 2.1e-2, logits 2.3e-1 (the BatchNorm1d neck divides by
/// the small spread of v1 over the batch), losses at most 3.9e-2 (total 1.5e-2), whole gradient
/// 1.9e-1 (f32: 1.0e-5), large parameters at most 4.5e-1 (layer31, behind the 4x2 global max pool). The tolerances are ~2x
/// those, so only gross bf16 backward bugs fail it. Tried by editing the code temporarily: every
/// bf16 eval BatchNorm dx x 1.1 (whole gradient 7.2e-1) or a bf16 ReLU backward that ignores its
/// mask (7.4e-1) fail; dx x 1.03 (3.4e-1) or dgamma rounded to bf16 (unchanged) pass.
fn plr_small_eval_bn_bf16_golden(device: Device) {
    const OUT_TOL: f64 = 5e-2;
    const LOGITS_TOL: f64 = 0.5;
    const LOSS_TOL: f64 = 8e-2;
    const WHOLE_TOL: f64 = 0.4;
    const PARAM_TOL: f64 = 0.9;
    // Parameters of at least this many elements (every convolution of layer1 onwards, the
    // attention projections, the classifiers) are asserted one by one.
    const LARGE: usize = 1024;
    let f32_step = PlrSmall::load(EVAL_BN, device).step(Precision::F32, false);
    let mut m = PlrSmall::load(EVAL_BN, device);
    let step = m.step(Precision::Bf16, false);
    let (f, store) = (&m.f, &m.store);
    let golden_err = |name: &str, t: &Tensor| norm_rel_err(&t.to_vec().unwrap(), &f.require(name).unwrap().to_f32());

    for (name, ours) in step.outputs().into_iter().chain(step.losses()) {
        assert_eq!(ours.dtype(), DType::F32, "{name}");
        let err = golden_err(name, ours);
        println!("{name}: {err:.2e}");
        let tol = match name {
            "out.v1" | "out.v2" => OUT_TOL,
            "out.logits1" | "out.logits2" => LOGITS_TOL,
            _ => LOSS_TOL,
        };
        assert!(err < tol, "{name}: norm-wise relative error {err:.2e} >= {tol:.0e}");
    }

    let zero = meta_list(f, "analytic_zero_grads");
    let (mut all_ours, mut all_golden, mut all_f32, mut large) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for id in store.trainable() {
        let name = format!("grad.{}", store.entry(id).name);
        let ours = step.grads.param(id).unwrap_or_else(|| panic!("{name}: no gradient"));
        // The master weights' gradients come back as f32 through the casts.
        assert_eq!(ours.dtype(), DType::F32, "{name}");
        if zero.contains(&name) {
            continue;
        }
        let values = ours.to_vec().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{name}: not finite");
        if values.len() >= LARGE {
            let err = golden_err(&name, ours);
            assert!(err < PARAM_TOL, "{name}: norm-wise relative error {err:.2e} >= {PARAM_TOL:.0e}");
            large.push((err, name.clone()));
        }
        all_golden.extend(f.require(&name).unwrap().to_f32());
        all_f32.extend(f32_step.grads.param(id).unwrap().to_vec().unwrap());
        all_ours.extend(values);
    }
    large.sort_by(|a, b| b.0.total_cmp(&a.0));
    let whole = norm_rel_err(&all_ours, &all_golden);
    println!(
        "whole gradient: {whole:.2e} (f32 run {:.2e}); largest of {} large parameters: {:?}",
        norm_rel_err(&all_f32, &all_golden),
        large.len(),
        large.iter().take(3).map(|(e, n)| format!("{n} {e:.2e}")).collect::<Vec<_>>()
    );
    assert!(whole < WHOLE_TOL, "whole gradient: norm-wise relative error {whole:.2e} >= {WHOLE_TOL:.0e}");
    assert!(all_ours != all_f32, "the bf16 gradient is bit-equal to the f32 one: bf16 did not run");
}

#[test]
fn plr_x1_half_weights_match_pytorch_eval_feature() {
    plr_x1_golden(Device::Cpu);
}

#[test]
fn plr_x1_golden_on_cuda() {
    if cuda_or_skip("plr_x1_golden_on_cuda") {
        plr_x1_golden(Device::Cuda);
    }
}

fn plr_x1_golden(device: Device) {
    let f = fixture("plr_x1_eval.safetensors");
    assert_eq!(meta::<f32>(&f, "width"), 1.0);
    let config = PlrConfig { channels: channels_for_width(1.0).unwrap(), num_classes: meta(&f, "num_classes"), parts: meta(&f, "parts") };
    let mut store = ParamStore::new();
    let model = PlrOsnet::new(&mut store, config, &mut Rng::new(0)).unwrap();
    apply_state_dict(&mut store, &f, "weights.").unwrap();
    store.to_device(device).unwrap();
    let mut tape = Tape::no_grad();
    let feature = model.forward_eval(&mut Ctx::new(&mut tape, &mut store, false), &input(&f, device)).unwrap();
    assert_eq!(feature.shape(), [meta::<usize>(&f, "batch"), 2560]);
    check(&f, "out.eval_feature", feature.value(), TOL);
}

#[test]
fn osnet_small_matches_pytorch_eval_feature() {
    let f = fixture("osnet_small.safetensors");
    let ModelKind::Osnet(config) = detect_model(&f, "weights.").unwrap() else { panic!("not an OSNet fixture") };
    assert_eq!(config.channels, channels_for_width(meta(&f, "width")).unwrap());
    let mut store = ParamStore::new();
    let model = Osnet::new(&mut store, config, &mut Rng::new(0)).unwrap();
    apply_state_dict(&mut store, &f, "weights.").unwrap();
    let mut tape = Tape::no_grad();
    let out = model.forward(&mut Ctx::new(&mut tape, &mut store, false), &input(&f, Device::Cpu)).unwrap();
    check(&f, "out.eval_feature", out.feature.value(), TOL);
}
