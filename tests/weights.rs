//! Safetensors state dicts: what is written (names, dtypes, shapes), round trips, the lenient parts
//! of loading (module. prefix, half floats, checkpoint state, missing counters), every strictness
//! error, OSNet -> PLR-OSNet init, and the `export` command.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};
use plr_engine::io::weights::*;
use plr_engine::models::{Osnet, OsnetConfig, PlrConfig, PlrLoss, PlrLossConfig, PlrOsnet};
use plr_engine::params::Kind;
use plr_engine::rng::Rng;
use plr_engine::{ParamStore, Tensor};
use safetensors::tensor::{Dtype, SafeTensors};

const X025: [usize; 4] = [16, 64, 96, 128];
const SMALL: PlrConfig = PlrConfig { channels: X025, num_classes: 6, parts: 4 };

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("weights").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small PLR-OSNet with every entry random (counters too), so a load that misses anything shows.
fn random_plr(seed: u64) -> ParamStore {
    let mut store = ParamStore::new();
    PlrOsnet::new(&mut store, SMALL, &mut Rng::new(seed)).unwrap();
    let mut rng = Rng::new(seed + 100);
    for id in 0..store.len() {
        let shape = store.get(id).shape().to_vec();
        let v = match store.entry(id).kind {
            Kind::Counter => Tensor::from_vec(vec![rng.below(1000) as f32], &[]).unwrap(),
            _ => Tensor::randn(&shape, 1.0, &mut rng),
        };
        store.set(id, v).unwrap();
    }
    store
}

fn assert_same(a: &ParamStore, b: &ParamStore) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.entries().iter().zip(b.entries()) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.value.to_vec().unwrap(), y.value.to_vec().unwrap(), "{}", x.name);
    }
}

/// The store's state dict as writable tensors, each passed through `f` (rename, re-type, drop).
fn rewrite(store: &ParamStore, mut f: impl FnMut(&str, Kind, &[usize], Vec<f32>) -> Option<OutTensor>) -> Vec<OutTensor> {
    store.entries().iter().filter_map(|e| f(&e.name, e.kind, e.value.shape(), e.value.to_vec().unwrap())).collect()
}

fn as_is(name: &str, kind: Kind, shape: &[usize], v: Vec<f32>) -> Option<OutTensor> {
    Some(match kind {
        Kind::Counter => OutTensor::i64(name, shape, &[v[0] as i64]),
        _ => OutTensor::f32(name, shape, &v),
    })
}

fn load_err(path: &Path) -> String {
    let mut store = random_plr(1);
    let before: Vec<Vec<f32>> = store.entries().iter().map(|e| e.value.to_vec().unwrap()).collect();
    let err = load_state_dict(&mut store, path).unwrap_err().to_string();
    let after: Vec<Vec<f32>> = store.entries().iter().map(|e| e.value.to_vec().unwrap()).collect();
    assert_eq!(before, after, "a failed load must leave the model unchanged");
    assert!(err.contains(path.to_str().unwrap()), "error does not name the file: {err}");
    err
}

#[test]
fn saved_file_has_pytorch_names_dtypes_and_shapes() {
    let dir = scratch("layout");
    let store = random_plr(1);
    let path = dir.join("w.safetensors");
    save_state_dict(&store, &path, HashMap::from([("note".to_string(), "x".to_string())])).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), store.len());
    for e in store.entries() {
        let t = st.tensor(&e.name).unwrap();
        assert_eq!(t.shape(), e.value.shape(), "{}", e.name);
        if e.kind == Kind::Counter {
            assert_eq!((t.dtype(), t.shape()), (Dtype::I64, &[][..]), "{}", e.name);
            let count = i64::from_le_bytes(t.data().try_into().unwrap());
            assert_eq!(count as f32, e.value.item().unwrap());
        } else {
            assert_eq!(t.dtype(), Dtype::F32, "{}", e.name);
            let v: Vec<f32> = t.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            assert_eq!(v, e.value.to_vec().unwrap(), "{}", e.name);
        }
    }
    assert_eq!(TensorFile::read(&path).unwrap().meta("note").unwrap(), "x");
    // Atomic write: nothing but the file itself is left in the folder, and overwriting works.
    save_state_dict(&random_plr(2), &path, HashMap::new()).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["w.safetensors"]);
}

