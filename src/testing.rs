//! Test helpers shared by unit and integration tests: a finite-difference gradient check and
//! relative-error comparisons. Public so that `tests/` can use them; not part of the engine proper.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::weights::TensorFile;
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::tensor::{DType, Tensor};

/// Settings of `gradcheck`.
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// Central-difference step.
    pub h: f32,
    /// Largest accepted ||analytic - numeric|| / max(||analytic||, ||numeric||) per input.
    pub tol: f64,
    /// Coordinates checked per input (all of them when the input is smaller).
    pub max_coords: usize,
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck { h: 1e-3, tol: 1e-2, max_coords: 64, seed: 0 }
    }
}

/// Largest |a - b| / max(|a|, |b|, floor) over the elements: a relative error that does not blow
/// up on values near zero.
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "max_rel_err: lengths differ");
    a.iter().zip(b).map(|(&x, &y)| (x - y).abs() / x.abs().max(y.abs()).max(floor)).fold(0.0, f32::max)
}

/// ||a - b|| / max(||a||, ||b||), the norm-wise relative error.
pub fn norm_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "norm_rel_err: lengths differ");
    let (mut d, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (x as f64 - y as f64).powi(2);
        na += (x as f64).powi(2);
        nb += (y as f64).powi(2);
    }
    let scale = na.max(nb).sqrt();
    if scale == 0.0 {
        0.0
    } else {
        d.sqrt() / scale
    }
}

/// Compares the tape's gradient of phi = sum(f(inputs) * r), r random, with central finite
/// differences of phi in every input, on a sample of coordinates. `f` must be deterministic.
pub fn gradcheck(inputs: &[Tensor], f: impl Fn(&mut Tape, &[Var]) -> Result<Var>, cfg: GradCheck) -> Result<()> {
    let mut rng = Rng::new(cfg.seed);
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    let y = f(&mut tape, &vars)?;
    let r = Tensor::randn(y.shape(), 1.0, &mut rng).to_device(y.value().device())?;
    let r_host = r.to_vec()?;
    let grads = tape.backward_with(&y, r)?;

    let phi = |xs: &[Tensor]| -> Result<f64> {
        let mut t = Tape::no_grad();
        let vs: Vec<Var> = xs.iter().map(|x| Var::constant(x.clone())).collect();
        let out = f(&mut t, &vs)?.value().to_vec()?;
        Ok(out.iter().zip(&r_host).map(|(&a, &b)| a as f64 * b as f64).sum())
    };

    for (i, var) in vars.iter().enumerate() {
        let n = inputs[i].numel();
        let analytic_all = match grads.of(var) {
            Some(g) => g.to_vec()?,
            None => vec![0.0; n],
        };
        if analytic_all.len() != n {
            return Err(Error::msg(format!("gradcheck: gradient of input {i} has {} values, input has {n}", analytic_all.len())));
        }
        let mut coords: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut coords);
        coords.truncate(cfg.max_coords);
        let host = inputs[i].to_vec()?;
        let mut analytic = Vec::new();
        let mut numeric = Vec::new();
        for &j in &coords {
            let eval = |delta: f32| -> Result<f64> {
                let mut v = host.clone();
                v[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, inputs[i].shape())?.to_device(inputs[i].device())?;
                phi(&xs)
            };
            let d = (eval(cfg.h)? - eval(-cfg.h)?) / (2.0 * cfg.h as f64);
            analytic.push(analytic_all[j]);
            numeric.push(d as f32);
        }
        let err = norm_rel_err(&analytic, &numeric);
        if err > cfg.tol || !err.is_finite() {
            let show: Vec<(usize, f32, f32)> =
                coords.iter().zip(analytic.iter().zip(&numeric)).take(8).map(|(&j, (&a, &b))| (j, a, b)).collect();
            return Err(Error::msg(format!(
                "gradcheck: input {i} (shape {:?}): relative error {err:.3e} > {:.1e}; (index, analytic, numeric): {show:?}",
                inputs[i].shape(),
                cfg.tol
            )));
        }
    }
    Ok(())
}

