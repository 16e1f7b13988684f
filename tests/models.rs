//! OSNet and PLR-OSNet: state-dict names, shapes and parameter counts against the spec (an
//! independent enumeration of spec section 7), init, forward shapes and modes, the PLR loss, and
//! the `embed` command end to end.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use plr_engine::data::image::load_test_image;
use plr_engine::io::weights::{save_state_dict, TensorFile};
use plr_engine::models::*;
use plr_engine::nn::{Ctx, Precision};
use plr_engine::ops::loss;
use plr_engine::params::Kind;
use plr_engine::rng::Rng;
use plr_engine::testing::{gradcheck, max_rel_err, norm_rel_err, GradCheck};
use plr_engine::{ParamStore, Tape, Tensor, Var};

const X1: [usize; 4] = [64, 256, 384, 512];
const X025: [usize; 4] = [16, 64, 96, 128];

type Entries = BTreeMap<String, (Vec<usize>, Kind)>;

/// Spec 7.1's `BN(p)`.
fn bn(e: &mut Entries, p: &str, c: usize) {
    e.insert(format!("{p}.weight"), (vec![c], Kind::Param));
    e.insert(format!("{p}.bias"), (vec![c], Kind::Param));
    e.insert(format!("{p}.running_mean"), (vec![c], Kind::Buffer));
    e.insert(format!("{p}.running_var"), (vec![c], Kind::Buffer));
    e.insert(format!("{p}.num_batches_tracked"), (vec![], Kind::Counter));
}

fn param(e: &mut Entries, name: String, shape: &[usize]) {
    e.insert(name, (shape.to_vec(), Kind::Param));
}

/// Conv (no bias) + BN under `p`: `p.conv.weight`, `BN(p.bn)`.
fn conv_bn(e: &mut Entries, p: &str, cin: usize, cout: usize, k: usize) {
    param(e, format!("{p}.conv.weight"), &[cout, cin, k, k]);
    bn(e, &format!("{p}.bn"), cout);
}

/// Spec 7.1's `LITE(p, m)`.
fn lite(e: &mut Entries, p: &str, m: usize) {
    param(e, format!("{p}.conv1.weight"), &[m, m, 1, 1]);
    param(e, format!("{p}.conv2.weight"), &[m, 1, 3, 3]);
    bn(e, &format!("{p}.bn"), m);
}

/// One OSNet stage (two blocks and, for conv2/conv3, the transition) under `s`.
fn stage(e: &mut Entries, s: &str, cin: usize, cout: usize, transition: bool) {
    let m = cout / 4;
    for (b, bin) in [(0, cin), (1, cout)] {
        let p = format!("{s}.{b}");
        conv_bn(e, &format!("{p}.conv1"), bin, m, 1);
        lite(e, &format!("{p}.conv2a"), m);
        for (stream, depth) in [("conv2b", 2), ("conv2c", 3), ("conv2d", 4)] {
            for j in 0..depth {
                lite(e, &format!("{p}.{stream}.{j}"), m);
            }
        }
        param(e, format!("{p}.gate.fc1.weight"), &[m / 16, m, 1, 1]);
        param(e, format!("{p}.gate.fc1.bias"), &[m / 16]);
        param(e, format!("{p}.gate.fc2.weight"), &[m, m / 16, 1, 1]);
        param(e, format!("{p}.gate.fc2.bias"), &[m]);
        conv_bn(e, &format!("{p}.conv3"), m, cout, 1);
        if b == 0 && bin != cout {
            conv_bn(e, &format!("{p}.downsample"), bin, cout, 1);
        }
    }
    if transition {
        conv_bn(e, &format!("{s}.2.0"), cout, cout, 1);
    }
}

fn osnet_expected(c: [usize; 4], k: usize) -> Entries {
    let mut e = Entries::new();
    conv_bn(&mut e, "conv1", 3, c[0], 7);
    stage(&mut e, "conv2", c[0], c[1], true);
    stage(&mut e, "conv3", c[1], c[2], true);
    stage(&mut e, "conv4", c[2], c[3], false);
    conv_bn(&mut e, "conv5", c[3], c[3], 1);
    param(&mut e, "fc.0.weight".into(), &[c[3], c[3]]);
    param(&mut e, "fc.0.bias".into(), &[c[3]]);
    bn(&mut e, "fc.1", c[3]);
    param(&mut e, "classifier.weight".into(), &[k, c[3]]);
    param(&mut e, "classifier.bias".into(), &[k]);
    e
}

