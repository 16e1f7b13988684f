//! The kernel library: `kernels/*.cu`, embedded at build time, compiled with NVRTC on first use to
//! a CUBIN for the GPU's own architecture (no PTX JIT, so a newer NVRTC than the driver is fine),
//! loaded once and cached. NVRTC cannot open `kernels/common.cuh` by path, so local `#include`s
//! are replaced by the header text, with `#line` marks keeping error positions right.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{result, sys, Ptx};

use super::{driver_err, lock};
use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The `.cu` files of the kernel library (one per op family).
pub fn kernel_files() -> impl Iterator<Item = &'static str> {
    KERNEL_SOURCES.iter().map(|(name, _)| *name).filter(|n| n.ends_with(".cu"))
}

fn source(name: &str) -> Option<&'static str> {
    KERNEL_SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The names of the `extern "C" __global__` functions a source defines.
pub fn entry_points(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find("__global__") {
        rest = &rest[at + "__global__".len()..];
        let head = rest.split('(').next().unwrap_or("");
        if let Some(name) = head.split_whitespace().last() {
            out.push(name.to_string());
        }
    }
    out
}

/// `file`'s source with every include of a kernels/ header replaced by the header's text (each
/// header once, like `#pragma once`).
pub fn expand(file: &str) -> Result<String> {
    let src = source(file).ok_or_else(|| Error::Cuda(format!("no kernel file {file} in kernels/")))?;
    let mut out = String::new();
    expand_into(file, src, &mut HashSet::new(), &mut out);
    Ok(out)
}

fn expand_into(file: &str, src: &str, seen: &mut HashSet<String>, out: &mut String) {
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if t == "#pragma once" {
            out.push('\n');
            continue;
        }
        let local = t.strip_prefix("#include").map(str::trim).and_then(|r| r.strip_prefix('"')).and_then(|r| r.split('"').next());
        match local.and_then(|h| source(h).map(|s| (h, s))) {
            Some((h, hsrc)) => {
                if seen.insert(h.to_string()) {
                    out.push_str(&format!("#line 1 \"{h}\"\n"));
                    expand_into(h, hsrc, seen, out);
                }
                out.push_str(&format!("#line {} \"{file}\"\n", i + 2));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}

/// A folder holding cuda_fp16.h for kernels that use half types: $CUDA_INCLUDE_DIR,
/// $CUDA_HOME/include, $CUDA_PATH/include, /usr/local/cuda/include, then the `nvidia/cu13/include`
/// of a Python environment's CUDA wheels (active venv or conda, the python3 on PATH, ~/.local,
/// /usr, /usr/local, /opt/torch/.venv, /opt/conda).
pub fn find_include_dir() -> Option<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("CUDA_INCLUDE_DIR") {
        cands.push(d.into());
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(v) {
            cands.push(Path::new(&d).join("include"));
        }
    }
    cands.push("/usr/local/cuda/include".into());
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"].iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    // The environment of the python3 on PATH (a venv's bin/ or /usr/bin).
    if let Some(path) = std::env::var_os("PATH") {
        prefixes
            .extend(std::env::split_paths(&path).filter(|d| d.join("python3").exists()).filter_map(|d| d.parent().map(Path::to_path_buf)));
    }
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(Path::new(&home).join(".local"));
    }
    prefixes.extend(["/usr", "/usr/local", "/opt/torch/.venv", "/opt/conda"].map(PathBuf::from));
    for p in prefixes {
        let Ok(entries) = std::fs::read_dir(p.join("lib")) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("python3") {
                for sp in ["site-packages", "dist-packages"] {
                    cands.push(e.path().join(sp).join("nvidia/cu13/include"));
                }
            }
        }
    }
    cands.into_iter().find(|d| d.join("cuda_fp16.h").is_file())
}

/// The name of a kernel's variant for an activation dtype: the f32 entry point has the plain name
/// and the bf16 one the suffix `_bf16` (kernels/*.cu stamp both out of one template body).
macro_rules! by_dtype {
    ($dtype:expr, $name:literal) => {
        match $dtype {
            $crate::tensor::DType::F32 => $name,
            $crate::tensor::DType::BF16 => concat!($name, "_bf16"),
        }
    };
}
pub(crate) use by_dtype;

/// Destroys an NVRTC program when dropped.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Compiles one kernel file to a CUBIN for `arch` (e.g. "sm_90"). A compile error carries NVRTC's
/// log, which names the file and line. Needs libnvrtc, not a GPU.
pub fn compile_cubin(file: &str, arch: &str) -> Result<Vec<u8>> {
    compile_source(file, &expand(file)?, arch)
}

