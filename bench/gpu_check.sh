#!/usr/bin/env bash
# Every GPU check of issue 6 in one call on a GPU machine (an H100/H200 here):
#   1. device, driver and library versions;
#   2. onnxruntime-gpu from /tmp/ortgpu (installed there from a carried wheel or its chunks);
#   3. the router-attention kernel built with nvcc (make -C kernels all ref check) and its
#      standalone validation + timing binary (llm.c style);
#   4. pytest tests/gpu (kernel vs C reference, ONNX Runtime CUDA, GpuRuntime, TensorRT where
#      installed), skips listed with their reasons;
#   5. bench/router_attention.py: kernel vs torch SDPA, CV router shape, batch 1/64/1024;
#   6. bench/gpu_latency.py: MoQE vs one expert (+ router, FP32, FP16) on the MobileNetV2
#      bundle at batch 1 and 64 on ONNX Runtime CUDA, checked against the CPU Runtime.
# Each step's log and JSON go to $OUT (the device tool's folder; /tmp/gpu_check otherwise).
#
# Here, before the call:   bash bench/gpu_check.sh --prepare
#   copies bundles/mobilenetv2-demo without its reports, with 64 test images (43 MB instead
#   of 54), to bundles/gpucheck-slim (ignored by git like every bundle); carry that folder.
#   Its manifest no longer matches report/: the bench loads it with --no-verify.
# There:                   bash bench/gpu_check.sh
# Environment: MOQE_BUNDLE (default bundles/gpucheck-slim, else bundles/mobilenetv2-demo),
#   ORTGPU_DIR (default /tmp/ortgpu), ORTGPU_WHEEL (a wheel file) or ORTGPU_CHUNKS (a folder
#   whose sorted *.part* files concatenate to the wheel named in its file NAME).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    src=bundles/mobilenetv2-demo dst=bundles/gpucheck-slim
    [[ -f $src/manifest.json ]] || { echo "no $src: build it first (README quick start)"; exit 1; }
    rm -rf "$dst" && mkdir -p "$dst/report"
    cp -r "$src/manifest.json" "$src/experts" "$src/router" "$src/fp" "$src/task" "$dst/"
    # 64 test-split images (as pixels) so the latency bench routes real photos, not noise
    ${PYTHON:-python3} - "$src/report/eval_data.npz" "$dst/report/eval_data.npz" <<'PY'
import sys
import numpy as np
with np.load(sys.argv[1], allow_pickle=False) as z:
    keep = {k: z[k][:64] for k in ("test_pixels", "test_y", "test_groups") if k in z}
    np.savez(sys.argv[2], splits=np.array(["test"]), mean=z["mean"], std=z["std"], **keep)
PY
    du -sh "$dst"
    echo "carry: [\"$dst\"]   command: bash bench/gpu_check.sh"
    exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
declare -A RC

step() {  # step NAME CMD...: run, tee the log to $OUT/NAME.log, record the exit status
    local name=$1; shift
    echo; echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    RC[$name]=${PIPESTATUS[0]}
}

echo "=== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
nvcc --version | tail -2 || true

ORTGPU_DIR=${ORTGPU_DIR:-/tmp/ortgpu}
if [[ ! -d $ORTGPU_DIR/onnxruntime ]]; then
    wheel=${ORTGPU_WHEEL:-}
    chunks=${ORTGPU_CHUNKS:-.ortgpu}
    if [[ -z $wheel && -f $chunks/NAME ]] && compgen -G "$chunks/*.part*" >/dev/null; then
        wheel=/tmp/$(cat "$chunks/NAME")
        cat $(ls "$chunks"/*.part* | sort) > "$wheel"
    fi
    if [[ -n $wheel && -f $wheel ]]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target "$ORTGPU_DIR" "$wheel" \
            || echo "onnxruntime-gpu install from $wheel failed"
    fi
fi
if [[ -d $ORTGPU_DIR/onnxruntime ]]; then
    export PYTHONPATH="$ORTGPU_DIR:$PYTHONPATH"
else
    echo "no onnxruntime-gpu in $ORTGPU_DIR: the ONNX Runtime CUDA parts will skip or fail (see above)"
fi
$PY - <<'EOF'
import importlib, json
v = {}
for m in ("torch", "onnxruntime", "onnx", "numpy", "cuda.bindings", "tensorrt"):
    try:
        v[m] = importlib.import_module(m).__version__
    except Exception as e:  # noqa: BLE001
        v[m] = f"unavailable ({type(e).__name__})"
import onnxruntime, torch
v["onnxruntime_providers"] = onnxruntime.get_available_providers()
v["torch_cuda"] = torch.version.cuda
v["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps(v))
EOF

step kernel_build make -j3 -C kernels all ref check
if [[ ${RC[kernel_build]} == 0 ]]; then
    step kernel_check kernels/build/router_attention_check
    export MOQE_ROUTER_ATTENTION_LIB=$PWD/kernels/build/libmoqe_router_attention.so
    export MOQE_ROUTER_ATTENTION_REF_LIB=$PWD/kernels/build/libmoqe_router_attention_ref.so
fi
step tests_gpu $PY -m pytest -q -rs -p no:cacheprovider tests/gpu tests/test_kernels_ref.py
step bench_attention_fp16 $PY bench/router_attention.py --dtype float16 --json "$OUT/router_attention_fp16.json"
step bench_attention_fp32 $PY bench/router_attention.py --dtype float32 --batches 1,1024 --json "$OUT/router_attention_fp32.json"

BUNDLE=${MOQE_BUNDLE:-bundles/gpucheck-slim}
[[ -f $BUNDLE/manifest.json ]] || BUNDLE=bundles/mobilenetv2-demo
if [[ -f $BUNDLE/manifest.json ]]; then
    step bench_latency $PY bench/gpu_latency.py "$BUNDLE" --no-verify --batches 1,64 --json "$OUT/gpu_latency.json"
else
    echo "no MobileNetV2 bundle carried (run bench/gpu_check.sh --prepare here and carry bundles/gpucheck-slim)"
    RC[bench_latency]=missing
fi

echo; echo "=== summary (exit status per step)"
fail=0
for k in "${!RC[@]}"; do
    echo "$k: ${RC[$k]}"
    [[ ${RC[$k]} == 0 ]] || fail=1
done
exit $fail
