//! Safetensors state dicts: PyTorch's key names, shapes and dtypes, so that PyTorch loads what the
//! engine saves with `load_state_dict(strict=True)` and the engine loads PyTorch's checkpoints
//! converted to safetensors.
//!
//! Saving writes float entries as F32 and `num_batches_tracked` as an I64 scalar of shape [].
//! Loading strips a leading `module.` (DataParallel), converts F16/BF16 floats, and is strict: a
//! missing, unexpected, wrongly shaped or wrongly typed tensor is an error naming the tensor and
//! the file; only a missing `num_batches_tracked` is tolerated. Entries under `optimizer.` and
//! `loss.` are training-checkpoint state (optimizer moments, center-loss centers), outside the
//! model's state dict: a store without them ignores them in the file (so a checkpoint loads as
//! plain weights), and a store with them keeps its values when the file has none (so plain weights
//! load into a training store).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::error::{Error, Result};
use crate::models::{Osnet, OsnetConfig, PlrConfig, PlrOsnet};
use crate::params::{Kind, ParamStore};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Name prefixes of training-checkpoint state that is not part of a model's state dict.
pub const CHECKPOINT_ONLY_PREFIXES: [&str; 2] = ["optimizer.", "loss."];

fn is_checkpoint_only(name: &str) -> bool {
    CHECKPOINT_ONLY_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Values of a tensor read from a file: floats widened or narrowed to f32, integers to i64.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub struct FileTensor {
    /// The dtype stored in the file.
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Values,
}

impl FileTensor {
    fn is_float(&self) -> bool {
        matches!(self.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }

    /// The values as f32 (integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.values {
            Values::F32(v) => v.clone(),
            Values::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as i64, or None for a float tensor.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.values {
            Values::I64(v) => Some(v),
            Values::F32(_) => None,
        }
    }

    /// A CPU f32 tensor of the same shape.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.to_f32(), &self.shape)
    }
}

/// A whole safetensors file in memory, tensors by name, with its string metadata.
pub struct TensorFile {
    path: PathBuf,
    tensors: BTreeMap<String, FileTensor>,
    metadata: HashMap<String, String>,
}

fn weights_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights { path: path.to_path_buf(), msg: msg.into() }
}

fn decode(path: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<Values> {
    fn words<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        data.chunks_exact(N).map(|c| c.try_into().expect("chunks_exact gives N bytes"))
    }
    Ok(match dtype {
        Dtype::F32 => Values::F32(words::<4>(data).map(f32::from_le_bytes).collect()),
        Dtype::F16 => Values::F32(words::<2>(data).map(|b| f16::from_le_bytes(b).to_f32()).collect()),
        Dtype::BF16 => Values::F32(words::<2>(data).map(|b| bf16::from_le_bytes(b).to_f32()).collect()),
        Dtype::F64 => Values::F32(words::<8>(data).map(|b| f64::from_le_bytes(b) as f32).collect()),
        Dtype::I64 => Values::I64(words::<8>(data).map(i64::from_le_bytes).collect()),
        Dtype::I32 => Values::I64(words::<4>(data).map(|b| i32::from_le_bytes(b) as i64).collect()),
        other => return Err(weights_err(path, format!("tensor {name}: unsupported dtype {other:?}"))),
    })
}

