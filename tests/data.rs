//! Data pipeline: dataset layouts and file-name parsing, the PK sampler, augmentation, the
//! synthetic dataset generator and the background loader.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use plr_engine::data::dataset::{parse_pid_cam, Dataset, DatasetKind, SplitStats};
use plr_engine::data::image::{load_rgb, normalize_chw, resize_bilinear_pil};
use plr_engine::data::loader::{Loader, LoaderConfig};
use plr_engine::data::sampler::RandomIdentitySampler;
use plr_engine::data::synth::{generate, SynthConfig};
use plr_engine::data::transforms::{hflip, Augment, RandomErasing};
use plr_engine::rng::Rng;

/// A fresh, empty temporary folder unique to this test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("plr-data-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Empty files with the given names: parsing never opens them.
fn touch_all(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for n in names {
        std::fs::write(dir.join(n), b"").unwrap();
    }
}

fn err_text<T>(r: plr_engine::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Datasets

#[test]
fn market_layout_parses_relabels_and_skips_junk() {
    let root = temp_dir("market");
    let dir = root.join("market1501/Market-1501-v15.09.15");
    touch_all(
        &dir.join("bounding_box_train"),
        &["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c6s1_000001_01.jpg", "-1_c1s1_000001_00.jpg", "Thumbs.db"],
    );
    touch_all(&dir.join("query"), &["0003_c1s1_000001_00.jpg", "0009_c4s2_000123_02.jpg"]);
    touch_all(
        &dir.join("bounding_box_test"),
        &["0000_c1s1_000002_00.jpg", "-1_c3s1_000003_00.jpg", "0003_c5s1_000010_01.jpg", "0009_c2s1_000011_01.jpg"],
    );
    let ds = Dataset::load(DatasetKind::Market1501, &root).unwrap();
    assert_eq!(ds.dir, dir);
    // Sorted file names; pid -1 and non-jpg files skipped; labels 0..K-1 in sorted pid order.
    let train: Vec<(usize, usize)> = ds.train.iter().map(|s| (s.pid, s.camid)).collect();
    assert_eq!(train, vec![(0, 0), (0, 1), (1, 5)]);
    assert_eq!(ds.num_train_pids, 2);
    assert_eq!(ds.train_pids, vec![2, 7]);
    let query: Vec<(usize, usize)> = ds.query.iter().map(|s| (s.pid, s.camid)).collect();
    assert_eq!(query, vec![(3, 0), (9, 3)]);
    // pid 0 (distractor) kept in the gallery with its raw pid.
    let gallery: Vec<(usize, usize)> = ds.gallery.iter().map(|s| (s.pid, s.camid)).collect();
    assert_eq!(gallery, vec![(0, 0), (3, 4), (9, 1)]);
    assert_eq!(SplitStats::of(&ds.gallery), SplitStats { ids: 3, images: 3, cameras: 3 });
    assert!(ds.summary().contains("gallery"));

    // The older layout without the versioned folder is found too.
    let flat = temp_dir("market-flat");
    std::fs::rename(&dir, flat.join("market1501")).unwrap();
    assert_eq!(Dataset::load(DatasetKind::Market1501, &flat).unwrap().gallery.len(), 3);
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&flat).unwrap();
}

