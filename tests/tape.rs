//! Autograd through the tape where values and weights are used more than once: a leaf fanning out
//! to several branches, a weight shared by four streams (OSBlock's shared channel gate), a
//! ParamStore parameter fetched once per use; and a no-grad tape.

use plr_engine::params::Kind;
use plr_engine::rng::Rng;
use plr_engine::testing::{gradcheck, max_rel_err, norm_rel_err, GradCheck};
use plr_engine::{ParamId, ParamStore, Result, Tape, Tensor, Var};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, &mut Rng::new(seed))
}

/// Random values at least 0.1 away from zero, so ReLU's kink stays out of finite differences.
fn randn_off_zero(shape: &[usize], seed: u64) -> Tensor {
    let v = randn(shape, seed).to_vec().unwrap().into_iter().map(|x| x.signum() * (0.1 + x.abs())).collect();
    Tensor::from_vec(v, shape).unwrap()
}

fn sum(tape: &mut Tape, xs: &[Var]) -> Result<Var> {
    let mut acc = xs[0].clone();
    for x in &xs[1..] {
        acc = tape.add(&acc, x)?;
    }
    Ok(acc)
}

/// relu(x) + sigmoid(x) + x * x + x * g: one leaf feeding four branches, one of which uses it
/// twice, with g a per-channel gate.
fn four_branches(tape: &mut Tape, x: &Var, g: &Var) -> Result<Var> {
    let a = tape.relu(x)?;
    let b = tape.sigmoid(x)?;
    let c = tape.mul(x, x)?;
    let d = tape.mul(x, g)?;
    sum(tape, &[a, b, c, d])
}

#[test]
fn fan_out_sums_the_gradients_of_every_branch() {
    let (x, g) = (randn_off_zero(&[2, 3, 4, 4], 1), randn(&[2, 3, 1, 1], 2));
    gradcheck(&[x.clone(), g.clone()], |t, v| four_branches(t, &v[0], &v[1]), GradCheck::default()).unwrap();

    // d sum / dx = [x > 0] + s (1 - s) + 2 x + g, and d sum / dg = per-channel sums of x.
    let mut tape = Tape::new();
    let (xv, gv) = (tape.leaf(x.clone()), tape.leaf(g.clone()));
    let y = four_branches(&mut tape, &xv, &gv).unwrap();
    let total = tape.sum_all(&y).unwrap();
    let grads = tape.backward(&total).unwrap();
    let (xs, gs) = (x.to_vec().unwrap(), g.to_vec().unwrap());
    let want_dx: Vec<f32> = xs
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = 1.0 / (1.0 + (-v as f64).exp());
            ((v > 0.0) as u8 as f64 + s * (1.0 - s) + 2.0 * v as f64 + gs[i / 16] as f64) as f32
        })
        .collect();
    let want_dg: Vec<f32> = xs.chunks(16).map(|c| c.iter().map(|&v| v as f64).sum::<f64>() as f32).collect();
    assert!(max_rel_err(&grads.of(&xv).unwrap().to_vec().unwrap(), &want_dx, 1e-6) < 1e-5);
    assert!(max_rel_err(&grads.of(&gv).unwrap().to_vec().unwrap(), &want_dg, 1e-3) < 1e-5);
}

/// The channel gate s * sigmoid(s W^T + b), GAP-free.
fn gate(tape: &mut Tape, s: &Var, w: &Var, b: &Var) -> Result<Var> {
    let z = tape.linear(s, w, Some(b))?;
    let g = tape.sigmoid(&z)?;
    tape.mul(s, &g)
}

#[test]
fn shared_weight_var_applied_to_four_streams() {
    let inputs = [randn(&[3, 5], 3), randn(&[5, 5], 4), randn(&[5], 5)];
    gradcheck(
        &inputs,
        |t, v| {
            let (x, w, b) = (&v[0], &v[1], &v[2]);
            let streams = [x.clone(), t.scale(x, -0.5)?, t.sigmoid(x)?, t.mul(x, x)?];
            let gated = streams.iter().map(|s| gate(t, s, w, b)).collect::<Result<Vec<_>>>()?;
            sum(t, &gated)
        },
        GradCheck { max_coords: 100, ..GradCheck::default() },
    )
    .unwrap();
}

const N: usize = 2;
const C: usize = 3;
const HW: usize = 4;

