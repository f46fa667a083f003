#!/usr/bin/env bash
# Everything that needs GPUs, on the device machine, one GPU per rank, in phases that each fit one
# 10-minute call (chain the calls while the machine is warm):
#   bash tools/gpu_check.sh quick       GPU tests at 2 ranks, then at every GPU (4 on a 4-GPU machine)
#   bash tools/gpu_check.sh tests [N]   GPU tests at N ranks (default: every GPU); GPU_TESTS=path selects
#   bash tools/gpu_check.sh bench [N]   collective benchmarks (CTA/tile variants too) at N ranks
#   bash tools/gpu_check.sh coll [N]    collective benchmark (eager + CUDA graph) and host cost at N ranks
#   bash tools/gpu_check.sh tune [N]    tilegen tune of the collective specs at N ranks ($OUT/calibration)
#   bash tools/gpu_check.sh calibrate [N]  tune, rebuild the collectives with the measurements, tests, coll
#   bash tools/gpu_check.sh downstream [N]  examples/downstream's app from its carried wheel (.whl/tp_app-*.whl)
#   bash tools/gpu_check.sh moe [N]     MoE dispatch/combine benchmark against the NCCL baseline, the MoE layer example
#   bash tools/gpu_check.sh moe_ll [N]  the low-latency case alone (128 tokens: bf16 and fp8, CUDA graphs) + its kernel times
#                                       (MOE_TRACE=1: and when each CTA reached each phase, tools/profile_moe.py --trace)
#   bash tools/gpu_check.sh probe [N]   NVLink store rates at the low-latency MoE push's sizes, N and 2 GPUs (no ops)
#   bash tools/gpu_check.sh fused [N]   the fused GEMM kernel alone at several tile shapes vs cuBLAS (issue 14 goal 2)
#   bash tools/gpu_check.sh sanitize [N] compute-sanitizer memcheck and racecheck over one op of each family
#                                       (tools/sanitize_ops.py), one GPU per rank (N <= GPUs)
#   bash tools/gpu_check.sh script N path [args]  a script under torchrun in this environment (diagnostics)
#   bash tools/gpu_check.sh ab N path [args]      the same, on the base ops (BASE=<rev> tools/pack_prebuilt.sh), on
#                                       VARIANTS="<name>=<rev> ..." revisions
#                                       and on this tree's in turns, e.g. AB_GREP="in-graph|ll_" and
#                                       tools/profile_moe.py --tokens 128 --op moe_bf16_ll
#   bash tools/gpu_check.sh gemm [N]    GEMM benchmarks and the TP MLP example at N ranks (GEMM_ARGS="--styles all
#                                       --splits 1,2,3": the copy-engine sweep tools/ce_calibrate.py turns into choices)
# Each phase first makes the ops: unpacks .prebuilt/ops.tar.xz when the call carries one (made here by
# tools/pack_prebuilt.sh, saves the build there), else generates and builds every spec. With one GPU,
# ranks share it under CUDA MPS: that checks the protocol, not link speed or NCCL.
set -uo pipefail
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1   # never multicast there
# Spinning kernels and lazily loaded kernels can deadlock (a load may wait for the spinning kernel):
export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER}
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-24G} NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo PYTHONUNBUFFERED=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1
OUT=${OUT:-/tmp/tilegen-out}; mkdir -p "$OUT"
PHASE=${1:-quick}
NGPU=$(nvidia-smi -L | wc -l)
NP=${2:-${NPROC:-$(( NGPU >= 2 ? NGPU : 2 ))}}

setup_python() {
  [ -n "${TILEGEN_PY_READY:-}" ] && return 0
  export TILEGEN_PY_READY=1
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
}

make_ops() {
  [ -n "${TILEGEN_OPS_READY:-}" ] && return 0  # a phase that runs others made them already
  export TILEGEN_OPS_READY=1
  if [ -f .prebuilt/ops.tar.xz ]; then  # built on the CPU machine: the libraries find NVSHMEM and TVM-FFI here
    tar -xJf .prebuilt/ops.tar.xz || exit 1
    local nv ffi
    nv=$(python3 -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])")/lib
    ffi=$(python3 -c "import tvm_ffi, os; print(os.path.join(os.path.dirname(tvm_ffi.__file__), 'lib'))")
    export LD_LIBRARY_PATH=$nv:$ffi${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "ops: prebuilt ($(tar -tJf .prebuilt/ops.tar.xz | grep -c '\.so$') libraries)"
  elif ! python3 -m tilegen.cli generate specs/ -o generated -j 32 -q > "$OUT/generate.log" 2>&1; then
    tail -30 "$OUT/generate.log"; echo "generate failed"; exit 1
  fi
}