/// Spec 7.2: the OSNet entries renamed, plus the new layers.
fn plr_expected(c: [usize; 4], k: usize, parts: usize) -> Entries {
    let mut e = Entries::new();
    for (name, v) in osnet_expected(c, k) {
        let renamed: Vec<String> = if let Some(r) = name.strip_prefix("conv1.") {
            vec![format!("layer0.0.{r}")]
        } else if let Some(r) = name.strip_prefix("conv2.") {
            vec![format!("layer1.{r}")]
        } else if let Some(r) = name.strip_prefix("conv3.") {
            vec![format!("layer2.{r}")]
        } else if let Some(r) = name.strip_prefix("conv4.") {
            vec![format!("layer30.{r}"), format!("layer31.0.{r}")]
        } else if let Some(r) = name.strip_prefix("conv5.") {
            vec![format!("layer40.{r}"), format!("layer41.0.{r}")]
        } else {
            vec![]
        };
        for n in renamed {
            e.insert(n, v.clone());
        }
    }
    for (i, ch) in [(1, c[1]), (2, c[2])] {
        let p = format!("attention_module{i}");
        param(&mut e, format!("{p}.pam.gamma"), &[1]);
        for conv in ["query_conv", "key_conv"] {
            param(&mut e, format!("{p}.pam.{conv}.weight"), &[ch / 8, ch, 1, 1]);
            param(&mut e, format!("{p}.pam.{conv}.bias"), &[ch / 8]);
        }
        bn(&mut e, &format!("{p}.pam.bn"), ch);
        param(&mut e, format!("{p}.se.fc1.weight"), &[ch / 16, ch, 1, 1]);
        param(&mut e, format!("{p}.se.fc1.bias"), &[ch / 16]);
        param(&mut e, format!("{p}.se.fc2.weight"), &[ch, ch / 16, 1, 1]);
        param(&mut e, format!("{p}.se.fc2.bias"), &[ch]);
    }
    param(&mut e, "fc2.weight".into(), &[c[3], c[3]]);
    param(&mut e, "fc2.bias".into(), &[c[3]]);
    bn(&mut e, "bn1", parts * c[3]);
    bn(&mut e, "bn2", c[3]);
    param(&mut e, "classifier1.weight".into(), &[k, parts * c[3]]);
    param(&mut e, "classifier1.bias".into(), &[k]);
    param(&mut e, "classifier2.weight".into(), &[k, c[3]]);
    param(&mut e, "classifier2.bias".into(), &[k]);
    e
}

fn entries(store: &ParamStore) -> Entries {
    store.entries().iter().map(|e| (e.name.clone(), (e.value.shape().to_vec(), e.kind))).collect()
}

fn shape_of(store: &ParamStore, name: &str) -> Vec<usize> {
    store.get(store.id(name).unwrap()).shape().to_vec()
}

fn plr(store: &mut ParamStore, channels: [usize; 4], num_classes: usize, seed: u64) -> PlrOsnet {
    PlrOsnet::new(store, PlrConfig { channels, num_classes, parts: 4 }, &mut Rng::new(seed)).unwrap()
}

fn values(store: &ParamStore, name: &str) -> Vec<f32> {
    store.get(store.id(name).unwrap()).to_vec().unwrap()
}

