//! Compiles every kernel file with NVRTC for sm_90 (the H100), which needs libnvrtc but no GPU.
//! Without NVRTC the test prints a SKIP line, except under CI=true, where a missing NVRTC means the
//! CI recipe (.ci/nvrtc-env.sh) broke and the test fails.

use std::collections::HashMap;

use plr_engine::cuda::nvrtc::{compile_cubin, compile_source, entry_points, expand, kernel_files};

fn nvrtc_present(test: &str) -> bool {
    // SAFETY: only dlopens and closes the library.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return true;
    }
    let why = "libnvrtc not found (source .ci/nvrtc-env.sh to install it)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: CI=true but {why}");
    }
    println!("SKIP: {test}: {why}");
    false
}

#[test]
fn kernels_compile_for_sm90() {
    if !nvrtc_present("kernels_compile_for_sm90") {
        return;
    }
    let mut owner: HashMap<String, &str> = HashMap::new();
    let mut compiled = 0;
    for file in kernel_files() {
        let cubin = compile_cubin(file, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{file}: NVRTC did not return an ELF cubin");
        let names = entry_points(&expand(file).unwrap());
        assert!(!names.is_empty(), "{file} defines no kernel");
        for name in names {
            // Kernels are looked up by name alone, so a name must not repeat across files.
            if let Some(other) = owner.insert(name.clone(), file) {
                panic!("kernel {name} is defined in both {other} and {file}");
            }
            let symbol = [name.as_bytes(), b"\0"].concat();
            assert!(cubin.windows(symbol.len()).any(|w| w == symbol), "{file}: kernel {name} missing from the cubin (not extern \"C\"?)");
        }
        compiled += 1;
    }
    assert!(compiled >= 6, "only {compiled} kernel files found");
}

#[test]
fn compile_errors_show_the_nvrtc_log() {
    if !nvrtc_present("compile_errors_show_the_nvrtc_log") {
        return;
    }
    let e = compile_cubin("no_such_file.cu", "sm_90").unwrap_err().to_string();
    assert!(e.contains("no_such_file.cu"), "{e}");
    let broken = "// line 1\nextern \"C\" __global__ void k(float* x) { x[0] = undefined_symbol; }\n";
    let e = compile_source("broken.cu", broken, "sm_90").unwrap_err().to_string();
    assert!(e.contains("broken.cu(2)") && e.contains("undefined_symbol"), "{e}");
}