impl TensorFile {
    /// Reads and validates a whole file; a truncated or corrupt file is an error naming it.
    pub fn read(path: &Path) -> Result<TensorFile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| weights_err(path, format!("not a valid safetensors file: {e}")))?;
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| weights_err(path, format!("not a valid safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let values = decode(path, name, view.dtype(), view.data())?;
            tensors.insert(name.to_string(), FileTensor { dtype: view.dtype(), shape: view.shape().to_vec(), values });
        }
        Ok(TensorFile { path: path.to_path_buf(), tensors, metadata: header.metadata().clone().unwrap_or_default() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<&FileTensor> {
        self.tensors.get(name)
    }

    /// The tensor, or an error naming it and the file.
    pub fn require(&self, name: &str) -> Result<&FileTensor> {
        self.get(name).ok_or_else(|| weights_err(&self.path, format!("no tensor named {name}")))
    }

    /// The tensor as a CPU f32 tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.require(name)?.to_tensor()
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A metadata value, or an error naming the key and the file.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata.get(key).map(String::as_str).ok_or_else(|| weights_err(&self.path, format!("no metadata key {key}")))
    }

    /// The entries whose names start with `prefix`, keyed by the rest of the name with a leading
    /// `module.` removed.
    pub fn state_dict(&self, prefix: &str) -> Result<BTreeMap<&str, &FileTensor>> {
        let mut out = BTreeMap::new();
        for (name, t) in &self.tensors {
            let Some(key) = name.strip_prefix(prefix) else { continue };
            let key = key.strip_prefix("module.").unwrap_or(key);
            if out.insert(key, t).is_some() {
                return Err(weights_err(&self.path, format!("tensor {key} appears twice (with and without the module. prefix)")));
            }
        }
        Ok(out)
    }
}

/// A tensor to write: name, dtype, shape and little-endian bytes.
pub struct OutTensor {
    pub name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OutTensor {
    pub fn f32(name: impl Into<String>, shape: &[usize], values: &[f32]) -> Self {
        OutTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn i64(name: impl Into<String>, shape: &[usize], values: &[i64]) -> Self {
        OutTensor {
            name: name.into(),
            dtype: Dtype::I64,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Any dtype, given its little-endian bytes (e.g. F16 weights).
    pub fn raw(name: impl Into<String>, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Result<Self> {
        let name = name.into();
        let want = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        if bytes.len() != want {
            return Err(Error::msg(format!("tensor {name}: {} bytes for {dtype:?} of shape {shape:?}, expected {want}", bytes.len())));
        }
        Ok(OutTensor { name, dtype, shape: shape.to_vec(), bytes })
    }
}

impl View for &OutTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors and string metadata to a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[OutTensor], metadata: HashMap<String, String>) -> Result<()> {
    let info = if metadata.is_empty() { None } else { Some(metadata) };
    let bytes = safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), t)), info)
        .map_err(|e| weights_err(path, format!("cannot serialise: {e}")))?;
    super::write_atomic(path, &bytes)
}

/// Every entry of the store as PyTorch stores it: floats as F32, counters as I64 scalars.
pub fn state_dict(store: &ParamStore) -> Result<Vec<OutTensor>> {
    store
        .entries()
        .iter()
        .map(|e| {
            let v = e.value.to_vec()?;
            Ok(match e.kind {
                Kind::Counter => OutTensor::i64(&e.name, &[], &[v[0].round() as i64]),
                Kind::Param | Kind::Buffer => OutTensor::f32(&e.name, e.value.shape(), &v),
            })
        })
        .collect()
}

/// Saves the store's state dict (atomic write).
pub fn save_state_dict(store: &ParamStore, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
    write_safetensors(path, &state_dict(store)?, metadata)
}

/// Reads a file and loads it strictly into the store (see the module doc).
pub fn load_state_dict(store: &mut ParamStore, path: &Path) -> Result<()> {
    apply_state_dict(store, &TensorFile::read(path)?, "")
}

/// Lists up to 5 names and the count of the rest.
fn name_list(names: &[String]) -> String {
    let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        format!("{shown} (and {} more)", names.len() - 5)
    } else {
        shown
    }
}

/// Why a file tensor cannot fill a store entry of `kind` and `shape`, if it cannot.
fn mismatch(kind: Kind, shape: &[usize], t: &FileTensor) -> Option<String> {
    let dtype_ok = match kind {
        Kind::Counter => matches!(t.dtype, Dtype::I64 | Dtype::F32),
        Kind::Param | Kind::Buffer => t.is_float(),
    };
    if !dtype_ok {
        let want = if kind == Kind::Counter { "I64 or F32" } else { "F32, F16 or BF16" };
        return Some(format!("dtype {:?}, expected {want}", t.dtype));
    }
    (t.shape != shape).then(|| format!("shape {:?}, expected {shape:?}", t.shape))
}