#[test]
fn round_trip_restores_every_entry() {
    let dir = scratch("round_trip");
    let a = random_plr(1);
    let path = dir.join("w.safetensors");
    save_state_dict(&a, &path, HashMap::new()).unwrap();
    let mut b = random_plr(2);
    load_state_dict(&mut b, &path).unwrap();
    assert_same(&a, &b);
    assert_eq!(detect_model(&TensorFile::read(&path).unwrap(), "").unwrap(), ModelKind::PlrOsnet(SMALL));
}

#[test]
fn loading_accepts_module_prefix_half_floats_f32_counters_and_no_counters() {
    let dir = scratch("lenient");
    let a = random_plr(1);
    let mut want = random_plr(1);
    let path = dir.join("w.safetensors");
    let mut i = 0;
    let tensors = rewrite(&a, |name, kind, shape, v| {
        i += 1;
        let name = format!("module.{name}");
        Some(match (kind, i % 3) {
            (Kind::Counter, 0) => return None,
            (Kind::Counter, 1) => OutTensor::f32(name, shape, &v),
            (Kind::Counter, _) => OutTensor::i64(name, shape, &[v[0] as i64]),
            (_, 0) => half_tensor(&name, shape, &v, Dtype::F16),
            (_, 1) => half_tensor(&name, shape, &v, Dtype::BF16),
            _ => OutTensor::f32(name, shape, &v),
        })
    });
    write_safetensors(&path, &tensors, HashMap::new()).unwrap();
    // What the load must produce: half floats rounded, dropped counters left as they were.
    let mut i = 0;
    for id in 0..want.len() {
        i += 1;
        let e = want.entry(id);
        let v = a.get(id).to_vec().unwrap();
        let v: Vec<f32> = match (e.kind, i % 3) {
            (Kind::Counter, 0) => continue,
            (Kind::Counter, _) => v,
            (_, 0) => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
            (_, 1) => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            _ => v,
        };
        let shape = e.value.shape().to_vec();
        want.set(id, Tensor::from_vec(v, &shape).unwrap()).unwrap();
    }
    let mut got = random_plr(1);
    load_state_dict(&mut got, &path).unwrap();
    assert_same(&want, &got);
}

fn half_tensor(name: &str, shape: &[usize], v: &[f32], dtype: Dtype) -> OutTensor {
    let bytes: Vec<u8> = match dtype {
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
    };
    OutTensor::raw(name, dtype, shape, bytes).unwrap()
}