/// Compiles source text (already expanded) named `file` in NVRTC's messages.
pub fn compile_source(file: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    let nvrtc_err = |what: &str, e: result::NvrtcError| Error::Cuda(format!("NVRTC {what} for {file}: {e:?}"));
    let src = CString::new(src).map_err(|_| Error::Cuda(format!("{file} contains a NUL byte")))?;
    let name = CString::new(file).map_err(|_| Error::Cuda(format!("kernel file name {file:?} contains a NUL byte")))?;
    let prog = Program(result::create_program(&src, Some(&name)).map_err(|e| nvrtc_err("create_program", e))?);
    let mut opts = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "--generate-line-info".to_string()];
    if let Some(inc) = find_include_dir() {
        opts.push(format!("--include-path={}", inc.display()));
    }
    // SAFETY: prog is a live program; options are plain strings.
    if let Err(e) = unsafe { result::compile_program(prog.0, &opts) } {
        // SAFETY: as above; the log is NUL-terminated.
        let log = unsafe { result::get_program_log(prog.0) }
            .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Err(Error::Cuda(format!("NVRTC failed to compile {file} for {arch} ({e:?}), options {opts:?}:\n{log}")));
    }
    let mut size = 0usize;
    // SAFETY: prog compiled successfully; the buffer has the size NVRTC reports.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| nvrtc_err("nvrtcGetCUBINSize", e))?;
    let mut cubin = vec![0u8; size];
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }.result().map_err(|e| nvrtc_err("nvrtcGetCUBIN", e))?;
    Ok(cubin)
}

/// A loaded kernel and the byte sizes of its parameters as the driver reports them (None when the
/// driver cannot say), so that a launcher passing the wrong argument list fails with an error
/// instead of running on garbage.
pub(crate) struct Kernel {
    pub(crate) func: CudaFunction,
    pub(crate) param_sizes: Option<Vec<usize>>,
}

fn param_sizes(f: &CudaFunction) -> Option<Vec<usize>> {
    let cu = f.cu_function();
    // A driver older than CUDA 12.4 lacks the call, which cudarc reports by panicking.
    std::panic::catch_unwind(|| {
        let mut sizes = Vec::new();
        loop {
            let (mut offset, mut size) = (0usize, 0usize);
            // SAFETY: a live function; the driver answers INVALID_VALUE past the last parameter.
            let r = unsafe { cudarc::driver::sys::cuFuncGetParamInfo(cu, sizes.len(), &mut offset, &mut size) };
            if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                return (!sizes.is_empty()).then_some(sizes);
            }
            sizes.push(size);
        }
    })
    .ok()
    .flatten()
}

/// Compiled modules by file and loaded kernels by name (kernel names are unique across the
/// library; tests/nvrtc_compile.rs checks it).
pub(crate) struct KernelCache {
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    kernels: RwLock<HashMap<&'static str, Arc<Kernel>>>,
}

impl KernelCache {
    pub(crate) fn new(arch: String) -> Self {
        KernelCache { arch, modules: Mutex::default(), kernels: RwLock::default() }
    }

