//! The CUDA backend: one lazily created global context on GPU 0 with one stream, a cuBLAS handle,
//! the NVRTC kernel cache and a caching allocator; cuDNN handles are per thread (`cudnn.rs`).
//!
//! Every CUDA library is dlopened by cudarc on first use and a missing one panics inside cudarc, so
//! `probe` checks that each is present before anything touches it. The engine uses a single
//! stream, so work from several threads is ordered by submission and a freed buffer can be handed
//! to the next allocation at once; cudarc's per-buffer event tracking is switched off.
//!
//! Every wait of the host for the GPU (stream synchronize, device-to-host copy, a busy staging
//! buffer) goes through `host_wait`, which counts it: `sync_count` lets the benchmark and the tests
//! check that a steady-state training step makes none.

mod alloc;
pub(crate) mod cublas;
pub(crate) mod cudnn;
pub mod dwconv;
pub mod graph;
pub mod nvrtc;
pub mod optim;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};

pub use alloc::{memory_stats, peak_memory_bytes, reset_peak_memory, CudaBuffer, MemoryStats};

pub(crate) struct Backend {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: Mutex<cublas::Blas>,
    kernels: nvrtc::KernelCache,
    pub(crate) pool: alloc::Pool,
    pub(crate) staging: Mutex<alloc::Staging>,
    labels: Mutex<LabelCache>,
}

/// The label buffer of the last `labels` call, reused while the labels stay the same (the six
/// loss calls of a step then upload once); or, in CUDA graph mode, the static buffer the graph
/// reads, which the replaying code refills before each launch.
#[derive(Default)]
struct LabelCache {
    last: Vec<i32>,
    buf: Option<Arc<CudaBuffer>>,
    fixed: Option<Arc<CudaBuffer>>,
}

static BACKEND: OnceLock<std::result::Result<Backend, String>> = OnceLock::new();

/// The backend, created on first use; an error says why CUDA cannot be used.
pub(crate) fn backend() -> Result<&'static Backend> {
    match BACKEND.get_or_init(init) {
        Ok(b) => Ok(b),
        Err(e) => Err(Error::Cuda(e.clone())),
    }
}

/// Checks that a CUDA driver, a GPU and the libraries the engine needs can be used; the error
/// names what is missing.
pub fn probe() -> std::result::Result<(), String> {
    BACKEND.get_or_init(init).as_ref().map(|_| ()).map_err(Clone::clone)
}

/// (what, file cudarc loads, whether it can be loaded)
fn libraries() -> [(&'static str, &'static str, bool); 4] {
    // SAFETY: each probe only dlopens and closes the library.
    unsafe {
        [
            ("the NVIDIA driver", "libcuda.so.1", cudarc::driver::sys::is_culib_present()),
            ("NVRTC", "libnvrtc.so.13", cudarc::nvrtc::sys::is_culib_present()),
            ("cuBLAS", "libcublas.so.13 + libcublasLt.so.13", cudarc::cublas::sys::is_culib_present()),
            ("cuDNN 9", "libcudnn.so.9", cudarc::cudnn::sys::is_culib_present()),
        ]
    }
}

fn init() -> std::result::Result<Backend, String> {
    let missing: Vec<String> = libraries().iter().filter(|l| !l.2).map(|l| format!("{} ({})", l.0, l.1)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "CUDA libraries not found: {}. Put their folders on LD_LIBRARY_PATH (scripts/gpu-env.sh finds them in a \
             PyTorch pip install) and, for kernels using half types, CUDA_INCLUDE_DIR on a folder with cuda_fp16.h",
            missing.join(", ")
        ));
    }
    // cudarc panics instead of returning errors in a few places (a symbol missing from an old
    // library); turn that into an error too.
    std::panic::catch_unwind(init_unchecked).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(format!("CUDA initialisation panicked: {}", msg.unwrap_or_default()))
    })
}

fn init_unchecked() -> std::result::Result<Backend, String> {
    let ctx = CudaContext::new(0).map_err(|e| format!("no usable GPU: creating a context on device 0 failed ({e:?})"))?;
    // SAFETY: set before any buffer exists; the engine submits everything to one stream.
    unsafe { ctx.disable_event_tracking() };
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("reading the compute capability: {e:?}"))?;
    let version = cudarc::cudnn::result::get_version();
    if version / 10000 != 9 {
        return Err(format!("cuDNN 9 is required, the loaded libcudnn reports version {version}"));
    }
    let stream = ctx.new_stream().map_err(|e| format!("creating a stream: {e:?}"))?;
    let blas = cublas::Blas::new(&stream).map_err(|e| e.to_string())?;
    Ok(Backend {
        ctx,
        stream,
        blas: Mutex::new(blas),
        kernels: nvrtc::KernelCache::new(format!("sm_{major}{minor}")),
        pool: alloc::Pool::default(),
        staging: Mutex::default(),
        labels: Mutex::default(),
    })
}

