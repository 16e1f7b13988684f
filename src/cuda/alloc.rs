//! A caching allocator: device blocks come in size buckets, and a dropped buffer puts its block on
//! its bucket's free list instead of freeing it, so a training step that repeats the previous
//! step's allocations makes no cudaMalloc. All work runs on one stream, so a block freed after its
//! last use was submitted can be reused by any later submission without synchronising.
//!
//! Uploads go through a small ring of pinned host buffers (`Staging`): a copy from pageable memory
//! may make the driver wait for the stream, a copy from pinned memory never does, so a training
//! step's batch and label uploads leave the host free to run ahead of the GPU.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::{backend, driver_err, host_wait, lock, BACKEND};
use crate::error::{Error, Result};

/// Allocator counters, in bytes of whole blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held by live buffers.
    pub in_use_bytes: usize,
    /// Highest `in_use_bytes` since start or the last `reset_peak_memory`.
    pub peak_bytes: usize,
    /// Free blocks kept for reuse.
    pub cached_bytes: usize,
    /// Device allocations made so far (each a cudaMalloc).
    pub device_allocations: u64,
}

#[derive(Default)]
pub(crate) struct Pool {
    inner: Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    free: HashMap<usize, Vec<CudaSlice<u8>>>,
    stats: MemoryStats,
    graph: GraphBlocks,
}

/// Blocks a captured CUDA graph uses. Every block taken or freed during capture is reserved for
/// the graph (its replays write them), so it never goes back to the shared free lists while the
/// graph lives: freed reserved blocks wait in `private`, where only a later capture takes them.
#[derive(Default)]
struct GraphBlocks {
    /// A graph is being captured or alive (one at a time).
    alive: bool,
    capturing: bool,
    reserved: HashSet<u64>,
    private: HashMap<usize, Vec<CudaSlice<u8>>>,
}

/// Block size for a request: 512-byte steps up to 1 MiB, then four steps per power of two (at
/// most 25 % waste).
fn bucket(bytes: usize) -> usize {
    let b = bytes.max(1);
    let step = if b <= 1 << 20 { 512 } else { (1usize << b.ilog2()) / 4 };
    b.div_ceil(step) * step
}

impl Pool {
    fn take(&self, stream: &Arc<CudaStream>, bytes: usize) -> Result<CudaSlice<u8>> {
        let size = bucket(bytes);
        {
            let mut p = lock(&self.inner);
            let capturing = p.graph.capturing;
            let private = if capturing { p.graph.private.get_mut(&size).and_then(Vec::pop) } else { None };
            if let Some(block) = private.or_else(|| p.free.get_mut(&size).and_then(Vec::pop)) {
                p.stats.cached_bytes -= size;
                p.note_taken(size, false);
                if capturing {
                    p.graph.reserved.insert(block.device_ptr(stream).0);
                }
                return Ok(block);
            }
            if capturing {
                // cudarc allocates stream-ordered (cuMemAllocAsync): captured, that would be an
                // allocation node of the graph, which a relaunch refuses while the block lives on.
                return Err(Error::Cuda(format!(
                    "the captured step needs a new device block of {size} bytes: the eager warm-up step did not leave one in the cache"
                )));
            }
        }
        // SAFETY: the block is written by a kernel or a copy before anything reads it.
        let block = match unsafe { stream.alloc::<u8>(size) } {
            Ok(b) => b,
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                self.release_cached();
                host_wait(|| stream.synchronize())?;
                // SAFETY: as above.
                unsafe { stream.alloc::<u8>(size) }
                    .map_err(|e| Error::Cuda(format!("out of GPU memory allocating {size} bytes ({e:?})")))?
            }
            Err(e) => return Err(driver_err("cuMemAlloc", e)),
        };
        lock(&self.inner).note_taken(size, true);
        Ok(block)
    }

    fn give_back(&self, block: CudaSlice<u8>, ptr: u64) {
        let size = block.len();
        let mut p = lock(&self.inner);
        p.stats.in_use_bytes -= size;
        p.stats.cached_bytes += size;
        let g = &mut p.graph;
        if g.capturing {
            g.reserved.insert(ptr);
        }
        if g.reserved.contains(&ptr) {
            g.private.entry(size).or_default().push(block);
        } else {
            p.free.entry(size).or_default().push(block);
        }
    }

    /// Starts reserving every block taken or freed for the graph being captured.
    pub(crate) fn begin_capture(&self) -> Result<()> {
        let mut p = lock(&self.inner);
        if p.graph.alive {
            return Err(Error::Cuda("a CUDA graph is already alive; the engine keeps one at a time".into()));
        }
        p.graph.alive = true;
        p.graph.capturing = true;
        Ok(())
    }

    /// Ends the capture. The blocks stay reserved until `release_graph`.
    pub(crate) fn end_capture(&self) {
        lock(&self.inner).graph.capturing = false;
    }

    pub(crate) fn capturing(&self) -> bool {
        lock(&self.inner).graph.capturing
    }

    /// The graph is gone: its free blocks go back to the shared cache, its live ones will when
    /// dropped. (Stream order covers a replay still running.)
    pub(crate) fn release_graph(&self) {
        let mut p = lock(&self.inner);
        let private = std::mem::take(&mut p.graph.private);
        p.graph.reserved.clear();
        p.graph.alive = false;
        for (size, blocks) in private {
            p.free.entry(size).or_default().extend(blocks);
        }
    }

    /// Frees every cached block (stream-ordered, after the work already submitted) except those
    /// a graph holds.
    fn release_cached(&self) {
        let blocks = {
            let mut p = lock(&self.inner);
            p.stats.cached_bytes = p.graph.private.iter().map(|(size, b)| size * b.len()).sum();
            std::mem::take(&mut p.free)
        };
        drop(blocks);
    }
}

