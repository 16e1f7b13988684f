//! Convolutions through cuDNN's legacy API: forward, backward-data and backward-filter, grouped and
//! depthwise via the group count. cuDNN handles may not be shared between threads, so each thread
//! keeps its own handle and its own plans: descriptors plus the algorithm and workspace size per
//! direction, built once per (input shape, weight shape, config, dtype). In f32 the math is
//! FMA-only (no TF32); in bf16 (x, w, y and their gradients bf16, f32 compute type) tensor cores
//! are allowed, since their products of bf16 values are exact and they accumulate in f32. FFT and
//! Winograd algorithms are avoided in both, so that results match the CPU reference (f32: ~1e-6;
//! bf16: within the final rounding).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cudnn::{result, sys};

use super::{backend, CudaBuffer};
use crate::error::{Error, Result};
use crate::ops::conv::Conv2dCfg;
use crate::tensor::DType;

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

/// The algorithm of one direction, its math type and workspace size in bytes.
#[derive(Clone, Copy)]
struct Choice<A> {
    algo: A,
    math: sys::cudnnMathType_t,
    ws: usize,
}

/// Descriptors of one convolution and the algorithm chosen for each direction used so far.
struct Plan {
    dtype: DType,
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
    fwd: Option<Choice<sys::cudnnConvolutionFwdAlgo_t>>,
    bwd_data: Option<Choice<sys::cudnnConvolutionBwdDataAlgo_t>>,
    bwd_filter: Option<Choice<sys::cudnnConvolutionBwdFilterAlgo_t>>,
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
        Ok(Plan { dtype, x: tensor_desc(x, dtype)?, w: wd, y: tensor_desc(&y, dtype)?, conv, fwd: None, bwd_data: None, bwd_filter: None })
    }
}

/// Largest workspace an algorithm may ask for.
const MAX_WORKSPACE: usize = 1 << 30;

