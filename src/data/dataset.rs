//! Re-ID datasets on disk: Market-1501, DukeMTMC-reID, CUHK03 (labeled / detected, in the
//! Market-style folders PLR-OSNet uses) and a generic layout for a user's own data.
//!
//! Every layout is three folders of images, `bounding_box_train` (training), `query` and
//! `bounding_box_test` (the gallery), looked for under:
//!
//! | kind | folder searched, first that exists | images |
//! | --- | --- | --- |
//! | `market1501` | `<root>/market1501/Market-1501-v15.09.15`, `<root>/market1501`, `<root>` | `*.jpg` |
//! | `dukemtmcreid` | `<root>/dukemtmc-reid/DukeMTMC-reID`, `<root>` | `*.jpg` |
//! | `cuhk03_labeled` | `<root>/cuhk03/CUHK03_labeled`, `<root>` | `*.png` |
//! | `cuhk03_detected` | `<root>/cuhk03/CUHK03_detected`, `<root>` | `*.png` |
//! | `custom` | `<root>` | `*.jpg`, `*.jpeg`, `*.png` (any case) |
//!
//! File names carry the identity and the camera: the first match of the regex `([-\d]+)_c(\d)` in
//! the file name gives `(pid, cam)`, so Market names (`0002_c1s1_000451_03.jpg`), Duke names
//! (`0005_c2_f0046985.jpg`), CUHK03-NP names (`0001_c1_01.png`) and the simple custom form
//! `<pid>_c<cam>_<anything>.<ext>` all parse. Cameras are single digits 1-9 (camid = cam - 1);
//! pid -1 marks junk and is skipped; pid 0 marks gallery distractors and is kept. Query and gallery
//! images of one person must carry different camera numbers to count as a match (the standard
//! protocol drops same-pid same-camera gallery images).
//!
//! Training pids are relabelled 0..K-1 in sorted order; query and gallery keep the raw pids.
//! (torchreid matches the regex on the full path; matching the file name only is the same for
//! these datasets and immune to digits in a user's directory names.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

pub const TRAIN_DIR: &str = "bounding_box_train";
pub const QUERY_DIR: &str = "query";
pub const GALLERY_DIR: &str = "bounding_box_test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    Market1501,
    DukeMtmc,
    Cuhk03Labeled,
    Cuhk03Detected,
    Custom,
}

impl DatasetKind {
    pub const NAMES: [&'static str; 5] = ["market1501", "dukemtmcreid", "cuhk03_labeled", "cuhk03_detected", "custom"];

    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Market1501 => "market1501",
            DatasetKind::DukeMtmc => "dukemtmcreid",
            DatasetKind::Cuhk03Labeled => "cuhk03_labeled",
            DatasetKind::Cuhk03Detected => "cuhk03_detected",
            DatasetKind::Custom => "custom",
        }
    }

    /// Folders that may hold the three split folders, most specific first.
    fn candidates(self, root: &Path) -> Vec<PathBuf> {
        let sub: &[&str] = match self {
            DatasetKind::Market1501 => &["market1501/Market-1501-v15.09.15", "market1501"],
            DatasetKind::DukeMtmc => &["dukemtmc-reid/DukeMTMC-reID"],
            DatasetKind::Cuhk03Labeled => &["cuhk03/CUHK03_labeled"],
            DatasetKind::Cuhk03Detected => &["cuhk03/CUHK03_detected"],
            DatasetKind::Custom => &[],
        };
        sub.iter().map(|s| root.join(s)).chain(std::iter::once(root.to_path_buf())).collect()
    }

    fn extensions(self) -> &'static [&'static str] {
        match self {
            DatasetKind::Market1501 | DatasetKind::DukeMtmc => &["jpg"],
            DatasetKind::Cuhk03Labeled | DatasetKind::Cuhk03Detected => &["png"],
            DatasetKind::Custom => &["jpg", "jpeg", "png"],
        }
    }

    /// The spec's per-dataset asserts on a parsed (pid, cam), as an error message.
    fn check(self, pid: i64, cam: u32) -> std::result::Result<(), String> {
        let (max_pid, max_cam) = match self {
            DatasetKind::Market1501 => (Some(1501), 6),
            DatasetKind::DukeMtmc => (None, 8),
            _ => (None, 9),
        };
        if pid < 0 || max_pid.is_some_and(|m| pid > m) {
            return Err(format!("pid {pid} out of range for {}", self.name()));
        }
        if cam < 1 || cam > max_cam {
            return Err(format!("camera {cam} out of range 1..={max_cam} for {}", self.name()));
        }
        Ok(())
    }
}