fn std_dev(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

#[test]
fn osnet_x1_state_dict_and_parameter_counts_match_the_spec() {
    let mut store = ParamStore::new();
    Osnet::new(&mut store, OsnetConfig { channels: X1, num_classes: 1000 }, &mut Rng::new(0)).unwrap();
    assert_eq!(store.len(), 567);
    assert_eq!(entries(&store), osnet_expected(X1, 1000));
    assert_eq!(store.count_params(|_| true), 2_682_508);
    assert_eq!(store.count_params(|n| !n.starts_with("classifier")), 2_169_508);
    assert_eq!(store.count_params(|n| n.starts_with("conv1.")), 9_536);
    assert_eq!(store.count_params(|n| n.starts_with("conv4.")), 806_160);
}

#[test]
fn osnet_widths_follow_torchreid() {
    assert_eq!(channels_for_width(1.0).unwrap(), X1);
    assert_eq!(channels_for_width(0.75).unwrap(), [48, 192, 288, 384]);
    assert_eq!(channels_for_width(0.5).unwrap(), [32, 128, 192, 256]);
    assert_eq!(channels_for_width(0.25).unwrap(), X025);
    assert!(channels_for_width(0.3).unwrap_err().to_string().contains("0.3"));
    for width in [0.75, 0.5, 0.25] {
        let c = channels_for_width(width).unwrap();
        let mut store = ParamStore::new();
        Osnet::new(&mut store, OsnetConfig { channels: c, num_classes: 10 }, &mut Rng::new(0)).unwrap();
        assert_eq!(entries(&store), osnet_expected(c, 10), "width {width}");
    }
}

#[test]
fn plr_x1_state_dict_and_parameter_counts_match_the_spec() {
    let mut store = ParamStore::new();
    plr(&mut store, X1, 751, 0);
    assert_eq!(store.len(), 786);
    assert_eq!(entries(&store), plr_expected(X1, 751, 4));
    assert_eq!(store.count_params(|_| true), 5_248_988);
    assert_eq!(store.count_params(|n| !n.starts_with("classifier")), 3_324_926);
    let module = |p: &str| store.count_params(|n| n.starts_with(p));
    let table = [
        ("layer0.", 9_536),
        ("layer1.", 234_632),
        ("attention_module1.", 25_425),
        ("layer2.", 592_332),
        ("attention_module2.", 56_569),
        ("layer30.", 806_160),
        ("layer31.", 806_160),
        ("layer40.", 263_168),
        ("layer41.", 263_168),
        ("fc2.", 262_656),
        ("bn1.", 4_096),
        ("bn2.", 1_024),
    ];
    for (p, n) in table {
        assert_eq!(module(p), n, "{p}");
    }
    // The brief's spot checks, and the kinds of a BN's entries.
    assert_eq!(shape_of(&store, "layer1.0.conv2b.1.conv2.weight"), [64, 1, 3, 3]);
    assert_eq!(shape_of(&store, "layer31.0.1.conv3.bn.running_var"), [512]);
    assert_eq!(shape_of(&store, "attention_module2.pam.query_conv.weight"), [48, 384, 1, 1]);
    assert_eq!(shape_of(&store, "layer1.2.0.conv.weight"), [256, 256, 1, 1]);
    assert_eq!(shape_of(&store, "layer30.0.gate.fc1.bias"), [8]);
    assert_eq!(shape_of(&store, "layer40.conv.weight"), [512, 512, 1, 1]);
    assert_eq!(shape_of(&store, "layer41.0.bn.weight"), [512]);
    assert_eq!(shape_of(&store, "bn1.num_batches_tracked"), Vec::<usize>::new());
    let kind = |n: &str| store.entry(store.id(n).unwrap()).kind;
    assert_eq!(kind("bn1.running_mean"), Kind::Buffer);
    assert_eq!(kind("bn1.num_batches_tracked"), Kind::Counter);
    assert_eq!(kind("attention_module1.pam.gamma"), Kind::Param);
}

#[test]
fn plr_small_state_dict_follows_the_width_and_parts() {
    let mut store = ParamStore::new();
    PlrOsnet::new(&mut store, PlrConfig { channels: X025, num_classes: 6, parts: 2 }, &mut Rng::new(0)).unwrap();
    assert_eq!(entries(&store), plr_expected(X025, 6, 2));
    let mut s = ParamStore::new();
    let too_narrow = PlrOsnet::new(&mut s, PlrConfig { channels: [8, 32, 48, 64], num_classes: 6, parts: 4 }, &mut Rng::new(0));
    assert!(too_narrow.is_err());
}

#[test]
fn init_follows_the_spec() {
    let mut store = ParamStore::new();
    plr(&mut store, X1, 751, 3);
    // Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out channels * kernel area)).
    for (name, fan_out) in
        [("layer2.0.conv1.conv.weight", 96.0), ("layer0.0.conv.weight", 64.0 * 49.0), ("layer1.0.conv2a.conv2.weight", 64.0 * 9.0)]
    {
        let want = (2.0f64 / fan_out).sqrt();
        let got = std_dev(&values(&store, name));
        assert!((got / want - 1.0).abs() < 0.06, "{name}: std {got} vs {want}");
    }
    assert!(values(&store, "layer1.0.gate.fc1.bias").iter().all(|&v| v == 0.0));
    for name in ["fc2.weight", "classifier1.weight", "classifier2.weight"] {
        assert!((std_dev(&values(&store, name)) / 0.01 - 1.0).abs() < 0.03, "{name}");
    }
    for name in ["fc2.bias", "classifier1.bias", "bn1.bias", "layer30.0.conv1.bn.bias", "bn2.running_mean"] {
        assert!(values(&store, name).iter().all(|&v| v == 0.0), "{name}");
    }
    for name in ["bn1.weight", "attention_module1.pam.bn.weight", "layer41.0.bn.running_var"] {
        assert!(values(&store, name).iter().all(|&v| v == 1.0), "{name}");
    }
    assert_eq!(values(&store, "attention_module1.pam.gamma"), [0.0]);
    // PyTorch's default conv init in the attention modules: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for (name, fan_in) in [("attention_module2.pam.key_conv.weight", 384.0), ("attention_module1.se.fc2.bias", 16.0)] {
        let bound = 1.0 / f64::sqrt(fan_in);
        let v = values(&store, name);
        assert!(v.iter().all(|&x| (x as f64).abs() <= bound));
        assert!((std_dev(&v) / (bound / 3f64.sqrt()) - 1.0).abs() < 0.2, "{name}");
    }
    // The global branch starts as a copy of the local one (deepcopy in the official code).
    for e in store.entries() {
        let twin = if let Some(r) = e.name.strip_prefix("layer31.0.") {
            format!("layer30.{r}")
        } else if let Some(r) = e.name.strip_prefix("layer41.0.") {
            format!("layer40.{r}")
        } else {
            continue;
        };
        assert_eq!(e.value.to_vec().unwrap(), values(&store, &twin), "{}", e.name);
    }
    assert_ne!(values(&store, "layer30.0.conv1.conv.weight")[..8], values(&store, "layer2.0.conv1.conv.weight")[..8]);
}