/// Picks the best-ranked heuristic result that succeeded, uses a math type allowed for the plan's
/// dtype, is not an FFT/Winograd variant and needs a bounded workspace, else the best successful
/// one; returns it with its math type (set on the descriptor before each use, since the directions
/// share it).
macro_rules! pick {
    ($perf:expr, $count:expr, $inexact:expr, $dtype:expr) => {{
        let ok: Vec<_> = $perf[..$count as usize].iter().filter(|p| p.status.result().is_ok()).collect();
        let allowed = allowed_math($dtype);
        let exact = ok.iter().find(|p| allowed.contains(&p.mathType) && !$inexact.contains(&p.algo) && p.memory <= MAX_WORKSPACE);
        match exact.or(ok.first()) {
            Some(p) => Ok((p.algo, p.mathType)),
            None => Err(Error::Cuda("cuDNN found no algorithm for this convolution".into())),
        }
    }};
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

/// y = conv(x, w) (no bias), all NCHW/OIHW device buffers of `dtype` elements.
pub(crate) fn conv2d_forward(x: u64, w: u64, y: u64, x_shape: &[usize], w_shape: &[usize], cfg: Conv2dCfg, dtype: DType) -> Result<()> {
    with_plan(x_shape, w_shape, cfg, dtype, |h, p| {
        if p.fwd.is_none() {
            set_math(&p.conv, allowed_math(p.dtype)[0])?;
            let n = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
            let mut perf: Vec<sys::cudnnConvolutionFwdAlgoPerf_t> = vec![unsafe { std::mem::zeroed() }; n];
            let mut count = 0;
            // SAFETY: live descriptors; perf holds n entries.
            unsafe { result::get_convolution_forward_algorithm(h, p.x.0, p.w.0, p.conv.0, p.y.0, n as i32, &mut count, perf.as_mut_ptr()) }
                .map_err(|e| err("forward algorithm", e))?;
            use sys::cudnnConvolutionFwdAlgo_t as A;
            let inexact = [
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
                A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            ];
            let (algo, math) = pick!(perf, count, inexact, p.dtype)?;
            set_math(&p.conv, math)?;
            // SAFETY: as above.
            let ws = unsafe { result::get_convolution_forward_workspace_size(h, p.x.0, p.w.0, p.conv.0, p.y.0, algo) }
                .map_err(|e| err("forward workspace size", e))?;
            p.fwd = Some(Choice { algo, math, ws });
        }
        let Choice { algo, math, ws: ws_bytes } = p.fwd.expect("chosen above");
        set_math(&p.conv, math)?;
        let ws = workspace(ws_bytes)?;
        let (alpha, beta) = alpha_beta();
        // SAFETY: x, w, y hold the element counts of the plan's descriptors; ws holds ws_bytes.
        unsafe {
            result::convolution_forward(
                h,
                alpha,
                p.x.0,
                x as *const c_void,
                p.w.0,
                w as *const c_void,
                p.conv.0,
                algo,
                ws_ptr(&ws),
                ws_bytes,
                beta,
                p.y.0,
                y as *mut c_void,
            )
        }
        .map_err(|e| err(&format!("convolution forward x {x_shape:?} w {w_shape:?} {cfg:?} {dtype:?}"), e))
    })
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
    with_plan(x_shape, w_shape, cfg, dtype, |h, p| {
        if p.bwd_data.is_none() {
            set_math(&p.conv, allowed_math(p.dtype)[0])?;
            let n = sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as usize;
            let mut perf: Vec<sys::cudnnConvolutionBwdDataAlgoPerf_t> = vec![unsafe { std::mem::zeroed() }; n];
            let mut count = 0;
            // SAFETY: live descriptors; perf holds n entries.
            unsafe {
                result::get_convolution_backward_data_algorithm(h, p.w.0, p.y.0, p.conv.0, p.x.0, n as i32, &mut count, perf.as_mut_ptr())
            }
            .map_err(|e| err("backward-data algorithm", e))?;
            use sys::cudnnConvolutionBwdDataAlgo_t as A;
            let inexact = [
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
            ];
            let (algo, math) = pick!(perf, count, inexact, p.dtype)?;
            set_math(&p.conv, math)?;
            // SAFETY: as above.
            let ws = unsafe { result::get_convolution_backward_data_workspace_size(h, p.w.0, p.y.0, p.conv.0, p.x.0, algo) }
                .map_err(|e| err("backward-data workspace size", e))?;
            p.bwd_data = Some(Choice { algo, math, ws });
        }
        let Choice { algo, math, ws: ws_bytes } = p.bwd_data.expect("chosen above");
        set_math(&p.conv, math)?;
        let ws = workspace(ws_bytes)?;
        let (alpha, beta) = alpha_beta();
        // SAFETY: dy, w, dx hold the element counts of the plan's descriptors; ws holds ws_bytes.
        unsafe {
            result::convolution_backward_data(
                h,
                alpha,
                p.w.0,
                w as *const c_void,
                p.y.0,
                dy as *const c_void,
                p.conv.0,
                algo,
                ws_ptr(&ws),
                ws_bytes,
                beta,
                p.x.0,
                dx as *mut c_void,
            )
        }
        .map_err(|e| err(&format!("convolution backward-data x {x_shape:?} w {w_shape:?} {cfg:?} {dtype:?}"), e))
    })
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
    with_plan(x_shape, w_shape, cfg, dtype, |h, p| {
        if p.bwd_filter.is_none() {
            set_math(&p.conv, allowed_math(p.dtype)[0])?;
            let n = sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as usize;
            let mut perf: Vec<sys::cudnnConvolutionBwdFilterAlgoPerf_t> = vec![unsafe { std::mem::zeroed() }; n];
            let mut count = 0;
            // SAFETY: live descriptors; perf holds n entries.
            unsafe {
                result::get_convolution_backward_filter_algorithm(h, p.x.0, p.y.0, p.conv.0, p.w.0, n as i32, &mut count, perf.as_mut_ptr())
            }
            .map_err(|e| err("backward-filter algorithm", e))?;
            use sys::cudnnConvolutionBwdFilterAlgo_t as A;
            let inexact = [
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            ];
            let (algo, math) = pick!(perf, count, inexact, p.dtype)?;
            set_math(&p.conv, math)?;
            // SAFETY: as above.
            let ws = unsafe { result::get_convolution_backward_filter_workspace_size(h, p.x.0, p.y.0, p.conv.0, p.w.0, algo) }
                .map_err(|e| err("backward-filter workspace size", e))?;
            p.bwd_filter = Some(Choice { algo, math, ws });
        }
        let Choice { algo, math, ws: ws_bytes } = p.bwd_filter.expect("chosen above");
        set_math(&p.conv, math)?;
        let ws = workspace(ws_bytes)?;
        let (alpha, beta) = alpha_beta();
        // SAFETY: x, dy, dw hold the element counts of the plan's descriptors; ws holds ws_bytes.
        unsafe {
            result::convolution_backward_filter(
                h,
                alpha,
                p.x.0,
                x as *const c_void,
                p.y.0,
                dy as *const c_void,
                p.conv.0,
                algo,
                ws_ptr(&ws),
                ws_bytes,
                beta,
                p.w.0,
                dw as *mut c_void,
            )
        }
        .map_err(|e| err(&format!("convolution backward-filter x {x_shape:?} w {w_shape:?} {cfg:?} {dtype:?}"), e))
    })
}