#[test]
fn checkpoint_state_is_ignored_by_the_model_loader_and_dropped_by_export() {
    let dir = scratch("checkpoint");
    let a = random_plr(1);
    let mut tensors = rewrite(&a, as_is);
    tensors.push(OutTensor::f32("optimizer.exp_avg.fc2.weight", &[128, 128], &vec![0.5; 128 * 128]));
    tensors.push(OutTensor::i64("optimizer.step", &[], &[42]));
    tensors.push(OutTensor::f32("loss.centers1", &[6, 512], &vec![1.0; 6 * 512]));
    let ckpt = dir.join("ckpt.safetensors");
    write_safetensors(&ckpt, &tensors, HashMap::from([("epoch".to_string(), "3".to_string())])).unwrap();
    let mut b = random_plr(2);
    load_state_dict(&mut b, &ckpt).unwrap();
    assert_same(&a, &b);

    let out = dir.join("model.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_plr-engine"))
        .args(["export", "--weights", ckpt.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let exported = TensorFile::read(&out).unwrap();
    let names: Vec<&str> = exported.names().collect();
    let mut want: Vec<&str> = a.entries().iter().map(|e| e.name.as_str()).collect();
    want.sort();
    assert_eq!(names, want);
    let mut c = random_plr(3);
    load_state_dict(&mut c, &out).unwrap();
    assert_same(&a, &c);
    assert_eq!(exported.meta("model").unwrap(), "plr_osnet");

    // A training store (model + loss centers) keeps its centers when the file has none and takes
    // the checkpoint's when it has them.
    let mut train = random_plr(2);
    let lossfn = PlrLoss::new(&mut train, PlrLossConfig::new(6), 512, 128, &mut Rng::new(4)).unwrap();
    let own = train.get(lossfn.centers1).to_vec().unwrap();
    load_state_dict(&mut train, &out).unwrap();
    assert_eq!(train.get(lossfn.centers1).to_vec().unwrap(), own);
    load_state_dict(&mut train, &ckpt).unwrap();
    assert_eq!(train.get(lossfn.centers1).to_vec().unwrap(), vec![1.0; 6 * 512]);
}

#[test]
fn export_widens_half_weights_and_handles_osnet() {
    let dir = scratch("export_half");
    let a = random_plr(1);
    let half = dir.join("half.safetensors");
    let tensors = rewrite(&a, |n, k, s, v| if k == Kind::Counter { as_is(n, k, s, v) } else { Some(half_tensor(n, s, &v, Dtype::F16)) });
    write_safetensors(&half, &tensors, HashMap::new()).unwrap();
    let out = dir.join("out.safetensors");
    let s = plr_engine::cli::export::export(&half, &out).unwrap();
    assert_eq!(s.tensors, a.len());
    let f = TensorFile::read(&out).unwrap();
    let w = f.require("fc2.weight").unwrap();
    assert_eq!(w.dtype, Dtype::F32);
    let want: Vec<f32> = a.get(a.id("fc2.weight").unwrap()).to_vec().unwrap().iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(w.to_f32(), want);

    let mut osnet = ParamStore::new();
    Osnet::new(&mut osnet, OsnetConfig { channels: X025, num_classes: 10 }, &mut Rng::new(0)).unwrap();
    let src = dir.join("osnet.safetensors");
    save_state_dict(&osnet, &src, HashMap::new()).unwrap();
    let s = plr_engine::cli::export::export(&src, &out).unwrap();
    assert_eq!(s.model, ModelKind::Osnet(OsnetConfig { channels: X025, num_classes: 10 }));
    assert_eq!(s.tensors, osnet.len());
}

#[test]
fn strict_loading_names_the_offending_tensor_and_file() {
    let dir = scratch("strict");
    let a = random_plr(1);
    let write = |name: &str, tensors: Vec<OutTensor>| {
        let path = dir.join(name);
        write_safetensors(&path, &tensors, HashMap::new()).unwrap();
        path
    };

    let missing =
        write("missing.safetensors", rewrite(&a, |n, k, s, v| (n != "layer2.1.conv3.bn.bias").then(|| as_is(n, k, s, v)).flatten()));
    let err = load_err(&missing);
    assert!(err.contains("missing") && err.contains("layer2.1.conv3.bn.bias"), "{err}");

    let mut tensors = rewrite(&a, as_is);
    tensors.push(OutTensor::f32("head.extra.weight", &[2], &[1.0, 2.0]));
    let err = load_err(&write("unexpected.safetensors", tensors));
    assert!(err.contains("unexpected") && err.contains("head.extra.weight"), "{err}");

    let shape = rewrite(&a, |n, k, s, v| if n == "fc2.bias" { Some(OutTensor::f32(n, &[2, 64], &v)) } else { as_is(n, k, s, v) });
    let err = load_err(&write("shape.safetensors", shape));
    assert!(err.contains("fc2.bias") && err.contains("[2, 64]") && err.contains("[128]"), "{err}");

    let dtype = rewrite(&a, |n, k, s, v| {
        if n == "layer0.0.conv.weight" {
            Some(OutTensor::i64(n, s, &v.iter().map(|&x| x as i64).collect::<Vec<_>>()))
        } else {
            as_is(n, k, s, v)
        }
    });
    let err = load_err(&write("dtype.safetensors", dtype));
    assert!(err.contains("layer0.0.conv.weight") && err.contains("I64"), "{err}");

    let counter =
        rewrite(&a, |n, k, s, v| if n == "bn2.num_batches_tracked" { Some(half_tensor(n, s, &v, Dtype::F16)) } else { as_is(n, k, s, v) });
    let err = load_err(&write("counter.safetensors", counter));
    assert!(err.contains("bn2.num_batches_tracked") && err.contains("F16"), "{err}");

    let twice = rewrite(&a, |n, k, s, v| as_is(if n == "fc2.bias" { "module.fc2.weight" } else { n }, k, s, v));
    let err = load_err(&write("twice.safetensors", twice));
    assert!(err.contains("fc2.weight") && err.contains("twice"), "{err}");
}

#[test]
fn damaged_files_are_errors_naming_the_file() {
    let dir = scratch("damaged");
    let good = dir.join("good.safetensors");
    save_state_dict(&random_plr(1), &good, HashMap::new()).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    assert!(load_err(&truncated).contains("not a valid safetensors file"));

    let mut corrupt = bytes.clone();
    corrupt[8..20].copy_from_slice(b"#!garbage!#}");
    let corrupt_path = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    assert!(load_err(&corrupt_path).contains("not a valid safetensors file"));

    let huge_header = dir.join("huge.safetensors");
    let mut h = u64::MAX.to_le_bytes().to_vec();
    h.extend_from_slice(b"{}");
    std::fs::write(&huge_header, &h).unwrap();
    load_err(&huge_header);

    let empty = dir.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    load_err(&empty);

    load_err(&dir.join("absent.safetensors"));
}

#[test]
fn plr_init_from_osnet_copies_the_mapped_tensors() {
    let dir = scratch("init");
    let mut osnet = ParamStore::new();
    Osnet::new(&mut osnet, OsnetConfig { channels: X025, num_classes: 10 }, &mut Rng::new(5)).unwrap();
    // Distinct running statistics so the copy of buffers and counters is visible.
    for id in 0..osnet.len() {
        let shape = osnet.get(id).shape().to_vec();
        match osnet.entry(id).kind {
            Kind::Buffer => osnet.set(id, Tensor::rand_uniform(&shape, 2.0, 3.0, &mut Rng::new(id as u64))).unwrap(),
            Kind::Counter => osnet.set(id, Tensor::from_vec(vec![id as f32], &[]).unwrap()).unwrap(),
            Kind::Param => {}
        }
    }
    let path = dir.join("osnet.safetensors");
    save_state_dict(&osnet, &path, HashMap::new()).unwrap();

    let mut store = ParamStore::new();
    PlrOsnet::new(&mut store, SMALL, &mut Rng::new(9)).unwrap();
    let report = init_plr_from_osnet(&mut store, &path).unwrap();

    let source = |name: &str| -> Option<String> {
        let map = [
            ("layer0.0.", "conv1."),
            ("layer1.", "conv2."),
            ("layer2.", "conv3."),
            ("layer30.", "conv4."),
            ("layer31.0.", "conv4."),
            ("layer40.", "conv5."),
            ("layer41.0.", "conv5."),
        ];
        map.iter().find_map(|(to, from)| name.strip_prefix(to).map(|rest| format!("{from}{rest}")))
    };
    let mut copied = 0;
    for e in store.entries() {
        match source(&e.name) {
            Some(key) => {
                assert_eq!(e.value.to_vec().unwrap(), osnet.get(osnet.id(&key).unwrap()).to_vec().unwrap(), "{} from {key}", e.name);
                assert!(report.copied.contains(&(key, e.name.clone())));
                copied += 1;
            }
            None => assert!(report.kept.contains(&e.name), "{} should keep its init", e.name),
        }
    }
    assert_eq!(report.copied.len(), copied);
    let backbone = |p: &str| osnet.entries().iter().filter(|e| e.name.starts_with(p)).count();
    assert_eq!(copied, backbone("conv1.") + backbone("conv2.") + backbone("conv3.") + 2 * (backbone("conv4.") + backbone("conv5.")));
    let skipped: Vec<&str> = report.skipped.iter().map(|(n, _)| n.as_str()).collect();
    let mut fc: Vec<&str> =
        osnet.entries().iter().map(|e| e.name.as_str()).filter(|n| n.starts_with("fc.") || n.starts_with("classifier.")).collect();
    fc.sort();
    assert_eq!(skipped, fc);
    assert_eq!(report.kept.len(), store.len() - copied);

    // A checkpoint of another width fits nowhere: everything is skipped with the shape named.
    let mut wide = ParamStore::new();
    Osnet::new(&mut wide, OsnetConfig { channels: [32, 128, 192, 256], num_classes: 10 }, &mut Rng::new(5)).unwrap();
    let wide_path = dir.join("wide.safetensors");
    save_state_dict(&wide, &wide_path, HashMap::new()).unwrap();
    let mut store = ParamStore::new();
    PlrOsnet::new(&mut store, SMALL, &mut Rng::new(9)).unwrap();
    let report = init_plr_from_osnet(&mut store, &wide_path).unwrap();
    let conv_copies: Vec<_> = report.copied.iter().filter(|(from, _)| !from.ends_with("num_batches_tracked")).collect();
    assert!(conv_copies.is_empty(), "{conv_copies:?}");
    let (name, why) = report.skipped.iter().find(|(n, _)| n == "conv1.conv.weight").unwrap();
    assert!(why.contains("shape [32, 3, 7, 7]"), "{name}: {why}");
}