/// Loads the file's entries under `prefix` (e.g. "" or "weights.") strictly into the store. Nothing
/// is changed unless every entry fits.
pub fn apply_state_dict(store: &mut ParamStore, file: &TensorFile, prefix: &str) -> Result<()> {
    let entries = file.state_dict(prefix)?;
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let mut updates = Vec::new();
    for (id, e) in store.entries().iter().enumerate() {
        match entries.get(e.name.as_str()) {
            None if e.kind == Kind::Counter || is_checkpoint_only(&e.name) => {}
            None => missing.push(e.name.clone()),
            Some(t) => match mismatch(e.kind, e.value.shape(), t) {
                Some(why) => wrong.push(format!("tensor {}: {why}", e.name)),
                None => updates.push((id, *t)),
            },
        }
    }
    let unexpected: Vec<String> =
        entries.keys().filter(|k| store.id(k).is_err() && !is_checkpoint_only(k)).map(|k| k.to_string()).collect();
    let mut problems = wrong;
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", name_list(&missing)));
    }
    if !unexpected.is_empty() {
        problems.push(format!("unexpected tensors: {}", name_list(&unexpected)));
    }
    if !problems.is_empty() {
        return Err(weights_err(file.path(), format!("does not fit the model: {}", problems.join("; "))));
    }
    for (id, t) in updates {
        let device = store.get(id).device();
        store.set(id, t.to_tensor()?.to_device(device)?)?;
    }
    Ok(())
}

/// Which network a state dict holds, with the shape read off its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    PlrOsnet(PlrConfig),
    Osnet(OsnetConfig),
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelKind::PlrOsnet(c) => {
                write!(f, "PLR-OSNet (channels {:?}, {} classes, {} parts)", c.channels, c.num_classes, c.parts)
            }
            ModelKind::Osnet(c) => write!(f, "OSNet (channels {:?}, {} classes)", c.channels, c.num_classes),
        }
    }
}

fn dim0(path: &Path, sd: &BTreeMap<&str, &FileTensor>, name: &str) -> Result<usize> {
    match sd.get(name).map(|t| t.shape.as_slice()) {
        Some([d, ..]) => Ok(*d),
        Some(s) => Err(weights_err(path, format!("tensor {name} has shape {s:?}"))),
        None => Err(weights_err(path, format!("no tensor named {name}"))),
    }
}

/// Recognises PLR-OSNet (`layer0.0.conv.weight`) or OSNet (`conv1.conv.weight`) among the entries
/// under `prefix` and reads the widths, classes and parts off the tensor shapes.
pub fn detect_model(file: &TensorFile, prefix: &str) -> Result<ModelKind> {
    let sd = file.state_dict(prefix)?;
    let p = file.path();
    if sd.contains_key("layer0.0.conv.weight") {
        let channels = [
            dim0(p, &sd, "layer0.0.conv.weight")?,
            dim0(p, &sd, "layer1.0.conv3.conv.weight")?,
            dim0(p, &sd, "layer2.0.conv3.conv.weight")?,
            dim0(p, &sd, "layer30.0.conv3.conv.weight")?,
        ];
        let local = dim0(p, &sd, "bn1.weight")?;
        if channels[3] == 0 || !local.is_multiple_of(channels[3]) {
            return Err(weights_err(
                p,
                format!("bn1.weight width {local} is not a multiple of the final stage's {} channels", channels[3]),
            ));
        }
        let num_classes = dim0(p, &sd, "classifier1.weight")?;
        Ok(ModelKind::PlrOsnet(PlrConfig { channels, num_classes, parts: local / channels[3] }))
    } else if sd.contains_key("conv1.conv.weight") {
        let channels = [
            dim0(p, &sd, "conv1.conv.weight")?,
            dim0(p, &sd, "conv2.0.conv3.conv.weight")?,
            dim0(p, &sd, "conv3.0.conv3.conv.weight")?,
            dim0(p, &sd, "conv4.0.conv3.conv.weight")?,
        ];
        Ok(ModelKind::Osnet(OsnetConfig { channels, num_classes: dim0(p, &sd, "classifier.weight")? }))
    } else {
        Err(weights_err(p, "neither a PLR-OSNet (layer0.0.conv.weight) nor an OSNet (conv1.conv.weight) state dict"))
    }
}

