#!/usr/bin/env bash
# GPU test round trip, for a GPU machine that has no Rust toolchain.
#
#   scripts/gpu-test.sh build        (here) cargo test --release --no-run; copies every test binary
#                                    and the release plr-engine binary, stripped, into .carry/ under
#                                    stable names (unit-<crate>, test-<file>, plr-engine)
#   scripts/gpu-test.sh run [args]   (on the GPU machine) sources scripts/gpu-env.sh, records
#                                    nvidia-smi and the driver version, runs every carried test
#                                    binary with PLR_REQUIRE_GPU=1 (a GPU test that would SKIP
#                                    fails) and tees the logs into $OUT (default .carry/out); extra
#                                    args go to each binary (e.g. a test name filter); exits
#                                    non-zero if any binary failed
#   scripts/gpu-test.sh speed        (on the GPU machine) plr-engine bench on CUDA in bf16 with the
#                                    CUDA graph and the op-family profile, the same with cuDNN's
#                                    depthwise convolutions, then tools/compare_pytorch.py --device
#                                    cuda with the engine variants bf16+graph, bf16, f32+graph, f32
#                                    in the same invocation; logs and JSON into $OUT
#   scripts/gpu-test.sh train        (on the GPU machine) the zero-config quick start on CUDA in f32,
#                                    bf16, and bf16 with --cuda-graph (issue 6: bf16 reaches the f32
#                                    mAP within one point; the graph changes nothing but speed);
#                                    runs in runs/gpu-train-*, logs and log.jsonl copies in $OUT, the
#                                    final evaluation of each printed
#   scripts/gpu-test.sh kernels      (on the GPU machine) the criterion kernel benches
#                                    (benches/kernels_cuda.rs), criterion's files into $OUT/criterion
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.carry

