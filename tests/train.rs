//! Training and evaluation: configuration precedence, checkpoint resume equivalence, NaN handling,
//! an end-to-end run on synthetic data, and the errors bad input gives.

use std::path::{Path, PathBuf};

use clap::Parser;
use plr_engine::cli::device::DeviceChoice;
use plr_engine::cli::eval::{evaluate_weights, EvalArgs};
use plr_engine::cli::train::TrainArgs;
use plr_engine::data::synth::{generate, SynthConfig};
use plr_engine::io::weights::{load_plr, TensorFile};
use plr_engine::nn::Precision;
use plr_engine::tensor::DType;
use plr_engine::train::checkpoint::{self, Checkpoint};
use plr_engine::train::{PartialConfig, TrainConfig, Trainer};
use plr_engine::Tensor;

/// A fresh, empty temporary folder unique to this test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("plr-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn err_text<T>(r: plr_engine::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A synthetic dataset of `ids` identities (half train) at 64x32, the smallest input the stripes
/// of the x0.25 model split.
fn synth(dir: &Path, ids: usize, images_per_id: usize, seed: u64) {
    let cfg = SynthConfig { ids, cameras: 3, images_per_id, seed, height: 64, width: 32, ..SynthConfig::default() };
    generate(&cfg, dir, false).unwrap();
}

/// A small, fast configuration on the dataset at `root`, writing to `out`.
fn tiny_config(root: &Path, out: &Path) -> TrainConfig {
    let mut c = TrainConfig::quickstart();
    c.data.root = Some(root.to_path_buf());
    c.data.height = 64;
    c.data.width = 32;
    c.data.batch_ids = 4;
    c.data.instances = 2;
    c.data.workers = 2;
    c.data.test_batch = 64;
    c.optim.epochs = 3;
    c.run.output = out.to_path_buf();
    c.run.device = "cpu".into();
    c.run.eval_freq = 0;
    c.run.save_freq = 1;
    c.run.eval_before_training = false;
    c.run.seed = 5;
    c
}

/// The end-to-end learning run: a synthetic dataset under `dir/data` with 40 training identities x
/// 10 images, 25 epochs of 10 iterations, evaluated before training and at the end, writing to
/// `dir/out`. A model trained from scratch needs a few hundred iterations (60, with 20 identities,
/// left it at chance level).
fn learning_config(dir: &Path) -> TrainConfig {
    synth(&dir.join("data"), 80, 10, 1);
    let mut cfg = tiny_config(&dir.join("data"), &dir.join("out"));
    cfg.data.batch_ids = 8;
    cfg.data.instances = 4;
    cfg.optim.epochs = 25;
    cfg.optim.warmup_epochs = 3;
    cfg.optim.milestones = vec![16];
    cfg.run.seed = 1;
    cfg.run.eval_freq = 0;
    cfg.run.save_freq = 0;
    cfg.run.eval_before_training = true;
    cfg
}

fn quiet(mut t: Trainer) -> Trainer {
    t.verbose = false;
    t
}

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    args: TrainArgs,
}

fn flags(argv: &[&str]) -> TrainArgs {
    Cmd::try_parse_from(std::iter::once("train").chain(argv.iter().copied())).unwrap().args
}

