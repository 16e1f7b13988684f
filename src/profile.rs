//! Opt-in wall-time profile per op family, split into forward and backward.
//!
//! Every public op in `crate::ops` opens a `scope` of its family; the tape's backward pass marks its
//! thread as being in the backward phase. Only the outermost scope on a thread counts, so an op
//! built from other ops (a conv adding its bias) is charged once, to the outer family.
//!
//! Off (the default) a scope costs one relaxed atomic load. On, each outermost scope synchronises
//! the GPU stream at its start and end, so the time of asynchronous CUDA work lands on the op that
//! queued it; that serialises host and device, which is why throughput is never measured with
//! profiling on.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Conv,
    BatchNorm,
    Pool,
    Elementwise,
    Linear,
    Attention,
    Loss,
    Optim,
}

impl Family {
    pub const ALL: [Family; 8] = [
        Family::Conv,
        Family::BatchNorm,
        Family::Pool,
        Family::Elementwise,
        Family::Linear,
        Family::Attention,
        Family::Loss,
        Family::Optim,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Conv => "conv",
            Family::BatchNorm => "batchnorm",
            Family::Pool => "pool",
            Family::Elementwise => "elementwise",
            Family::Linear => "linear",
            Family::Attention => "attention",
            Family::Loss => "loss",
            Family::Optim => "optim",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Forward,
    Backward,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
        }
    }
}

/// Accumulated time and call count of one (family, phase).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timing {
    pub time: Duration,
    pub calls: u64,
}

/// Totals since the last `reset`, indexed [family][phase].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    cells: [[Timing; 2]; 8],
}

impl Profile {
    pub fn get(&self, family: Family, phase: Phase) -> Timing {
        self.cells[family as usize][phase as usize]
    }

    /// Time of every family and phase together.
    pub fn total(&self) -> Duration {
        self.cells.iter().flatten().map(|c| c.time).sum()
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Profile> = Mutex::new(Profile { cells: [[Timing { time: Duration::ZERO, calls: 0 }; 2]; 8] });

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static PHASE: Cell<Phase> = const { Cell::new(Phase::Forward) };
}

pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn reset() {
    *crate::cuda::lock(&TOTALS) = Profile::default();
}

pub fn snapshot() -> Profile {
    crate::cuda::lock(&TOTALS).clone()
}

/// An open timing scope; it records on drop.
pub struct Scope(ScopeState);

enum ScopeState {
    Off,
    Nested,
    Outer { family: Family, phase: Phase, start: Instant },
}

/// Opens a scope for `family` (a no-op unless profiling is on and no scope is open on this thread).
#[inline]
pub fn scope(family: Family) -> Scope {
    if !is_enabled() {
        return Scope(ScopeState::Off);
    }
    if DEPTH.with(|d| d.replace(d.get() + 1)) > 0 {
        return Scope(ScopeState::Nested);
    }
    sync_device();
    Scope(ScopeState::Outer { family, phase: PHASE.with(Cell::get), start: Instant::now() })
}

impl Drop for Scope {
    fn drop(&mut self) {
        if matches!(self.0, ScopeState::Off) {
            return;
        }
        if let ScopeState::Outer { family, phase, start } = self.0 {
            sync_device();
            let dt = start.elapsed();
            let mut t = crate::cuda::lock(&TOTALS);
            let c = &mut t.cells[family as usize][phase as usize];
            c.time += dt;
            c.calls += 1;
        }
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Marks the current thread as running a backward pass until the guard drops.
pub struct PhaseGuard {
    prev: Phase,
}

pub fn backward_phase() -> PhaseGuard {
    PhaseGuard { prev: PHASE.with(|p| p.replace(Phase::Backward)) }
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        PHASE.with(|p| p.set(self.prev));
    }
}

/// Waits for queued GPU work, if the CUDA backend is up; errors are left for the ops to report.
fn sync_device() {
    let _ = crate::cuda::synchronize();
}