build() {
    rm -rf "$CARRY"
    mkdir -p "$CARRY"
    cargo build --release --bin plr-engine
    # cargo names each test binary on stderr: "Executable tests/cuda_ops.rs (target/release/deps/cuda_ops-<hash>)".
    cargo test --release --no-run 2>&1 | tee "$CARRY/build.log" >&2
    local line src path name
    while IFS= read -r line; do
        src="$(sed -E 's/^ *Executable (unittests )?([^ ]+) \((.*)\)$/\2/' <<<"$line")"
        path="$(sed -E 's/^ *Executable (unittests )?([^ ]+) \((.*)\)$/\3/' <<<"$line")"
        case "$src" in
            src/lib.rs) name=unit-lib ;;
            src/main.rs) name=unit-main ;;
            tests/*) name="test-$(basename "$src" .rs)" ;;
            benches/*) continue ;;
            *) name="unit-$(basename "$src" .rs)" ;;
        esac
        cp "$path" "$CARRY/$name"
        strip "$CARRY/$name"
    done < <(grep -E '^ *Executable ' "$CARRY/build.log")
    cp target/release/plr-engine "$CARRY/plr-engine"
    strip "$CARRY/plr-engine"
    cargo bench --bench kernels_cuda --no-run 2>&1 | tee "$CARRY/build.log" >&2
    path="$(sed -nE 's/^ *Executable benches\/kernels_cuda.rs \((.*)\)$/\1/p' "$CARRY/build.log")"
    cp "$path" "$CARRY/bench-kernels_cuda"
    strip "$CARRY/bench-kernels_cuda"
    rm "$CARRY/build.log"
    ls -l "$CARRY"
    du -sh "$CARRY"
    # The device tool carries at most 64 MiB. Fully stripped (panic messages keep their file and
    # line; backtraces lose names) the binaries were 44 MiB on 2026-11-24.
    local kib
    kib="$(du -sk "$CARRY" | cut -f1)"
    if [ "$kib" -gt $((62 * 1024)) ]; then
        echo "error: $CARRY is $((kib / 1024)) MiB, over the device tool's 64 MiB carry limit" >&2
        exit 1
    fi
}

run() {
    local out="${OUT:-$CARRY/out}" failed=() bin name rc
    mkdir -p "$out"
    # shellcheck source=scripts/gpu-env.sh
    source scripts/gpu-env.sh >"$out/gpu-env.log" 2>&1
    cat "$out/gpu-env.log"
    # A GPU test that cannot reach the GPU fails here instead of printing SKIP and passing.
    export PLR_REQUIRE_GPU=1
    { nvidia-smi || echo "nvidia-smi failed"; } 2>&1 | tee "$out/nvidia-smi.log"
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 | tee -a "$out/nvidia-smi.log" || true
    for bin in "$CARRY"/unit-* "$CARRY"/test-*; do
        [ -x "$bin" ] || continue
        name="$(basename "$bin")"
        echo "=== $name $*" | tee "$out/$name.log"
        set +e
        "$bin" "$@" 2>&1 | tee -a "$out/$name.log"
        rc=${PIPESTATUS[0]}
        set -e
        echo "=== $name exit $rc" | tee -a "$out/$name.log"
        [ "$rc" -eq 0 ] || failed+=("$name")
    done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "FAILED: ${failed[*]}"
        exit 1
    fi
    echo "all test binaries passed"
}

gpu_env() {
    local out="$1"
    mkdir -p "$out"
    # shellcheck source=scripts/gpu-env.sh
    source scripts/gpu-env.sh >"$out/gpu-env.log" 2>&1
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 | tee "$out/nvidia-smi.log" || true
}

speed() {
    local out="${OUT:-$CARRY/out}"
    gpu_env "$out"
    "$CARRY/plr-engine" bench --device cuda --precision bf16 --cuda-graph --json "$out/bench-engine.json" 2>&1 |
        tee "$out/bench-engine.log"
    PLR_DEPTHWISE=cudnn "$CARRY/plr-engine" bench --device cuda --precision bf16 --profile-iters 0 \
        --json "$out/bench-engine-cudnn-depthwise.json" 2>&1 | tee "$out/bench-engine-cudnn-depthwise.log"
    python3 tools/compare_pytorch.py --device cuda --engine "$CARRY/plr-engine" --json "$out/compare.json" 2>&1 | tee "$out/compare.log"
}

train() {
    local out="${OUT:-$CARRY/out}" variant start
    gpu_env "$out"
    for variant in f32 bf16 bf16-graph; do
        # The run folder (with its synthetic dataset) stays out of $OUT; its log.jsonl is copied there.
        local flags=(--device cuda --precision "${variant%-graph}" --output "runs/gpu-train-$variant")
        [ "$variant" = bf16-graph ] && flags+=(--cuda-graph)
        start=$SECONDS
        "$CARRY/plr-engine" train "${flags[@]}" 2>&1 | tee "$out/train-$variant.log"
        echo "train-$variant: $((SECONDS - start)) s wall" | tee -a "$out/train-$variant.log"
        cp "runs/gpu-train-$variant/log.jsonl" "$out/train-$variant.jsonl"
    done
    for variant in f32 bf16 bf16-graph; do
        python3 -c 'import json, sys
e = [e for e in map(json.loads, open(sys.argv[1])) if e["event"] == "eval"][-1]
m = e["report"]["metrics"]
print("%s: epoch %d, mAP %.1f%%, rank-1 %.1f%%" % (sys.argv[2], e["epoch"], 100 * m["map"], 100 * m["rank1"]))' \
            "$out/train-$variant.jsonl" "train-$variant" | tee -a "$out/train-summary.log"
    done
}

kernels() {
    local out="${OUT:-$CARRY/out}"
    gpu_env "$out"
    CRITERION_HOME="$out/criterion" "$CARRY/bench-kernels_cuda" --bench "$@" 2>&1 | tee "$out/kernels_cuda.log"
}

case "${1:-}" in
    build) build ;;
    run) shift; run "$@" ;;
    speed) speed ;;
    train) train ;;
    kernels) shift; kernels "$@" ;;
    *) echo "usage: $0 build | run [test-binary args] | speed | train | kernels [criterion filter]" >&2; exit 2 ;;
esac