impl PoolInner {
    fn note_taken(&mut self, size: usize, fresh: bool) {
        self.stats.in_use_bytes += size;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.in_use_bytes);
        if fresh {
            self.stats.device_allocations += 1;
        }
    }
}

fn pool() -> Option<&'static Pool> {
    match BACKEND.get() {
        Some(Ok(b)) => Some(&b.pool),
        _ => None,
    }
}

/// The allocator's counters (all zero before the backend starts).
pub fn memory_stats() -> MemoryStats {
    pool().map(|p| lock(&p.inner).stats).unwrap_or_default()
}

/// Highest number of bytes held by live device buffers since start or the last reset.
pub fn peak_memory_bytes() -> usize {
    memory_stats().peak_bytes
}

/// Restarts peak tracking from the bytes in use now.
pub fn reset_peak_memory() {
    if let Some(p) = pool() {
        let mut p = lock(&p.inner);
        p.stats.peak_bytes = p.stats.in_use_bytes;
    }
}

/// Uploads larger than this go straight from pageable memory (loading weights); batches of
/// images at 384x128, batch 64, are 38 MiB.
const STAGED_MAX_BYTES: usize = 64 << 20;
/// Pinned buffers in the ring: a slot is written again only after its previous copy ran, so the
/// host can be this many uploads ahead of the GPU before it waits (a replayed graph step makes
/// three: images, labels, Adam's step size).
const STAGING_SLOTS: usize = 8;

/// One pinned host buffer and the event recorded after the copy out of it.
struct PinnedSlot {
    host: *mut u8,
    capacity: usize,
    copied: cudarc::driver::CudaEvent,
    in_flight: bool,
}

// SAFETY: the pinned pointer is only touched under the staging mutex.
unsafe impl Send for PinnedSlot {}

#[derive(Default)]
pub(crate) struct Staging {
    slots: Vec<PinnedSlot>,
    next: usize,
    /// Pinned sources of copies captured in a CUDA graph: each replay copies from them again, so
    /// they belong to the graph and are never rewritten (only constants, such as the backward
    /// pass's seed of ones, may be uploaded by a captured step).
    graph_sources: Vec<*mut u8>,
}

// SAFETY: the pinned pointers are only touched under the staging mutex.
unsafe impl Send for Staging {}

impl Staging {
    /// Frees the sources of a destroyed graph's copies.
    pub(crate) fn release_graph(&mut self) -> Result<()> {
        for host in self.graph_sources.drain(..) {
            // SAFETY: the graph reading it has been destroyed after its last launch completed.
            unsafe { cudarc::driver::result::free_host(host.cast()) }.map_err(|e| driver_err("cuMemFreeHost", e))?;
        }
        Ok(())
    }