fn input(b: usize, h: usize, w: usize, seed: u64) -> Tensor {
    Tensor::randn(&[b, 3, h, w], 1.0, &mut Rng::new(seed))
}

fn buffers(store: &ParamStore) -> Vec<Vec<f32>> {
    store.entries().iter().filter(|e| e.kind != Kind::Param).map(|e| e.value.to_vec().unwrap()).collect()
}

fn row_norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn plr_forward_shapes_and_modes() {
    let mut store = ParamStore::new();
    let model = plr(&mut store, X025, 5, 1);
    let x = input(4, 64, 32, 2);

    let before = buffers(&store);
    let mut tape = Tape::no_grad();
    let f = model.forward_eval(&mut Ctx::new(&mut tape, &mut store, false), &Var::constant(x.clone())).unwrap();
    assert_eq!(f.shape(), [4, 640]);
    assert_eq!(buffers(&store), before, "eval mode must not touch the running statistics");
    let f = f.value().to_vec().unwrap();
    for row in f.chunks(640) {
        assert!((row_norm(&row[..512]) - 1.0).abs() < 1e-5 && (row_norm(&row[512..]) - 1.0).abs() < 1e-5);
    }
    // Eval-mode features of an image do not depend on the rest of the batch.
    let one = Tensor::from_vec(x.to_vec().unwrap()[3 * 64 * 32..2 * 3 * 64 * 32].to_vec(), &[1, 3, 64, 32]).unwrap();
    let mut tape = Tape::no_grad();
    let f1 = model.forward_eval(&mut Ctx::new(&mut tape, &mut store, false), &Var::constant(one)).unwrap();
    assert!(max_rel_err(&f1.value().to_vec().unwrap(), &f[640..1280], 1e-3) < 1e-4);

    let mut tape = Tape::no_grad();
    let out = model.forward_train(&mut Ctx::new(&mut tape, &mut store, true), &Var::constant(x)).unwrap();
    assert_eq!(out.logits1.shape(), [4, 5]);
    assert_eq!(out.logits2.shape(), [4, 5]);
    assert_eq!(out.v1.shape(), [4, 512]);
    assert_eq!(out.v2.shape(), [4, 128]);
    // Training mode updated every BatchNorm once: all counters at 1, all running statistics moved.
    for e in store.entries() {
        let v = e.value.to_vec().unwrap();
        if e.kind == Kind::Counter {
            assert_eq!(v, [1.0], "{}", e.name);
        } else if e.name.ends_with("running_var") {
            assert!(v.iter().any(|&x| x != 1.0), "{}", e.name);
        }
    }
}

#[test]
fn full_size_plr_gives_2560_features_and_osnet_a_16x8_map() {
    let mut store = ParamStore::new();
    let model = plr(&mut store, X1, 751, 0);
    let mut tape = Tape::no_grad();
    let f = model.forward_eval(&mut Ctx::new(&mut tape, &mut store, false), &Var::constant(input(1, 256, 128, 5))).unwrap();
    assert_eq!(f.shape(), [1, 2560]);

    let mut store = ParamStore::new();
    let osnet = Osnet::new(&mut store, OsnetConfig { channels: X1, num_classes: 1000 }, &mut Rng::new(0)).unwrap();
    let mut tape = Tape::no_grad();
    let mut ctx = Ctx::new(&mut tape, &mut store, false);
    let map = osnet.feature_map(&mut ctx, &Var::constant(input(1, 256, 128, 6))).unwrap();
    assert_eq!(map.shape(), [1, 512, 16, 8]);
}

#[test]
fn osnet_forward_returns_the_fc_feature_and_logits() {
    let mut store = ParamStore::new();
    let osnet = Osnet::new(&mut store, OsnetConfig { channels: X025, num_classes: 7 }, &mut Rng::new(0)).unwrap();
    let mut tape = Tape::no_grad();
    let out = osnet.forward(&mut Ctx::new(&mut tape, &mut store, false), &Var::constant(input(2, 64, 32, 1))).unwrap();
    assert_eq!(out.feature.shape(), [2, 128]);
    assert_eq!(out.logits.shape(), [2, 7]);
    assert!(out.feature.value().to_vec().unwrap().iter().all(|&v| v >= 0.0), "the fc feature ends with a ReLU");
}

