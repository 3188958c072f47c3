// One chunk (4 columns) of the 2:4 format (csrc/sparse24.h) on CPU: its code's
// two positions, and the positions pack picks for a chunk's 4 mask bytes.
// Shared by the driver (sparse24.cpp, which names the first bad chunk in its
// error) and the per-ISA conversion loops (sparse24_tile_impl.h).
//
// Everything is in an anonymous namespace: the isa_*.cpp files include this
// under their target pragmas, and an inline function with external linkage
// compiled there could be the copy the linker keeps for the baseline code too
// (isa_prelude.h explains). Internal linkage gives every translation unit its own.
#pragma once

#include <algorithm>
#include <cstdint>

namespace multiflow::cpu {
namespace {

// A chunk's 4-bit code: the position of its first value in bits 0-1, the
// second in bits 2-3.
inline int first_position(uint32_t code) {
  return static_cast<int>(code & 3u);
}
inline int second_position(uint32_t code) {
  return static_cast<int>((code >> 2) & 3u);
}

// For each 4-bit keep pattern of a chunk (bit p: position p kept): the code of
// its two positions, the kept ones and then the lowest unused, in increasing
// order; valid when it keeps at most 2.
struct ChunkPick {
  uint8_t code;
  bool valid;
};

struct ChunkPicks {
  ChunkPick pick[16];
};

constexpr ChunkPicks make_chunk_picks() {
  ChunkPicks t{};
  for (uint32_t keep = 0; keep < 16; ++keep) {
    int positions[4] = {};
    int n = 0;
    for (int p = 0; p < 4; ++p) {
      if ((keep >> p) & 1u) {
        positions[n++] = p;
      }
    }
    t.pick[keep].valid = n <= 2;
    for (int p = 0; p < 4 && n < 2; ++p) {
      if (!((keep >> p) & 1u)) {
        positions[n++] = p;
      }
    }
    const int lo = std::min(positions[0], positions[1]);
    const int hi = std::max(positions[0], positions[1]);
    t.pick[keep].code = static_cast<uint8_t>(lo | (hi << 2));
  }
  return t;
}

constexpr ChunkPicks kChunkPicks = make_chunk_picks();

// The mask is read as bytes: a bool byte other than 0 / 1 (a tensor viewed as bool) counts
// as true, as in pack_mask and the CUDA kernel, and never indexes past the 16-entry table.
inline uint32_t keep_pattern(const uint8_t* m) {
  return (m[0] != 0 ? 1u : 0u) | (m[1] != 0 ? 2u : 0u) | (m[2] != 0 ? 4u : 0u) | (m[3] != 0 ? 8u : 0u);
}

}  // namespace
}  // namespace multiflow::cpu