#[test]
fn config_defaults_file_and_flags_in_order_of_precedence() {
    let none = PartialConfig::default();
    // No source: the quick start.
    let q = TrainConfig::resolve(&none, &none).unwrap();
    assert_eq!(q, TrainConfig::quickstart());
    assert!(q.data.root.is_none());
    assert_eq!((q.model.width, q.data.height, q.data.width), (0.25, 128, 64));

    // A dataset root selects the official recipe of the dataset.
    let m = TrainConfig::resolve(&none, &flags(&["--data", "/d"]).overrides()).unwrap();
    assert_eq!(m.data.root.as_deref(), Some(Path::new("/d")));
    assert_eq!((m.data.height, m.data.width, m.data.batch_ids, m.data.instances), (256, 128, 16, 4));
    assert_eq!((m.model.width, m.optim.epochs, m.optim.lr, m.optim.weight_decay), (1.0, 120, 3.5e-5, 5e-4));
    assert_eq!((m.optim.warmup_epochs, m.optim.milestones.clone(), m.run.eval_freq), (19, vec![40, 70], 10));
    assert!(m.data.random_flip && m.data.random_erasing && !m.loss.learned_centers);
    // The schedule it builds is the spec's table.
    let s = m.schedule();
    for (e, lr) in [(1, 3.5e-5), (20, 3.5e-4), (60, 3.5e-4), (61, 3.5e-5), (91, 3.5e-6)] {
        assert!((s.lr_at(e) - lr).abs() < 1e-12, "epoch {e}");
    }
    let c = TrainConfig::resolve(&none, &flags(&["--data", "/d", "--dataset", "cuhk03_labeled"]).overrides()).unwrap();
    assert_eq!((c.optim.epochs, c.optim.warmup_epochs, c.optim.milestones.clone()), (150, 39, vec![60, 90]));
    assert!((c.schedule().lr_at(101) - 3.5e-5).abs() < 1e-12);

    // File over defaults, flags over the file, key by key; the file's root selects the recipe too.
    let file = PartialConfig::from_toml(
        "[data]\nroot = \"/r\"\ndataset = \"dukemtmcreid\"\nbatch_ids = 8\n[optim]\nepochs = 50\nlr = 1e-4\n[run]\nseed = 9\n",
        "test.toml",
    )
    .unwrap();
    let args = flags(&[
        "--epochs",
        "7",
        "--width",
        "0.5",
        "--width-px",
        "64",
        "--height",
        "160",
        "--device",
        "cpu",
        "--learned-centers",
        "--center-classes",
        "official",
        "--random-erasing",
        "false",
    ]);
    let r = TrainConfig::resolve(&file, &args.overrides()).unwrap();
    assert_eq!(r.data.root.as_deref(), Some(Path::new("/r")));
    assert_eq!(r.data.dataset, "dukemtmcreid");
    assert_eq!((r.optim.epochs, r.optim.lr, r.data.batch_ids, r.run.seed), (7, 1e-4, 8, 9));
    assert_eq!((r.model.width, r.data.height, r.data.width, r.run.device.as_str()), (0.5, 160, 64, "cpu"));
    assert!(r.loss.learned_centers && !r.data.random_erasing && r.data.random_flip);
    assert_eq!(r.center_classes(702).unwrap(), 751);
    assert_eq!(r.data.instances, 4, "untouched keys keep the dataset default");

    // The saved form reads back as the same configuration, and works as a --config file.
    let text = r.to_toml().unwrap();
    assert_eq!(TrainConfig::from_toml(&text, "saved").unwrap(), r);
    assert_eq!(TrainConfig::resolve(&PartialConfig::from_toml(&text, "saved").unwrap(), &none).unwrap(), r);
}

#[test]
fn config_errors_name_the_key() {
    let e = err_text(PartialConfig::from_toml("[optim]\nepochs = 3\nlearning_rate = 0.1\n", "my.toml"));
    assert!(e.contains("my.toml") && e.contains("learning_rate"), "{e}");
    let e = err_text(PartialConfig::from_toml("[trainer]\nepochs = 3\n", "my.toml"));
    assert!(e.contains("trainer"), "{e}");
    let e = err_text(PartialConfig::from_toml("[data]\nbatch_ids = \"many\"\n", "my.toml"));
    assert!(e.contains("batch_ids"), "{e}");
    let e = err_text(PartialConfig::from_file(Path::new("/nonexistent/plr.toml")));
    assert!(e.contains("/nonexistent/plr.toml"), "{e}");

    let none = PartialConfig::default();
    for (argv, key) in [
        (&["--width", "0.3"][..], "--width"),
        (&["--batch-ids", "1"][..], "--batch-ids"),
        (&["--epochs", "0"][..], "--epochs"),
        (&["--lr=-1"][..], "--lr"),
        (&["--center-classes", "some"][..], "--center-classes"),
        (&["--data", "/d", "--dataset", "mars"][..], "mars"),
    ] {
        let e = err_text(TrainConfig::resolve(&none, &flags(argv).overrides()));
        assert!(e.contains(key), "{argv:?}: {e}");
    }
    // The CLI rejects a device name it does not know before any of this.
    assert!(Cmd::try_parse_from(["train", "--device", "tpu"]).is_err());
    assert_eq!(flags(&["--device", "auto"]).device, Some(DeviceChoice::Auto));
}