start_mps_if_shared() {  # more ranks than GPUs: NVSHMEM's multi-process-per-GPU mode under CUDA MPS
  [ "$1" -gt "$NGPU" ] || return 0
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$(( 100 / ($1 / NGPU) )) NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=1
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && echo "MPS started: $1 ranks on $NGPU GPU(s)" || echo "MPS not started: ranks time-slice"
  trap 'echo quit | nvidia-cuda-mps-control 2>/dev/null' EXIT
  # A fused GEMM and its communication kernel spin on each other, so both must be resident: size the
  # persistent GEMM to this rank's share of the SMs, less a margin (MPS does not promise all of it).
  local sms
  sms=$(python3 -c "import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)")
  export TILEGEN_GEMM_SMS=${TILEGEN_GEMM_SMS:-$(( sms * CUDA_MPS_ACTIVE_THREAD_PERCENTAGE / 100 - 16 ))}
}

run_tests() {  # $1 ranks
  local log="$OUT/gpu_tests_np$1.log" rc
  # faulthandler: a test still running after 150 s dumps every thread's stack into the log (where a hang waits)
  timeout "${GPU_TEST_TIMEOUT:-540}" torchrun --nproc-per-node "$1" -m pytest ${GPU_TESTS:-tests/gpu} -q -p no:cacheprovider \
    -o faulthandler_timeout=150 > "$log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|Error|error:|Timeout \(0:|ending the run" "$log" | grep -v "^E  " | sort | uniq | head -40
  echo "== gpu tests at $1 ranks: $(grep -E '[0-9]+ (passed|failed)' "$log" | tail -1)$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  return $rc
}

setup_python
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sort | uniq -c
PROBE_NVCC_FLAGS="-O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a"  # (tests/test_repo.py builds with these)
if [ "$PHASE" = probe ]; then  # NVLink store rates at the MoE push's sizes (a CUDA program of its own: no ops)
  # shellcheck disable=SC2086
  mkdir -p build && nvcc $PROBE_NVCC_FLAGS tools/probe_nvlink_stores.cu -o build/probe_nvlink_stores || exit 1
  rc=0 n=$(( NGPU < NP ? NGPU : NP ))
  for g in $n $([ "$n" -gt 2 ] && echo 2); do build/probe_nvlink_stores "$g" | tee "$OUT/probe_nvlink_stores_$g.txt" || rc=1; done
  exit $rc
