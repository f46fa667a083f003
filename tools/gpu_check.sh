#!/usr/bin/env bash
# Everything that needs GPUs, in one call on the device machine (nvidia-h200-x2):
# install the missing wheels, generate + build every spec, run the GPU tests under torchrun,
# run the benchmarks, print a short table last.   Usage: bash tools/gpu_check.sh [quick|sweep|gemm]
# (quick: tests only; gemm: tests, then only the GEMM benchmarks and the TP MLP example)
set -uo pipefail
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1   # never multicast there
# Spinning kernels and lazily loaded kernels can deadlock (a load may wait for the spinning kernel):
export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER}
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-16G} NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo PYTHONUNBUFFERED=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1
OUT=${OUT:-/tmp/tilegen-out}; mkdir -p "$OUT"
NGPU=$(nvidia-smi -L | wc -l)
NP=${NPROC:-$(( NGPU >= 2 ? NGPU : 2 ))}
if [ "$NP" -gt "$NGPU" ]; then
  # More ranks than GPUs: NVSHMEM's multi-process-per-GPU mode, with CUDA MPS so that the ranks'
  # kernels run side by side (each gets a share of the SMs). Checks the protocol, not link speed.
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$(( 100 / (NP / NGPU) )) NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=1
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && echo "MPS started: $NP ranks on $NGPU GPU(s)" || echo "MPS not started: ranks time-slice"
  trap 'echo quit | nvidia-cuda-mps-control 2>/dev/null' EXIT
  # A fused GEMM and its communication kernel spin on each other, so both must be resident: size
  # the persistent GEMM to this rank's share of the SMs, less a margin: with exactly the share
  # minus the 8 communication CTAs (58 of 66) a run hung, MPS does not promise every SM of the share.
  SMS=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -qi "h100\|h200" && echo 132 || echo 108)
  export TILEGEN_GEMM_SMS=${TILEGEN_GEMM_SMS:-$(( SMS * CUDA_MPS_ACTIVE_THREAD_PERCENTAGE / 100 - 16 ))}
  echo "fused GEMMs: TILEGEN_GEMM_SMS=$TILEGEN_GEMM_SMS CTAs per rank"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nvidia-smi topo -m | head -4
status=0
python3 -m tilegen.cli generate specs/ -o generated -j 16 -q 2>&1 | tee "$OUT/generate.log" || status=1
[ $status = 0 ] || { echo "generate failed"; exit 1; }
timeout ${GPU_TEST_TIMEOUT:-420} torchrun --nproc-per-node "$NP" -m pytest ${GPU_TESTS:-tests/gpu} -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
OPS=generated:allgather_bf16
if [ "$NGPU" -ge 2 ] || [ "${1:-}" = sweep ]; then  # CTA / tile variants (tools/bench_specs), one build
  python3 -m tilegen.cli generate tools/bench_specs -o bench_generated -j 16 -q > "$OUT/generate_bench.log" 2>&1 \
    && OPS="$OPS,bench_generated:*" || echo "bench variants did not build: see generate_bench.log"
fi
if [ "${1:-}" != quick ] && [ "${1:-}" != gemm ]; then
  timeout 400 torchrun --nproc-per-node "$NP" tools/bench_allgather.py --ops "$OPS" --out "$OUT/bench_allgather.json" \
    > "$OUT/bench.log" 2>&1 || { status=1; tail -30 "$OUT/bench.log"; }
  sed -n '/ranks on /,$p' "$OUT/bench.log"
  timeout 500 torchrun --nproc-per-node "$NP" tools/bench_collectives.py --out "$OUT/bench_collectives.json" \
    --plot "$OUT/collectives.png" > "$OUT/bench_collectives.log" 2>&1 || { status=1; tail -30 "$OUT/bench_collectives.log"; }
  sed -n '/ranks on /,$p' "$OUT/bench_collectives.log"
fi
if [ "${1:-}" != quick ]; then
  timeout 300 torchrun --nproc-per-node "$NP" tools/bench_gemm.py --out "$OUT/bench_gemm.json" \
    > "$OUT/bench_gemm.log" 2>&1 || { status=1; tail -30 "$OUT/bench_gemm.log"; }
  sed -n '/^ag_gemm/,$p' "$OUT/bench_gemm.log"
  timeout 200 torchrun --nproc-per-node "$NP" examples/tp_mlp.py > "$OUT/tp_mlp.log" 2>&1 || { status=1; tail -30 "$OUT/tp_mlp.log"; }
  grep "^TP MLP" "$OUT/tp_mlp.log"
fi
echo "== gpu tests: $(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests.log" | tail -1)"
exit $status