    /// Copies captured so far.
    pub(crate) fn graph_uploads(&self) -> usize {
        self.graph_sources.len()
    }

    /// Copies `bytes` into the next pinned slot and from there to `dst` on the stream.
    fn copy(&mut self, be: &super::Backend, bytes: &[u8], dst: u64) -> Result<()> {
        if be.pool.capturing() {
            // SAFETY: a plain page-locked allocation, freed by `release_graph`.
            let host: *mut u8 = unsafe { cudarc::driver::result::malloc_host(bytes.len(), 0) }
                .map_err(|e| driver_err("cuMemHostAlloc during capture", e))?
                .cast();
            self.graph_sources.push(host);
            // SAFETY: `host` holds bytes.len() bytes; the copy node reads it on every replay.
            let src = unsafe { std::slice::from_raw_parts_mut(host, bytes.len()) };
            src.copy_from_slice(bytes);
            // SAFETY: as in the ring path below.
            return unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, be.stream.cu_stream()) }
                .map_err(|e| driver_err("copy to GPU", e));
        }
        if self.slots.len() < STAGING_SLOTS {
            let copied = be.ctx.new_event(None).map_err(|e| driver_err("creating an event", e))?;
            self.slots.push(PinnedSlot { host: std::ptr::null_mut(), capacity: 0, copied, in_flight: false });
        }
        let i = self.next;
        self.next = (self.next + 1) % STAGING_SLOTS;
        let slot = &mut self.slots[i];
        if slot.in_flight && !slot.copied.is_complete() {
            host_wait(|| slot.copied.synchronize())?;
        }
        slot.in_flight = false;
        if slot.capacity < bytes.len() {
            if !slot.host.is_null() {
                // SAFETY: the slot's last copy has completed (waited for above).
                unsafe { cudarc::driver::result::free_host(slot.host.cast()) }.map_err(|e| driver_err("cuMemFreeHost", e))?;
                slot.host = std::ptr::null_mut();
                slot.capacity = 0;
            }
            let capacity = bytes.len().next_power_of_two();
            // SAFETY: a plain page-locked allocation, freed above or kept for the process.
            slot.host = unsafe { cudarc::driver::result::malloc_host(capacity, 0) }
                .map_err(|e| driver_err(&format!("cuMemHostAlloc of {capacity} bytes"), e))?
                .cast();
            slot.capacity = capacity;
        }
        // SAFETY: the slot holds `capacity >= bytes.len()` bytes and no copy reads it any more.
        let host = unsafe { std::slice::from_raw_parts_mut(slot.host, bytes.len()) };
        host.copy_from_slice(bytes);
        // SAFETY: `dst` is a live device buffer of at least `bytes.len()` bytes (checked by the
        // caller); the pinned source stays untouched until `copied` completes.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, be.stream.cu_stream()) }.map_err(|e| driver_err("copy to GPU", e))?;
        slot.copied.record(&be.stream).map_err(|e| driver_err("recording an event", e))?;
        slot.in_flight = true;
        Ok(())
    }
}

/// A device buffer of `len` values of `elem` bytes each (4: f32, or i32 for labels; 2: bf16),
/// holding a pool block.
pub struct CudaBuffer {
    block: Option<CudaSlice<u8>>,
    ptr: u64,
    len: usize,
    elem: usize,
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if let (Some(block), Some(pool)) = (self.block.take(), pool()) {
            pool.give_back(block, self.ptr);
        }
    }
}

impl CudaBuffer {
    /// An uninitialised buffer of `len` 4-byte values.
    pub(crate) fn alloc(len: usize) -> Result<CudaBuffer> {
        CudaBuffer::alloc_elems(len, 4)
    }

    /// An uninitialised buffer of `len` values of `elem` bytes.
    pub(crate) fn alloc_elems(len: usize, elem: usize) -> Result<CudaBuffer> {
        // Kernels index with 32-bit ints; every size they see is bounded by some buffer's length.
        if len > i32::MAX as usize {
            return Err(Error::Cuda(format!("tensor of {len} elements exceeds the kernels' 2^31 element limit")));
        }
        let be = backend()?;
        let block = be.pool.take(&be.stream, len * elem)?;
        let (ptr, _) = block.device_ptr(&be.stream);
        Ok(CudaBuffer { block: Some(block), ptr, len, elem })
    }

