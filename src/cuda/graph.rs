//! A training step captured once in a CUDA graph and replayed (`--cuda-graph`).
//!
//! The step (forward, loss, backward, Adam) is first run eagerly (warm-up: NVRTC modules, cuDNN
//! plans, the allocator's blocks, Adam's moments all exist afterwards), then captured on the
//! engine's stream in relaxed mode (the captured step's constant uploads need pinned host memory
//! allocated during the capture) and instantiated. Device memory comes from the allocator's cache
//! only: a block the warm-up did not leave there fails the capture (see `alloc.rs`). What changes from step to step is read by the graph from device memory at fixed
//! addresses, written by the host before each launch without waiting: the images, the labels (the
//! loss kernels read the fixed label buffer, see `cuda::set_fixed_labels`), and Adam's step size
//! and bias correction (`Adam::write_hyper`). Host-side bookkeeping the graph cannot do is
//! repeated per replay: Adam's step counts and BatchNorm's num_batches_tracked (CPU counters).
//! Parameters and moments are updated in place; their addresses are checked after capture.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::{backend, lock, set_fixed_labels, write_labels, CudaBuffer};
use crate::error::{Error, Result};
use crate::optim::Adam;
use crate::params::{Kind, ParamId, ParamStore};
use crate::tensor::{Device, Storage, Tensor};

/// A step function: runs one training step on (images, labels), reading and updating the store
/// and Adam.
pub type StepFn<'a> = dyn FnMut(&mut ParamStore, &mut Adam, &Tensor, &[usize], f64) -> Result<()> + 'a;

pub struct TrainGraph {
    graph: CudaGraph,
    images: Tensor,
    labels: Arc<CudaBuffer>,
    /// CPU counters the captured step advanced, and by how much.
    counters: Vec<(ParamId, f32)>,
    /// Host-to-device copies captured (constants the step uploads).
    pub captured_uploads: usize,
}

impl Drop for TrainGraph {
    fn drop(&mut self) {
        // The graph's blocks and pinned sources go back once no replay can still read them.
        if let Ok(be) = backend() {
            let _ = super::synchronize();
            let _ = release(be);
        }
    }
}

/// Back to eager mode: the loss kernels' own labels, the graph's blocks to the shared cache, its
/// pinned upload sources freed.
fn release(be: &super::Backend) -> Result<()> {
    set_fixed_labels(None)?;
    be.pool.release_graph();
    lock(&be.staging).release_graph()
}

/// Device addresses of every parameter, buffer and Adam moment: they must not move while a graph
/// that writes them is alive.
fn addresses(store: &ParamStore, adam: &Adam) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for id in 0..store.len() {
        let t = store.get(id);
        if let Storage::Cuda(b) = t.storage() {
            out.push((store.entry(id).name.clone(), b.ptr()));
            if let Some(st) = adam.state(id) {
                for (what, m) in [("exp_avg", &st.m), ("exp_avg_sq", &st.v)] {
                    if let Storage::Cuda(b) = m.storage() {
                        out.push((format!("{what} of {}", store.entry(id).name), b.ptr()));
                    }
                }
            }
        }
    }
    out
}

fn counters(store: &ParamStore) -> Result<Vec<(ParamId, f32)>> {
    (0..store.len()).filter(|&id| store.entry(id).kind == Kind::Counter).map(|id| Ok((id, store.get(id).item()?))).collect()
}

/// The per-replay increments of the counters between two snapshots.
fn counter_steps(before: &[(ParamId, f32)], after: &[(ParamId, f32)]) -> Vec<(ParamId, f32)> {
    before.iter().zip(after).filter(|(b, a)| a.1 != b.1).map(|(b, a)| (b.0, a.1 - b.1)).collect()
}

fn add_counters(store: &mut ParamStore, steps: &[(ParamId, f32)]) -> Result<()> {
    for &(id, d) in steps {
        let v = store.get(id).item()?;
        *store.get_mut(id) = Tensor::from_vec(vec![v + d], &[])?;
    }
    Ok(())
}

