//! Training checkpoints: one safetensors file per save, written atomically (temporary file, then
//! rename), so a crash or a NaN stop never leaves a damaged checkpoint behind.
//!
//! Contents:
//! - every entry of the parameter store under its PyTorch state-dict name (so `plr-engine export`
//!   and `safetensors.torch.load_file` read the model directly), plus the center-loss centers under
//!   `loss.`;
//! - Adam's moments as `optimizer.exp_avg.<param>` and `optimizer.exp_avg_sq.<param>` (torch's
//!   names for m and v);
//! - string metadata: `epoch` (epochs completed; the schedule position, since the learning rate
//!   is a function of the epoch), `rng` (the trainer's generator state), `optimizer` (Adam's
//!   hyper-parameters and per-parameter step counts, JSON), `schedule` (JSON), `config` (the
//!   resolved training configuration, TOML), `train_pids` (the raw pid of each class, JSON) and
//!   the metrics of the latest evaluation, if any.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use crate::error::{Error, Result};
use crate::eval::Metrics;
use crate::io::weights::{apply_state_dict, state_dict, write_safetensors, OutTensor, TensorFile};
use crate::optim::{Adam, AdamConfig, AdamState, LrSchedule};
use crate::params::ParamStore;
use crate::rng::Rng;

/// Marks a file as a plr-engine training checkpoint, with the layout version.
pub const FORMAT: &str = "plr-engine-checkpoint-1";
const EXP_AVG: &str = "optimizer.exp_avg.";
const EXP_AVG_SQ: &str = "optimizer.exp_avg_sq.";

#[derive(Serialize, Deserialize)]
struct OptimizerMeta {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Updates applied to each parameter (torch's per-parameter `step`).
    steps: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
struct ScheduleMeta {
    base_lr: f64,
    multiplier: f64,
    total_epoch: usize,
    milestones: Vec<usize>,
    gamma: f64,
    /// The rate the next epoch runs at.
    next_lr: f64,
}

/// The state a checkpoint carries besides tensors.
pub struct CheckpointMeta {
    /// Epochs completed.
    pub epoch: usize,
    pub rng: Rng,
    pub config: TrainConfig,
    pub train_pids: Vec<usize>,
}

/// What gets saved: the store, the optimizer and the trainer's position.
pub struct Snapshot<'a> {
    pub store: &'a ParamStore,
    pub adam: &'a Adam,
    pub schedule: &'a LrSchedule,
    pub epoch: usize,
    pub rng: &'a Rng,
    pub config: &'a TrainConfig,
    pub train_pids: &'a [usize],
    pub metrics: Option<&'a Metrics>,
}

fn json<T: Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::msg(format!("checkpoint: cannot encode {what}: {e}")))
}

/// Writes the snapshot to `path` atomically.
pub fn save(path: &Path, s: &Snapshot) -> Result<()> {
    let mut tensors = state_dict(s.store)?;
    let mut steps = BTreeMap::new();
    for id in s.store.trainable() {
        let Some(st) = s.adam.state(id) else { continue };
        let name = &s.store.entry(id).name;
        tensors.push(OutTensor::f32(format!("{EXP_AVG}{name}"), st.m.shape(), &st.m.to_vec()?));
        tensors.push(OutTensor::f32(format!("{EXP_AVG_SQ}{name}"), st.v.shape(), &st.v.to_vec()?));
        steps.insert(name.clone(), st.step);
    }
    let c = &s.adam.cfg;
    let optimizer = OptimizerMeta { beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay, steps };
    let sch = s.schedule;
    let schedule = ScheduleMeta {
        base_lr: sch.base_lr,
        multiplier: sch.multiplier,
        total_epoch: sch.total_epoch,
        milestones: sch.milestones.clone(),
        gamma: sch.gamma,
        next_lr: sch.lr_at(s.epoch + 1),
    };
    // u64 words as hex strings: JSON readers that use doubles would round them.
    let rng: Vec<String> = s.rng.state().iter().map(|w| format!("{w:016x}")).collect();
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("plr_engine".to_string(), FORMAT.to_string()),
        ("epoch".to_string(), s.epoch.to_string()),
        ("rng".to_string(), json("rng", &rng)?),
        ("optimizer".to_string(), json("optimizer", &optimizer)?),
        ("schedule".to_string(), json("schedule", &schedule)?),
        ("config".to_string(), s.config.to_toml()?),
        ("train_pids".to_string(), json("train_pids", &s.train_pids)?),
    ]);
    if let Some(m) = s.metrics {
        meta.insert("metrics".to_string(), json("metrics", m)?);
    }
    write_safetensors(path, &tensors, meta)
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights { path: path.to_path_buf(), msg: msg.into() }
}

