// tilegen collective op library: what a generated collective <op>.cu includes (allgather,
// reduce_scatter, allreduce, all_to_all, broadcast, reduce): the generic kernel and its host code,
// nothing of the GEMM overlap (no cuBLAS, no copy-engine executor). The <op>.cu defines its traits
// struct Op, then exports the op with TILEGEN_EXPORT_COLLECTIVE(Op). GEMM ops include overlap/op.cuh.
#pragma once
#include "tilegen/collective/host.cuh"
#include "tilegen/collective/kernel.cuh"

#define TILEGEN_EXPORT_COLLECTIVE(OP)                                  \
  extern "C" {                                                         \
  TILEGEN_EXPORT_COLLECTIVE_CALLS(tilegen::coll::Host<OP>)             \
  }