impl TrainGraph {
    /// Captures `step` on the batch (images, labels) and launches it once, so that on success this
    /// call is that batch's training step. Adam must have taken at least one step (warm-up). On
    /// failure nothing was updated: the host-side state is restored and the error says why, so the
    /// caller can run the step eagerly instead.
    pub fn capture(
        store: &mut ParamStore,
        adam: &mut Adam,
        images: &Tensor,
        labels: &[usize],
        lr: f64,
        step: &mut StepFn,
    ) -> Result<TrainGraph> {
        let be = backend()?;
        crate::ensure_shape!(images.device() == Device::Cuda, "cuda_graph", "the images must be on the GPU");
        let Some(done) = adam.uniform_step() else {
            return Err(Error::msg("--cuda-graph: capture needs an eager warm-up step first (Adam has no common step count)"));
        };
        // A buffer of the graph's own (a shared one is copied by storage_mut).
        let mut static_images = images.clone();
        static_images.storage_mut()?;
        let static_labels = Arc::new(CudaBuffer::alloc(labels.len())?);
        write_labels(&static_labels, labels)?;
        adam.write_hyper(lr, done + 1)?;
        let before_counters = counters(store)?;
        let before_addresses = addresses(store, adam);
        super::synchronize()?;

        be.pool.begin_capture()?;
        set_fixed_labels(Some(static_labels.clone()))?;
        adam.set_hyper_external(true);
        let uploads_before = lock(&be.staging).graph_uploads();
        let begun = be
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| super::driver_err("cuStreamBeginCapture", e));
        let ran = begun.and_then(|_| step(store, adam, &static_images, labels, lr));
        // End the capture whatever happened, so that the stream is usable again.
        let ended =
            be.stream.end_capture(CUgraphInstantiate_flags(0)).map_err(|e| super::driver_err("cuStreamEndCapture / cuGraphInstantiate", e));
        be.pool.end_capture();
        let captured_uploads = lock(&be.staging).graph_uploads() - uploads_before;
        adam.set_hyper_external(false);
        let graph = ran.and(ended).and_then(|g| g.ok_or_else(|| Error::Cuda("the captured graph is empty".into())));
        let moved: Vec<String> =
            before_addresses.iter().zip(addresses(store, adam)).filter(|(b, a)| b.1 != a.1).map(|(b, _)| b.0.clone()).collect();
        let graph = graph.and_then(|g| {
            if moved.is_empty() {
                Ok(g)
            } else {
                Err(Error::Cuda(format!(
                    "these tensors moved during capture (copied instead of updated in place), so replays would update stale copies: {}",
                    moved.join(", ")
                )))
            }
        });
        let undo = |store: &mut ParamStore, adam: &mut Adam| -> Result<()> {
            adam.set_steps(done);
            for &(id, v) in &before_counters {
                *store.get_mut(id) = Tensor::from_vec(vec![v], &[])?;
            }
            Ok(())
        };
        let graph = match graph {
            Ok(g) => g,
            Err(e) => {
                // Nothing ran on the GPU: undo the host-side bookkeeping of the captured step.
                release(be)?;
                undo(store, adam)?;
                return Err(Error::Cuda(format!("CUDA graph capture failed: {e}")));
            }
        };
        let counters = counter_steps(&before_counters, &counters(store)?);
        let graph = TrainGraph { graph, images: static_images, labels: static_labels, counters, captured_uploads };
        let launched = graph.graph.upload().and_then(|_| graph.graph.launch());
        if let Err(e) = launched {
            drop(graph);
            undo(store, adam)?;
            return Err(super::driver_err("CUDA graph: cuGraphUpload / cuGraphLaunch", e));
        }
        Ok(graph)
    }

    /// Whether a batch of `images` values and `labels` labels can replay the graph.
    pub fn fits(&self, images: usize, labels: usize) -> bool {
        images == self.images.numel() && labels == self.labels.len()
    }

    /// Runs `f` (an eager step, say on a batch of another shape) with the loss kernels reading
    /// their own labels again instead of the graph's fixed buffer.
    pub fn run_eager<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        set_fixed_labels(None)?;
        let result = f();
        set_fixed_labels(Some(self.labels.clone()))?;
        result
    }

    /// One training step on a new batch of the captured shape: copies it into the graph's inputs,
    /// writes Adam's step size, launches, and advances the host-side counters. Never waits.
    pub fn replay(&mut self, store: &mut ParamStore, adam: &mut Adam, images: &[f32], labels: &[usize], lr: f64) -> Result<()> {
        if !self.fits(images.len(), labels.len()) {
            return Err(Error::shape(
                "cuda_graph",
                format!(
                    "the graph was captured for {} labels and images {:?}; this batch has {} labels and {} values",
                    self.labels.len(),
                    self.images.shape(),
                    labels.len(),
                    images.len()
                ),
            ));
        }
        match self.images.storage() {
            Storage::Cuda(b) => b.write(images)?,
            Storage::Cpu(_) => return Err(Error::Cuda("the graph's image buffer is not on the GPU".into())),
        }
        write_labels(&self.labels, labels)?;
        adam.advance_steps();
        let step = adam.uniform_step().ok_or_else(|| Error::msg("--cuda-graph: Adam's step counts diverged"))?;
        adam.write_hyper(lr, step)?;
        self.graph.launch().map_err(|e| super::driver_err("cuGraphLaunch", e))?;
        add_counters(store, &self.counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_steps_keep_the_counters_a_step_advanced() {
        let mut store = ParamStore::new();
        let ids: Vec<ParamId> = (0..3)
            .map(|i| store.add(format!("bn{i}.num_batches_tracked"), Tensor::zeros(&[], Device::Cpu).unwrap(), Kind::Counter).unwrap())
            .collect();
        let before = counters(&store).unwrap();
        add_counters(&mut store, &[(ids[0], 1.0), (ids[2], 1.0)]).unwrap();
        let steps = counter_steps(&before, &counters(&store).unwrap());
        assert_eq!(steps, vec![(ids[0], 1.0), (ids[2], 1.0)]);
        for _ in 0..4 {
            add_counters(&mut store, &steps).unwrap();
        }
        let got: Vec<f32> = ids.iter().map(|&id| store.get(id).item().unwrap()).collect();
        assert_eq!(got, [5.0, 0.0, 5.0]);
    }
}
