// tilegen MoE layer: the byte layout of a MoE op (tilegen/moe's layout, checked there before any op is
// generated): the copy kernels' shapes, a row's pieces, the routing entries, and low-latency mode's
// region and LL128 line rows. Host and device code compute sizes and offsets from these alone.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace tilegen {
namespace moe {

constexpr int kBlockTokens = 32;  // tokens per routing block
constexpr int kWarps = 16;        // warps per CTA of the copy kernels
enum CopyKernel { kPush, kExpand, kSend, kReduce, kLLPush, kLLExpand, kKernels };

// Pieces of a row in a large call: at most ~4 KiB each.
constexpr int pieces_of(int64_t bytes) { return static_cast<int>((bytes + 4095) / 4096); }

template <class Op>
struct Dims {
  static constexpr int kMeta = 1 + 3 * Op::kTopk;  // meta row: token, experts[k], indices[k], weight bits[k]
  static constexpr int64_t kRowBytes = Op::kHidden * static_cast<int64_t>(sizeof(typename Op::Elem));  // x, y
  static constexpr int kVec = 16 / sizeof(typename Op::Elem);  // elements per 16-byte vector
  // fp8 dispatch (Op::kFp8Group > 0): staging and received rows hold e4m3 bytes (x / scale per group
  // of kFp8Group channels, scale = amax / 448), the staging row then its fp32 scales.
  static constexpr bool kFp8 = Op::kFp8Group > 0;
  static constexpr int64_t kGroups = kFp8 ? Op::kHidden / Op::kFp8Group : 0;
  static constexpr int64_t kScaleBytes = (kGroups * 4 + 15) / 16 * 16;
  static constexpr int64_t kOutRowBytes = kFp8 ? Op::kHidden : kRowBytes;  // a received row's payload
  static constexpr int64_t kStageRowBytes = kOutRowBytes + kScaleBytes;     // a staging row
  // What each kernel walks per row (Host::*_cut cut it into pieces, a warp each): the push 16-byte
  // payload vectors or (fp8) steps of 8 channels; the expansion the payload's 16-byte vectors; combine
  // rows of the token dtype, twice an fp8 payload row.
  static constexpr int64_t kPushUnits = kFp8 ? Op::kHidden / 8 : kOutRowBytes / 16;
  static constexpr int64_t kExpandUnits = kOutRowBytes / 16, kCombineUnits = kRowBytes / 16;
  // Pieces of a row in a large call (fp8 push: whole tokens, per-token scales)
  static constexpr int kPushPieces = kFp8 ? 1 : pieces_of(kOutRowBytes);
  static constexpr int kExpandPieces = pieces_of(kOutRowBytes), kCombinePieces = pieces_of(kRowBytes);
};

// A row of `units` work units in pieces of `per` units, one warp each, sized on the host per call
// (Host::cut_for): a decode-sized call is latency-bound and wants every warp's stores in flight.
struct Cut {
  int pieces;
  int64_t per, units;
  __host__ __device__ int64_t lo(int ch) const { return ch * per; }
  __host__ __device__ int64_t hi(int ch) const { return (ch + 1) * per < units ? (ch + 1) * per : units; }
};

// Expert id of routing entry i; ids outside [0, experts) count as dropped (-1) everywhere, so a bad
// routing that skipped the caller's check cannot write outside any buffer.
__device__ __forceinline__ int load_expert(const void* idx, int64_t i, int idx64, int experts) {
  const int64_t e = idx64 ? static_cast<const int64_t*>(idx)[i] : static_cast<const int32_t*>(idx)[i];
  return e >= 0 && e < experts ? static_cast<int>(e) : -1;
}

struct LLLayout {  // byte offsets in a rank's low-latency region
  int64_t out, scales, handle, slot_rows, stage_src, stage_w, counts, ntok, lines, heads, bytes;
};
template <class P>
__device__ __host__ __forceinline__ P* at(char* base, int64_t off) {
  return reinterpret_cast<P*>(base + off);
}

// A line row: the data bytes (meta: token, pad, slot rows there, weights, as int32 / fp32 (K rounded up
// to even); fp8 scales (groups rounded up to even); the payload row) in 128-byte lines of 120 data bytes
// and the call's epoch (dev::ll128_load), whole warp stores of 4 lines (the lines past the data are not
// sent). A head: rows sent, pad, counts per local expert (at most the experts), the same way.
constexpr int kLineBytes = 128, kLineData = 120;
template <class Op>
struct LLLines {
  using D = Dims<Op>;
  static constexpr int kK2 = (Op::kTopk + 1) / 2 * 2;
  static constexpr int64_t kMetaBytes = 4 * (2 + 2 * kK2);
  static constexpr int64_t kPayloadAt = kMetaBytes + 4 * ((D::kGroups + 1) / 2 * 2);
  static constexpr int64_t kData = kPayloadAt + D::kOutRowBytes;
  static constexpr int64_t kLines = (kData + kLineData - 1) / kLineData;
  static constexpr int64_t kUnits = (kLines + 3) / 4;  // warp stores
  static constexpr int64_t kRowBytes = kUnits * 4 * kLineBytes;
  static constexpr int64_t kHeadData = 4 * (2 + Op::kExperts);
  static constexpr int64_t kHeadLines = (kHeadData + kLineData - 1) / kLineData;
  static constexpr int64_t kHeadBytes = (kHeadLines + 3) / 4 * 4 * kLineBytes;
  static_assert(kMetaBytes <= 4 * kLineData, "a row's meta lies in its first warp store (every copying warp reads it)");
};
// Lane's 16 bytes of warp store u: line 4u + lane / 8, at data byte line * 120 + (lane % 8) * 16 (the
// line's last lane: 8 data bytes, then the epoch).
__device__ __forceinline__ int64_t line_of(int64_t u, int lane) { return u * 4 + (lane >> 3); }
__device__ __forceinline__ int64_t line_data_at(int64_t u, int lane) { return line_of(u, lane) * kLineData + (lane & 7) * 16; }
__device__ __forceinline__ int64_t line_byte_at(int64_t u, int lane) { return line_of(u, lane) * kLineBytes + (lane & 7) * 16; }
__device__ __forceinline__ bool epoch_lane(int lane) { return (lane & 7) == 7; }
// Int32 i of the data of a warp store 0 the warp loaded (a, b: each lane's 16 bytes), to every lane (i
// the same in every lane: a lane sends the word its own i names).
__device__ __forceinline__ int32_t line_int(uint64_t a, uint64_t b, int i) {
  const int byte = 4 * i, in_line = byte % kLineData, from = byte / kLineData * 8 + in_line / 16;
  const int word = in_line % 16 / 4;
  const uint64_t v = word < 2 ? a : b;
  return static_cast<int32_t>(__shfl_sync(0xffffffffu, static_cast<uint32_t>(word & 1 ? v >> 32 : v), from));
}

}  // namespace moe
}  // namespace tilegen
