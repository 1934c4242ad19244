#!/usr/bin/env bash
# Every GPU check in one command on a GPU machine (H100/H200 class):
#   1. device, driver and library versions;
#   2. onnxruntime-gpu into $ORTGPU_DIR (from an uploaded wheel or its parts);
#   3. the router-attention kernel built with nvcc (make -C kernels all ref check) and its
#      standalone validation + timing binary (llm.c style);
#   4. pytest tests/gpu (kernel vs C reference, ONNX Runtime CUDA, GpuRuntime, TensorRT where
#      installed), skips listed with their reasons;
#   5. bench/gpu/router_attention.py: kernel vs torch SDPA, CV router shape, batch 1/64/1024;
#   6. bench/gpu/latency.py: MoQE vs one expert (+ router, FP32, FP16) on the MobileNetV2
#      bundle at batch 1 and 64 on ONNX Runtime CUDA, checked against the CPU Runtime;
#   7. bench/gpu/torch_baseline.py: torch FP16 MobileNetV2, eager and CUDA graph.
# Each step's JSON goes to $OUT/<step>.json and its log to $OUT/logs/<step>.log, the layout of
# bench/results/<hardware>/ ($OUT: a fresh temporary folder unless set; the path is printed).
#
# On the machine you prepare on, before the remote commands:
#   bash bench/gpu/check.sh --prepare
#     copies bundles/mobilenetv2-demo without its reports and calibration histograms, with 16
#     test images, to bundles/gpucheck-slim (ignored by git like every bundle; about 29 MB).
#     Its manifest no longer matches its files: the bench loads it with --no-verify.
#   bash bench/gpu/check.sh --pack-ortgpu onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
#     unpacks the wheel (255 MB), packs it as one tar.xz (about 204 MB) and splits that into
#     62 MB parts, one per git-ignored folder .ortchunks1/ .. .ortchunks4/: one folder per
#     remote command where a tool uploads a limited amount with each (64 MiB, say), the last one beside
#     bundles/gpucheck-slim.
# On the GPU machine, one command per folder, back to back (what a command uploaded stays for the
# next while the machine is held):
#   command 1, upload [.ortchunks1]:                     bash bench/gpu/check.sh --stage kernels
#   commands 2..N-1, upload [.ortchunksK]:               ls -la .ortchunks*
#   command N, upload [.ortchunksN, bundles/gpucheck-slim]: bash bench/gpu/check.sh --stage ort
# (--stage all, the default, runs both stages in one command.)
# Environment: OUT (see above), MOQE_BUNDLE (default bundles/gpucheck-slim, else
#   bundles/mobilenetv2-demo), ORTGPU_DIR (default ~/.cache/moqe/ortgpu, kept so a rerun skips the
#   unpacking), ORTGPU_WHEEL (a wheel file to install instead of the parts), REPEATS (latency
#   rounds, 100), TORCH_BASELINE=0 (leave out step 7).
set -uo pipefail
cd "$(dirname "$0")/../.."

if [[ "${1:-}" == "--prepare" ]]; then
    src=bundles/mobilenetv2-demo dst=bundles/gpucheck-slim
    [[ -f $src/manifest.json ]] || { echo "no $src: build it first (README quick start)"; exit 1; }
    rm -rf "$dst" && mkdir -p "$dst/report"
    cp -r "$src/manifest.json" "$src/experts" "$src/router" "$src/fp" "$src/task" "$dst/"
    rm -f "$dst"/experts/*/calibration.json  # histograms: the build's record, not read to serve
    # 16 test-split images (as pixels) so the latency bench routes real photos, not noise
    ${PYTHON:-python3} - "$src/report/eval_data.npz" "$dst/report/eval_data.npz" <<'PY'
import sys
import numpy as np
with np.load(sys.argv[1], allow_pickle=False) as z:
    keep = {k: z[k][:16] for k in ("test_pixels", "test_y", "test_groups") if k in z}
    np.savez(sys.argv[2], splits=np.array(["test"]), mean=z["mean"], std=z["std"], **keep)
PY
    du -sh "$dst"
    exit 0
fi

if [[ "${1:-}" == "--pack-ortgpu" ]]; then
    wheel=${2:?usage: check.sh --pack-ortgpu WHEEL [PART_BYTES]}
    part=${3:-62000000}
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    unzip -q "$wheel" -d "$tmp/w"
    # xz packs the CUDA provider library no smaller than deflate; the gain is one whole tar
    tar -C "$tmp/w" -cf - . | xz -T0 -6 > "$tmp/ortgpu.tar.xz"
    rm -rf .ortchunks*/
    split -b "$part" -d -a 2 "$tmp/ortgpu.tar.xz" "$tmp/part"
    i=0
    for f in "$tmp"/part*; do
        i=$((i + 1)); mkdir -p ".ortchunks$i"; mv "$f" ".ortchunks$i/"
    done
    ls -la .ortchunks*/
    exit 0