#[test]
fn eval_feature_gradient_matches_finite_differences() {
    let mut store = ParamStore::new();
    let model = plr(&mut store, X025, 3, 4);
    // Non-zero gamma so that the attention's query and key convs are on the gradient path.
    let g = store.id("attention_module1.pam.gamma").unwrap();
    store.set(g, Tensor::from_vec(vec![0.7], &[1]).unwrap()).unwrap();
    let store = RefCell::new(store);
    let x = input(2, 64, 32, 9);
    let cfg = GradCheck { h: 1e-2, tol: 2e-2, max_coords: 24, seed: 1 };
    gradcheck(&[x], |tape, v| model.forward_eval(&mut Ctx::new(tape, &mut store.borrow_mut(), false), &v[0]), cfg).unwrap();
}

#[test]
fn a_training_step_reaches_every_parameter() {
    let mut store = ParamStore::new();
    let model = plr(&mut store, X025, 4, 5);
    let labels = [0, 0, 1, 1, 2, 2, 3, 3];
    let lossfn = PlrLoss::new(&mut store, PlrLossConfig::new(4), 512, 128, &mut Rng::new(6)).unwrap();
    let step = |store: &mut ParamStore| {
        let mut tape = Tape::new();
        let x = Var::constant(input(8, 64, 32, 7));
        let mut ctx = Ctx::new(&mut tape, store, true);
        let out = model.forward_train(&mut ctx, &x).unwrap();
        let terms = lossfn.forward(&mut ctx, &out, &labels).unwrap();
        tape.backward(&terms.total).unwrap()
    };
    let grads = step(&mut store);
    let norm = |store: &ParamStore, name: &str| row_norm(&grads.param(store.id(name).unwrap()).unwrap().to_vec().unwrap());
    for id in store.trainable() {
        let g = grads.param(id).unwrap_or_else(|| panic!("no gradient for {}", store.entry(id).name));
        assert!(g.to_vec().unwrap().iter().all(|v| v.is_finite()));
    }
    // Frozen centers get none; with gamma = 0 (its init) PAM's query and key get exactly zero.
    assert!(grads.param(lossfn.centers1).is_none());
    assert_eq!(norm(&store, "attention_module1.pam.query_conv.weight"), 0.0);
    assert!(norm(&store, "attention_module1.pam.gamma") > 0.0);
    let g = store.id("attention_module1.pam.gamma").unwrap();
    store.set(g, Tensor::from_vec(vec![0.5], &[1]).unwrap()).unwrap();
    let grads = step(&mut store);
    assert!(row_norm(&grads.param(store.id("attention_module1.pam.query_conv.weight").unwrap()).unwrap().to_vec().unwrap()) > 0.0);
}

/// logits1, logits2, v1, v2 and labels of a 4 x 2 batch.
fn loss_inputs() -> (Vec<Tensor>, Vec<usize>) {
    let mut rng = Rng::new(11);
    let t = vec![
        Tensor::randn(&[8, 5], 1.0, &mut rng),
        Tensor::randn(&[8, 5], 1.0, &mut rng),
        Tensor::randn(&[8, 12], 1.0, &mut rng),
        Tensor::randn(&[8, 6], 1.0, &mut rng),
    ];
    (t, vec![0, 0, 1, 1, 2, 2, 4, 4])
}

fn train_output(v: &[Var]) -> PlrTrainOutput {
    PlrTrainOutput { logits1: v[0].clone(), logits2: v[1].clone(), v1: v[2].clone(), v2: v[3].clone() }
}

