// The stats types the engine bindings hand to Python (bound in bind_stats.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "apportion/engine.hpp"

namespace apportion::bindings {

/// One model's counters and histograms at one moment, with the model's shape: what
/// `RuntimeCore._model_stats` returns (bound as apportion._core.ModelSnapshot).
struct ModelStatsSnapshot {
  std::string name;
  ModelSnapshot snapshot;
  uint32_t instances = 0;
  std::size_t max_queue = 0;
  uint32_t lane_groups = 0;
  uint64_t moves = 0;
};

}  // namespace apportion::bindings