#[test]
fn duke_cuhk03_and_custom_names_parse() {
    let root = temp_dir("others");
    let duke = root.join("dukemtmc-reid/DukeMTMC-reID");
    touch_all(&duke.join("bounding_box_train"), &["0005_c2_f0046985.jpg", "0005_c8_f0046999.jpg"]);
    touch_all(&duke.join("query"), &["0011_c7_f0000001.jpg"]);
    touch_all(&duke.join("bounding_box_test"), &["0011_c3_f0000002.jpg"]);
    let ds = Dataset::load(DatasetKind::DukeMtmc, &root).unwrap();
    assert_eq!(ds.train.iter().map(|s| (s.pid, s.camid)).collect::<Vec<_>>(), vec![(0, 1), (0, 7)]);
    assert_eq!((ds.query[0].pid, ds.query[0].camid), (11, 6));

    let cuhk = root.join("cuhk03/CUHK03_labeled");
    touch_all(&cuhk.join("bounding_box_train"), &["0001_c1_01.png", "0001_c2_07.png", "0042_c1_03.png", "0001_c1_01.jpg"]);
    touch_all(&cuhk.join("query"), &["1400_c1_01.png"]);
    touch_all(&cuhk.join("bounding_box_test"), &["1400_c2_03.png"]);
    let ds = Dataset::load(DatasetKind::Cuhk03Labeled, &root).unwrap();
    assert_eq!(ds.train.len(), 3, "CUHK03 reads .png only");
    assert_eq!(ds.train_pids, vec![1, 42]);
    assert!(Dataset::load(DatasetKind::Cuhk03Detected, &root.join("nowhere")).is_err());

    let custom = root.join("mine");
    touch_all(&custom.join("bounding_box_train"), &["7_c1_front.JPG", "7_c2_x.png", "12_c9_a.jpeg", "notes.txt"]);
    touch_all(&custom.join("query"), &["3_c1_q.jpg"]);
    touch_all(&custom.join("bounding_box_test"), &["3_c2_g.jpg", "0_c1_distractor.jpg"]);
    let ds = Dataset::load(DatasetKind::Custom, &custom).unwrap();
    assert_eq!(ds.train.iter().map(|s| (s.pid, s.camid)).collect::<Vec<_>>(), vec![(1, 8), (0, 0), (0, 1)]);
    assert_eq!(ds.train_pids, vec![7, 12]);
    assert_eq!(ds.gallery.len(), 2);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn dataset_errors_name_the_file_or_folder() {
    let root = temp_dir("errors");
    // Nothing there: the error names the folder it expected.
    let e = err_text(Dataset::load(DatasetKind::Market1501, &root));
    assert!(e.contains("market1501/Market-1501-v15.09.15/bounding_box_train"), "{e}");

    // A folder missing.
    let dir = root.join("market1501");
    touch_all(&dir.join("bounding_box_train"), &["0001_c1s1_000001_00.jpg"]);
    touch_all(&dir.join("query"), &["0002_c1s1_000001_00.jpg"]);
    let e = err_text(Dataset::load(DatasetKind::Market1501, &root));
    assert!(e.contains(&dir.join("bounding_box_test").display().to_string()), "{e}");

    // Empty query set.
    touch_all(&dir.join("bounding_box_test"), &["0002_c2s1_000001_00.jpg"]);
    std::fs::remove_file(dir.join("query/0002_c1s1_000001_00.jpg")).unwrap();
    let e = err_text(Dataset::load(DatasetKind::Market1501, &root));
    assert!(e.contains("no images") && e.contains("query"), "{e}");
    touch_all(&dir.join("query"), &["0002_c1s1_000001_00.jpg"]);
    assert!(Dataset::load(DatasetKind::Market1501, &root).is_ok());

    // Unparseable names and the spec's range asserts, each naming the file.
    for bad in ["person_12.jpg", "1-2_c1s1_000001_00.jpg", "1502_c1s1_000001_00.jpg", "0003_c7s1_000001_00.jpg", "0003_c0s1_000001_00.jpg"]
    {
        touch_all(&dir.join("query"), &[bad]);
        let e = err_text(Dataset::load(DatasetKind::Market1501, &root));
        assert!(e.contains(bad), "{bad}: {e}");
        std::fs::remove_file(dir.join("query").join(bad)).unwrap();
    }
    // Duke allows camera 8, Market does not.
    assert_eq!(parse_pid_cam("0003_c8_f01.jpg"), Some(Ok((3, 8))));
    assert!("market".parse::<DatasetKind>().is_ok());
    assert!(err_text("msmt17".parse::<DatasetKind>()).contains("msmt17"));
    std::fs::remove_dir_all(&root).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Sampler

#[test]
fn sampler_batches_are_16_ids_by_4_images() {
    let mut rng = Rng::new(5);
    // 40 identities with 1..=20 images each, interleaved in the dataset.
    let counts: Vec<usize> = (0..40).map(|_| 1 + rng.below(20)).collect();
    let mut labels: Vec<usize> = counts.iter().enumerate().flat_map(|(l, &n)| std::iter::repeat_n(l, n)).collect();
    rng.shuffle(&mut labels);
    let sampler = RandomIdentitySampler::new(&labels, 16, 4).unwrap();
    assert_eq!(sampler.batch_size(), 64);
    let batches = sampler.epoch(&mut Rng::new(1));
    assert!(!batches.is_empty());

    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut chunks_used = vec![0usize; 40];
    for b in &batches {
        assert_eq!(b.len(), 64);
        let ids: Vec<usize> = b.chunks(4).map(|c| labels[c[0]]).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 16, "16 distinct identities per batch");
        for (chunk, &id) in b.chunks(4).zip(&ids) {
            assert!(chunk.iter().all(|&i| labels[i] == id), "a chunk holds 4 images of one identity");
            chunks_used[id] += 1;
            for &i in chunk {
                *seen.entry(i).or_default() += 1;
            }
        }
    }
    for (id, &n) in counts.iter().enumerate() {
        let chunks = n.max(4) / 4;
        assert!(chunks_used[id] <= chunks, "identity {id}: {} chunks used of {chunks}", chunks_used[id]);
    }
    // Identities with 4+ images are sampled without replacement within the epoch.
    for (&i, &k) in &seen {
        if counts[labels[i]] >= 4 {
            assert_eq!(k, 1, "index {i} of a 4+-image identity drawn {k} times");
        }
    }
    // Identities with fewer than 4 images still fill whole chunks (with replacement).
    let small: Vec<usize> = (0..40).filter(|&l| counts[l] < 4 && chunks_used[l] > 0).collect();
    assert!(!small.is_empty(), "the test data should exercise the with-replacement path");
    // Sampling stops only when fewer than 16 identities have chunks left.
    let left = (0..40).filter(|&l| chunks_used[l] < counts[l].max(4) / 4).count();
    assert!(left < 16, "{left} identities still had chunks");

    // Deterministic per seed, different across seeds.
    assert_eq!(sampler.epoch(&mut Rng::new(1)), batches);
    assert_ne!(sampler.epoch(&mut Rng::new(2)), batches);
    assert_eq!(sampler.len_estimate(), counts.iter().map(|&n| n.max(4) / 4 * 4).sum::<usize>());
}

#[test]
fn sampler_epoch_length_and_errors() {
    // 16 identities x 8 images: exactly two batches that use every image once.
    let labels: Vec<usize> = (0..16 * 8).map(|i| i % 16).collect();
    let s = RandomIdentitySampler::new(&labels, 16, 4).unwrap();
    let batches = s.epoch(&mut Rng::new(3));
    assert_eq!(batches.len(), 2);
    let mut all: Vec<usize> = batches.concat();
    all.sort_unstable();
    assert_eq!(all, (0..128).collect::<Vec<_>>());
    // 32 identities x 4 images: also two batches; 31 x 4 leaves 15 identities, so one.
    let labels: Vec<usize> = (0..32 * 4).map(|i| i / 4).collect();
    assert_eq!(RandomIdentitySampler::new(&labels, 16, 4).unwrap().epoch(&mut Rng::new(4)).len(), 2);
    let labels: Vec<usize> = (0..31 * 4).map(|i| i / 4).collect();
    assert_eq!(RandomIdentitySampler::new(&labels, 16, 4).unwrap().epoch(&mut Rng::new(4)).len(), 1);
    // Partial chunks are dropped: 16 identities x 7 images give one batch each.
    let labels: Vec<usize> = (0..16 * 7).map(|i| i % 16).collect();
    assert_eq!(RandomIdentitySampler::new(&labels, 16, 4).unwrap().epoch(&mut Rng::new(4)).len(), 1);

    let labels: Vec<usize> = (0..15 * 10).map(|i| i % 15).collect();
    let e = err_text(RandomIdentitySampler::new(&labels, 16, 4));
    assert!(e.contains("15 identities") && e.contains("16"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Transforms

#[test]
fn random_erasing_follows_torchreid() {
    let (c, h, w) = (3, 256, 128);
    let erasing = RandomErasing::default();
    let mut rng = Rng::new(9);
    let base: Vec<f32> = (0..c * h * w).map(|_| rng.normal() as f32 * 2.0 + 5.0).collect();
    let (mut erased, mut min_area, mut max_area) = (0, f64::MAX, 0.0f64);
    let trials = 4000;
    for _ in 0..trials {
        let mut img = base.clone();
        let Some(r) = erasing.apply(&mut img, c, h, w, &mut rng) else {
            assert_eq!(img, base, "no erasing leaves the image unchanged");
            continue;
        };
        erased += 1;
        assert!(r.h < h && r.w < w && r.top + r.h <= h && r.left + r.w <= w, "{r:?}");
        // Some (area, aspect) in the sampling ranges rounds to (h, w).
        let (hf, wf) = (r.h as f64, r.w as f64);
        let hw = (h * w) as f64;
        assert!((hf + 0.5) * (wf + 0.5) >= 0.02 * hw && (hf - 0.5) * (wf - 0.5) <= 0.4 * hw, "area of {r:?}");
        assert!((hf + 0.5) / (wf - 0.5) >= 0.3 && (hf - 0.5) / (wf + 0.5) <= 1.0 / 0.3, "aspect of {r:?}");
        min_area = min_area.min(hf * wf / hw);
        max_area = max_area.max(hf * wf / hw);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let i = (ch * h + y) * w + x;
                    let inside = (r.top..r.top + r.h).contains(&y) && (r.left..r.left + r.w).contains(&x);
                    let want = if inside { [0.4914f32, 0.4822, 0.4465][ch] } else { base[i] };
                    assert_eq!(img[i], want);
                }
            }
        }
    }
    let p = erased as f64 / trials as f64;
    assert!((p - 0.5).abs() < 0.03, "erasing probability {p}");
    assert!(min_area < 0.03 && max_area > 0.35, "areas span the range: {min_area}..{max_area}");
    // A tall narrow image rejects most rectangles; attempts run out without erasing.
    let never = RandomErasing { probability: 1.0, area_min: 0.9, area_max: 0.95, ..RandomErasing::default() };
    let mut img = vec![0.0f32; 3 * 8 * 8];
    assert_eq!(never.apply(&mut img, 3, 8, 8, &mut rng), None);
}

#[test]
fn flip_mirrors_rows_and_fires_half_the_time() {
    let (c, h, w) = (3, 5, 7);
    let img: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
    let mut f = img.clone();
    hflip(&mut f, w);
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                assert_eq!(f[(ch * h + y) * w + x], img[(ch * h + y) * w + (w - 1 - x)]);
            }
        }
    }
    let aug = Augment { flip_p: 0.5, erasing: None };
    let mut rng = Rng::new(4);
    let trials = 4000;
    let flipped = (0..trials)
        .filter(|_| {
            let mut x = img.clone();
            aug.apply(&mut x, c, h, w, &mut rng);
            assert!(x == img || x == f);
            x == f
        })
        .count();
    let p = flipped as f64 / trials as f64;
    assert!((p - 0.5).abs() < 0.03, "flip probability {p}");
}

