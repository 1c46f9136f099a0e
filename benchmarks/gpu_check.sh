#!/usr/bin/env bash
# tvm-cuda checks on a GPU machine that has TVM's runtime but not its compiler.
#
# Prepare on a machine with the TVM compiler and nvcc (no GPU needed), from the repo root:
#   BITSMITH_CACHE_DIR=/tmp/bitsmith-cache python tests/cuda_cases.py --build .gpu/prebuilt
#       -> .gpu/prebuilt/models/<case>/ (tvm-cuda artifacts + inputs + reference logits)
#          .gpu/prebuilt/qkernels/      (one quantized kernel per scheme/outlier/N:M case)
#   BITSMITH_CACHE_DIR=/tmp/bitsmith-cache python benchmarks/gpu_kernels.py --build .gpu/prebuilt/bench
#       -> .gpu/prebuilt/bench/ (dense + quantized GEMV/GEMM kernels, no weights)
#   bash benchmarks/gpu_site.sh   -> .gpu/site
# .gpu/site holds the TVM runtime (python package + libtvm_runtime_cuda, tvm_ffi for cp312)
# and a bitsmith dist-info so the backend entry points resolve from the source tree.
#
# Run on the GPU machine from the repo root (carry: .gpu), total < 8 minutes (timeouts 90+180+200 s):
#   bash benchmarks/gpu_check.sh
# Writes to $OUT (default ./gpu_out): nvidia-smi.txt, smoke.txt, gpu_tests.txt, gpu_kernels.txt.
set -u
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"  # libcudart for libtvm_runtime_cuda
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
ROOT="$PWD"
SITE="${BITSMITH_GPU_SITE:-$ROOT/.gpu/site}"   # override only for a dry run elsewhere
export PYTHONPATH="$SITE:$ROOT:$ROOT/tests"
export TVM_USE_RUNTIME_LIB=1
export TVM_CUDA_COMPILE_MODE=nvcc          # only used if a kernel has no prebuilt fatbin
export BITSMITH_CUDA_PREBUILT="$ROOT/.gpu/prebuilt"
export BITSMITH_CACHE_DIR="${TMPDIR:-/tmp}/bitsmith-cache"
# The prebuilt artifacts and kernels were built on another machine, so this one's trust store
# does not list their native code: the checks below pass trust_native_code=True (the pytest
# run does so because BITSMITH_CUDA_PREBUILT is set). A throwaway store keeps $HOME untouched.
export BITSMITH_TRUST_STORE="${TMPDIR:-/tmp}/bitsmith-trust/trusted_native.json"
export HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"

echo "== $(date -u +%FT%TZ) start" | tee "$OUT/nvidia-smi.txt"
nvidia-smi >> "$OUT/nvidia-smi.txt" 2>&1

# 1. smoke: runtime import, GPU visible, one prebuilt kernel loads without compiling, one model runs
timeout 90 "$PY" - > "$OUT/smoke.txt" 2>&1 <<'EOF'
import time, sys
from pathlib import Path
t0 = time.time()
import numpy as np, tvm
from bitsmith.backends.tvm.cuda_runtime import gpu_available; gpu_available()
print("python", sys.version.split()[0], "tvm", tvm.__version__, tvm.__file__)
print("cuda(0).exist:", tvm.cuda(0).exist, "compute", tvm.cuda(0).compute_version if tvm.cuda(0).exist else "-")
from bitsmith.backends.tvm.cuda_runtime import BINARIES
import cuda_cases
import os
pre = Path(os.environ["BITSMITH_CUDA_PREBUILT"])
print("qkernel rtn-int4:", cuda_cases.check_qkernel(pre / "qkernels", "rtn-int4", trust_native_code=True),
      "(ratio <= 1 passes)")
print("prebuilt binaries used:", BINARIES.hits, "runtime compiles:", BINARIES.misses)
print("model llama:", cuda_cases.check_model(pre / "models" / "llama", trust_native_code=True),
      "(err <= allowed passes)")
print("prebuilt binaries used:", BINARIES.hits, "runtime compiles:", BINARIES.misses)
print(f"smoke done in {time.time() - t0:.1f} s")
EOF
echo "smoke exit $?" >> "$OUT/smoke.txt"

# 2. gpu-marked tests (tiny-model logits vs reference, every quantized kernel case vs numpy)
timeout 180 "$PY" -m pytest tests/test_tvm_cuda.py -m gpu -v -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.txt"

# 3. kernel benchmark: quantized GEMV/GEMM vs torch fp16, GB/s vs the copy-bandwidth roofline
timeout 200 "$PY" benchmarks/gpu_kernels.py --run .gpu/prebuilt/bench --trust-native-code > "$OUT/gpu_kernels.txt" 2>&1
echo "benchmark exit $?" >> "$OUT/gpu_kernels.txt"
echo "== $(date -u +%FT%TZ) done" >> "$OUT/nvidia-smi.txt"