static HOST_WAITS: AtomicU64 = AtomicU64::new(0);
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Kernels of kernels/*.cu launched since start (cuDNN and cuBLAS calls, which launch their own,
/// are not counted).
pub fn launch_count() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Runs a call that blocks the host until the GPU reaches some point, counting it.
pub(crate) fn host_wait(wait: impl FnOnce() -> std::result::Result<(), cudarc::driver::DriverError>) -> Result<()> {
    HOST_WAITS.fetch_add(1, Ordering::Relaxed);
    wait().map_err(|e| driver_err("waiting for the GPU", e))
}

/// Times the host has waited for the GPU since start (synchronize, every read-back of a device
/// tensor, a staging buffer still in use).
pub fn sync_count() -> u64 {
    HOST_WAITS.load(Ordering::Relaxed)
}

/// Waits until the GPU has finished all queued work; a no-op if the backend was never started.
pub fn synchronize() -> Result<()> {
    match BACKEND.get() {
        Some(Ok(b)) => host_wait(|| b.stream.synchronize()),
        _ => Ok(()),
    }
}

/// The GPU's name, if the backend is up.
pub fn device_name() -> Option<String> {
    match BACKEND.get() {
        Some(Ok(b)) => b.ctx.name().ok(),
        _ => None,
    }
}

/// Locks a mutex, ignoring poisoning: the guarded caches stay consistent when a holder panics.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn driver_err(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Per-dimension sizes or strides passed to a kernel by value (`struct Dims8` in common.cuh).
pub(crate) const MAX_DIMS: usize = 8;

/// One kernel argument. Device pointers travel as raw addresses.
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    Dims([i32; MAX_DIMS]),
    Table(Box<TensorTable>),
}

/// Tensors one multi-tensor launch works on (`struct TensorTable` in kernels/optim.cu): up to
/// `TABLE_TENSORS` groups of four device addresses and an element count, passed by value so that
/// nothing is uploaded per launch and the launch can be captured in a CUDA graph.
pub const TABLE_TENSORS: usize = 48;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct TensorTable {
    pub(crate) ptrs: [[u64; TABLE_TENSORS]; 4],
    pub(crate) len: [i32; TABLE_TENSORS],
    pub(crate) count: i32,
}

// SAFETY: plain old data with the C layout of the kernel's parameter.
unsafe impl cudarc::driver::DeviceRepr for TensorTable {}

impl TensorTable {
    /// Tables for `rows` (four addresses and a length each), `TABLE_TENSORS` rows at most per table.
    pub(crate) fn build(rows: &[([u64; 4], usize)]) -> Vec<TensorTable> {
        rows.chunks(TABLE_TENSORS)
            .map(|chunk| {
                let mut t = TensorTable { ptrs: [[0; TABLE_TENSORS]; 4], len: [0; TABLE_TENSORS], count: chunk.len() as i32 };
                for (i, (ptrs, len)) in chunk.iter().enumerate() {
                    for (k, p) in ptrs.iter().enumerate() {
                        t.ptrs[k][i] = *p;
                    }
                    t.len[i] = *len as i32;
                }
                t
            })
            .collect()
    }

    /// Elements over all rows.
    pub(crate) fn total(&self) -> usize {
        self.len[..self.count as usize].iter().map(|&n| n as usize).sum()
    }
}

impl Arg {
    /// Bytes the kernel parameter occupies.
    fn size(&self) -> usize {
        match self {
            Arg::Ptr(_) => 8,
            Arg::I32(_) | Arg::F32(_) => 4,
            Arg::Dims(_) => 4 * MAX_DIMS,
            Arg::Table(_) => std::mem::size_of::<TensorTable>(),
        }
    }
}

/// A usize that an earlier allocation bounded by i32::MAX (every size passed to a kernel is at
/// most some tensor's element count).
pub(crate) fn int(v: usize) -> Arg {
    Arg::I32(v as i32)
}

pub(crate) const BLOCK: u32 = 256;

/// Blocks for a grid-stride loop over n elements.
pub(crate) fn grid_for(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).min(1 << 20) as u32
}

/// Blocks of `BLOCK` threads for kernels that give each of n rows (planes, samples) one warp.
pub(crate) fn warp_grid(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize / 32) as u32
}

impl Backend {
    /// Launches `kernel` of `kernels/<file>` with a 1-d grid; an empty grid launches nothing.
    pub(crate) fn launch(&self, file: &'static str, kernel: &'static str, grid: u32, block: u32, args: &[Arg]) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        let k = self.kernels.get(&self.ctx, file, kernel)?;
        if let Some(expected) = &k.param_sizes {
            let given: Vec<usize> = args.iter().map(Arg::size).collect();
            if *expected != given {
                return Err(Error::Cuda(format!(
                    "{file}: kernel {kernel} takes parameters of {expected:?} bytes, the launcher passed {given:?}"
                )));
            }
        }
        let mut b = self.stream.launch_builder(&k.func);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::Dims(v) => b.arg(v),
                Arg::Table(t) => b.arg(&**t),
            };
        }
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: every launcher passes the argument list its kernel declares, with pointers to
        // live buffers of the sizes the kernel indexes.
        unsafe { b.launch(cfg) }.map_err(|e| driver_err(kernel, e))?;
        LAUNCHES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Launches a kernel on the global backend (see `Backend::launch`).
pub(crate) fn launch(file: &'static str, kernel: &'static str, grid: u32, block: u32, args: &[Arg]) -> Result<()> {
    backend()?.launch(file, kernel, grid, block, args)
}

/// The device address of a CUDA tensor.
pub(crate) fn ptr(t: &Tensor) -> Result<u64> {
    match t.storage() {
        Storage::Cuda(b) => Ok(b.ptr()),
        Storage::Cpu(_) => Err(Error::Cuda("expected a tensor on the GPU".into())),
    }
}

/// The device address of a CUDA tensor about to be written in place (copied first if shared).
pub(crate) fn ptr_mut(t: &mut Tensor) -> Result<u64> {
    match t.storage_mut()? {
        Storage::Cuda(b) => Ok(b.ptr()),
        Storage::Cpu(_) => Err(Error::Cuda("expected a tensor on the GPU".into())),
    }
}

/// A new uninitialised f32 CUDA tensor and its address.
pub(crate) fn empty(shape: &[usize]) -> Result<(Tensor, u64)> {
    empty_dtype(shape, DType::F32)
}

/// A new uninitialised CUDA tensor of `dtype` and its address.
pub(crate) fn empty_dtype(shape: &[usize], dtype: DType) -> Result<(Tensor, u64)> {
    let buf = CudaBuffer::alloc_elems(crate::tensor::numel(shape), dtype.size_in_bytes())?;
    let p = buf.ptr();
    Ok((Tensor::from_storage_dtype(Storage::Cuda(buf), shape, dtype), p))
}

/// `x` converted to `dtype` on the GPU (kernels/elementwise.cu; bf16 rounds to nearest even).
pub(crate) fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let kernel = match (x.dtype(), dtype) {
        (DType::F32, DType::BF16) => "cast_f32_to_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_to_f32",
        _ => return Ok(x.clone()),
    };
    let (y, py) = empty_dtype(x.shape(), dtype)?;
    let n = x.numel();
    launch("elementwise.cu", kernel, grid_for(n), BLOCK, &[Arg::Ptr(ptr(x)?), Arg::Ptr(py), int(n)])?;
    Ok(y)
}

fn labels_i32(labels: &[usize]) -> Result<Vec<i32>> {
    labels.iter().map(|&l| i32::try_from(l).map_err(|_| Error::msg(format!("label {l} does not fit a 32-bit integer")))).collect()
}

/// Class labels as an i32 device buffer (kept alive by the caller until the kernels using it are
/// submitted; the allocator's stream ordering does the rest). Uploaded only when they differ from
/// the previous call's; in graph mode (`set_fixed_labels`) the fixed buffer, whatever `labels` say.
pub(crate) fn labels(labels: &[usize]) -> Result<Arc<CudaBuffer>> {
    let be = backend()?;
    let mut cache = lock(&be.labels);
    if let Some(fixed) = &cache.fixed {
        if fixed.len() != labels.len() {
            return Err(Error::Cuda(format!(
                "CUDA graph: the captured step has {} labels, this call {} (the batch size must stay the same)",
                fixed.len(),
                labels.len()
            )));
        }
        return Ok(fixed.clone());
    }
    let v = labels_i32(labels)?;
    if let Some(buf) = cache.buf.as_ref().filter(|_| cache.last == v) {
        return Ok(buf.clone());
    }
    let buf = Arc::new(CudaBuffer::from_host_i32(&v)?);
    cache.last = v;
    cache.buf = Some(buf.clone());
    Ok(buf)
}

/// Graph mode: loss kernels read `buf` instead of uploading their labels (None switches back).
pub(crate) fn set_fixed_labels(buf: Option<Arc<CudaBuffer>>) -> Result<()> {
    lock(&backend()?.labels).fixed = buf;
    Ok(())
}

/// Writes `labels` into a fixed label buffer (before a graph launch), without waiting.
pub(crate) fn write_labels(buf: &CudaBuffer, labels: &[usize]) -> Result<()> {
    if buf.len() != labels.len() {
        return Err(Error::Cuda(format!("{} labels for a label buffer of {}", labels.len(), buf.len())));
    }
    buf.write(&labels_i32(labels)?)
}
