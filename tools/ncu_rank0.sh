#!/usr/bin/env bash
# Nsight Compute on rank 0 only, the other ranks run plainly (they wait for rank 0's replays):
#   bash tools/gpu_check.sh script 2 --no-python bash tools/ncu_rank0.sh KERNEL_REGEX script.py [args]
# A kernel that writes peers is replayed as is (peer memory is not restored): profile idempotent ones.
set -u
regex=$1; shift
if [ "${RANK:-0}" = 0 ]; then
  exec ncu --clock-control none --kernel-name "regex:$regex" --launch-skip "${NCU_SKIP:-3}" --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats python3 "$@"
fi
exec python3 "$@"