#[test]
fn eval_rerank_from_flag_file_and_older_configs() {
    let none = PartialConfig::default();
    let q = TrainConfig::resolve(&none, &none).unwrap();
    assert!(!q.run.eval_rerank);
    assert!(TrainConfig::resolve(&none, &flags(&["--eval-rerank"]).overrides()).unwrap().run.eval_rerank);
    let file = PartialConfig::from_toml("[run]\neval_rerank = true\n", "my.toml").unwrap();
    assert!(TrainConfig::resolve(&file, &none).unwrap().run.eval_rerank);
    // Without the flag a file's setting stands; a configuration saved before the key existed means false.
    assert!(TrainConfig::resolve(&file, &flags(&[]).overrides()).unwrap().run.eval_rerank);
    let old: String = q.to_toml().unwrap().lines().filter(|l| !l.starts_with("eval_rerank")).map(|l| format!("{l}\n")).collect();
    assert_eq!(TrainConfig::from_toml(&old, "old").unwrap(), q);
}

#[test]
fn precision_from_flag_file_saved_config_and_resume() {
    let none = PartialConfig::default();
    let q = TrainConfig::resolve(&none, &none).unwrap();
    assert_eq!((q.run.precision.as_str(), q.precision().unwrap()), ("f32", Precision::F32));

    let b = TrainConfig::resolve(&none, &flags(&["--precision", "bf16"]).overrides()).unwrap();
    assert_eq!(b.precision().unwrap(), Precision::Bf16);
    let text = b.to_toml().unwrap();
    assert!(text.contains("precision = \"bf16\""), "{text}");
    assert_eq!(TrainConfig::from_toml(&text, "saved").unwrap(), b);
    let file = PartialConfig::from_toml("[run]\nprecision = \"bf16\"\n", "my.toml").unwrap();
    assert_eq!(TrainConfig::resolve(&file, &none).unwrap().precision().unwrap(), Precision::Bf16);

    // A resumed run keeps its precision unless a flag changes it.
    assert_eq!(b.clone().resolve_on(&none, &none).unwrap().precision().unwrap(), Precision::Bf16);
    let f = b.clone().resolve_on(&none, &flags(&["--precision", "f32"]).overrides()).unwrap();
    assert_eq!(f.precision().unwrap(), Precision::F32);
    // A configuration saved before the key existed means f32.
    let old: String = q.to_toml().unwrap().lines().filter(|l| !l.starts_with("precision")).map(|l| format!("{l}\n")).collect();
    assert_eq!(TrainConfig::from_toml(&old, "old").unwrap(), q);

    let bad = PartialConfig::from_toml("[run]\nprecision = \"fp8\"\n", "my.toml").unwrap();
    let e = err_text(TrainConfig::resolve(&bad, &none));
    assert!(e.contains("run.precision") && e.contains("fp8") && e.contains("bf16"), "{e}");
    let e = Cmd::try_parse_from(["train", "--precision", "fp8"]).err().expect("an unknown precision is a CLI error").to_string();
    assert!(e.contains("--precision") && e.contains("fp8"), "{e}");
}

