# Sourced by .ci/run (and by hand: `source .ci/nvrtc-env.sh`): NVRTC 13.0 and the CUDA 13.0 headers
# from two pinned pip wheels, so that tests/nvrtc_compile.rs compiles every kernel for sm_90 on a
# machine without a GPU. Installs into target/nvrtc-13.0 once, then only exports the paths.
# NVRTC is pinned to 13.0: the GPU machine's driver (CUDA 13.0) must accept what it produces.

NV_DIR="${NV_DIR:-${CARGO_TARGET_DIR:-target}/nvrtc-13.0}"
if [ ! -e "$NV_DIR/nvidia/cu13/lib/libnvrtc.so.13" ] || [ ! -e "$NV_DIR/nvidia/cu13/include/cuda_fp16.h" ]; then
    mkdir -p "$NV_DIR"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-cache-dir --upgrade \
        --target "$NV_DIR" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-runtime==13.0.96" || return 1 2>/dev/null || exit 1
    # Unneeded variants: 225 MB -> 114 MB.
    rm -f "$NV_DIR"/nvidia/cu13/lib/*.alt.so* "$NV_DIR"/nvidia/cu13/lib/*.a
fi
NV_DIR="$(cd "$NV_DIR" && pwd)"
export LD_LIBRARY_PATH="$NV_DIR/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_INCLUDE_DIR="$NV_DIR/nvidia/cu13/include"
# With NVRTC set up, tests/nvrtc_compile.rs must compile the kernels rather than skip.
export CI="${CI:-true}"