/// Four streams of an [N, C, 2, 2] map, each gated per channel by the same ParamStore weights
/// (fetched with `tape.param` once per use): s * sigmoid(flatten(s) W^T + b) as [N, C, 1, 1].
/// Returns sum(out * r) so that every output element counts with its own weight.
fn param_gate_forward(tape: &mut Tape, store: &ParamStore, (w_id, b_id): (ParamId, ParamId), x: &Var, r: &Var) -> Result<Var> {
    let streams = [x.clone(), tape.relu(x)?, tape.sigmoid(x)?, tape.scale(x, 2.0)?];
    let mut gated = Vec::new();
    for s in &streams {
        let (w, b) = (tape.param(store, w_id), tape.param(store, b_id));
        let flat = tape.reshape(s, &[N, C * HW])?;
        let z = tape.linear(&flat, &w, Some(&b))?;
        let g = tape.sigmoid(&z)?;
        let g = tape.reshape(&g, &[N, C, 1, 1])?;
        gated.push(tape.mul(s, &g)?);
    }
    let out = sum(tape, &gated)?;
    let weighted = tape.mul(&out, r)?;
    tape.sum_all(&weighted)
}

#[test]
fn shared_param_store_entry_fetched_four_times() {
    let mut store = ParamStore::new();
    let w_id = store.add("gate.fc.weight", randn(&[C, C * HW], 6), Kind::Param).unwrap();
    let b_id = store.add("gate.fc.bias", randn(&[C], 7), Kind::Param).unwrap();
    let ids = (w_id, b_id);
    let x = Var::constant(randn_off_zero(&[N, C, 2, 2], 8));
    let r = Var::constant(randn(&[N, C, 2, 2], 9));

    let mut tape = Tape::new();
    let loss = param_gate_forward(&mut tape, &store, ids, &x, &r).unwrap();
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(grads.params().len(), 2);

    let eval = |store: &ParamStore| -> f64 {
        let mut t = Tape::no_grad();
        param_gate_forward(&mut t, store, ids, &x, &r).unwrap().value().item().unwrap() as f64
    };
    let h = 1e-2;
    for id in [w_id, b_id] {
        let analytic = grads.param(id).unwrap().to_vec().unwrap();
        let base = store.get(id).to_vec().unwrap();
        let numeric: Vec<f32> = (0..base.len())
            .map(|j| {
                let mut at = |delta: f32| {
                    let mut v = base.clone();
                    v[j] += delta;
                    store.set(id, Tensor::from_vec(v, store.get(id).shape()).unwrap()).unwrap();
                    eval(&store)
                };
                let d = (at(h) - at(-h)) / (2.0 * h as f64);
                store.set(id, Tensor::from_vec(base.clone(), store.get(id).shape()).unwrap()).unwrap();
                d as f32
            })
            .collect();
        let err = norm_rel_err(&analytic, &numeric);
        assert!(err < 1e-3, "{}: relative error {err:.2e}\nanalytic {analytic:?}\nnumeric {numeric:?}", store.entry(id).name);
    }

    // A buffer fetched with tape.param is a constant: no node, no gradient.
    let buf = store.add("bn.running_mean", randn(&[C], 10), Kind::Buffer).unwrap();
    let mut tape = Tape::new();
    assert!(!tape.param(&store, buf).requires_grad());
    assert!(tape.is_empty());
}

#[test]
fn no_grad_tape_records_nothing() {
    let (x, g) = (randn(&[2, 3, 4, 4], 11), randn(&[2, 3, 1, 1], 12));
    let mut rec = Tape::new();
    let (xr, gr) = (rec.leaf(x.clone()), rec.leaf(g.clone()));
    let want = four_branches(&mut rec, &xr, &gr).unwrap();
    assert!(rec.len() > 2);

    let mut tape = Tape::no_grad();
    let (xv, gv) = (tape.leaf(x), tape.leaf(g));
    let y = four_branches(&mut tape, &xv, &gv).unwrap();
    let total = tape.sum_all(&y).unwrap();
    assert_eq!(tape.len(), 0);
    assert!(!xv.requires_grad() && !total.requires_grad());
    assert_eq!(y.value().to_vec().unwrap(), want.value().to_vec().unwrap());
    let err = tape.backward(&total).err().expect("backward on a no-grad tape must fail");
    assert!(err.to_string().contains("backward"), "{err}");
}