fi
make_ops
status=0
case "$PHASE" in
  quick)
    for np in 2 $(( NGPU > 2 ? NGPU : 0 )); do
      [ "$np" -gt 0 ] || continue
      start_mps_if_shared "$np"
      run_tests "$np" || status=1
    done ;;
  tests)
    start_mps_if_shared "$NP"
    run_tests "$NP" || status=1 ;;
  bench)
    start_mps_if_shared "$NP"
    # Each step's timeout is capped by what is left of BENCH_BUDGET_S (since the script started), so the
    # phase ends inside one 10-minute call even when a step hangs; a step with under 30 s left is skipped.
    cap() { local left=$(( ${BENCH_BUDGET_S:-570} - SECONDS )); echo $(( left < $1 ? left : $1 )); }
    OPS=generated:allgather_bf16
    python3 -m tilegen.cli generate tools/bench_specs -o bench_generated -j 32 -q > "$OUT/generate_bench.log" 2>&1 \
      && OPS="$OPS,bench_generated:*" || echo "bench variants did not build: see generate_bench.log"
    t=$(cap 200)
    if [ "$t" -ge 30 ]; then
      timeout "$t" torchrun --nproc-per-node "$NP" tools/bench_allgather.py --ops "$OPS" \
        --out "$OUT/bench_allgather_np$NP.json" > "$OUT/bench_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/bench_np$NP.log"; }
      grep "^graph capture of" "$OUT/bench_np$NP.log" | head -10
      sed -n '/ranks on /,$p' "$OUT/bench_np$NP.log"
    else echo "bench_allgather skipped: ${t}s left of BENCH_BUDGET_S"; status=1; fi
    t=$(cap 300)
    if [ "$t" -ge 30 ]; then  # eager and CUDA-graph replayed (--no-graph: eager only)
      timeout "$t" torchrun --nproc-per-node "$NP" tools/bench_collectives.py --out "$OUT/bench_collectives_np$NP.json" \
        --plot "$OUT/collectives_np$NP.png" > "$OUT/bench_collectives_np$NP.log" 2>&1 \
        || { status=1; tail -30 "$OUT/bench_collectives_np$NP.log"; }
      grep "^graph capture of" "$OUT/bench_collectives_np$NP.log" | head -10
      sed -n '/ranks on /,$p' "$OUT/bench_collectives_np$NP.log"
    else echo "bench_collectives skipped: ${t}s left of BENCH_BUDGET_S"; status=1; fi
    t=$(cap 120)
    if [ "$t" -ge 30 ]; then  # host cost of an eager call: wrapper, binding + launch, NCCL
      timeout "$t" torchrun --nproc-per-node "$NP" tools/bench_host.py --out "$OUT/bench_host_np$NP.json" \
        > "$OUT/bench_host_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/bench_host_np$NP.log"; }
      grep -E "^(host cost|torch.Tensor has|no NCCL)" "$OUT/bench_host_np$NP.log"
    else echo "bench_host skipped: ${t}s left of BENCH_BUDGET_S"; status=1; fi ;;
  coll)  # the collective benchmark (eager + graph) and the host cost only
    start_mps_if_shared "$NP"
    timeout 420 torchrun --nproc-per-node "$NP" tools/bench_collectives.py --out "$OUT/bench_collectives_np$NP.json" \
      ${BENCH_ARGS:-} > "$OUT/bench_collectives_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/bench_collectives_np$NP.log"; }
    sed -n '/ranks on /,$p' "$OUT/bench_collectives_np$NP.log"
    timeout 100 torchrun --nproc-per-node "$NP" tools/bench_host.py --out "$OUT/bench_host_np$NP.json" \
      > "$OUT/bench_host_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/bench_host_np$NP.log"; }
    grep -E "^(host cost|torch.Tensor has)" "$OUT/bench_host_np$NP.log" ;;
  tune)  # measured calibrations of the collective specs (tilegen tune) at N ranks into $OUT/calibration
    start_mps_if_shared "$NP"
    [ -f .prebuilt/tune.tar.xz ] && tar -xJf .prebuilt/tune.tar.xz
    timeout 560 torchrun --nproc-per-node "$NP" -m tilegen.cli tune ${TUNE_SPECS:-specs/allgather_bf16.yaml \
      specs/reduce_scatter_bf16.yaml specs/allreduce_bf16.yaml specs/all_to_all_bf16.yaml specs/broadcast_f32.yaml} \
      -o "$OUT/calibration" > "$OUT/tune_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/tune_np$NP.log"; }
    grep -vE "^\s+skip|Warning|warn" "$OUT/tune_np$NP.log" | tail -80 ;;
  calibrate)  # tune at N ranks, rebuild the collective specs here with the new measurements, then tests + coll
    CAL=tilegen/calibrations/${CALIBRATION_MACHINE:-h100-sxm-nvswitch}
    bash "$0" tune "$NP" || status=1
    cp "$OUT"/calibration/*.json "$CAL"/ && mkdir -p "$OUT/committed" && cp "$CAL"/*.json "$OUT/committed/"
    python3 -m tilegen.cli generate ${TUNE_SPECS:-specs/allgather_bf16.yaml specs/reduce_scatter_bf16.yaml \
      specs/allreduce_bf16.yaml specs/all_to_all_bf16.yaml specs/broadcast_f32.yaml} -o generated -j 64 -q \
      > "$OUT/generate_calibrated.log" 2>&1 || { tail -20 "$OUT/generate_calibrated.log"; exit 1; }
    bash "$0" tests "$NP" || status=1
    bash "$0" coll "$NP" || status=1 ;;
  downstream)  # the downstream example's app from its wheel (carried in .whl/), no LD_LIBRARY_PATH: as users run it
    python3 -c "import tp_app" 2>/dev/null || { echo "tp_app wheel not installed (pip wheel examples/downstream -w .whl)"; exit 1; }
    start_mps_if_shared "$NP"
    env -u LD_LIBRARY_PATH timeout 240 torchrun --nproc-per-node "$NP" -m tp_app > "$OUT/downstream_np$NP.log" 2>&1 \
      || status=1
    grep -E "^(tp_app|allreduce_bf16|mlp_)|Error" "$OUT/downstream_np$NP.log" | head -20 ;;
  gemm)
    start_mps_if_shared "$NP"
    # GEMM_ARGS="--styles all --splits 1,2,3": the copy-engine sweep tools/ce_calibrate.py reads
    timeout 360 torchrun --nproc-per-node "$NP" tools/bench_gemm.py --graph ${GEMM_ARGS:-} --out "$OUT/bench_gemm_np$NP.json" \
      > "$OUT/bench_gemm_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/bench_gemm_np$NP.log"; }
    grep "unavailable\|^graph" "$OUT/bench_gemm_np$NP.log"; sed -n '/^ag_gemm/,$p' "$OUT/bench_gemm_np$NP.log"
    timeout 240 torchrun --nproc-per-node "$NP" examples/tp_mlp.py --graph > "$OUT/tp_mlp_np$NP.log" 2>&1 \
      || { status=1; tail -30 "$OUT/tp_mlp_np$NP.log"; }
    grep "^TP MLP" "$OUT/tp_mlp_np$NP.log" ;;
  moe)  # MoE dispatch/combine: the NCCL baseline checked against tilegen.moe.check's reference, then timed
    start_mps_if_shared "$NP"
    timeout 300 torchrun --nproc-per-node "$NP" tools/bench_moe.py --out "$OUT/bench_moe_np$NP.json" \
      > "$OUT/bench_moe_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/bench_moe_np$NP.log"; }
    grep -E "^(NCCL baseline|normal|low latency|  tilegen|tilegen op)" "$OUT/bench_moe_np$NP.log"
    timeout 200 torchrun --nproc-per-node "$NP" examples/moe_layer.py > "$OUT/moe_layer_np$NP.log" 2>&1 \
      || { status=1; tail -30 "$OUT/moe_layer_np$NP.log"; }
    grep "^MoE layer" "$OUT/moe_layer_np$NP.log" ;;
  moe_ll)  # the decode-sized MoE case alone, then each kernel's time at that size (a quick loop on the latency)
    start_mps_if_shared "$NP"
    timeout 150 torchrun --nproc-per-node "$NP" tools/bench_moe.py --tokens 128 --out "$OUT/bench_moe_ll_np$NP.json" \
      > "$OUT/bench_moe_ll_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/bench_moe_ll_np$NP.log"; }
    grep -E "^(low latency|  tilegen|tilegen op)" "$OUT/bench_moe_ll_np$NP.log"
    for op in moe_bf16_ll moe_bf16_fp8_ll; do  # (in-graph timeline of each kernel)
      timeout 90 torchrun --nproc-per-node "$NP" tools/profile_moe.py --tokens 128 --op $op ${MOE_TRACE:+--trace} \
        > "$OUT/profile_$op.log" 2>&1 || { status=1; tail -20 "$OUT/profile_$op.log"; }
      grep -A6 "in-graph timeline" "$OUT/profile_$op.log"
      grep -A20 "^rank 0: phase stamps" "$OUT/profile_$op.log"  # (MOE_TRACE=1: each CTA's phases, rank 0)
    done ;;
  fused)  # the fused GEMM kernel alone at several tiles vs cuBLAS (tools/fused_specs; prebuilt: .prebuilt/fused.tar.xz)
    start_mps_if_shared "$NP"
    if [ -f .prebuilt/fused.tar.xz ]; then tar -xJf .prebuilt/fused.tar.xz || exit 1
    elif ! python3 -m tilegen.cli generate tools/fused_specs -o fused_generated -j 32 -q > "$OUT/generate_fused.log" 2>&1; then
      tail -20 "$OUT/generate_fused.log"; exit 1; fi
    timeout 300 torchrun --nproc-per-node "$NP" tools/bench_fused_tiles.py --out "$OUT/fused_tiles_np$NP.json" \
      > "$OUT/fused_tiles_np$NP.log" 2>&1 || { status=1; tail -30 "$OUT/fused_tiles_np$NP.log"; }
    grep "tile \[" "$OUT/fused_tiles_np$NP.log" ;;
  ab)  # a script on the base ops (.prebuilt/base.tar.xz: BASE=<rev> tools/pack_prebuilt.sh), on each variant's
       # (.prebuilt/ab_<name>.tar.xz: VARIANTS="<name>=<rev> ...") and on this tree's, in turns, AB_ROUNDS rounds
       # (2; even rounds in reverse order), lines matching AB_GREP printed; AB_SUMMARY='<regex with one group>'
       # (e.g. 'dispatch ([0-9.]+)') ends with each side's min / median / max of that number over every rank
       # and round: bash tools/gpu_check.sh ab N path [args]
    [ -f .prebuilt/base.tar.xz ] || { echo "no .prebuilt/base.tar.xz: BASE=<rev> bash tools/pack_prebuilt.sh"; exit 1; }
    start_mps_if_shared "$NP"
    # ./generated becomes a link to either build (not a path order: `python -m` and `-c` put the working
    # directory first, and the tree's package would shadow the base's unseen)
    ab=/tmp/tilegen-ab
    [ -L generated ] && rm generated && mv "$ab/tree/generated" generated  # (an interrupted earlier run)
    rm -rf "$ab" && mkdir -p "$ab/tree" && sides=""
    for v in .prebuilt/base.tar.xz .prebuilt/ab_*.tar.xz; do  # (ab_*: VARIANTS= of tools/pack_prebuilt.sh)
      [ -f "$v" ] || continue
      name=$(basename "$v" .tar.xz); name=${name#ab_}
      mkdir -p "$ab/$name" && tar -xJf "$v" -C "$ab/$name" || exit 1
      sides="$sides $name"
    done
    mv generated "$ab/tree/generated"
    for round in $(seq "${AB_ROUNDS:-2}"); do
      order="$sides tree"  # (even rounds in reverse: a drift along a round does not favour one side)
      [ $((round % 2)) -eq 0 ] && order=$(echo "$order" | tr ' ' '\n' | tac | tr '\n' ' ')
      for side in $order; do
        ln -sfn "$ab/$side/generated" generated
        log="$OUT/ab_${side}_$round.log"
        timeout "${SCRIPT_TIMEOUT:-120}" torchrun --nproc-per-node "$NP" "${@:3}" > "$log" 2>&1 || { status=1; tail -20 "$log"; }
        echo "== $side, round $round"; grep -E "${AB_GREP:-.}" "$log" | head -"${AB_LINES:-12}"
      done
    done
    rm generated && mv "$ab/tree/generated" generated
    if [ -n "${AB_SUMMARY:-}" ]; then
      echo "== summary of '$AB_SUMMARY' (every rank and round): min / median / max"
      for side in $sides tree; do
        cat "$OUT"/ab_"${side}"_*.log | python3 -c '
import re, statistics, sys
v = [float(m) for m in re.findall(sys.argv[1], sys.stdin.read())]
print(f"  {sys.argv[2]:<12}", f"{min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f} ({len(v)} values)" if v else "no match")
' "$AB_SUMMARY" "$side"
      done
    fi ;;
  sanitize)  # compute-sanitizer over one op of each family, checked calls; every rank's report must be clean
    if [ "$NP" -gt "$NGPU" ]; then  # sanitized kernels of ranks sharing a GPU do not run concurrently: waits never end
      echo "sanitize needs one GPU per rank: $NP ranks, $NGPU GPU(s)"; exit 1
    fi
    for tool in memcheck racecheck; do
      log="$OUT/sanitize_${tool}_np$NP.log"
      timeout "${SANITIZE_TIMEOUT:-280}" torchrun --nproc-per-node "$NP" --no-python compute-sanitizer --tool "$tool" \
        --error-exitcode 9 --print-limit 20 python3 tools/sanitize_ops.py > "$log" 2>&1 || status=1
      echo "== $tool at $NP ranks:"; grep -E "ERROR SUMMARY|sanitize_ops|Error|Timeout" "$log" | sort | uniq -c | head -20
    done ;;
  script)  # any script under torchrun with this environment: bash tools/gpu_check.sh script N path [args]
    start_mps_if_shared "$NP"
    timeout "${SCRIPT_TIMEOUT:-300}" torchrun --nproc-per-node "$NP" "${@:3}" || status=1 ;;
  *) echo "usage: bash tools/gpu_check.sh quick|tests|bench|coll|tune|calibrate|downstream|gemm|moe|moe_ll|probe|fused|sanitize|ab|script [ranks]"
     exit 2 ;;
esac
exit $status