/// A checkpoint read from disk: its tensors and decoded metadata.
pub struct Checkpoint {
    pub file: TensorFile,
    pub meta: CheckpointMeta,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let file = TensorFile::read(path)?;
        if file.metadata().get("plr_engine").map(String::as_str) != Some(FORMAT) {
            return Err(bad(
                path,
                format!("not a plr-engine training checkpoint (metadata plr_engine != {FORMAT}); a plain weights file cannot be resumed"),
            ));
        }
        let epoch = file.meta("epoch")?.parse().map_err(|_| bad(path, "metadata epoch is not a number"))?;
        let words: Vec<String> = serde_json::from_str(file.meta("rng")?).map_err(|e| bad(path, format!("metadata rng: {e}")))?;
        let words: Vec<u64> = words
            .iter()
            .map(|w| u64::from_str_radix(w, 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(path, format!("metadata rng: {e}")))?;
        let rng = Rng::from_state(words.try_into().map_err(|_| bad(path, "metadata rng: expected 4 words"))?);
        let config = TrainConfig::from_toml(file.meta("config")?, &format!("{} (metadata config)", path.display()))?;
        let train_pids = serde_json::from_str(file.meta("train_pids")?).map_err(|e| bad(path, format!("metadata train_pids: {e}")))?;
        Ok(Checkpoint { file, meta: CheckpointMeta { epoch, rng, config, train_pids } })
    }

    /// Loads the parameters (strictly: every store entry must be present with its shape) and the
    /// optimizer state. Returns the Adam optimizer the run continues with.
    pub fn restore(&self, store: &mut ParamStore) -> Result<Adam> {
        let path = self.file.path();
        apply_state_dict(store, &self.file, "")?;
        let opt: OptimizerMeta =
            serde_json::from_str(self.file.meta("optimizer")?).map_err(|e| bad(path, format!("metadata optimizer: {e}")))?;
        let mut adam = Adam::new(AdamConfig { beta1: opt.beta1, beta2: opt.beta2, eps: opt.eps, weight_decay: opt.weight_decay });
        let ids: Vec<_> = store.trainable().collect();
        for id in ids {
            let name = store.entry(id).name.clone();
            let Some(&step) = opt.steps.get(&name) else { continue };
            let device = store.get(id).device();
            let m = self.file.tensor(&format!("{EXP_AVG}{name}"))?;
            let v = self.file.tensor(&format!("{EXP_AVG_SQ}{name}"))?;
            if m.shape() != store.get(id).shape() || v.shape() != store.get(id).shape() {
                return Err(bad(
                    path,
                    format!("optimizer state of {name} has shape {:?}, the parameter {:?}", m.shape(), store.get(id).shape()),
                ));
            }
            adam.set_state(id, AdamState { m: m.to_device(device)?, v: v.to_device(device)?, step });
        }
        Ok(adam)
    }
}

/// The checkpoint file of epoch `epoch` in `dir`.
pub fn path_for(dir: &Path, epoch: usize) -> PathBuf {
    dir.join(format!("checkpoint-epoch{epoch:03}.safetensors"))
}

/// `path` itself, or for a folder the checkpoint in it with the highest epoch.
pub fn find(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries {
        let p = entry.map_err(|e| Error::io(path, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let epoch =
            name.strip_prefix("checkpoint-epoch").and_then(|r| r.strip_suffix(".safetensors")).and_then(|e| e.parse::<usize>().ok());
        if let Some(e) = epoch {
            if best.as_ref().is_none_or(|(b, _)| e > *b) {
                best = Some((e, p));
            }
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| Error::msg(format!("--resume {}: no checkpoint-epochNNN.safetensors in this folder", path.display())))
}