#[test]
fn plr_loss_is_the_spec_combination_of_its_terms() {
    let (t, labels) = loss_inputs();
    let mut store = ParamStore::new();
    let lossfn = PlrLoss::new(&mut store, PlrLossConfig::new(5), 12, 6, &mut Rng::new(1)).unwrap();
    let vars: Vec<Var> = t.iter().cloned().map(Var::constant).collect();
    let mut tape = Tape::no_grad();
    let terms = lossfn.forward(&mut Ctx::new(&mut tape, &mut store, true), &train_output(&vars), &labels).unwrap();
    let item = |v: &Var| v.value().item().unwrap() as f64;
    let c1 = store.get(lossfn.centers1).clone();
    let c2 = store.get(lossfn.centers2).clone();
    let want = [
        loss::cross_entropy_label_smooth_forward(&t[0], &labels, 0.1).unwrap(),
        loss::cross_entropy_label_smooth_forward(&t[1], &labels, 0.1).unwrap(),
        loss::triplet_soft_margin_forward(&t[2], &labels).unwrap(),
        loss::triplet_soft_margin_forward(&t[3], &labels).unwrap(),
        loss::center_loss_forward(&t[2], &labels, &c1).unwrap(),
        loss::center_loss_forward(&t[3], &labels, &c2).unwrap(),
    ]
    .map(|x| x.item().unwrap() as f64);
    let got = [&terms.ce1, &terms.ce2, &terms.tri1, &terms.tri2, &terms.cen1, &terms.cen2].map(item);
    assert_eq!(got, want);
    let total = 0.5 * (want[0] + want[1]) + 0.5 * (want[2] + want[3]) + 5e-4 * 0.5 * (want[4] + want[5]);
    assert!((item(&terms.total) - total).abs() < 1e-6 * total.abs());
    assert_eq!(c1.shape(), [5, 12]);
    assert!((std_dev(&c1.to_vec().unwrap()) - 1.0).abs() < 0.5, "centers are N(0, 1) draws");
}

#[test]
fn plr_loss_gradient_matches_finite_differences() {
    let (t, labels) = loss_inputs();
    let mut store = ParamStore::new();
    let lossfn = PlrLoss::new(&mut store, PlrLossConfig::new(5), 12, 6, &mut Rng::new(1)).unwrap();
    let store = RefCell::new(store);
    gradcheck(
        &t,
        |tape, v| Ok(lossfn.forward(&mut Ctx::new(tape, &mut store.borrow_mut(), true), &train_output(v), &labels)?.total),
        GradCheck::default(),
    )
    .unwrap();
}