/// Checks an op against the bf16 contract on the CPU. `inputs` are f32 values; `activation[i]`
/// says whether input i is an activation (passed as bf16) or an always-f32 operand. `op` runs on
/// the bf16 inputs and on the same values as f32: its output k must have dtype `out[k]` and equal,
/// bit for bit, the f32 run's output rounded once to that dtype (both compute in f32 from the
/// same values). Every mixed call (one of several activations left f32, or an f32 operand passed
/// as bf16) must fail with a dtype mismatch.
pub fn check_bf16_op(name: &str, inputs: &[Tensor], activation: &[bool], out: &[DType], op: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>) {
    assert_eq!(inputs.len(), activation.len(), "{name}: one activation flag per input");
    let with_dtypes = |flip: Option<usize>| -> Vec<Tensor> {
        let dtype = |i: usize| if activation[i] != (flip == Some(i)) { DType::BF16 } else { DType::F32 };
        inputs.iter().enumerate().map(|(i, t)| t.to_dtype(dtype(i)).expect("cpu cast")).collect()
    };
    let xb = with_dtypes(None);
    let xf: Vec<Tensor> = xb.iter().map(|t| t.to_dtype(DType::F32).expect("cpu cast")).collect();
    let yb = op(&xb).unwrap_or_else(|e| panic!("{name} on bf16 inputs: {e}"));
    let yf = op(&xf).unwrap_or_else(|e| panic!("{name} on f32 inputs: {e}"));
    assert_eq!(yb.len(), out.len(), "{name}: number of outputs");
    for (k, ((b, f), &dtype)) in yb.iter().zip(&yf).zip(out).enumerate() {
        assert_eq!(b.dtype(), dtype, "{name}: dtype of output {k}");
        assert_eq!(f.dtype(), DType::F32, "{name}: dtype of output {k} of the f32 call");
        let want = f.to_dtype(dtype).and_then(|t| t.to_vec()).expect("cpu values");
        let got = b.to_vec().expect("cpu values");
        let same = got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
        assert!(same, "{name}: output {k} is not the f32 result rounded once to {dtype}");
    }
    let activations = activation.iter().filter(|&&a| a).count();
    for (i, &is_activation) in activation.iter().enumerate() {
        // Making the only activation f32 is the valid all-f32 call.
        if is_activation && activations < 2 {
            continue;
        }
        match op(&with_dtypes(Some(i))) {
            Err(Error::DTypeMismatch { .. }) => {}
            other => panic!("{name}: input {i} of the other dtype should be a dtype mismatch, got {:?}", other.map(|_| ())),
        }
    }
}

/// Whether a GPU test can run. Without a usable GPU it prints the test's one `SKIP: <test>: <reason>`
/// line and returns false, unless PLR_REQUIRE_GPU=1 (set by scripts/gpu-test.sh on the GPU
/// machine), where a missing GPU is a failure instead of a silent pass.
pub fn cuda_or_skip(test: &str) -> bool {
    match crate::cuda::probe() {
        Ok(()) => true,
        Err(why) if std::env::var("PLR_REQUIRE_GPU").is_ok_and(|v| v == "1") => panic!("{test}: PLR_REQUIRE_GPU=1 but {why}"),
        Err(why) => {
            println!("SKIP: {test}: {why}");
            false
        }
    }
}

/// A golden file of tests/fixtures (written by the scripts in tools/).
pub fn fixture(name: &str) -> TensorFile {
    // Test binaries carried to a GPU machine run from a checkout elsewhere: fall back to the
    // working directory's tests/fixtures (scripts/gpu-test.sh runs from the repository root).
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let path = if built_in.exists() { built_in } else { Path::new("tests/fixtures").join(name) };
    TensorFile::read(&path).unwrap_or_else(|e| panic!("{e} (tools/README.md says which script writes it)"))
}