/// Every store entry and the optimizer state of two trainers, compared exactly.
fn assert_same_state(a: &Trainer, b: &Trainer) {
    assert_eq!(a.epoch, b.epoch);
    assert_eq!(a.rng, b.rng);
    assert_eq!(a.store.len(), b.store.len());
    for (ea, eb) in a.store.entries().iter().zip(b.store.entries()) {
        assert_eq!(ea.name, eb.name);
        assert_eq!(ea.value.to_vec().unwrap(), eb.value.to_vec().unwrap(), "{}", ea.name);
    }
    let ids: Vec<_> = a.store.trainable().collect();
    assert!(!ids.is_empty());
    for id in ids {
        let (sa, sb) = (a.adam.state(id).unwrap(), b.adam.state(id).unwrap());
        let name = &a.store.entry(id).name;
        assert_eq!(sa.step, sb.step, "{name}");
        assert_eq!(sa.m.to_vec().unwrap(), sb.m.to_vec().unwrap(), "{name} exp_avg");
        assert_eq!(sa.v.to_vec().unwrap(), sb.v.to_vec().unwrap(), "{name} exp_avg_sq");
    }
}

#[test]
fn resume_gives_the_state_of_an_uninterrupted_run() {
    let dir = temp_dir("resume");
    synth(&dir.join("data"), 16, 6, 1);
    let straight_cfg = tiny_config(&dir.join("data"), &dir.join("straight"));
    let mut straight = quiet(Trainer::new(straight_cfg, None).unwrap());
    let summary = straight.run().unwrap();
    assert_eq!(summary.checkpoints.len(), 3);
    assert_eq!(straight.epoch, 3);

    // The same run killed after its first checkpoint...
    let mut killed = quiet(Trainer::new(tiny_config(&dir.join("data"), &dir.join("killed")), None).unwrap());
    killed.train_epoch().unwrap();
    let first = killed.save_checkpoint().unwrap();
    drop(killed);
    // ...and continued from it: `find` picks the checkpoint from the folder.
    assert_eq!(checkpoint::find(&dir.join("killed")).unwrap(), first);
    let ckpt = Checkpoint::read(&first).unwrap();
    assert_eq!(ckpt.meta.epoch, 1);
    let mut resumed = quiet(Trainer::new(ckpt.meta.config.clone(), Some(&ckpt)).unwrap());
    assert_eq!(resumed.epoch, 1);
    resumed.run().unwrap();
    assert_same_state(&straight, &resumed);

    // The final checkpoints agree too, and each is both a checkpoint and a plain weights file.
    let last = |d: &str| TensorFile::read(&checkpoint::path_for(&dir.join(d), 3)).unwrap();
    let (a, b) = (last("straight"), last("killed"));
    let names: Vec<&str> = a.names().collect();
    assert_eq!(names, b.names().collect::<Vec<_>>());
    for n in &names {
        assert_eq!(a.get(n).unwrap().values, b.get(n).unwrap().values, "{n}");
    }
    assert!(names.contains(&"layer0.0.conv.weight") && names.contains(&"classifier1.bias"));
    assert!(names.contains(&"optimizer.exp_avg.fc2.weight") && names.contains(&"optimizer.exp_avg_sq.layer30.0.conv1.conv.weight"));
    assert!(names.contains(&"loss.centers1"));
    for key in ["epoch", "rng", "optimizer", "schedule", "train_pids"] {
        assert_eq!(a.meta(key).unwrap(), b.meta(key).unwrap(), "metadata {key}");
    }
    // The recorded configurations differ only in the output folder.
    let cfg = |f: &TensorFile| TrainConfig::from_toml(f.meta("config").unwrap(), "config").unwrap();
    let (mut ca, cb) = (cfg(&a), cfg(&b));
    ca.run.output = cb.run.output.clone();
    assert_eq!(ca, cb);
    let (model, _) = load_plr(&checkpoint::path_for(&dir.join("straight"), 3)).unwrap();
    assert_eq!(model.config.num_classes, 8);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_loss_stops_with_epoch_and_iteration_and_keeps_the_checkpoint() {
    let dir = temp_dir("nan");
    synth(&dir.join("data"), 16, 6, 2);
    let out = dir.join("out");
    let mut t = quiet(Trainer::new(tiny_config(&dir.join("data"), &out), None).unwrap());
    t.train_epoch().unwrap();
    let saved = t.save_checkpoint().unwrap();
    let before = std::fs::read(&saved).unwrap();

    // A weight gone bad (as after an overflow) makes the next loss NaN.
    let id = t.store.id("fc2.weight").unwrap();
    let shape = t.store.get(id).shape().to_vec();
    t.store.set(id, Tensor::full(&shape, f32::NAN, plr_engine::Device::Cpu).unwrap()).unwrap();
    let e = err_text(t.run());
    assert!(e.contains("non-finite loss") && e.contains("epoch 2, iteration 1"), "{e}");
    assert_eq!(t.epoch, 1);

    // The checkpoint written before is byte-identical and still loads; nothing newer was written.
    assert_eq!(std::fs::read(&saved).unwrap(), before);
    assert_eq!(Checkpoint::read(&saved).unwrap().meta.epoch, 1);
    assert_eq!(checkpoint::find(&out).unwrap(), saved);
    let leftovers: Vec<_> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "stopped");
    assert!(last["error"].as_str().unwrap().contains("epoch 2, iteration 1"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn training_on_synthetic_data_raises_map_and_eval_command_agrees() {
    let dir = temp_dir("e2e");
    let mut cfg = learning_config(&dir);
    cfg.run.eval_rerank = true;
    let mut t = quiet(Trainer::new(cfg, None).unwrap());
    let summary = t.run().unwrap();
    // Every evaluation was also re-ranked (the eval command below checks the plain figures).
    let reranked = summary.after.as_ref().unwrap().metrics_reranked.clone().expect("run.eval_rerank re-ranks");
    let (before, after) = (summary.before.unwrap().metrics, summary.after.unwrap().metrics);
    assert_ne!(reranked, after);
    println!("mAP {:.3} -> {:.3}, rank-1 {:.3} -> {:.3}", before.map, after.map, before.rank1, after.rank1);
    assert!(
        after.map > before.map + 0.25 && after.rank1 > before.rank1 + 0.25,
        "mAP {:.3} -> {:.3}, rank-1 {:.3} -> {:.3}",
        before.map,
        after.map,
        before.rank1,
        after.rank1
    );
    assert_eq!(summary.checkpoints, vec![checkpoint::path_for(&dir.join("out"), 25)]);

    // The eval command on the final checkpoint (input size read from it) gives the same numbers.
    let json = dir.join("eval.json");
    let args = EvalArgs {
        weights: summary.checkpoints[0].clone(),
        data: dir.join("data"),
        dataset: "market1501".into(),
        device: DeviceChoice::Cpu,
        precision: Precision::F32,
        height: None,
        width_px: None,
        batch_size: 50,
        json: Some(json.clone()),
        rerank: false,
        rerank_k1: 20,
        rerank_k2: 6,
        rerank_lambda: 0.3,
    };
    let report = evaluate_weights(&args).unwrap();
    assert_eq!(report.metrics, after);
    assert!(report.table().contains("Rank-10") && !report.table().contains("re-ranking"));
    assert!(report.metrics_reranked.is_none());
    // With re-ranking: the plain metrics unchanged, a second row, both in the JSON.
    let args = EvalArgs { rerank: true, ..args };
    let report = evaluate_weights(&args).unwrap();
    let reranked = report.metrics_reranked.clone().unwrap();
    assert_eq!(report.metrics, after);
    assert_ne!(reranked, after);
    assert!(report.table().contains("market1501 + re-ranking (k1 20, k2 6, lambda 0.3)"), "{}", report.table());
    plr_engine::cli::eval::run(&args).unwrap();
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written["metrics"]["map"].as_f64().unwrap(), after.map);
    assert_eq!(written["metrics_reranked"]["map"].as_f64().unwrap(), reranked.map);
    assert_eq!(written["rerank"]["k1"], 20);
    assert_eq!(written["feature_dim"], 640);

    // The output folder holds the resolved config, the log and the last evaluation.
    let saved = TrainConfig::from_toml(&std::fs::read_to_string(dir.join("out/config.toml")).unwrap(), "config.toml").unwrap();
    assert_eq!(saved, t.cfg);
    let events: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("out/log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
    assert_eq!((count("start"), count("epoch"), count("eval"), count("checkpoint"), count("end")), (1, 25, 2, 1, 1));
    assert!(events.iter().filter(|e| e["event"] == "eval").all(|e| e["report"]["metrics_reranked"]["map"].is_f64()));
    assert!(dir.join("out/eval.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = temp_dir("bad");
    let out = dir.join("out");
    // Missing and misnamed dataset folders.
    let e = err_text(Trainer::new(tiny_config(&dir.join("nowhere"), &out), None));
    assert!(e.contains("no dataset found") && e.contains("nowhere"), "{e}");
    synth(&dir.join("data"), 16, 6, 4);
    std::fs::rename(dir.join("data/query"), dir.join("data/queries")).unwrap();
    let e = err_text(Trainer::new(tiny_config(&dir.join("data"), &out), None));
    assert!(e.contains("missing folder") && e.contains("query"), "{e}");
    // An empty query set.
    std::fs::create_dir(dir.join("data/query")).unwrap();
    let e = err_text(Trainer::new(tiny_config(&dir.join("data"), &out), None));
    assert!(e.contains("no images in") && e.contains("query"), "{e}");
    std::fs::remove_dir(dir.join("data/query")).unwrap();
    std::fs::rename(dir.join("data/queries"), dir.join("data/query")).unwrap();

    // Fewer identities than a batch needs (8 training identities here).
    let mut cfg = tiny_config(&dir.join("data"), &out);
    cfg.data.batch_ids = 16;
    let e = err_text(Trainer::new(cfg, None));
    assert!(e.contains("8 identities") && e.contains("16"), "{e}");
    // An input size the four stripes cannot split.
    let mut cfg = tiny_config(&dir.join("data"), &out);
    cfg.data.height = 48;
    let e = err_text(Trainer::new(cfg, None));
    assert!(e.contains("48x32") && e.contains("--height"), "{e}");
    // A plain weights file is not a checkpoint to resume.
    let weights = dir.join("weights.safetensors");
    plr_engine::cli::export::export(
        &{
            let mut t = quiet(Trainer::new(tiny_config(&dir.join("data"), &out), None).unwrap());
            t.train_epoch().unwrap();
            t.save_checkpoint().unwrap()
        },
        &weights,
    )
    .unwrap();
    let e = err_text(Checkpoint::read(&weights));
    assert!(e.contains("not a plr-engine training checkpoint"), "{e}");
    let e = err_text(Checkpoint::read(&dir.join("missing.safetensors")));
    assert!(e.contains("missing.safetensors"), "{e}");

    // A corrupt training image is fatal and named.
    let train_dir = dir.join("data/bounding_box_train");
    let victim = std::fs::read_dir(&train_dir).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    for f in std::fs::read_dir(&train_dir).unwrap() {
        std::fs::write(f.unwrap().path(), b"not a jpeg").unwrap();
    }
    let mut t = quiet(Trainer::new(tiny_config(&dir.join("data"), &out), None).unwrap());
    let e = err_text(t.train_epoch());
    assert!(e.contains("epoch 1, iteration 1") && e.contains("cannot decode") && e.contains("fatal"), "{e}");
    assert!(victim.exists());

    // A corrupt query image stops the evaluation, named.
    let query = std::fs::read_dir(dir.join("data/query")).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    std::fs::write(&query, b"truncated").unwrap();
    let mut c = tiny_config(&dir.join("data"), &out);
    c.run.eval_before_training = true;
    let mut t = quiet(Trainer::new(c, None).unwrap());
    let e = err_text(t.run());
    let name = query.file_name().unwrap().to_string_lossy().into_owned();
    assert!(e.contains(&name) && e.contains("cannot decode") && e.contains("fatal"), "{e}");

    // The eval command: unknown dataset name, missing weights.
    let args = |weights: &Path, dataset: &str| EvalArgs {
        weights: weights.to_path_buf(),
        data: dir.join("data"),
        dataset: dataset.into(),
        device: DeviceChoice::Cpu,
        precision: Precision::F32,
        height: None,
        width_px: None,
        batch_size: 8,
        json: None,
        rerank: false,
        rerank_k1: 20,
        rerank_k2: 6,
        rerank_lambda: 0.3,
    };
    let e = err_text(evaluate_weights(&args(&weights, "mars")));
    assert!(e.contains("mars") && e.contains("market1501"), "{e}");
    let e = err_text(evaluate_weights(&EvalArgs { rerank: true, rerank_lambda: 2.0, ..args(&weights, "market1501") }));
    assert!(e.contains("--rerank-lambda") && e.contains("[0, 1]"), "{e}");
    let e = err_text(evaluate_weights(&args(&dir.join("none.safetensors"), "generic")));
    assert!(e.contains("none.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn binary_reports_config_errors_without_panicking() {
    let dir = temp_dir("bin");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[run]\nseed = 1\nsaving = 3\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plr-engine")).args(["train", "--config"]).arg(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("saving") && !stderr.contains("panicked"), "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plr-engine"))
        .args(["eval", "--weights", "w.safetensors", "--dataset", "market1501", "--data"])
        .arg(dir.join("missing"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no dataset found"), "{stderr}");
    // Re-ranking parameters without --rerank are a usage error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plr-engine"))
        .args(["eval", "--weights", "w.safetensors", "--dataset", "market1501", "--data", "d", "--rerank-k1", "10"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--rerank"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn init_osnet_copies_the_backbone_or_names_the_mismatch() {
    use plr_engine::io::weights::save_state_dict;
    use plr_engine::models::{channels_for_width, Osnet, OsnetConfig};
    use plr_engine::rng::Rng;
    use std::collections::HashMap;

    let dir = temp_dir("init");
    synth(&dir.join("data"), 16, 6, 6);
    let osnet_file = |width: f32, name: &str| {
        let mut store = plr_engine::ParamStore::new();
        Osnet::new(&mut store, OsnetConfig { channels: channels_for_width(width).unwrap(), num_classes: 1000 }, &mut Rng::new(3)).unwrap();
        let path = dir.join(name);
        save_state_dict(&store, &path, HashMap::new()).unwrap();
        (store, path)
    };
    let with_init = |path: &Path| {
        let mut c = tiny_config(&dir.join("data"), &dir.join("out"));
        c.model.init_osnet = Some(path.to_path_buf());
        Trainer::new(c, None)
    };

    // The same width: conv4 lands in both branches, conv1 in the stem.
    let (osnet, path) = osnet_file(0.25, "x025.safetensors");
    let t = with_init(&path).unwrap();
    let value = |s: &plr_engine::ParamStore, n: &str| s.get(s.id(n).unwrap()).to_vec().unwrap();
    let conv4 = value(&osnet, "conv4.0.conv1.conv.weight");
    assert_eq!(value(&t.store, "layer30.0.conv1.conv.weight"), conv4);
    assert_eq!(value(&t.store, "layer31.0.0.conv1.conv.weight"), conv4);
    assert_eq!(value(&t.store, "layer0.0.conv.weight"), value(&osnet, "conv1.conv.weight"));

    // Another width fits nowhere (only BatchNorm's scalar counters would): an error, not a silent
    // random init.
    let (_, wide) = osnet_file(1.0, "x10.safetensors");
    let e = err_text(with_init(&wide));
    assert!(e.contains("x10.safetensors") && e.contains("no weight fits") && e.contains("0.25") && e.contains("shape"), "{e}");
    let e = err_text(with_init(&dir.join("absent.safetensors")));
    assert!(e.contains("absent.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bf16 run of `learning_config`: it learns (the f32 run's bar), keeps f32
/// master weights and records its precision. Its mAP is not compared with the f32 run's here:
/// at this size the seed alone moves the final mAP by several points (f32, seeds 1 and 2 at 50
/// epochs: 79.4% and 75.0%), so a one-point comparison would only measure noise; the quick start
/// below, converged to ~94%, makes it.
#[test]
fn bf16_training_learns_and_keeps_f32_master_weights() {
    let dir = temp_dir("bf16");
    let mut cfg = learning_config(&dir);
    cfg.run.precision = "bf16".into();
    let mut t = quiet(Trainer::new(cfg, None).unwrap());
    assert!(t.describe().ends_with("bf16"), "{}", t.describe());
    let summary = t.run().unwrap();
    let (before, after) = (summary.before.unwrap().metrics, summary.after.unwrap().metrics);
    println!("bf16: mAP {:.3} -> {:.3}, rank-1 {:.3} -> {:.3}", before.map, after.map, before.rank1, after.rank1);
    assert!(
        after.map > before.map + 0.2 && after.rank1 > before.rank1 + 0.2,
        "bf16 did not learn: mAP {:.3} -> {:.3}",
        before.map,
        after.map
    );
    assert!(t.store.entries().iter().all(|e| e.value.dtype() == DType::F32), "master weights must stay f32");
    let ckpt = Checkpoint::read(&summary.checkpoints[0]).unwrap();
    assert_eq!(ckpt.meta.config.precision().unwrap(), Precision::Bf16);
    let log = std::fs::read_to_string(dir.join("out/log.jsonl")).unwrap();
    assert!(log.lines().next().unwrap().contains("\"precision\":\"bf16\""), "the start event records the precision");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The issue's criterion: trained with bf16 mixed precision, the quick start reaches the mAP of
/// the same f32 run, not more than one point lower. About 3 to 6 minutes on 2 cores, so not in the
/// default suite: `cargo test --release --test train -- --ignored bf16_quick_start`. Measured
/// first (2026-11-24, CPU, `plr-engine train [--precision bf16] [--seed 2]`): f32 seed 1 mAP 93.2%
/// (rank-1 97.4%), f32 seed 2 94.2% (99.4%): the seed alone moves it by a point, so bf16 is held
/// to "not worse by more than a point" rather than to a two-sided bound; bf16 seed 1: 94.7% (98.7%).
#[test]
#[ignore]
fn bf16_quick_start_reaches_the_map_of_f32() {
    let dir = temp_dir("bf16-quickstart");
    let run = |precision: &str| {
        let mut cfg = TrainConfig::quickstart();
        cfg.run.output = dir.join(precision);
        cfg.run.device = "cpu".into();
        cfg.run.eval_before_training = false;
        cfg.run.eval_freq = 0;
        cfg.run.precision = precision.into();
        quiet(Trainer::new(cfg, None).unwrap()).run().unwrap().after.unwrap().metrics
    };
    let (f, b) = (run("f32"), run("bf16"));
    println!("f32: mAP {:.3} rank-1 {:.3}; bf16: mAP {:.3} rank-1 {:.3}", f.map, f.rank1, b.map, b.rank1);
    assert!(f.map > 0.85, "the f32 run is not converged (mAP {:.3})", f.map);
    assert!(b.map >= f.map - 0.01, "bf16 mAP {:.3} is more than a point below f32's {:.3}", b.map, f.map);
    assert!(b.rank1 >= f.rank1 - 0.01, "bf16 rank-1 {:.3} is more than a point below f32's {:.3}", b.rank1, f.rank1);
    std::fs::remove_dir_all(&dir).unwrap();
}