#[test]
fn center_options_official_751_and_learned() {
    let (t, labels) = loss_inputs();
    // Labels beyond the center table are left out of the center loss (CUHK03 with 751 centers).
    let mut store = ParamStore::new();
    let cfg = PlrLossConfig { center_classes: 3, ..PlrLossConfig::new(5) };
    let lossfn = PlrLoss::new(&mut store, cfg, 12, 6, &mut Rng::new(1)).unwrap();
    let vars: Vec<Var> = t.iter().cloned().map(Var::constant).collect();
    let mut tape = Tape::no_grad();
    let terms = lossfn.forward(&mut Ctx::new(&mut tape, &mut store, true), &train_output(&vars), &labels).unwrap();
    let c1 = store.get(lossfn.centers1).to_vec().unwrap();
    let x = t[2].to_vec().unwrap();
    let kept: Vec<f64> = (0..6).map(|i| (0..12).map(|d| (x[i * 12 + d] as f64 - c1[labels[i] * 12 + d] as f64).powi(2)).sum()).collect();
    let want = kept.iter().sum::<f64>() / 6.0;
    assert!((terms.cen1.value().item().unwrap() as f64 - want).abs() < 1e-5 * want);

    let official = PlrLossConfig { center_classes: OFFICIAL_CENTER_CLASSES, ..PlrLossConfig::new(5) };
    let mut store = ParamStore::new();
    let lossfn = PlrLoss::new(&mut store, official, 12, 6, &mut Rng::new(1)).unwrap();
    assert_eq!(store.get(lossfn.centers1).shape(), [751, 12]);
    assert_eq!(store.entry(lossfn.centers1).kind, Kind::Buffer);

    let learned = PlrLossConfig { learned_centers: true, ..PlrLossConfig::new(5) };
    let mut store = ParamStore::new();
    let lossfn = PlrLoss::new(&mut store, learned, 12, 6, &mut Rng::new(1)).unwrap();
    assert_eq!(store.entry(lossfn.centers2).kind, Kind::Param);
    let mut tape = Tape::new();
    let vars: Vec<Var> = t.iter().map(|x| tape.leaf(x.clone())).collect();
    let terms = lossfn.forward(&mut Ctx::new(&mut tape, &mut store, true), &train_output(&vars), &labels).unwrap();
    let grads = tape.backward(&terms.total).unwrap();
    let dc = grads.param(lossfn.centers2).unwrap().to_vec().unwrap();
    // Only the centers of classes in the batch (0, 1, 2, 4) get a gradient.
    assert!(dc[3 * 6..4 * 6].iter().all(|&v| v == 0.0) && dc[..6].iter().any(|&v| v != 0.0));
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("models").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_plr-engine")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `plr-engine embed --weights W --images I --out O` followed by `extra`.
fn embed(weights: &Path, images: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    run(&[&["embed", "--weights", p(weights), "--images", p(images), "--out", p(out)], extra].concat())
}

/// A small PLR-OSNet weights file with trained-looking BatchNorm statistics.
fn small_weights(dir: &Path) -> PathBuf {
    let mut store = ParamStore::new();
    let model = plr(&mut store, X025, 3, 8);
    let mut tape = Tape::no_grad();
    model.forward_train(&mut Ctx::new(&mut tape, &mut store, true), &Var::constant(input(4, 64, 32, 3))).unwrap();
    let path = dir.join("small.safetensors");
    save_state_dict(&store, &path, Default::default()).unwrap();
    path
}

#[test]
fn embed_writes_the_eval_features_of_every_image_in_name_order() {
    let dir = scratch("embed");
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("subfolder.png")).unwrap();
    let mut rng = Rng::new(3);
    let mut pic = |w: u32, h: u32| image::RgbImage::from_fn(w, h, |_, _| image::Rgb([0, 0, 0].map(|_: u8| rng.below(256) as u8)));
    pic(64, 128).save(images.join("b.png")).unwrap();
    pic(50, 150).save(images.join("a.JPG")).unwrap();
    image::DynamicImage::ImageRgb8(pic(20, 40)).to_luma8().save(images.join("c.png")).unwrap();
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let weights = small_weights(&dir);
    let out = dir.join("feats.safetensors");

    let (ok, err) = embed(&weights, &images, &out, &["--device", "cpu", "--height", "64", "--width", "32", "--batch-size", "2"]);
    assert!(ok, "{err}");
    let file = TensorFile::read(&out).unwrap();
    let feats = file.require("features").unwrap();
    assert_eq!(feats.shape, [3, 640]);
    let names: Vec<String> = serde_json::from_str(file.meta("files").unwrap()).unwrap();
    assert_eq!(names, ["a.JPG", "b.png", "c.png"]);

    let (model, mut store) = plr_engine::io::weights::load_plr(&weights).unwrap();
    let got = feats.to_f32();
    for (i, name) in names.iter().enumerate() {
        let x = Tensor::from_vec(load_test_image(&images.join(name), 64, 32).unwrap(), &[1, 3, 64, 32]).unwrap();
        let mut tape = Tape::no_grad();
        let want = model.forward_eval(&mut Ctx::new(&mut tape, &mut store, false), &Var::constant(x)).unwrap();
        assert!(max_rel_err(&got[i * 640..(i + 1) * 640], &want.value().to_vec().unwrap(), 1e-3) < 1e-4, "{name}");
    }

    // --precision bf16: still f32 features, those of the bf16 forward, and not the f32 ones.
    let out16 = dir.join("feats16.safetensors");
    let (ok, err) = embed(&weights, &images, &out16, &["--device", "cpu", "--height", "64", "--width", "32", "--precision", "bf16"]);
    assert!(ok, "{err}");
    let file16 = TensorFile::read(&out16).unwrap();
    let got16 = file16.require("features").unwrap().to_f32();
    let x =
        Tensor::from_vec(names.iter().flat_map(|n| load_test_image(&images.join(n), 64, 32).unwrap()).collect(), &[3, 3, 64, 32]).unwrap();
    let mut tape = Tape::no_grad();
    let mut ctx = Ctx::new(&mut tape, &mut store, false).with_precision(Precision::Bf16);
    let want16 = model.forward_eval(&mut ctx, &Var::constant(x)).unwrap();
    assert_eq!(want16.value().dtype(), plr_engine::tensor::DType::F32);
    let (same, vs_f32) = (norm_rel_err(&got16, &want16.value().to_vec().unwrap()), norm_rel_err(&got16, &got));
    println!("bf16 embed: vs the in-process bf16 forward {same:.2e}, vs f32 {vs_f32:.2e}");
    assert!(same < 1e-6, "bf16 embed differs from the bf16 forward by {same:.2e}");
    // Measured 4.1e-3 (2026-11-24): eval-mode BatchNorm with set statistics is well conditioned.
    assert!(vs_f32 > 1e-4 && vs_f32 < 2e-2, "bf16 vs f32 features: {vs_f32:.2e}");
}

#[test]
fn embed_errors_name_the_culprit() {
    let dir = scratch("embed_errors");
    let weights = small_weights(&dir);
    let out = dir.join("feats.safetensors");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, err) = embed(&weights, &empty, &out, &["--device", "cpu"]);
    assert!(!ok && err.contains(p(&empty)) && err.contains("no .jpg"), "{err}");

    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    image::RgbImage::new(8, 16).save(bad.join("good.png")).unwrap();
    std::fs::write(bad.join("broken.jpg"), b"\xff\xd8 definitely not a jpeg").unwrap();
    let (ok, err) = embed(&weights, &bad, &out, &["--device", "cpu", "--height", "64", "--width", "32"]);
    assert!(!ok && err.contains("broken.jpg"), "{err}");
    assert!(!out.exists(), "no output is written on failure");

    let missing = dir.join("missing.safetensors");
    let (ok, err) = embed(&missing, &bad, &out, &["--device", "cpu"]);
    assert!(!ok && err.contains("missing.safetensors"), "{err}");

    let (ok, err) = embed(&weights, &bad, &out, &["--device", "cpu", "--height", "40"]);
    assert!(!ok && err.contains("--height 40"), "{err}");

    let (ok, err) = embed(&weights, &bad, &out, &["--device", "cpu", "--batch-size", "0"]);
    assert!(!ok && err.contains("--batch-size"), "{err}");

    if let Err(why) = plr_engine::cuda::probe() {
        let (ok, err) = embed(&weights, &bad, &out, &["--device", "cuda"]);
        assert!(!ok && err.contains("--device cuda") && err.contains(&why), "{err}");
    }
}