impl std::str::FromStr for DatasetKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "market1501" | "market" => DatasetKind::Market1501,
            "dukemtmcreid" | "duke" => DatasetKind::DukeMtmc,
            "cuhk03_labeled" | "cuhk03" => DatasetKind::Cuhk03Labeled,
            "cuhk03_detected" => DatasetKind::Cuhk03Detected,
            "custom" => DatasetKind::Custom,
            _ => return Err(Error::msg(format!("--dataset: unknown dataset {s:?}; expected one of {}", DatasetKind::NAMES.join(", ")))),
        })
    }
}

/// One image: its path, person id (relabelled 0..K-1 in the train split, raw elsewhere) and
/// 0-based camera id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub pid: usize,
    pub camid: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SplitStats {
    pub ids: usize,
    pub images: usize,
    pub cameras: usize,
}

impl SplitStats {
    pub fn of(samples: &[Sample]) -> SplitStats {
        let ids: BTreeSet<usize> = samples.iter().map(|s| s.pid).collect();
        let cams: BTreeSet<usize> = samples.iter().map(|s| s.camid).collect();
        SplitStats { ids: ids.len(), images: samples.len(), cameras: cams.len() }
    }
}

pub struct Dataset {
    pub kind: DatasetKind,
    /// The folder holding the three split folders.
    pub dir: PathBuf,
    pub train: Vec<Sample>,
    pub query: Vec<Sample>,
    pub gallery: Vec<Sample>,
    /// K: training labels are 0..K-1.
    pub num_train_pids: usize,
    /// Raw pid of each training label, so label k came from pid `train_pids[k]`.
    pub train_pids: Vec<usize>,
}

/// (pid, cam) from the first match of `([-\d]+)_c(\d)` in `name`, or None when nothing matches.
/// The pid is returned as text when it is not an integer (e.g. `1-2`), as Python's `int` would fail.
pub fn parse_pid_cam(name: &str) -> Option<std::result::Result<(i64, u32), String>> {
    let b = name.as_bytes();
    let in_class = |c: u8| c == b'-' || c.is_ascii_digit();
    let mut i = 0;
    while i < b.len() {
        if !in_class(b[i]) {
            i += 1;
            continue;
        }
        // The greedy run from a run's start is the only candidate a regex match starting inside
        // the run could use (backtracking into the run leaves a class character before `_c`).
        let start = i;
        while i < b.len() && in_class(b[i]) {
            i += 1;
        }
        if b.len() >= i + 3 && b[i] == b'_' && b[i + 1] == b'c' && b[i + 2].is_ascii_digit() {
            let text = &name[start..i];
            let cam = (b[i + 2] - b'0') as u32;
            return Some(text.parse::<i64>().map(|pid| (pid, cam)).map_err(|_| text.to_string()));
        }
    }
    None
}

fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Parses every image of one split folder, sorted by file name; pid -1 is skipped.
fn read_split(kind: DatasetKind, dir: &Path) -> Result<Vec<Sample>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() && has_extension(&path, kind.extensions()) {
            paths.push(path);
        }
    }
    paths.sort();
    let mut samples = Vec::with_capacity(paths.len());
    for path in paths {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let bad = |why: String| Error::msg(format!("{}: {why}", path.display()));
        let (pid, cam) = match parse_pid_cam(name) {
            None => return Err(bad("file name does not start with <pid>_c<camera> (e.g. 0002_c1s1_000451_03.jpg)".into())),
            Some(Err(text)) => return Err(bad(format!("person id {text:?} is not an integer"))),
            Some(Ok(pc)) => pc,
        };
        if pid == -1 {
            continue;
        }
        kind.check(pid, cam).map_err(bad)?;
        samples.push(Sample { path, pid: pid as usize, camid: cam as usize - 1 });
    }
    Ok(samples)
}

impl Dataset {
    /// Loads the dataset of `kind` under `root` (see the module documentation for the layouts).
    pub fn load(kind: DatasetKind, root: &Path) -> Result<Dataset> {
        let candidates = kind.candidates(root);
        let Some(dir) = candidates.iter().find(|d| d.join(TRAIN_DIR).is_dir() || d.join(QUERY_DIR).is_dir()) else {
            let expected: Vec<String> = candidates.iter().map(|d| d.join(TRAIN_DIR).display().to_string()).collect();
            return Err(Error::msg(format!("{}: no dataset found; expected the folder {}", kind.name(), expected.join(" or "))));
        };
        for sub in [TRAIN_DIR, QUERY_DIR, GALLERY_DIR] {
            if !dir.join(sub).is_dir() {
                return Err(Error::msg(format!("{}: missing folder {}", kind.name(), dir.join(sub).display())));
            }
        }
        let mut train = read_split(kind, &dir.join(TRAIN_DIR))?;
        let query = read_split(kind, &dir.join(QUERY_DIR))?;
        let gallery = read_split(kind, &dir.join(GALLERY_DIR))?;
        for (split, samples) in [(QUERY_DIR, &query), (GALLERY_DIR, &gallery)] {
            if samples.is_empty() {
                return Err(Error::msg(format!("{}: no images in {}", kind.name(), dir.join(split).display())));
            }
        }
        let train_pids: Vec<usize> = train.iter().map(|s| s.pid).collect::<BTreeSet<_>>().into_iter().collect();
        for s in &mut train {
            s.pid = train_pids.binary_search(&s.pid).expect("pid collected from this split");
        }
        Ok(Dataset { kind, dir: dir.clone(), train, query, gallery, num_train_pids: train_pids.len(), train_pids })
    }

    /// A one-line-per-split summary in torchreid's layout.
    pub fn summary(&self) -> String {
        let mut s = format!("=> {} loaded from {}\n  subset   | # ids | # images | # cameras\n", self.kind.name(), self.dir.display());
        for (name, samples) in [("train", &self.train), ("query", &self.query), ("gallery", &self.gallery)] {
            let st = SplitStats::of(samples);
            s += &format!("  {name:<8} | {:>5} | {:>8} | {:>9}\n", st.ids, st.images, st.cameras);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_rule_matches_python_re_search() {
        let ok = |s: &str| parse_pid_cam(s).unwrap().unwrap();
        assert_eq!(ok("0002_c1s1_000451_03.jpg"), (2, 1));
        assert_eq!(ok("-1_c3s1_000001_00.jpg"), (-1, 3));
        assert_eq!(ok("0005_c2_f0046985.jpg"), (5, 2));
        assert_eq!(ok("12_c4_front.png"), (12, 4));
        // The first run that is followed by _c<digit> wins; an earlier run without it is skipped.
        assert_eq!(ok("a7_b_0031_c2x.jpg"), (31, 2));
        // Python would crash on int("1-2"); we report it.
        assert_eq!(parse_pid_cam("1-2_c1.jpg"), Some(Err("1-2".to_string())));
        assert_eq!(parse_pid_cam("0002_cam1.jpg"), None);
        assert_eq!(parse_pid_cam("0002_c.jpg"), None);
        assert_eq!(parse_pid_cam("person.jpg"), None);
    }
}
