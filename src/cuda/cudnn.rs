//! Convolutions through cuDNN's legacy API: forward, backward-data and backward-filter, grouped and
//! depthwise via the group count. cuDNN handles may not be shared between threads, so each thread
//! keeps its own handle and its own plans: descriptors plus the algorithm and workspace size per
//! direction, built once per (input shape, weight shape, config, dtype). In f32 the math is
//! FMA-only (no TF32); in bf16 (x, w, y and their gradients bf16, f32 compute type) tensor cores
//! are allowed, since their products of bf16 values are exact and they accumulate in f32. FFT and
//! Winograd algorithms are avoided in both, so that results match the CPU reference (f32: ~1e-6;
//! bf16: within the final rounding; there deterministic algorithms are preferred, since atomics on
//! a bf16 output could round more than once). An algorithm that refuses its first call gives way
//! to the next one the heuristics offered.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cudnn::{result, sys};

use super::{backend, CudaBuffer};
use crate::error::{Error, Result};
use crate::ops::conv::Conv2dCfg;
use crate::tensor::DType;

/// What a raw cuDNN call returns.
type CallResult = std::result::Result<(), result::CudnnError>;

fn err(what: &str, e: result::CudnnError) -> Error {
    Error::Cuda(format!("cuDNN {what}: {e:?}"))
}

struct Handle(sys::cudnnHandle_t);
struct TensorDesc(sys::cudnnTensorDescriptor_t);
struct FilterDesc(sys::cudnnFilterDescriptor_t);
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

