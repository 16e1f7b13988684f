//! Embeds every `kernels/*.cu` (and the shared `kernels/*.cuh` headers) into the binary. NVRTC
//! compiles them at run time, so building needs no CUDA toolkit.

use std::env;
use std::fs;
use std::path::Path;

fn main() {
    let dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    let mut files: Vec<String> = fs::read_dir(dir)
        .expect("kernels/ folder is missing")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu") || n.ends_with(".cuh"))
        .collect();
    files.sort();
    let mut out =
        String::from("/// (file name, source) of every kernel file, sorted by name.\npub static KERNEL_SOURCES: &[(&str, &str)] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed=kernels/{f}");
        let abs = fs::canonicalize(dir.join(f)).expect("kernel file vanished during the build");
        out.push_str(&format!("    ({f:?}, include_str!({:?})),\n", abs.display().to_string()));
    }
    out.push_str("];\n");
    let dest = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.rs");
    fs::write(dest, out).expect("cannot write kernels.rs into OUT_DIR");
}