/// A cast to bf16 and back: the forward rounds once, the gradient comes back as f32 of the
/// gradient's bf16 value (what autocast does to a weight's gradient).
#[test]
fn cast_rounds_forward_and_converts_the_gradient_back() {
    use plr_engine::tensor::{round_bf16, DType};
    let x = randn(&[3, 5], 4);
    let dy = randn(&[3, 5], 5);
    let mut tape = Tape::new();
    let xv = tape.leaf(x.clone());
    let b = tape.cast(&xv, DType::BF16).unwrap();
    assert_eq!(b.value().dtype(), DType::BF16);
    let want: Vec<f32> = x.to_vec().unwrap().into_iter().map(round_bf16).collect();
    assert_eq!(b.value().to_vec().unwrap(), want);
    // L = sum(f32(b) * dy): the gradient reaching b is dy rounded to bf16, handed to x as f32.
    let b32 = tape.cast(&b, DType::F32).unwrap();
    let w = tape.leaf(dy.clone());
    let y = tape.mul(&b32, &w).unwrap();
    let total = tape.sum_all(&y).unwrap();
    let grads = tape.backward(&total).unwrap();
    let dx = grads.of(&xv).unwrap();
    assert_eq!(dx.dtype(), DType::F32);
    assert_eq!(dx.to_vec().unwrap(), dy.to_vec().unwrap().into_iter().map(round_bf16).collect::<Vec<_>>());
}

/// Mixed precision on the tape: a bf16 leaf feeding two branches and one cast weight used by two
/// convolutions. Gradients summed at a bf16 value stay bf16 (rounded once per sum, as every bf16
/// op rounds); the master weight's gradient comes back through the cast as f32.
#[test]
fn bf16_fan_out_sums_in_bf16_and_the_master_weight_gradient_is_f32() {
    use plr_engine::ops::conv::{conv2d_backward_data, conv2d_backward_filter, Conv2dCfg};
    use plr_engine::ops::elementwise as ew;
    use plr_engine::tensor::DType::{BF16, F32};
    let cfg = Conv2dCfg::new(1, 1, 1);
    let mut store = ParamStore::new();
    let w_id = store.add("conv.weight", randn(&[4, 3, 3, 3], 13), Kind::Param).unwrap();
    let x = randn(&[2, 3, 5, 5], 14).to_dtype(BF16).unwrap();
    let r = randn(&[2, 4, 5, 5], 15);

    let mut tape = Tape::new();
    let xv = tape.leaf(x.clone());
    let w = tape.param(&store, w_id);
    let wb = tape.cast(&w, BF16).unwrap();
    let a = tape.conv2d(&xv, &wb, None, cfg).unwrap();
    let xr = tape.relu(&xv).unwrap();
    let b = tape.conv2d(&xr, &wb, None, cfg).unwrap();
    let y = tape.add(&a, &b).unwrap();
    assert_eq!(y.value().dtype(), BF16);
    let y32 = tape.cast(&y, F32).unwrap();
    let weighted = tape.mul(&y32, &Var::constant(r.clone())).unwrap();
    let total = tape.sum_all(&weighted).unwrap();
    let grads = tape.backward(&total).unwrap();

    // By hand with the ops: dy is r rounded to bf16 (the cast's backward), each branch's
    // gradient is a bf16 op result, and the sums are bf16 adds.
    let dy = r.to_dtype(BF16).unwrap();
    let wv = store.get(w_id).to_dtype(BF16).unwrap();
    let xr_val = ew::relu_forward(&x).unwrap();
    let dw = ew::add(
        &conv2d_backward_filter(&dy, &xr_val, wv.shape(), cfg).unwrap(),
        &conv2d_backward_filter(&dy, &x, wv.shape(), cfg).unwrap(),
    )
    .unwrap();
    let dxa = conv2d_backward_data(&dy, &wv, x.shape(), cfg).unwrap();
    let dxb = ew::relu_backward(&conv2d_backward_data(&dy, &wv, x.shape(), cfg).unwrap(), &xr_val).unwrap();
    let dx = ew::add(&dxb, &dxa).unwrap();

    let got_dx = grads.of(&xv).unwrap();
    assert_eq!(got_dx.dtype(), BF16);
    assert_eq!(got_dx.to_vec().unwrap(), dx.to_vec().unwrap());
    let got_dw = grads.param(w_id).unwrap();
    assert_eq!(got_dw.dtype(), F32);
    assert_eq!(got_dw.to_vec().unwrap(), dw.to_vec().unwrap());
    // Rounding happened: the f32 sum of the two filter gradients differs from the bf16 one.
    let dw_f32 = ew::add(
        &conv2d_backward_filter(&dy.to_dtype(F32).unwrap(), &xr_val.to_dtype(F32).unwrap(), wv.shape(), cfg).unwrap(),
        &conv2d_backward_filter(&dy.to_dtype(F32).unwrap(), &x.to_dtype(F32).unwrap(), wv.shape(), cfg).unwrap(),
    )
    .unwrap();
    assert_ne!(got_dw.to_vec().unwrap(), dw_f32.to_vec().unwrap());
}