/// Everything a training step and an eval pass of the small model produce on `device`, by name.
fn step_results(device: plr_engine::Device) -> Vec<(String, Vec<f32>)> {
    let mut store = ParamStore::new();
    let model = plr(&mut store, X025, 4, 21);
    for (name, g) in [("attention_module1.pam.gamma", 0.6), ("attention_module2.pam.gamma", -0.3)] {
        store.set(store.id(name).unwrap(), Tensor::from_vec(vec![g], &[1]).unwrap()).unwrap();
    }
    let lossfn = PlrLoss::new(&mut store, PlrLossConfig::new(4), 512, 128, &mut Rng::new(22)).unwrap();
    store.to_device(device).unwrap();
    let x = Var::constant(input(8, 64, 32, 23).to_device(device).unwrap());
    let labels = [0, 0, 1, 1, 2, 2, 3, 3];
    let mut res = Vec::new();
    let mut keep = |name: &str, t: &Tensor| res.push((name.to_string(), t.to_vec().unwrap()));

    let mut tape = Tape::no_grad();
    keep("eval", model.forward_eval(&mut Ctx::new(&mut tape, &mut store, false), &x).unwrap().value());
    let mut tape = Tape::new();
    let mut ctx = Ctx::new(&mut tape, &mut store, true);
    let out = model.forward_train(&mut ctx, &x).unwrap();
    let terms = lossfn.forward(&mut ctx, &out, &labels).unwrap();
    for (name, v) in [("logits1", &out.logits1), ("v1", &out.v1), ("v2", &out.v2), ("total", &terms.total), ("cen2", &terms.cen2)] {
        keep(name, v.value());
    }
    let grads = tape.backward(&terms.total).unwrap();
    for id in store.trainable() {
        keep(&format!("grad.{}", store.entry(id).name), grads.param(id).unwrap());
    }
    for e in store.entries().iter().filter(|e| e.kind != Kind::Param) {
        keep(&format!("after.{}", e.name), &e.value);
    }
    res
}

#[test]
fn plr_on_cuda_matches_cpu() {
    if !plr_engine::testing::cuda_or_skip("plr_on_cuda_matches_cpu") {
        return;
    }
    use plr_engine::Device;
    let (cpu, gpu) = (step_results(Device::Cpu), step_results(Device::Cuda));
    let mut worst = (0.0, String::new());
    for ((name, a), (_, b)) in cpu.iter().zip(&gpu) {
        let err = norm_rel_err(a, b);
        let tol = if name.starts_with("grad.") { 1e-3 } else { 1e-4 };
        assert!(err < tol, "{name}: cpu vs cuda norm-wise relative error {err:.2e}");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    println!("largest cpu/cuda difference: {:.2e} ({})", worst.0, worst.1);

    // Full size, through the embed path, on a few images.
    let dir = scratch("embed_cuda");
    let mut store = ParamStore::new();
    plr(&mut store, X1, 751, 0);
    let weights = dir.join("x1.safetensors");
    save_state_dict(&store, &weights, Default::default()).unwrap();
    let mut rng = Rng::new(5);
    let files: Vec<PathBuf> = (0..3)
        .map(|i| {
            let path = dir.join(format!("{i}.png"));
            image::RgbImage::from_fn(64, 128, |_, _| image::Rgb([0u8; 3].map(|_| rng.below(256) as u8))).save(&path).unwrap();
            path
        })
        .collect();
    let embed = |device| plr_engine::cli::embed::embed_files(&weights, &files, device, Precision::F32, 2, 256, 128).unwrap();
    let ((a, da), (b, db)) = (embed(Device::Cpu), embed(Device::Cuda));
    assert_eq!((da, db), (2560, 2560));
    let err = norm_rel_err(&a, &b);
    println!("x1 embed cpu vs cuda: {err:.2e}");
    assert!(err < 1e-4, "x1 embed: cpu vs cuda norm-wise relative error {err:.2e}");
}