// SAFETY (all four drops): each raw object was created by its constructor below and is destroyed
// once; errors at teardown have nowhere to go.
impl Drop for Handle {
    fn drop(&mut self) {
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}
impl Drop for TensorDesc {
    fn drop(&mut self) {
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}
impl Drop for FilterDesc {
    fn drop(&mut self) {
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}
impl Drop for ConvDesc {
    fn drop(&mut self) {
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

fn dims4(s: &[usize]) -> [i32; 4] {
    [s[0] as i32, s[1] as i32, s[2] as i32, s[3] as i32]
}

/// cuDNN's data type for a tensor or filter of `dtype`.
fn data_type(dtype: DType) -> sys::cudnnDataType_t {
    match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
    }
}

/// The math types an algorithm may use for `dtype`, preferred first: FMA only for f32 (tensor-op
/// math would mean TF32); for bf16 tensor cores too, but never a down-conversion.
fn allowed_math(dtype: DType) -> &'static [sys::cudnnMathType_t] {
    use sys::cudnnMathType_t as M;
    match dtype {
        DType::F32 => &[M::CUDNN_FMA_MATH],
        DType::BF16 => &[M::CUDNN_TENSOR_OP_MATH, M::CUDNN_DEFAULT_MATH, M::CUDNN_FMA_MATH],
    }
}

fn tensor_desc(s: &[usize], dtype: DType) -> Result<TensorDesc> {
    let d = TensorDesc(result::create_tensor_descriptor().map_err(|e| err("create tensor descriptor", e))?);
    // SAFETY: a fresh descriptor.
    unsafe { result::set_tensor4d_descriptor(d.0, sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, data_type(dtype), dims4(s)) }
        .map_err(|e| err(&format!("tensor descriptor {s:?}"), e))?;
    Ok(d)
}

/// The algorithms of one direction that cuDNN's heuristics offered, in the order they are tried,
/// each with its math type, and the one in use. The heuristics' ranking is not a promise that the
/// algorithm runs: an algorithm they report as successful may still refuse the call
/// (CUDNN_STATUS_NOT_SUPPORTED, most often with bf16 data), so until one has run the next is tried,
/// as PyTorch does.
struct Choices<A> {
    cands: Vec<(A, sys::cudnnMathType_t)>,
    /// Index into `cands` of the algorithm in use.
    at: usize,
    /// Its workspace size in bytes.
    ws: usize,
    /// Whether it has run once (later failures are errors, not reasons to switch).
    proven: bool,
}

/// The descriptors of one convolution.
struct Descs {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

/// Descriptors of one convolution and the algorithm chosen for each direction used so far.
struct Plan {
    d: Descs,
    fwd: Option<Choices<sys::cudnnConvolutionFwdAlgo_t>>,
    bwd_data: Option<Choices<sys::cudnnConvolutionBwdDataAlgo_t>>,
    bwd_filter: Option<Choices<sys::cudnnConvolutionBwdFilterAlgo_t>>,
}

impl Plan {
    fn new(x: &[usize], w: &[usize], cfg: Conv2dCfg, dtype: DType) -> Result<Plan> {
        let y = crate::ops::conv::conv2d_output_shape(x, w, cfg)?;
        let wd = FilterDesc(result::create_filter_descriptor().map_err(|e| err("create filter descriptor", e))?);
        let conv = ConvDesc(result::create_convolution_descriptor().map_err(|e| err("create convolution descriptor", e))?);
        let (p, s) = (cfg.padding as i32, cfg.stride as i32);
        // SAFETY: fresh descriptors; the shapes were validated by conv2d_output_shape.
        unsafe {
            result::set_filter4d_descriptor(wd.0, data_type(dtype), sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, dims4(w))
                .map_err(|e| err(&format!("filter descriptor {w:?}"), e))?;
            result::set_convolution2d_descriptor(
                conv.0,
                p,
                p,
                s,
                s,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                // The compute type: f32 accumulation for bf16 data too.
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| err(&format!("convolution descriptor {cfg:?}"), e))?;
            result::set_convolution_group_count(conv.0, cfg.groups as i32).map_err(|e| err("set_group_count", e))?;
        }
        let d = Descs { x: tensor_desc(x, dtype)?, w: wd, y: tensor_desc(&y, dtype)?, conv };
        Ok(Plan { d, fwd: None, bwd_data: None, bwd_filter: None })
    }
}

/// Largest workspace an algorithm may ask for.
const MAX_WORKSPACE: usize = 1 << 30;

/// A successful heuristic result: algorithm, math type, workspace bytes, whether deterministic.
type Found<A> = (A, sys::cudnnMathType_t, usize, bool);

/// The successful heuristic results, best first, put in the order to try them: first those that
/// use a math type allowed for `dtype`, are not FFT/Winograd variants (`inexact`), need a bounded
/// workspace and, for bf16, are deterministic (the others add into the output with atomics, which
/// for a bf16 output could round at every addition instead of once); then the others (still better
/// than no convolution at all), each group in cuDNN's ranking.
fn candidates<A: Copy + PartialEq>(results: &[Found<A>], inexact: &[A], dtype: DType) -> Vec<(A, sys::cudnnMathType_t)> {
    let allowed = allowed_math(dtype);
    let exact =
        |&(a, m, ws, det): &Found<A>| allowed.contains(&m) && !inexact.contains(&a) && ws <= MAX_WORKSPACE && (det || dtype == DType::F32);
    let (first, rest): (Vec<_>, Vec<_>) = results.iter().partition(|r| exact(r));
    first.into_iter().chain(rest).map(|&(a, m, _, _)| (a, m)).collect()
}

/// The successful entries of a heuristic query's `count` perf results, as `Found` tuples.
macro_rules! successful {
    ($perf:expr, $count:expr) => {
        $perf[..$count as usize]
            .iter()
            .filter(|p| p.status.result().is_ok())
            .map(|p| (p.algo, p.mathType, p.memory, p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC))
            .collect::<Vec<_>>()
    };
}

/// Runs `exec(algo, math, workspace bytes)` with the direction's algorithm in use; until one has
/// run, an algorithm whose workspace size or call fails gives way to the next candidate. The error
/// names every algorithm tried.
fn run_choice<A: Copy + std::fmt::Debug>(
    what: &str,
    ch: &mut Choices<A>,
    mut ws_size: impl FnMut(A, sys::cudnnMathType_t) -> Result<usize>,
    mut exec: impl FnMut(A, sys::cudnnMathType_t, usize) -> Result<()>,
) -> Result<()> {
    if ch.proven {
        let (algo, math) = ch.cands[ch.at];
        return exec(algo, math, ch.ws);
    }
    let mut failures = Vec::new();
    for i in ch.at..ch.cands.len() {
        let (algo, math) = ch.cands[i];
        match ws_size(algo, math).and_then(|ws| exec(algo, math, ws).map(|()| ws)) {
            Ok(ws) => {
                *ch = Choices { cands: std::mem::take(&mut ch.cands), at: i, ws, proven: true };
                return Ok(());
            }
            Err(e) => failures.push(format!("{algo:?}: {e}")),
        }
    }
    if failures.is_empty() {
        return Err(Error::Cuda(format!("cuDNN found no algorithm for the {what}")));
    }
    Err(Error::Cuda(format!("cuDNN: no algorithm ran the {what}; tried {}", failures.join("; "))))
}

fn set_math(conv: &ConvDesc, math: sys::cudnnMathType_t) -> Result<()> {
    // SAFETY: a live descriptor.
    unsafe { result::set_convolution_math_type(conv.0, math) }.map_err(|e| err("set_math_type", e))
}

struct State {
    handle: Handle,
    plans: HashMap<([usize; 4], [usize; 4], Conv2dCfg, DType), Plan>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's handle and the plan for the convolution, creating them on first use.
fn with_plan<R>(
    x: &[usize],
    w: &[usize],
    cfg: Conv2dCfg,
    dtype: DType,
    f: impl FnOnce(sys::cudnnHandle_t, &mut Plan) -> Result<R>,
) -> Result<R> {
    let be = backend()?;
    be.ctx.bind_to_thread().map_err(|e| super::driver_err("binding the context", e))?;
    STATE.with(|cell| {
        let mut state = cell.borrow_mut();
        if state.is_none() {
            let handle = Handle(result::create_handle().map_err(|e| err("create handle", e))?);
            // SAFETY: a live handle and the engine's stream.
            unsafe { result::set_stream(handle.0, be.stream.cu_stream() as _) }.map_err(|e| err("set_stream", e))?;
            *state = Some(State { handle, plans: HashMap::new() });
        }
        let st = state.as_mut().expect("created above");
        let key = ([x[0], x[1], x[2], x[3]], [w[0], w[1], w[2], w[3]], cfg, dtype);
        let plan = match st.plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Plan::new(x, w, cfg, dtype)?),
        };
        f(st.handle.0, plan)
    })
}

/// Workspace for one call, from the caching allocator.
fn workspace(bytes: usize) -> Result<Option<CudaBuffer>> {
    if bytes == 0 {
        Ok(None)
    } else {
        CudaBuffer::alloc(bytes.div_ceil(4)).map(Some)
    }
}

fn ws_ptr(ws: &Option<CudaBuffer>) -> *mut c_void {
    ws.as_ref().map_or(std::ptr::null_mut(), |b| b.ptr() as *mut c_void)
}

const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;

fn alpha_beta() -> (*const c_void, *const c_void) {
    (&ONE as *const f32 as *const c_void, &ZERO as *const f32 as *const c_void)
}

/// One direction of a convolution: its algorithm type and its three cuDNN calls. Each names the
/// plan's descriptors in the order the call takes them: two operands, then the output.
trait Direction {
    type Algo: Copy + PartialEq + std::fmt::Debug;
    const NAME: &'static str;
    /// The FFT and Winograd variants, which round differently from the CPU reference.
    const INEXACT: [Self::Algo; 4];
    fn choices(plan: &mut Plan) -> (&Descs, &mut Option<Choices<Self::Algo>>);
    fn find(h: sys::cudnnHandle_t, d: &Descs) -> Result<Vec<Found<Self::Algo>>>;
    fn workspace_size(h: sys::cudnnHandle_t, d: &Descs, algo: Self::Algo) -> Result<usize>;
    /// SAFETY: `ptrs` (the two operands, then the output) hold the element counts of the descriptors
    /// the call reads and writes, and `ws` holds `ws_bytes`.
    unsafe fn run(h: sys::cudnnHandle_t, d: &Descs, algo: Self::Algo, ws: *mut c_void, ws_bytes: usize, ptrs: [u64; 3]) -> CallResult;
}

/// The `Direction` of a type from its cuDNN names. The three directions' calls take the same
/// arguments in the same order: the handle, the two operands' descriptors, the convolution, the
/// output's descriptor; `($a, $b, $out)` name the plan's descriptors in that order.
macro_rules! direction {
    ($ty:ident, $name:literal, $algo:ty, $perf:ty, $count:ident, [$($inexact:ident),*], $slot:ident,
     $find:ident, $ws:ident, $run:ident, ($a:ident, $b:ident, $out:ident)) => {
        struct $ty;

        impl Direction for $ty {
            type Algo = $algo;
            const NAME: &'static str = $name;
            const INEXACT: [$algo; 4] = [$(<$algo>::$inexact),*];
            fn choices(plan: &mut Plan) -> (&Descs, &mut Option<Choices<$algo>>) {
                (&plan.d, &mut plan.$slot)
            }
            fn find(h: sys::cudnnHandle_t, d: &Descs) -> Result<Vec<Found<$algo>>> {
                // SAFETY: cuDNN's perf structs are plain C data for which all-zero bits are valid.
                let mut perf: Vec<$perf> = (0..<$algo>::$count as u32).map(|_| unsafe { std::mem::zeroed() }).collect();
                let mut count = 0;
                // SAFETY: live descriptors; perf holds as many entries as asked for.
                unsafe { result::$find(h, d.$a.0, d.$b.0, d.conv.0, d.$out.0, perf.len() as i32, &mut count, perf.as_mut_ptr()) }
                    .map_err(|e| err(concat!($name, " algorithm"), e))?;
                Ok(successful!(perf, count))
            }
            fn workspace_size(h: sys::cudnnHandle_t, d: &Descs, algo: $algo) -> Result<usize> {
                // SAFETY: live descriptors.
                unsafe { result::$ws(h, d.$a.0, d.$b.0, d.conv.0, d.$out.0, algo) }
                    .map_err(|e| err(concat!($name, " workspace size"), e))
            }
            unsafe fn run(h: sys::cudnnHandle_t, d: &Descs, algo: $algo, ws: *mut c_void, ws_bytes: usize, ptrs: [u64; 3]) -> CallResult {
                let (alpha, beta) = alpha_beta();
                let [a, b, out] = ptrs.map(|p| p as *mut c_void);
                result::$run(h, alpha, d.$a.0, a, d.$b.0, b, d.conv.0, algo, ws, ws_bytes, beta, d.$out.0, out)
            }
        }
    };
}

direction!(
    Forward,
    "forward",
    sys::cudnnConvolutionFwdAlgo_t,
    sys::cudnnConvolutionFwdAlgoPerf_t,
    CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
    [
        CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED
    ],
    fwd,
    get_convolution_forward_algorithm,
    get_convolution_forward_workspace_size,
    convolution_forward,
    (x, w, y)
);
direction!(
    BackwardData,
    "backward-data",
    sys::cudnnConvolutionBwdDataAlgo_t,
    sys::cudnnConvolutionBwdDataAlgoPerf_t,
    CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT,
    [
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED
    ],
    bwd_data,
    get_convolution_backward_data_algorithm,
    get_convolution_backward_data_workspace_size,
    convolution_backward_data,
    (w, y, x)
);
direction!(
    BackwardFilter,
    "backward-filter",
    sys::cudnnConvolutionBwdFilterAlgo_t,
    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
    CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT,
    [
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED
    ],
    bwd_filter,
    get_convolution_backward_filter_algorithm,
    get_convolution_backward_filter_workspace_size,
    convolution_backward_filter,
    (x, y, w)
);

/// Runs direction `D` of the convolution on `ptrs` (its two operands, then its output), choosing
/// the algorithm on the first call for this plan.
fn convolve<D: Direction>(x_shape: &[usize], w_shape: &[usize], cfg: Conv2dCfg, dtype: DType, ptrs: [u64; 3]) -> Result<()> {
    with_plan(x_shape, w_shape, cfg, dtype, |h, plan| {
        let (d, slot) = D::choices(plan);
        if slot.is_none() {
            set_math(&d.conv, allowed_math(dtype)[0])?;
            *slot = Some(Choices { cands: candidates(&D::find(h, d)?, &D::INEXACT, dtype), at: 0, ws: 0, proven: false });
        }
        let what = format!("convolution {} x {x_shape:?} w {w_shape:?} {cfg:?} {dtype:?}", D::NAME);
        let choices = slot.as_mut().expect("set above");
        run_choice(
            &what,
            choices,
            |algo, math| {
                set_math(&d.conv, math)?;
                D::workspace_size(h, d, algo)
            },
            |algo, math, ws_bytes| {
                set_math(&d.conv, math)?;
                let ws = workspace(ws_bytes)?;
                // SAFETY: the callers pass buffers of the plan's shapes and dtype; ws holds ws_bytes.
                unsafe { D::run(h, d, algo, ws_ptr(&ws), ws_bytes, ptrs) }.map_err(|e| err(&what, e))
            },
        )
    })
}

/// y = conv(x, w) (no bias), all NCHW/OIHW device buffers of `dtype` elements.
pub(crate) fn conv2d_forward(x: u64, w: u64, y: u64, x_shape: &[usize], w_shape: &[usize], cfg: Conv2dCfg, dtype: DType) -> Result<()> {
    convolve::<Forward>(x_shape, w_shape, cfg, dtype, [x, w, y])
}

/// dx = gradient of the convolution with respect to its input.
pub(crate) fn conv2d_backward_data(
    dy: u64,
    w: u64,
    dx: u64,
    x_shape: &[usize],
    w_shape: &[usize],
    cfg: Conv2dCfg,
    dtype: DType,
) -> Result<()> {
    convolve::<BackwardData>(x_shape, w_shape, cfg, dtype, [w, dy, dx])
}

/// dw = gradient of the convolution with respect to its weight.
pub(crate) fn conv2d_backward_filter(
    dy: u64,
    x: u64,
    dw: u64,
    x_shape: &[usize],
    w_shape: &[usize],
    cfg: Conv2dCfg,
    dtype: DType,
) -> Result<()> {
    convolve::<BackwardFilter>(x_shape, w_shape, cfg, dtype, [x, dy, dw])
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnConvolutionFwdAlgo_t as A;
    use sys::cudnnMathType_t as M;

    const INEXACT: [A; 2] = [A::CUDNN_CONVOLUTION_FWD_ALGO_FFT, A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD];

    /// Heuristic results, best first: a Winograd, a TF32 (tensor-op) GEMM, a GEMM asking for too
    /// much workspace, a non-deterministic one, then two exact ones.
    fn results() -> Vec<Found<A>> {
        vec![
            (A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD, M::CUDNN_FMA_MATH, 0, true),
            (A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, M::CUDNN_TENSOR_OP_MATH, 64, true),
            (A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM, M::CUDNN_FMA_MATH, MAX_WORKSPACE + 1, true),
            (A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING, M::CUDNN_FMA_MATH, 0, false),
            (A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, M::CUDNN_FMA_MATH, 0, true),
            (A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT, M::CUDNN_DEFAULT_MATH, 0, true),
        ]
    }

    #[test]
    fn exact_candidates_come_first_in_cudnns_order_then_the_rest() {
        let algos = |dtype| candidates(&results(), &INEXACT, dtype).into_iter().map(|(a, _)| a).collect::<Vec<_>>();
        // f32: FMA math only, so the tensor-op (TF32) and default-math ones are fallbacks, while
        // determinism does not matter. (FFT_TILING stands in for a non-deterministic algorithm
        // that is not in this test's inexact list.)
        assert_eq!(
            algos(DType::F32),
            [
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            ]
        );
        // bf16: tensor cores allowed, the non-deterministic one a fallback.
        assert_eq!(
            algos(DType::BF16),
            [
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
                A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            ]
        );
        // The math type travels with its algorithm.
        assert_eq!(candidates(&results(), &INEXACT, DType::BF16)[0].1, M::CUDNN_TENSOR_OP_MATH);
    }

    fn choices(algos: &[A]) -> Choices<A> {
        Choices { cands: algos.iter().map(|&a| (a, M::CUDNN_FMA_MATH)).collect(), at: 0, ws: 0, proven: false }
    }

    #[test]
    fn an_algorithm_that_refuses_the_call_gives_way_to_the_next_until_one_has_run() {
        let (gemm, direct) = (A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT);
        let mut ch = choices(&[gemm, direct]);
        let mut calls = Vec::new();
        // The first refuses (as CUDNN_STATUS_NOT_SUPPORTED would); the second runs with its own
        // workspace size.
        let ws_size = |a: A, _| Ok(if a == gemm { 8 } else { 16 });
        run_choice("test conv", &mut ch, ws_size, |a, _, ws| {
            calls.push((a, ws));
            if a == gemm {
                Err(Error::Cuda("not supported".into()))
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert_eq!(calls, [(gemm, 8), (direct, 16)]);
        assert!(ch.proven && ch.at == 1 && ch.ws == 16);
        // Later calls go straight to the proven one, and its failure is an error, not a switch.
        calls.clear();
        run_choice("test conv", &mut ch, ws_size, |a, _, ws| {
            calls.push((a, ws));
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, [(direct, 16)]);
        let e = run_choice("test conv", &mut ch, ws_size, |_, _, _| Err(Error::Cuda("launch failed".into()))).unwrap_err();
        assert!(e.to_string().contains("launch failed"), "{e}");
        assert!(ch.proven && ch.at == 1);
    }

    #[test]
    fn when_no_algorithm_runs_the_error_names_each_one_tried() {
        let (gemm, direct) = (A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT);
        let mut ch = choices(&[gemm, direct]);
        // One fails at its workspace query, the other at the call.
        let e = run_choice(
            "test conv",
            &mut ch,
            |a, _| if a == gemm { Err(Error::Cuda("ws query".into())) } else { Ok(0) },
            |_, _, _| Err(Error::Cuda("not supported".into())),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("test conv") && e.contains("IMPLICIT_GEMM") && e.contains("ws query"), "{e}");
        assert!(e.contains("DIRECT") && e.contains("not supported"), "{e}");
        assert!(!ch.proven);
        let e = run_choice("test conv", &mut choices(&[]), |_, _| Ok(0), |_, _, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains("no algorithm") && e.contains("test conv"), "{e}");
    }
}
