# Source this on the GPU machine: `source scripts/gpu-env.sh`. Finds the CUDA libraries the engine
# dlopens (libcuda, libnvrtc, libcublas/libcublasLt, libcudnn) and CUDA's include folder, and exports
# LD_LIBRARY_PATH and CUDA_INCLUDE_DIR. Looks in the pip wheels of a PyTorch install (nvidia/*/lib),
# then /usr/local/cuda; the driver's libcuda comes from the system (ldconfig) or the usual folders.
# Set PYTHON to choose the interpreter whose site-packages hold the wheels (default: python3).

_gpu_env() {
    local py="${PYTHON:-python3}" dirs="" d lib
    # nvidia is a namespace package (no __file__), so read its __path__; one line per folder.
    local roots
    roots="$("$py" -c 'import nvidia, os
p = getattr(nvidia, "__file__", None)
print("\n".join([os.path.dirname(p)] if p else list(nvidia.__path__)))' 2>/dev/null)"
    for root in $roots; do
        for d in "$root"/*/lib; do
            if ls "$d"/*.so* >/dev/null 2>&1; then dirs="$dirs:$d"; fi
        done
        if [ -z "${CUDA_INCLUDE_DIR:-}" ] && [ -e "$root/cu13/include/cuda_fp16.h" ]; then
            export CUDA_INCLUDE_DIR="$root/cu13/include"
        fi
    done
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && dirs="$dirs:$d"
    done
    if [ -z "${CUDA_INCLUDE_DIR:-}" ] && [ -e /usr/local/cuda/include/cuda_fp16.h ]; then
        export CUDA_INCLUDE_DIR=/usr/local/cuda/include
    fi
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
        for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/lib/wsl/lib; do
            [ -e "$d/libcuda.so.1" ] && dirs="$dirs:$d"
        done
    fi
    export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

    echo "gpu-env: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "gpu-env: CUDA_INCLUDE_DIR=${CUDA_INCLUDE_DIR:-<none>}"
    for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libcudnn.so.9; do
        local where=""
        for d in $(echo "$LD_LIBRARY_PATH" | tr ':' ' '); do
            if [ -e "$d/$lib" ]; then where="$d"; break; fi
        done
        if [ -z "$where" ] && ldconfig -p 2>/dev/null | grep -q "$lib"; then where="(ld.so cache)"; fi
        echo "gpu-env: $lib -> ${where:-NOT FOUND}"
    done
}
_gpu_env
unset -f _gpu_env