// ---------------------------------------------------------------------------------------------
// Synthetic dataset

fn small_synth(seed: u64) -> SynthConfig {
    SynthConfig { ids: 10, cameras: 3, images_per_id: 6, distractors: 5, seed, ..SynthConfig::default() }
}

fn read_tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for sub in ["bounding_box_train", "query", "bounding_box_test"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let p = e.unwrap().path();
            files.push((format!("{sub}/{}", p.file_name().unwrap().to_str().unwrap()), std::fs::read(&p).unwrap()));
        }
    }
    files.sort();
    files
}

#[test]
fn synth_split_counts_match_loader_and_are_deterministic() {
    let cfg = small_synth(7);
    let out = temp_dir("synth");
    let summary = generate(&cfg, &out, false).unwrap();
    // 10 ids: 5 train x 6 images; 5 test ids, each in 2-3 cameras with one query per camera.
    assert_eq!((summary.train_ids, summary.train_images), (5, 30));
    assert_eq!(summary.query_ids, 5);
    assert!((10..=15).contains(&summary.query_images), "{summary:?}");
    assert_eq!(summary.query_images + summary.gallery_images, 5 * 6 + 5);
    assert_eq!(summary.gallery_ids, 6, "5 test ids + pid 0");

    for kind in [DatasetKind::Market1501, DatasetKind::Custom] {
        let ds = Dataset::load(kind, &out).unwrap();
        assert_eq!(ds.num_train_pids, 5);
        assert_eq!((SplitStats::of(&ds.train).ids, ds.train.len()), (summary.train_ids, summary.train_images));
        assert_eq!((SplitStats::of(&ds.query).ids, ds.query.len()), (summary.query_ids, summary.query_images));
        assert_eq!((SplitStats::of(&ds.gallery).ids, ds.gallery.len()), (summary.gallery_ids, summary.gallery_images));
        assert_eq!(ds.gallery.iter().filter(|s| s.pid == 0).count(), 5);
        // Train and test identities are disjoint; every query has a gallery match in another camera.
        let test_ids: HashSet<usize> = ds.query.iter().map(|s| s.pid).collect();
        assert!(ds.train_pids.iter().all(|p| !test_ids.contains(p)));
        for q in &ds.query {
            assert!(ds.gallery.iter().any(|g| g.pid == q.pid && g.camid != q.camid), "{:?}", q.path);
        }
    }
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("synth.json")).unwrap()).unwrap();
    assert_eq!(meta["summary"]["train_images"], 30);

    // Images decode at Market's size.
    let ds = Dataset::load(DatasetKind::Market1501, &out).unwrap();
    for s in ds.train.iter().chain(&ds.query).chain(&ds.gallery) {
        assert_eq!(load_rgb(&s.path).unwrap().dimensions(), (64, 128));
    }

    // Same seed: the same bytes; another seed: other images; a non-empty target is refused.
    let again = temp_dir("synth-again");
    generate(&cfg, &again, false).unwrap();
    assert!(read_tree(&out) == read_tree(&again), "same seed, same files");
    let e = err_text(generate(&small_synth(8), &again, false));
    assert!(e.contains("not empty") && e.contains("bounding_box_train"), "{e}");
    generate(&small_synth(8), &again, true).unwrap();
    assert!(read_tree(&out) != read_tree(&again), "another seed, other files");
    assert!(err_text(generate(&SynthConfig { cameras: 10, ..cfg.clone() }, &again, true)).contains("--cameras"));
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&again).unwrap();
}