    fn block(&self) -> &CudaSlice<u8> {
        self.block.as_ref().expect("a live buffer holds its block until dropped")
    }

    fn block_mut(&mut self) -> &mut CudaSlice<u8> {
        self.block.as_mut().expect("a live buffer holds its block until dropped")
    }

    fn upload(bytes: &[u8], elem: usize) -> Result<CudaBuffer> {
        let buf = CudaBuffer::alloc_elems(bytes.len() / elem, elem)?;
        buf.write_bytes(bytes)?;
        Ok(buf)
    }

    /// Overwrites the buffer's first bytes with `bytes`, in stream order and without waiting for
    /// the GPU; the address stays the same (static inputs of a CUDA graph).
    pub(crate) fn write_bytes(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.len * self.elem {
            return Err(Error::Cuda(format!("writing {} bytes into a buffer of {}", bytes.len(), self.len * self.elem)));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let be = backend()?;
        be.ctx.bind_to_thread().map_err(|e| driver_err("binding the context", e))?;
        if bytes.len() > STAGED_MAX_BYTES && !be.pool.capturing() {
            // Weights and other one-off uploads too large to keep a pinned copy of; from pageable
            // memory the call returns once `bytes` has been read.
            // SAFETY: the buffer holds at least `bytes.len()` bytes (checked above).
            return unsafe { cudarc::driver::result::memcpy_htod_async(self.ptr, bytes, be.stream.cu_stream()) }
                .map_err(|e| driver_err("copy to GPU", e));
        }
        lock(&be.staging).copy(be, bytes, self.ptr)
    }

    /// As `write_bytes`, for f32 or i32 values.
    pub(crate) fn write<T: bytemuck::Pod>(&self, values: &[T]) -> Result<()> {
        self.write_bytes(bytemuck::cast_slice(values))
    }

    pub fn from_host(data: &[f32]) -> Result<CudaBuffer> {
        CudaBuffer::upload(bytemuck::cast_slice(data), 4)
    }

    pub(crate) fn from_host_i32(data: &[i32]) -> Result<CudaBuffer> {
        CudaBuffer::upload(bytemuck::cast_slice(data), 4)
    }

    /// A buffer of bf16 values given as their bit patterns.
    pub(crate) fn from_host_u16(data: &[u16]) -> Result<CudaBuffer> {
        CudaBuffer::upload(bytemuck::cast_slice(data), 2)
    }

    /// Copies the raw bytes into `out` (whose length is the buffer's byte size), after all work
    /// submitted so far.
    fn download(&self, out: &mut [u8]) -> Result<()> {
        if !out.is_empty() {
            let be = backend()?;
            be.stream.memcpy_dtoh(&self.block().slice(..out.len()), out).map_err(|e| driver_err("copy from GPU", e))?;
            host_wait(|| be.stream.synchronize())?;
        }
        Ok(())
    }

    /// Copies 4-byte values to the host, after all work submitted so far.
    pub fn to_host(&self) -> Result<Vec<f32>> {
        if self.elem != 4 {
            return Err(Error::Cuda(format!("to_host: buffer holds {}-byte values, not f32", self.elem)));
        }
        let mut out = vec![0f32; self.len];
        self.download(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// Copies 2-byte values (bf16 bit patterns) to the host.
    pub(crate) fn to_host_u16(&self) -> Result<Vec<u16>> {
        if self.elem != 2 {
            return Err(Error::Cuda(format!("to_host_u16: buffer holds {}-byte values, not bf16", self.elem)));
        }
        let mut out = vec![0u16; self.len];
        self.download(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    pub fn try_clone(&self) -> Result<CudaBuffer> {
        let mut out = CudaBuffer::alloc_elems(self.len, self.elem)?;
        if self.len > 0 {
            let be = backend()?;
            let n = self.len * self.elem;
            be.stream
                .memcpy_dtod(&self.block().slice(..n), &mut out.block_mut().slice_mut(..n))
                .map_err(|e| driver_err("device copy", e))?;
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes per value.
    pub fn elem_bytes(&self) -> usize {
        self.elem
    }

    /// The device address of the first value.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{batchnorm as bn, conv, elementwise as ew, linear, loss};
    use crate::tensor::{Device, Tensor};

    /// A forward and backward pass of a small conv net plus an Adam step, all on the GPU.
    fn training_step(params: &mut [Tensor], moments: &mut [Tensor]) -> Result<()> {
        let mut rng = crate::rng::Rng::new(0);
        let x = Tensor::randn(&[8, 3, 16, 8], 1.0, &mut rng).to_device(Device::Cuda)?;
        let cfg = conv::Conv2dCfg::new(2, 1, 1);
        let h = conv::conv2d_forward(&x, &params[0], None, cfg)?;
        let (h, stats) = bn::batchnorm_forward_train(&h, &params[1], &params[2], bn::BN_EPS)?;
        let r = ew::relu_forward(&h)?;
        let f = r.reshape(&[8, 16 * 8 * 4])?;
        let logits = linear::linear_forward(&f, &params[3], None)?;
        let labels = [0, 1, 2, 3, 0, 1, 2, 3];
        let l = loss::cross_entropy_label_smooth_forward(&logits, &labels, 0.1)?;
        let dl = loss::cross_entropy_label_smooth_backward(&Tensor::ones(&[1], Device::Cuda)?, &logits, &labels, 0.1)?;
        let (df, dw3, _) = linear::linear_backward(&dl, &f, &params[3])?;
        let dh = ew::relu_backward(&df.reshape(r.shape())?, &r)?;
        let (dh, dg, db) = bn::batchnorm_backward_train(&dh, &h, &params[1], &stats)?;
        let dw0 = conv::conv2d_backward_filter(&dh, &x, params[0].shape(), cfg)?;
        for (i, g) in [dw0, dg, db, dw3].iter().enumerate() {
            let (m, v) = moments.split_at_mut(4);
            crate::cuda::optim::adam_update(&mut params[i], g, &mut m[i], &mut v[i], 1e-3, 0.9, 0.999, 1e-8, 5e-4, 1)?;
        }
        l.to_vec()?;
        Ok(())
    }

    #[test]
    fn steady_state_step_makes_no_device_allocation() {
        if !crate::testing::cuda_or_skip("steady_state_step_makes_no_device_allocation") {
            return;
        }
        let mut rng = crate::rng::Rng::new(1);
        let shapes: [&[usize]; 4] = [&[16, 3, 3, 3], &[16], &[16], &[4, 512]];
        let mut params: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(s, 0.1, &mut rng).to_device(Device::Cuda).unwrap()).collect();
        let mut moments: Vec<Tensor> = shapes.iter().chain(shapes.iter()).map(|s| Tensor::zeros(s, Device::Cuda).unwrap()).collect();
        training_step(&mut params, &mut moments).unwrap();
        let first = memory_stats();
        reset_peak_memory();
        for _ in 0..3 {
            training_step(&mut params, &mut moments).unwrap();
        }
        let later = memory_stats();
        assert_eq!(later.device_allocations, first.device_allocations, "a repeated step allocated device memory");
        assert_eq!(later.in_use_bytes, first.in_use_bytes, "a step leaked buffers");
        assert!(later.peak_bytes > later.in_use_bytes, "the step's temporaries do not show in the peak");
        assert_eq!(peak_memory_bytes(), later.peak_bytes);
        // A fresh, larger buffer raises the peak by at least its size.
        let before = peak_memory_bytes();
        let big = CudaBuffer::alloc(before / 4 + 1_000_000).unwrap();
        assert!(peak_memory_bytes() >= later.in_use_bytes + big.len() * 4);
    }

    #[test]
    fn buckets_round_up_with_bounded_waste() {
        assert_eq!(bucket(0), 512);
        assert_eq!(bucket(4), 512);
        assert_eq!(bucket(513), 1024);
        assert_eq!(bucket(1 << 20), 1 << 20);
        assert_eq!(bucket((1 << 20) + 1), (1 << 20) + (1 << 18));
        for b in [3usize << 20, 5_000_000, 123_456_789] {
            let s = bucket(b);
            assert!(s >= b && (s - b) * 4 <= b, "{b} -> {s}");
            assert_eq!(bucket(s), s, "a bucket size maps to itself");
        }
    }
}