    pub(crate) fn get(&self, ctx: &Arc<CudaContext>, file: &'static str, name: &'static str) -> Result<Arc<Kernel>> {
        if let Some(k) = self.kernels.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(k.clone());
        }
        let module = {
            // Held while compiling so that concurrent first uses compile a file once.
            let mut modules = lock(&self.modules);
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let cubin = compile_cubin(file, &self.arch)?;
                    let m = ctx.load_module(Ptx::from_binary(cubin)).map_err(|e| driver_err(&format!("loading {file}"), e))?;
                    modules.insert(file, m.clone());
                    m
                }
            }
        };
        let func = module.load_function(name).map_err(|e| driver_err(&format!("{file} has no kernel {name}"), e))?;
        let k = Arc::new(Kernel { param_sizes: param_sizes(&func), func });
        self.kernels.write().unwrap_or_else(|e| e.into_inner()).insert(name, k.clone());
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_are_inlined_once_with_line_marks() {
        for file in kernel_files() {
            let src = expand(file).unwrap();
            assert!(!src.contains("#include \"common.cuh\""), "{file} still includes common.cuh");
            let at = source(file).unwrap().lines().position(|l| l.trim() == "#include \"common.cuh\"");
            if let Some(at) = at {
                assert_eq!(src.matches("#line 1 \"common.cuh\"").count(), 1, "{file}");
                // The line after the include keeps its number in error messages.
                assert!(src.contains(&format!("#line {} \"{file}\"", at + 2)), "{file}");
            }
        }
    }

    #[test]
    fn entry_points_are_found() {
        let names = entry_points("extern \"C\" __global__ void a(float* x) {}\n__global__ void\nb_c (int n);");
        assert_eq!(names, ["a", "b_c"]);
    }

    /// The parameter types of each `extern "C" __global__` function of `src` (names dropped).
    fn signatures(src: &str) -> HashMap<String, Vec<String>> {
        let mut out = HashMap::new();
        for (at, _) in src.match_indices("__global__") {
            let rest = &src[at + "__global__".len()..];
            let (head, tail) = rest.split_once('(').expect("a kernel has a parameter list");
            let name = head.split_whitespace().last().expect("a kernel has a name").to_string();
            let params = tail.split_once(')').expect("the parameter list ends").0;
            let types = params
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    // Everything but the parameter's name, with spaces normalised.
                    let ty = p.rsplit_once(|c: char| c.is_whitespace() || c == '*').map_or(p, |(t, _)| t);
                    let ty = if p[ty.len()..].starts_with('*') { format!("{ty}*") } else { ty.to_string() };
                    ty.split_whitespace().collect::<Vec<_>>().join(" ")
                })
                .collect();
            out.insert(name, types);
        }
        out
    }

    /// Every bf16 kernel (`<name>_bf16`, or `_bf16_f32` / `_f32_bf16` for mixed outputs) has an f32
    /// twin `<name>` in the same file whose parameters are the same but for bf16 -> float, so the
    /// launchers, which pass one argument list for both dtypes, fit both (the driver's parameter
    /// sizes are checked only at launch, on a GPU).
    #[test]
    fn bf16_kernels_take_their_f32_twins_parameters() {
        let mut twins = 0;
        for file in kernel_files() {
            let sigs = signatures(&expand(file).unwrap());
            for (name, types) in &sigs {
                if name.starts_with("cast_") || !name.contains("bf16") {
                    continue;
                }
                let base = ["_bf16_f32", "_f32_bf16", "_bf16"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                let twin = sigs.get(base).unwrap_or_else(|| panic!("{file}: {name} has no f32 twin {base}"));
                let widened: Vec<String> = types.iter().map(|t| t.replace("bf16", "float")).collect();
                assert_eq!(&widened, twin, "{file}: parameters of {name} and {base}");
                twins += 1;
            }
        }
        assert!(twins >= 32, "only {twins} bf16 kernels found");
    }

    /// The families whose activations may be bf16 have a `_bf16` variant of every kernel (what
    /// `by_dtype!` asks for), except the f32-only ones: l2_normalize, casts, running statistics.
    #[test]
    fn bf16_families_have_a_variant_of_every_kernel() {
        let f32_only = ["l2_normalize_forward", "l2_normalize_backward", "cast_f32_to_bf16", "cast_bf16_to_f32", "bn_update_running"];
        for file in ["elementwise.cu", "pool.cu", "batchnorm.cu", "dwconv.cu"] {
            let sigs = signatures(&expand(file).unwrap());
            for name in sigs.keys().filter(|n| !n.contains("bf16") && !f32_only.contains(&n.as_str())) {
                assert!(sigs.contains_key(&format!("{name}_bf16")), "{file}: {name} has no bf16 variant {name}_bf16");
            }
        }
    }

    #[test]
    fn include_dir_comes_from_the_environment_first() {
        let dir = std::env::temp_dir().join(format!("plr-cuda-include-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let saved = std::env::var_os("CUDA_INCLUDE_DIR");
        std::env::set_var("CUDA_INCLUDE_DIR", &dir);
        let without_header = find_include_dir();
        std::fs::write(dir.join("cuda_fp16.h"), "").unwrap();
        let with_header = find_include_dir();
        match saved {
            Some(v) => std::env::set_var("CUDA_INCLUDE_DIR", v),
            None => std::env::remove_var("CUDA_INCLUDE_DIR"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(without_header.as_deref(), Some(dir.as_path()), "a folder without cuda_fp16.h is not an include folder");
        assert_eq!(with_header.as_deref(), Some(dir.as_path()));
    }

    #[test]
    fn every_family_has_a_kernel_file() {
        let files: Vec<&str> = kernel_files().collect();
        for f in ["elementwise.cu", "batchnorm.cu", "pool.cu", "attention.cu", "loss.cu", "optim.cu", "dwconv.cu"] {
            assert!(files.contains(&f), "missing kernels/{f}");
        }
    }
}
