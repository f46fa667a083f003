#!/usr/bin/env bash
# Nsight Compute on rank 0 only, the other ranks run plainly (they wait for rank 0's replays):
#   bash tools/gpu_check.sh script 2 --no-python bash tools/ncu_rank0.sh KERNEL_REGEX script.py [args]
# A kernel that writes peers is replayed as is (peer memory is not restored): profile idempotent ones.
# NCU_SKIP launches skipped (3), NCU_COUNT profiled (1), NCU_SECTIONS (the set below) to narrow the report,
# NCU_METRICS (comma-separated) added, e.g. the NVLink bytes a peer-storing kernel moved:
#   NCU_SECTIONS=SpeedOfLight NCU_METRICS=nvltx__bytes.sum,nvlrx__bytes.sum,gpu__time_duration.sum
set -u
regex=$1; shift
if [ "${RANK:-0}" = 0 ]; then
  sections=${NCU_SECTIONS:-SpeedOfLight LaunchStats Occupancy WarpStateStats MemoryWorkloadAnalysis SchedulerStats}
  args=()
  for s in $sections; do args+=(--section "$s"); done
  [ -n "${NCU_METRICS:-}" ] && args+=(--metrics "$NCU_METRICS")
  exec ncu --clock-control none --kernel-name "regex:$regex" --launch-skip "${NCU_SKIP:-3}" \
    --launch-count "${NCU_COUNT:-1}" "${args[@]}" python3 "$@"
fi
exec python3 "$@"
