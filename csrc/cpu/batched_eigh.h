// What batched_eigh (batched_eigh.cpp) decides from the CPU it runs on, for build_info.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace ngcuda::cpu {

// The sizes whose warm starts are refined, min_n ≤ n ≤ max_n (empty where the refinement does
// not pay on this CPU); the other warm starts are unused, their matrices solved cold.
// NGCUDA_EIGH_WARM_MIN_N / NGCUDA_EIGH_WARM_MAX_N (read once) override either end.
struct WarmRange {
  int64_t min_n;
  int64_t max_n;
  bool holds(int64_t n) const { return n >= min_n && n <= max_n; }
};
WarmRange warm_range(c10::ScalarType dtype);

}  // namespace ngcuda::cpu