/// Normalised 4x4x4 RGB histogram of the middle half of the image (mostly the person).
fn histogram(path: &Path) -> Vec<f64> {
    let img = load_rgb(path).unwrap();
    let (w, h) = img.dimensions();
    let mut hist = vec![0.0; 64];
    let mut n = 0.0;
    for (x, y, p) in img.enumerate_pixels() {
        if x >= w / 4 && x < 3 * w / 4 && y >= h / 8 && y < 7 * h / 8 {
            hist[(p[0] as usize / 64) * 16 + (p[1] as usize / 64) * 4 + p[2] as usize / 64] += 1.0;
            n += 1.0;
        }
    }
    hist.iter().map(|v| v / n).collect()
}

#[test]
fn synth_identities_are_distinguishable_across_cameras() {
    let out = temp_dir("synth-hist");
    generate(&SynthConfig { ids: 24, cameras: 4, images_per_id: 8, seed: 3, ..SynthConfig::default() }, &out, false).unwrap();
    let ds = Dataset::load(DatasetKind::Market1501, &out).unwrap();
    let hists: Vec<(usize, usize, Vec<f64>)> = ds.train.iter().map(|s| (s.pid, s.camid, histogram(&s.path))).collect();
    let l1 = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>();
    let (mut same, mut diff) = (Vec::new(), Vec::new());
    for (i, a) in hists.iter().enumerate() {
        for b in &hists[i + 1..] {
            // Cross-camera pairs only, so backgrounds and lighting differ in both groups.
            if a.1 != b.1 {
                (if a.0 == b.0 { &mut same } else { &mut diff }).push(l1(&a.2, &b.2));
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ms, md) = (mean(&same), mean(&diff));
    assert!(ms < 0.8 * md, "same-id cross-camera distance {ms} vs different ids {md}");
    // Not trivial either: same-id pairs are far from identical.
    assert!(ms > 0.1, "same-id images are nearly identical ({ms})");
    std::fs::remove_dir_all(&out).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Loader

#[test]
fn loader_batches_are_reproducible_cached_and_correct() {
    let out = temp_dir("loader");
    generate(&SynthConfig { ids: 34, cameras: 3, images_per_id: 5, seed: 1, ..SynthConfig::default() }, &out, false).unwrap();
    let ds = Dataset::load(DatasetKind::Market1501, &out).unwrap();
    assert_eq!(ds.num_train_pids, 17);
    let (h, w) = (64u32, 32u32);
    let cfg = LoaderConfig { height: h, width: w, workers: 3, prefetch: 2, cache_bytes: usize::MAX };
    let loader = Loader::new(ds.train.clone(), &cfg).unwrap();
    let labels: Vec<usize> = ds.train.iter().map(|s| s.pid).collect();
    let sampler = RandomIdentitySampler::new(&labels, 16, 4).unwrap();
    let aug = Augment::default();

    let epoch: Vec<_> = loader.train_epoch(&sampler, &aug, 42, 3).unwrap().map(Result::unwrap).collect();
    assert!(!epoch.is_empty());
    for b in &epoch {
        assert_eq!(b.shape, [64, 3, h as usize, w as usize]);
        assert_eq!(b.images.len(), 64 * 3 * (h * w) as usize);
        assert_eq!(b.tensor().unwrap().shape(), &[64, 3, h as usize, w as usize]);
        for (j, &i) in b.indices.iter().enumerate() {
            assert_eq!((b.labels[j], b.camids[j], &b.paths[j]), (ds.train[i].pid, ds.train[i].camid, &ds.train[i].path));
        }
        assert_eq!(b.labels.iter().collect::<HashSet<_>>().len(), 16);
    }
    // Every image touched is now cached.
    let touched: HashSet<usize> = epoch.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(loader.cached_bytes(), touched.len() * (3 * h * w) as usize);

    // Same (seed, epoch) with a different thread count and no cache: bit-identical batches.
    let other = Loader::new(ds.train.clone(), &LoaderConfig { workers: 1, cache_bytes: 0, ..cfg.clone() }).unwrap();
    let again: Vec<_> = other.train_epoch(&sampler, &aug, 42, 3).unwrap().map(Result::unwrap).collect();
    assert_eq!(other.cached_bytes(), 0);
    assert_eq!(epoch.len(), again.len());
    for (a, b) in epoch.iter().zip(&again) {
        assert_eq!(a.indices, b.indices);
        assert!(a.images == b.images);
    }
    // Another epoch draws other batches and other augmentations.
    let next: Vec<_> = loader.train_epoch(&sampler, &aug, 42, 4).unwrap().map(Result::unwrap).collect();
    assert_ne!(next[0].indices, epoch[0].indices);

    // Evaluation order: every image once, unaugmented, equal to the reference pipeline.
    let gallery = Loader::new(ds.gallery.clone(), &cfg).unwrap();
    let batches: Vec<_> = gallery.in_order(7).unwrap().map(Result::unwrap).collect();
    assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), ds.gallery.len());
    let flat: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(flat, (0..ds.gallery.len()).collect::<Vec<_>>());
    let want = normalize_chw(&resize_bilinear_pil(&load_rgb(&ds.gallery[9].path).unwrap(), h, w));
    let per = (3 * h * w) as usize;
    assert!(batches[1].images[2 * per..3 * per] == want[..], "item 9 = batch 1, slot 2");

    // Dropping an iterator early stops its producer; a broken file is an error naming it.
    drop(loader.train_epoch(&sampler, &aug, 42, 5).unwrap());
    std::fs::write(&ds.gallery[3].path, b"not a jpeg").unwrap();
    let fresh = Loader::new(ds.gallery.clone(), &LoaderConfig { cache_bytes: 0, ..cfg }).unwrap();
    let results: Vec<_> = fresh.in_order(7).unwrap().collect();
    assert_eq!(results.len(), 1, "the stream ends at the failing batch");
    let e = err_text(results.into_iter().next().unwrap());
    assert!(e.contains(ds.gallery[3].path.file_name().unwrap().to_str().unwrap()), "{e}");
    assert!(fresh.batches(vec![vec![ds.gallery.len()]], None).is_err());
    std::fs::remove_dir_all(&out).unwrap();
}