fi

STAGE=all
[[ "${1:-}" == "--stage" ]] && STAGE=${2:?--stage kernels|ort|all}

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT/logs"
echo "=== results: $OUT"
export PYTHONUNBUFFERED=1
# this script runs where a GPU is: the GPU tests must run, not skip on a device-node check
[[ -e /dev/nvidia0 ]] || nvidia-smi -L >/dev/null 2>&1 && export MOQE_GPU_TESTS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
declare -A RC

step() {  # step NAME CMD...: run, tee the log to $OUT/logs/NAME.log, record the exit status
    local name=$1; shift
    echo; echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/logs/$name.log"
    RC[$name]=${PIPESTATUS[0]}
}

echo "=== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
nvcc --version | tail -2 || true

ORTGPU_DIR=${ORTGPU_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/moqe/ortgpu}
if [[ $STAGE != kernels && ! -d $ORTGPU_DIR/onnxruntime ]]; then
    if [[ -n ${ORTGPU_WHEEL:-} && -f $ORTGPU_WHEEL ]]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target "$ORTGPU_DIR" "$ORTGPU_WHEEL" \
            || echo "onnxruntime-gpu install from $ORTGPU_WHEEL failed"
    elif compgen -G ".ortchunks*/part*" >/dev/null; then
        # the parts in order of their own names (part00, part01, ...), whatever folder holds them
        parts=$(ls .ortchunks*/part* | awk -F/ '{print $NF" "$0}' | sort | cut -d' ' -f2)
        echo "unpacking onnxruntime-gpu from: $parts"
        mkdir -p "$ORTGPU_DIR"
        cat $parts | $PY -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1])" "$ORTGPU_DIR" \
            || echo "unpacking the onnxruntime-gpu parts failed"
    fi
fi
if [[ -d $ORTGPU_DIR/onnxruntime ]]; then
    export PYTHONPATH="$ORTGPU_DIR:$PYTHONPATH"
elif [[ $STAGE != kernels ]]; then
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

if [[ $STAGE != ort ]]; then
    step kernel-build make -j3 -C kernels all ref check
    if [[ ${RC[kernel-build]} == 0 ]]; then
        step gpu-kernel-check kernels/build/router_attention_check
    fi
fi
if [[ -f kernels/build/libmoqe_router_attention.so ]]; then
    export MOQE_ROUTER_ATTENTION_LIB=$PWD/kernels/build/libmoqe_router_attention.so
    export MOQE_ROUTER_ATTENTION_REF_LIB=$PWD/kernels/build/libmoqe_router_attention_ref.so
fi
if [[ $STAGE != ort ]]; then
    step gpu-tests-kernels $PY -m pytest -q -rs -p no:cacheprovider tests/gpu/test_router_attention_gpu.py tests/backends/test_kernels_ref.py
    step router-attention-fp16 $PY bench/gpu/router_attention.py --dtype float16 \
        --json "$OUT/router-attention-fp16.json"
    step router-attention-fp32 $PY bench/gpu/router_attention.py --dtype float32 --batches 1,1024 \
        --json "$OUT/router-attention-fp32.json"
    step cuda-device $PY -c "from moqe_compile.backends.cuda_device import CudaDevice; print(CudaDevice().describe())"
fi
if [[ $STAGE != kernels ]]; then
    step gpu-tests $PY -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu_backends.py
    BUNDLE=${MOQE_BUNDLE:-bundles/gpucheck-slim}
    [[ -f $BUNDLE/manifest.json ]] || BUNDLE=bundles/mobilenetv2-demo
    if [[ -f $BUNDLE/manifest.json ]]; then
        step gpu-latency $PY bench/gpu/latency.py "$BUNDLE" --no-verify --batches 1,64 --repeats ${REPEATS:-100} \
            --json "$OUT/gpu-latency.json"
        [[ ${TORCH_BASELINE:-1} == 0 ]] ||
            step gpu-torch-baseline $PY bench/gpu/torch_baseline.py --json "$OUT/gpu-torch-baseline.json"
    else
        echo "no MobileNetV2 bundle here (run bench/gpu/check.sh --prepare first and upload bundles/gpucheck-slim with this command)"
        RC[gpu-latency]=missing
    fi
fi

echo; echo "=== summary (exit status per step)"
fail=0
for k in "${!RC[@]}"; do
    echo "$k: ${RC[$k]}"
    [[ ${RC[$k]} == 0 ]] || fail=1
done
exit $fail
