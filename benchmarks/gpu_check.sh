#!/usr/bin/env bash
# tvm-cuda checks on a GPU machine that has TVM's runtime but not its compiler.
#
# Prepare on a machine with the TVM compiler and nvcc (no GPU needed), from the repo root:
#   BITSMITH_CACHE_DIR=/tmp/bitsmith-cache python tests/cuda_cases.py --build .gpu/prebuilt
#       -> .gpu/prebuilt/models/<case>/ (tvm-cuda artifacts + inputs + reference logits)
#          .gpu/prebuilt/qkernels/      (one quantized kernel per scheme/outlier/N:M case)
#   BITSMITH_CACHE_DIR=/tmp/bitsmith-cache python benchmarks/gpu_kernels.py --build .gpu/prebuilt/bench
#       -> .gpu/prebuilt/bench/ (dense + quantized GEMV/GEMM kernels, no weights)
#   BITSMITH_CACHE_DIR=/tmp/bitsmith-cache python benchmarks/gpu_model.py --build .gpu/prebuilt/model
#       -> .gpu/prebuilt/model/<model>/ (seeded SmolLM2-135M and TinyLlama-1.1B shapes: tvm-cuda
#          artifact WITHOUT weights, reference tokens/logits; the GPU side regenerates the weights
#          from the seed and checks them against the manifest's sha256)
#   BITSMITH_CACHE_DIR=/tmp/bitsmith-cache python benchmarks/gpu_attention.py --build .gpu/prebuilt/attention
#       -> .gpu/prebuilt/attention/ (split-KV decode + tiled prefill attention kernels, ~1.5 min)
#   bash benchmarks/gpu_site.sh   -> .gpu/site
# Size check before the call (what travels must stay < 64 MiB): du -sh .gpu
# .gpu/site holds the TVM runtime (python package + libtvm_runtime_cuda, tvm_ffi for cp312)
# and a bitsmith dist-info so the backend entry points resolve from the source tree.
#
# Run on the GPU machine from the repo root (carry: .gpu):
#   bash benchmarks/gpu_check.sh
# Per-step timeouts 60+90+90+60+150+60 s = 510 s at most; expected about 5 minutes.
# Writes to $OUT (default ./gpu_out): nvidia-smi.txt, smoke.txt, gpu_tests.txt, gpu_kernels.txt,
# gpu_attention.txt, gpu_model.txt (whole-model decode/prefill vs torch eager, correctness), gpu_model_compile.txt.
# Without a GPU every step ends with a one-line "no GPU" message (dry run).
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
# one line instead of a traceback from every step where there is no GPU (a dry run)
NO_GPU=$("$PY" -c "from bitsmith.backends.tvm.cuda_runtime import NO_GPU, gpu_available; print('' if gpu_available() else NO_GPU)" 2>&1)
[ -n "$NO_GPU" ] && echo "no GPU: $NO_GPU (each step below says so and runs nothing on a device)" | tee -a "$OUT/nvidia-smi.txt"

# 1. smoke: runtime import, GPU visible, one prebuilt kernel loads without compiling, one model runs
timeout 60 "$PY" - > "$OUT/smoke.txt" 2>&1 <<'EOF'
import time, sys
from pathlib import Path
t0 = time.time()
import numpy as np, tvm
from bitsmith.backends.tvm.cuda_runtime import NO_GPU, gpu_available
if not gpu_available():
    sys.exit(f"no GPU: {NO_GPU}")
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

# 2. gpu-marked tests (tiny-model logits vs reference, every quantized kernel case vs numpy,
#    graph-captured decode vs the per-call path); they skip with "no GPU" where there is none
timeout 90 "$PY" -m pytest tests/test_tvm_cuda.py tests/test_tvm_cuda_mma.py tests/test_attention_cuda.py \
    tests/test_cuda_decode.py -m gpu -v -p no:cacheprovider \
    > "$OUT/gpu_tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.txt"

# 3. kernel benchmark: quantized GEMV/GEMM vs torch fp16, GB/s vs the copy-bandwidth roofline
if [ -n "$NO_GPU" ]; then echo "no GPU: kernel benchmark not run" > "$OUT/gpu_kernels.txt"; else
timeout 90 "$PY" benchmarks/gpu_kernels.py --run .gpu/prebuilt/bench --trust-native-code > "$OUT/gpu_kernels.txt" 2>&1
echo "benchmark exit $?" >> "$OUT/gpu_kernels.txt"; fi

# 3b. attention: split-KV decode and tiled prefill checked against the float64 interpreter, then
#     timed (CUDA events) vs torch fp16 scaled_dot_product_attention
if [ -n "$NO_GPU" ]; then echo "no GPU: attention benchmark not run" > "$OUT/gpu_attention.txt"; else
timeout 60 "$PY" benchmarks/gpu_attention.py --run .gpu/prebuilt/attention --trust-native-code > "$OUT/gpu_attention.txt" 2>&1
echo "attention exit $?" >> "$OUT/gpu_attention.txt"; fi

# 4. whole model: seeded SmolLM2-135M and TinyLlama-1.1B shapes, weights regenerated here;
#    greedy tokens vs reference, decode tok/s at batch 1/16 (CUDA graph, per-kernel, torch eager), prefill 512
timeout 150 "$PY" benchmarks/gpu_model.py --run .gpu/prebuilt/model --trust-native-code > "$OUT/gpu_model.txt" 2>&1
echo "model exit $?" >> "$OUT/gpu_model.txt"

# 5. torch.compile baseline of the same models (its own step: compiling takes minutes)
timeout 60 "$PY" benchmarks/gpu_model.py --run .gpu/prebuilt/model --compile-only > "$OUT/gpu_model_compile.txt" 2>&1
echo "compile baseline exit $?" >> "$OUT/gpu_model_compile.txt"
echo "== $(date -u +%FT%TZ) done" >> "$OUT/nvidia-smi.txt"