/// What `init_plr_from_osnet` did.
#[derive(Debug, Default)]
pub struct InitReport {
    /// (OSNet key, PLR key) pairs copied.
    pub copied: Vec<(String, String)>,
    /// OSNet keys not copied, with the reason.
    pub skipped: Vec<(String, String)>,
    /// PLR entries that kept their initial values.
    pub kept: Vec<String>,
}

/// PLR-OSNet keys an OSNet key maps to (conv4 and conv5 feed both branches).
fn plr_targets(key: &str) -> Vec<String> {
    const MAP: [(&str, &[&str]); 5] = [
        ("conv1.", &["layer0.0."]),
        ("conv2.", &["layer1."]),
        ("conv3.", &["layer2."]),
        ("conv4.", &["layer30.", "layer31.0."]),
        ("conv5.", &["layer40.", "layer41.0."]),
    ];
    MAP.iter()
        .find_map(|(from, tos)| key.strip_prefix(from).map(|rest| tos.iter().map(|to| format!("{to}{rest}")).collect()))
        .unwrap_or_default()
}

/// Initialises a PLR-OSNet store from an OSNet checkpoint (torchreid's ImageNet weights converted
/// to safetensors): conv1 -> layer0.0, conv2 -> layer1, conv3 -> layer2, conv4 -> layer30 and
/// layer31.0, conv5 -> layer40 and layer41.0; every tensor whose target exists with the same shape
/// is copied, the rest (fc, classifier, mismatches) is skipped, as torchreid's loader does.
pub fn init_plr_from_osnet(store: &mut ParamStore, path: &Path) -> Result<InitReport> {
    let file = TensorFile::read(path)?;
    let sd = file.state_dict("")?;
    let mut report = InitReport::default();
    let mut filled = vec![false; store.len()];
    for (key, t) in sd {
        let targets = plr_targets(key);
        if targets.is_empty() {
            report.skipped.push((key.to_string(), "not used by PLR-OSNet".into()));
            continue;
        }
        for target in targets {
            let Ok(id) = store.id(&target) else {
                report.skipped.push((key.to_string(), format!("PLR-OSNet has no {target}")));
                continue;
            };
            if let Some(why) = mismatch(store.entry(id).kind, store.get(id).shape(), t) {
                report.skipped.push((key.to_string(), format!("{target}: {why}")));
                continue;
            }
            let device = store.get(id).device();
            store.set(id, t.to_tensor()?.to_device(device)?)?;
            filled[id] = true;
            report.copied.push((key.to_string(), target));
        }
    }
    report.kept = store.entries().iter().zip(&filled).filter(|(_, &f)| !f).map(|(e, _)| e.name.clone()).collect();
    Ok(report)
}

/// Reads a weights file or training checkpoint of either network into a fresh store.
pub fn load_any_model(path: &Path) -> Result<(ModelKind, ParamStore)> {
    let file = TensorFile::read(path)?;
    let kind = detect_model(&file, "")?;
    let mut store = ParamStore::new();
    // The init is overwritten by the load; the seed only has to be fixed.
    let mut rng = Rng::new(0);
    match kind {
        ModelKind::PlrOsnet(cfg) => drop(PlrOsnet::new(&mut store, cfg, &mut rng)?),
        ModelKind::Osnet(cfg) => drop(Osnet::new(&mut store, cfg, &mut rng)?),
    }
    apply_state_dict(&mut store, &file, "")?;
    Ok((kind, store))
}

/// Reads a PLR-OSNet weights file or training checkpoint: the model (shape read off the tensors)
/// and its loaded parameters.
pub fn load_plr(path: &Path) -> Result<(PlrOsnet, ParamStore)> {
    let file = TensorFile::read(path)?;
    let ModelKind::PlrOsnet(cfg) = detect_model(&file, "")? else {
        return Err(weights_err(path, "holds an OSNet state dict; a PLR-OSNet one (layer0.0.conv.weight, ...) is needed"));
    };
    let mut store = ParamStore::new();
    let model = PlrOsnet::new(&mut store, cfg, &mut Rng::new(0))?;
    apply_state_dict(&mut store, &file, "")?;
    Ok((model, store))
}
